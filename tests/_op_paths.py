"""Run a fused op's call on both of its paths: the eager ``autograd.Function`` (plain tensors, nothing tracing) and
its ``torch.library`` custom op, which tracing (torch.compile, make_fx, FakeTensorMode) gets. A pass-through
TorchDispatchMode stands in for tracing: with one active, :func:`stop_kernels.backends.custom_op_bypass_ok` is
False, so the op dispatches as under a tracer while computing on real tensors."""
import contextlib

from torch.utils._python_dispatch import TorchDispatchMode


class PassThrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def on_both_paths(call):
    """``[call(), call()]``: the first on the eager path, the second under :class:`PassThrough` (the custom op);
    ``call`` runs the forward and its backward and returns what to compare."""
    results = []
    for mode in (contextlib.nullcontext(), PassThrough()):
        with mode:
            results.append(call())
    return results


def assert_same_results(first, second, names, scattered=("pos_embed",)):
    """The two paths' results (tensors or None, named by ``names``) are equal bit for bit, save the gradients
    scatter-added with ``index_add_`` (``scattered``): on CUDA its fp32 atomics add the rows in arrival order, so
    even two calls of one path differ in the last bits (GPU run 7: dψ at the ViT-H sizes). Those are held to
    fp32 rounding of the sums instead, and to bit equality under ``torch.use_deterministic_algorithms``."""
    import torch
    for name, a, b in zip(names, first, second, strict=True):
        assert (a is None) == (b is None), name
        if a is None:
            continue
        if name in scattered and a.is_cuda and not torch.are_deterministic_algorithms_enabled():
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
        else:
            assert torch.equal(a, b), name


@contextlib.contextmanager
def deterministic_algorithms(on: bool, monkeypatch):
    """``torch.use_deterministic_algorithms(on)`` for the block, the previous setting restored after. cuBLAS
    refuses the mode unless ``CUBLAS_WORKSPACE_CONFIG`` names a fixed workspace, so it is set for the block too."""
    import torch
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if on:
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
