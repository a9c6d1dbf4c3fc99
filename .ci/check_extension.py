"""Load the CUDA extension that .ci/compile_csrc.sh compiled and linked, on a machine without a GPU, and check
the contract the CPU tests rely on.

    python .ci/check_extension.py PATH/_C.so

* the library loads: every symbol resolves, and each ``m.impl`` of bindings.cpp matches the schema its
  ``m.def`` declares (torch compares them when the library registers, at load);
* the ops are ``stop_kernels_cuda.{stop_embed_fwd, stop_embed_bwd, stop_noise}`` and their argument names are,
  in order, those of the twin ops in ``tests/test_cuda_backend.py`` (``_TwinOps``) that the CPU tests run in
  their place: were the C++ to differ, those tests would prove nothing about it;
* the Python fakes of ``stop_kernels/ops/cuda_backend.py`` give the ops' output shapes under FakeTensorMode
  (what torch.compile traces).
Exit status 1 with the reason on any failure.
"""
import importlib.util
import inspect
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OPS = ("stop_embed_fwd", "stop_embed_bwd", "stop_noise")


def load(path: str):
    spec = importlib.util.spec_from_file_location("_C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def schema_args(op: str):
    return [a.name for a in getattr(torch.ops.stop_kernels_cuda, op).default._schema.arguments]


def twin_args():
    sys.path.insert(0, str(ROOT / "tests"))
    from test_cuda_backend import _TwinOps  # noqa: PLC0415  (the stand-in the CPU tests run)
    return {op: list(inspect.signature(getattr(_TwinOps, op)).parameters)[1:] for op in OPS}


def main(path: str) -> int:
    module = load(path)
    if tuple(module.OPS) != OPS:
        return fail(f"the extension registers {module.OPS}, expected {OPS}")
    from stop_kernels.ops import cuda_backend as cb
    cb.use_module(module)  # registers the fakes, as an installed extension would
    for op, twin in twin_args().items():
        got = schema_args(op)
        if got != twin:
            return fail(f"stop_kernels_cuda::{op} takes {got}, the twin of tests/test_cuda_backend.py {twin}")
    from torch._subclasses.fake_tensor import FakeTensorMode
    ns = torch.ops.stop_kernels_cuda
    with FakeTensorMode():
        pos, w = torch.empty(5, 8, device="cuda"), torch.empty(8, 12, device="cuda")
        idx, g = torch.empty(10, dtype=torch.long, device="cuda"), torch.empty(10, 8, device="cuda")
        out = ns.stop_embed_fwd(pos, idx, w, None, 1, 0.5)
        dw, db, dp = ns.stop_embed_bwd(g, idx, 5, 12, 1, 0.5, True, True, True)
        shapes = [tuple(t.shape) for t in (out, dw, db, dp)]
    if shapes != [(10, 8), (8, 12), (8,), (5, 8)]:
        return fail(f"fake shapes {shapes}")
    for op in OPS:
        print(f"  {getattr(ns, op).default._schema}")
    print("check_extension: the extension loads; schemas, twin and fakes agree")
    return 0


def fail(why: str) -> int:
    print(f"check_extension: FAILED: {why}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
