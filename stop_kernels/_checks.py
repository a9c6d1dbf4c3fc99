"""Argument validation shared by every public function.

Each check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape, range or
value) with a message that names the argument and says what was expected, so a user sees
``ValueError: idx: values must lie in [0, 256) (pos_embed has 256 rows), got 300`` rather than
a CUDA assert or a silently wrong result.
"""
from __future__ import annotations

import contextlib
import numbers
from typing import Iterable, Iterator, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def tensor(name: str, t, *, ndim: Optional[int] = None, min_ndim: Optional[int] = None,
           dtypes: Optional[Sequence[torch.dtype]] = None) -> torch.Tensor:
    """Check that ``t`` is a tensor of the given rank and dtype; return it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    return t


def float_tensor(name: str, t, **kw) -> torch.Tensor:
    return tensor(name, t, dtypes=FLOAT_DTYPES, **kw)


def position_table(name: str, t) -> torch.Tensor:
    """A ``[P, D]`` floating position table; the official code's ``[1, P, D]`` parameter gets the hint to pass
    ``t[0]`` (a view: gradients still reach it)."""
    if isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[0] == 1:
        raise ValueError(f"{name}: expected the [P, D] table, got shape {tuple(t.shape)}; for the official code's "
                         f"[1, P, D] parameter pass {name}[0]")
    return float_tensor(name, t, ndim=2)


def eager_under_compile(fn):
    """``fn`` for calls that must run eagerly inside ``torch.compile``'d code (a seed drawn from a generator,
    data-dependent checks): traced, it is called through ``torch.compiler.disable`` (one graph break); in
    eager mode directly, since the disable wrapper costs a few µs per call."""
    import functools
    disabled = torch.compiler.disable(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return (disabled if torch.compiler.is_compiling() else fn)(*args, **kwargs)
    return call


_DEVICE_RANGE_CHECKS = True


@contextlib.contextmanager
def trusted_device_indices() -> Iterator[None]:
    """Skip the value-range check of index tensors that live on an accelerator.

    Checking ``0 <= idx < upper`` on a GPU tensor reads its min and max back to the host: a device
    synchronisation that stalls the CPU's queue of kernels. A training loop that validated its
    masks on the host before moving them (as :mod:`stop_kernels.training` does) wraps its step in
    this context; shapes, dtypes and devices are still checked. CPU tensors are always checked.
    """
    global _DEVICE_RANGE_CHECKS
    old, _DEVICE_RANGE_CHECKS = _DEVICE_RANGE_CHECKS, False
    try:
        yield
    finally:
        _DEVICE_RANGE_CHECKS = old


def index_tensor(name: str, t, *, upper: int, what: str = "", **kw) -> torch.Tensor:
    """Check an integer index tensor whose values must lie in [0, upper)."""
    tensor(name, t, dtypes=INDEX_DTYPES, **kw)
    return index_range(name, t, upper=upper, what=what)


def index_range(name: str, t: torch.Tensor, *, upper: int, what: str = "") -> torch.Tensor:
    """The value part of :func:`index_tensor` (``t`` already checked as an index tensor): ``0 <= t < upper``,
    read back to the host for CPU tensors always and for device tensors unless :func:`trusted_device_indices`.
    Not while torch.compile traces: the values are data the graph cannot read without a break per check (and
    ``fullgraph=True`` or ``torch.export`` refused the model); the indexing ops themselves still fail on a
    wrong index."""
    if t.numel() > 0 and (_DEVICE_RANGE_CHECKS or t.device.type == "cpu") and t.device.type != "meta" \
            and not torch.compiler.is_compiling():
        values = t
        if torch._C._are_functorch_transforms_active():
            # inside torch.func.vmap the tensor is a per-sample view whose min() is batched and int() refuses
            # it (vmap's ".item()" error): check the wrapped tensor, every sample's values at once
            while torch._C._functorch.is_functorch_wrapped_tensor(values):
                values = torch._C._functorch.get_unwrapped(values)
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= upper:
            bad = lo if lo < 0 else hi
            extra = f" ({what})" if what else ""
            raise ValueError(f"{name}: values must lie in [0, {upper}){extra}, got {bad}")
    return t


def signature(values) -> Optional[tuple]:
    """Hashable metadata of ``values`` (a tuple) for remembering checks that read nothing else: a tensor's
    type, shape, strides, dtype and device; a list or tuple element-wise; None, str, bool, int and float as they
    are. None when a value is of any other kind (such a call is always checked in full)."""
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append((type(v), v.shape, v.stride(), v.dtype, v.device))
        elif isinstance(v, (list, tuple)):
            sub = signature(v)
            if sub is None:
                return None
            out.append((type(v), sub))
        elif v is None or isinstance(v, (str, bool, int, float)):
            out.append((type(v), v))
        else:
            return None
    return tuple(out)


class CheckedSignatures:
    """The signatures (:func:`signature`) of argument sets that passed a metadata-only check, so a call repeating
    one (every training step repeats a handful) skips the check's Python, tens of microseconds of host time
    per call. Bounded: cleared past ``limit`` entries. Not used while tracing or inside functorch transforms,
    whose wrapped tensors' metadata is per sample."""

    def __init__(self, limit: int = 512):
        self.limit, self.seen = limit, set()

    def key(self, values) -> Optional[tuple]:
        """The signature of ``values``, or None where it cannot stand in for the check (traced code never
        reads or fills the set)."""
        if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
            return None
        return signature(values)

    def add(self, key: Optional[tuple]) -> None:
        if key is None:
            return
        if len(self.seen) >= self.limit:
            self.seen.clear()
        self.seen.add(key)

    def __contains__(self, key) -> bool:
        return key is not None and key in self.seen


