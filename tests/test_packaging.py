"""The package as pip builds it (``pip install .``, a wheel), not only the source checkout that ``pip install -e``
points at: every module folder is a package (setup.py's ``find_packages`` leaves out a folder without
``__init__.py``: the training stack once was one), and the built package carries the recipes, so
``--model vit_h`` finds ``configs/vit_h14_224.yaml`` outside a checkout."""
import filecmp
import os
import subprocess
import sys

import pytest

from _train_helpers import REPO


def test_every_module_folder_is_a_package():
    setuptools = pytest.importorskip("setuptools", reason="setuptools (setup.py's find_packages) is not installed")
    folders = sorted({os.path.relpath(root, REPO).replace(os.sep, ".")
                      for root, _, files in os.walk(REPO / "stop_kernels")
                      if "__pycache__" not in root and any(f.endswith(".py") for f in files)})
    assert "stop_kernels.training" in folders
    missing = [f for f in folders if not (REPO / f.replace(".", os.sep) / "__init__.py").is_file()]
    assert not missing, f"folders without __init__.py (left out of a built package): {missing}"
    assert sorted(setuptools.find_packages(str(REPO), include=["stop_kernels", "stop_kernels.*"])) == folders


def test_built_package_carries_the_recipes(tmp_path):
    pytest.importorskip("setuptools", reason="setuptools (setup.py build_py) is not installed")
    lib = tmp_path / "lib"
    env = dict(os.environ, STOP_KERNELS_NO_CUDA="1")  # the pure-Python build: no CUDA probing
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(lib)], cwd=REPO, env=env, check=True,
                   capture_output=True, text=True)
    # run from another folder, setuptools would find no package there: setup.py refuses, saying where to run it
    other = subprocess.run([sys.executable, str(REPO / "setup.py"), "-q", "build_py", "-d", str(tmp_path / "x")],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
    assert other.returncode != 0 and f"run it from its own folder: cd {REPO}" in other.stderr, other.stderr
    assert not (tmp_path / "x").exists()
    recipes = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    assert recipes and sorted(os.listdir(lib / "stop_kernels" / "configs")) == recipes
    assert all(filecmp.cmp(REPO / "configs" / n, lib / "stop_kernels" / "configs" / n, shallow=False) for n in recipes)
    # the built package alone, outside the checkout: the training stack imports, the recipe is found there
    code = ("import stop_kernels, stop_kernels.training.loop\n"
            "from stop_kernels.training.config import CONFIG_DIR, parse_config\n"
            "cfg = parse_config(['--model', 'vit_h'])\n"
            "print(stop_kernels.__file__, CONFIG_DIR, cfg.patch_size, cfg.noise_std, cfg.batch_size, sep='\\n')")
    env = dict(os.environ, PYTHONPATH=str(lib))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True,
                         text=True).stdout.split()
    assert out[0].startswith(str(lib)) and out[1] == str(lib / "stop_kernels" / "configs")
    assert out[2:] == ["14", "0.2", "2048"]
