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