def same_device(**named: Optional[torch.Tensor]) -> torch.device:
    """All given tensors (None skipped) live on one device; return it."""
    items = [(k, v) for k, v in named.items() if v is not None]
    dev = items[0][1].device
    for k, v in items[1:]:
        if v.device != dev:
            raise ValueError(f"{k}: expected device {dev} (that of {items[0][0]}), got {v.device}")
    return dev


def dim_equals(name: str, t: torch.Tensor, dim: int, expected: int, why: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(f"{name}: expected size {expected} at dim {dim} ({why}), got shape {tuple(t.shape)}")


def projection_weight(name: str, w: torch.Tensor, D: int, D_from: str, *, E: Optional[int] = None,
                      E_from: str = "", bias: Optional[torch.Tensor] = None) -> None:
    """The ``[D, E]`` weight ``w`` of a projection ``x·wᵀ`` (as ``nn.Linear(E, D).weight`` holds it), already a 2-D
    tensor, against the width ``D`` that the argument ``D_from`` fixes (and ``E`` that ``E_from`` fixes, when
    given; ``bias``: the projection's ``[D]`` bias, when given, already 1-D). Raises ``ValueError`` naming ``name``
    and the expected shape when ``w`` is the argument at fault: its E is not ``E``; or its D is not ``D`` while
    ``bias`` agrees with ``D`` or, without a bias, its dims are swapped (``[E, D]``: ``proj.weight.t()`` by
    mistake), said in the message. Any other D mismatch is left to the caller's check of ``D_from`` (whose
    argument is then the odd one out). The check of shapes only: a strided weight of the right shape is fine."""
    d, e = w.shape
    swapped = d != D and e == D and (E is None or d == E)
    wrong_d = d != D and (bias.shape[0] == D if bias is not None else swapped)
    if wrong_d or (E is not None and e != E):
        where = f"D = {D_from}" + (f", E = {E_from}" if E is not None else "")
        hint = ("; it looks transposed ([E, D]): pass the weight as nn.Linear(E, D) holds it, e.g. proj.weight, "
                "not proj.weight.t()") if swapped else ""
        raise ValueError(f"{name}: expected shape [D, E] = [{D}, {E if E is not None else 'E'}] ({where}), got "
                         f"shape {tuple(w.shape)}{hint}")


def packed_offsets(name: str, offsets: Sequence[int], total: int) -> int:
    """Offsets ``[n + 1]`` of packed sequences (a ``cu_seqlens`` read back to the host) start at 0, never
    decrease and end at the token count ``total`` (``q.shape[0]``); return the longest sequence (0 with none).
    The one value check of the attention kernels' wrapper and of its reference twin."""
    offsets = list(offsets)
    if not offsets:
        raise ValueError(f"{name}: expected at least one element ([n + 1] offsets), got 0")
    if offsets[0] != 0:
        raise ValueError(f"{name}: must start at 0, got {offsets[0]}")
    if offsets[-1] != total:
        raise ValueError(f"{name}: must end at the token count T = {total} (q.shape[0]), got {offsets[-1]}")
    lens = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
    if any(n < 0 for n in lens):
        raise ValueError(f"{name}: must be non-decreasing, got {offsets if len(offsets) <= 16 else offsets[:16]}")
    return max(lens) if lens else 0


def read_json(path: str, what: str):
    """The JSON value in file ``path``; a file that is not JSON raises ``ValueError`` naming ``what``."""
    import json
    try:
        with open(path) as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: {path} is not JSON ({e.msg} at line {e.lineno})") from None


def write_atomic(path: str, write, mode: str = "wb") -> None:
    """Call ``write(fh)`` on a temporary file of its own in ``path``'s folder, flush it to disk, then rename
    it over ``path``: a crash leaves either the previous file or the new one, never a torn one, and two
    writers of the same path never share a temporary file. The file gets the mode ``open()`` gives (0666
    less the umask), as readable as the DCP shards beside it in a shared ``--out``."""
    import os
    import secrets
    folder, base = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    while True:  # O_EXCL: a name of its own. Not mkstemp: its 0600 would hide the file from the other users,
        # and reading the umask to widen it means setting it, a race with every other thread creating files
        tmp = os.path.join(folder, f"{base}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str, obj, default=None) -> None:
    """``obj`` as JSON at ``path``, written atomically (:func:`write_atomic`); ``default`` as ``json.dump``'s."""
    import json
    write_atomic(path, lambda fh: json.dump(obj, fh, indent=1, default=default), mode="w")


# Rows one StoP call may draw (positions of stop_embed, masked tokens of the predictor input): the Philox row counter
# is 32-bit, and the Triton kernels index rows in int32 (a last row block past 2**31 would wrap); the margin covers
# the largest row block. Every backend refuses more.
MAX_NOISE_ROWS = 2 ** 31 - 2 ** 16


# The widest D or E the StoP kernels launch for. Their grids put column tiles on grid.y, which CUDA caps at 65535:
# the Triton kernels' narrowest tiles (32 columns of E or D in quarter-width blocks of 8) reach it past 2**21, the
# CUDA extension's (256 columns of D) past 2**24; past the cap a launch fails with "invalid configuration
# argument", which names nothing. Every backend refuses wider W here, far above any ViT (D, E ≤ 8192).
MAX_KERNEL_WIDTH = 2 ** 20


def kernel_widths(weight) -> None:
    """``weight`` ``[D, E]``: both at most :data:`MAX_KERNEL_WIDTH` (``ValueError`` naming it)."""
    if max(weight.shape) > MAX_KERNEL_WIDTH:
        raise ValueError(f"weight: D and E at most 2**20 = {MAX_KERNEL_WIDTH} (the kernels' launch grids tile them on "
                         f"CUDA's grid.y, capped at 65535 blocks), got shape {tuple(weight.shape)}")


def kernel_sizes(rows_name: str, rows: int, what: str, weight) -> None:
    """The StoP ops' size limits (``ValueError`` naming the argument): at most :data:`MAX_NOISE_ROWS` rows (``what``
    they are), a W the Triton kernels can address with int32 offsets (fewer than 2**31 elements) and
    :func:`kernel_widths`."""
    if rows > MAX_NOISE_ROWS:
        raise ValueError(f"{rows_name}: at most {MAX_NOISE_ROWS} {what} per call (2**31 - 2**16: the kernels count "
                         f"rows in 32 bits), got {rows}; split the call")
    if weight.numel() >= 2 ** 31:
        raise ValueError(f"weight: at most 2**31 - 1 elements (the kernels address it in 32 bits), got shape "
                         f"{tuple(weight.shape)}")
    kernel_widths(weight)


def is_int(v) -> bool:
    """An int and not a bool (``True`` is an int in Python, never a size)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    """A real number (numpy scalars too) and not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def int_at_least(name: str, value, lo: int) -> int:
    """An int (not a bool, not 2.5) >= ``lo``."""
    if not is_int(value):
        raise TypeError(f"{name}: expected an integer, got {value!r}")
    if value < lo:
        raise ValueError(f"{name}: expected an integer >= {lo}, got {value}")
    return value


def non_negative(name: str, value: float) -> float:
    """A finite real number >= 0 (numpy scalars too), as a Python float."""
    if not is_number(value):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if not 0 <= value < float("inf"):  # also rejects NaN
        raise ValueError(f"{name}: expected a finite value >= 0, got {value}")
    try:
        return float(value)
    except OverflowError:  # an int or Fraction beyond a float's range passes the comparison above
        raise ValueError(f"{name}: expected a finite value >= 0, got one beyond a float's range "
                         f"({str(value)[:40]}...)") from None


def choice(name: str, value, options: Iterable) -> None:
    options = tuple(options)
    if value not in options:
        raise ValueError(f"{name}: expected one of {options}, got {value!r}")


def run_command(main, prog: str) -> None:
    """Run a command-line ``main()`` and exit with its status. A user error that reaches it (``ValueError``:
    a bad argument, named by the checks above; ``OSError``: a missing or unwritable file) is one line,
    ``<prog>: error: ...``, and status 2 (argparse's usage status), not a traceback; ``main`` itself keeps
    raising, for callers and tests."""
    import sys
    try:
        status = main()
    except (OSError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        status = 2
    sys.exit(status)


# the device types autocast knows, read once here: torch 2.11's Dynamo cannot trace is_autocast_available, and
# is_autocast_enabled raises for the others (meta tensors: shape inference)
_AUTOCAST_DEVICES = frozenset(d for d in ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "mtia")
                              if torch.amp.is_autocast_available(d))


def autocast_on(device_type: str) -> bool:
    """Autocast is enabled for ``device_type`` (False for a device autocast does not know, e.g. meta)."""
    return device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type)
