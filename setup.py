"""Install stop_kernels; build the CUDA extension stop_kernels._C when the machine can.

The extension (every csrc/*.cu and csrc/*.cpp) is built when torch has CUDA, nvcc is found, and
either a GPU is visible or TORCH_CUDA_ARCH_LIST names the targets (defaults to the visible GPU's
architecture: sm_90 on Hopper); it is built for the targets of compute capability 8.0 or newer only
(the kernels need bf16/tf32 tensor cores). Otherwise the pure-Python package is installed and one line
says why. STOP_KERNELS_NO_CUDA=1 skips the build on purpose.
"""
import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


HERE = os.path.dirname(os.path.abspath(__file__))
# setuptools finds the packages and the extension's sources from the working directory (and refuses absolute
# source paths): run from elsewhere, it would build a package without its modules. pip and PEP 517 builds run here.
# (Changing into this folder instead would move every relative path on the command line, such as `-d dist`.)
if os.path.realpath(os.getcwd()) != os.path.realpath(HERE):
    sys.exit(f"setup.py: run it from its own folder: cd {os.path.realpath(HERE)} && python setup.py ... "
             f"(or pip install {os.path.realpath(HERE)})")
# The kernels need bf16 / tf32 tensor cores (WMMA, sm_80+): nvcc stops at wmma::precision::tf32 for an older
# target (csrc/stop_common.cuh), and the launchers refuse older GPUs at run time anyway.
MIN_CAPABILITY = (8, 0)
PRE_SM80_NAMES = ("Kepler", "Maxwell", "Pascal", "Volta", "Turing")  # torch's named targets below 8.0


def sm80_arch_list(arch_list, capabilities):
    """Split the build targets into (kept, dropped): kept those of compute capability >= 8.0.

    ``arch_list`` is TORCH_CUDA_ARCH_LIST (entries separated by ';' or spaces: "7.5", "9.0a", "8.6+PTX" or torch's
    names such as "Ampere"); when it is unset, empty or "native" the targets are the visible GPUs'
    ``capabilities``, (major, minor) pairs, as torch.utils.cpp_extension picks them.
    """
    if arch_list and arch_list.strip() != "native":
        archs = [a for a in re.split(r"[;\s]+", arch_list.strip()) if a]
    else:
        archs = [f"{major}.{minor}" for major, minor in capabilities]

    def new_enough(arch):
        m = re.match(r"(\d+)\.(\d+)", arch)
        if m:
            return (int(m.group(1)), int(m.group(2))) >= MIN_CAPABILITY
        return not arch.startswith(PRE_SM80_NAMES)
    return [a for a in archs if new_enough(a)], [a for a in archs if not new_enough(a)]


def nvcc_major_mismatch(cuda_home, torch_cuda):
    """Why the extension cannot be built with CUDA_HOME's nvcc for a torch built with CUDA ``torch_cuda``
    ("13.0"), or None. torch's BuildExtension refuses another major version with a RuntimeError (a system
    nvcc 12.x beside a cu13x wheel is common), which would fail the install instead of skipping the extension."""
    import subprocess
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None  # torch's own check decides
    found = re.search(r"release (\d+)\.(\d+)", text)
    if found is None or found.group(1) == torch_cuda.split(".")[0]:
        return None
    return (f"{nvcc} is CUDA {found.group(1)}.{found.group(2)} but torch was built with CUDA {torch_cuda} (the "
            f"major versions must match; point CUDA_HOME at a CUDA {torch_cuda.split('.')[0]}.x toolkit)")


def cuda_extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    if os.environ.get("STOP_KERNELS_NO_CUDA") == "1":
        return [], {}, "STOP_KERNELS_NO_CUDA=1"
    if not sources:
        return [], {}, "csrc/ has no sources"
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and os.path.isdir("/usr/local/cuda/include"):
        # an nvcc wrapper script on PATH would otherwise make torch guess a CUDA_HOME without headers
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}, "torch is not installed yet"
    if torch.version.cuda is None:
        return [], {}, "this torch has no CUDA"
    if CUDA_HOME is None or shutil.which("nvcc") is None and not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return [], {}, "nvcc not found"
    mismatch = nvcc_major_mismatch(CUDA_HOME, torch.version.cuda)
    if mismatch:  # torch's BuildExtension would raise on it and fail the whole install
        return [], {}, mismatch
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return [], {}, "no GPU visible and TORCH_CUDA_ARCH_LIST unset"
    # A pre-sm_80 target (a T4 / V100 machine, or a container's TORCH_CUDA_ARCH_LIST such as
    # "7.0 7.5 8.0 8.6 9.0+PTX") would fail the whole install at the first nvcc call: build for the
    # sm_80+ targets only, or not at all when there is none.
    caps = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    kept, dropped = sm80_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"), caps)
    if not kept:
        return [], {}, (f"no build target of compute capability 8.0 or newer (bf16/tf32 tensor cores), got "
                        f"{';'.join(dropped) or 'none'}")
    if dropped:
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(kept)
        print(f"stop_kernels: building the CUDA extension for {';'.join(kept)} only (compute capability < 8.0 "
              f"dropped: {';'.join(dropped)})", file=sys.stderr)
    # torch picks the C++ standard itself (C++20 from torch 2.10 on); no fast-math: the noise
    # stream needs IEEE logf/sqrtf/sincospif to match the Triton kernels and the NumPy twin
    ext = CUDAExtension(
        name="stop_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}, None


class BuildPyWithRecipes(build_py):
    """Also copy the recipes (configs/*.yaml, at the repository root for `--config configs/...`) into the
    built package as stop_kernels/configs/, where `--model vit_h` finds them when the package is installed
    from a wheel instead of a source checkout."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "stop_kernels", "configs")
        self.mkpath(target)
        for path in sorted(glob.glob(os.path.join(HERE, "configs", "*.yaml"))):
            self.copy_file(path, os.path.join(target, os.path.basename(path)))


ext_modules, cmdclass, why_not = cuda_extensions()
cmdclass = dict(cmdclass, build_py=BuildPyWithRecipes)
if why_not and any(cmd in sys.argv for cmd in ("install", "develop", "build_ext", "bdist_wheel", "editable_wheel")):
    print(f"stop_kernels: building without the CUDA extension ({why_not}); Triton and reference backends only",
          file=sys.stderr)

setup(
    name="stop_kernels",
    version="0.1.0",
    description="Fused Triton/CUDA kernels and an FSDP training pipeline for I-JEPA with Stochastic Positional Embeddings",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["stop_kernels", "stop_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "triton>=3.2", "numpy", "torchvision", "pyyaml"],
    extras_require={
        "dev": ["pytest>=7.3", "pytest-benchmark", "hypothesis", "safetensors", "matplotlib"],
        "xformers": ["xformers"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
