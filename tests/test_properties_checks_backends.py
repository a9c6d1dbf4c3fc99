"""Property-based tests (hypothesis) of the argument checks, the backend selection and the plots' pure functions.

Contracts: ``stop_kernels/_checks.py`` (module docstring: a check raises ``TypeError`` for a wrong kind or dtype and
``ValueError`` for a wrong shape, range or value, with a message that starts with the argument's name; each
function's docstring for its rule; good input comes back unchanged, the same object; ``write_atomic``: a write
interrupted at any file operation leaves the previous file or the new one, never a torn one, and no temporary file;
two writers never share a temporary file; the file gets 0666 less the umask); ``stop_kernels/backends.py``
(``TRITON_INTERPRET`` read as Triton reads it, the interpreter decided at import, ``backends()``'s keys and reasons,
a probe that fails never breaks it, the triton / numpy pairs whose interpreter cannot run); the backend choice of
the ops as their docstrings and the README ("Use in your own model") describe it: ``stop_embed``'s
``check_backend`` ("auto": Triton on CUDA or CPU under ``TRITON_INTERPRET=1`` with kernel dtypes, else the
reference; "triton" refused by name elsewhere or for float64), ``dispatch_attention``'s ("auto" on CPU: SDPA,
unless ``TRITON_INTERPRET`` and ``STOP_KERNELS_CPU_AUTO=triton``; every forced name runs its backend; an unknown name
is a ``ValueError`` naming ``backend``), ``use_attention_backend`` (restored on exit) and the "auto" policy's text
form; ``stop_kernels/plots.py``'s pure parts (``read_log``, ``parse_queries``, ``default_queries``,
``similarity_maps``, ``read_benchmarks``, ``group_benchmarks``, ``bench_size``, ``_unit``, ``_check_out``).

Every expectation is computed here, independently of the function under test; the examples (the profile in
``conftest.py``) are the same on every run. The example-based tests of the same code are in
``tests/test_op_argument_checks.py`` and ``tests/test_plots.py`` (their helpers are imported, not copied); the
atomic writes' interruption inside the caller's write is also drawn in ``tests/test_properties_training.py``.
The defect found here (an int beyond a float's range escaped ``non_negative`` as a bare OverflowError) is
fixed; its reproduction stays at the end as a regression test.
"""
import errno
import fractions
import json
import math
import os
import stat
import tempfile
from contextlib import nullcontext
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import skip_unless_installed

skip_unless_installed("hypothesis", module_level=True)
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import stop_kernels as sk  # noqa: E402
from stop_kernels import _checks as chk  # noqa: E402
from stop_kernels import backends as _bk_pkg  # noqa: E402,F401  (the package exports a function of that name)
from stop_kernels import plots  # noqa: E402
from stop_kernels.ops import attention as attn  # noqa: E402
from stop_kernels.ops import stop_embed as se  # noqa: E402

from test_op_argument_checks import _gen  # noqa: E402
from test_plots import bench_entry, write_log  # noqa: E402

import importlib  # noqa: E402

bk = importlib.import_module("stop_kernels.backends")  # the module, not the function stop_kernels.backends

NAMES = st.from_regex(r"[a-z][a-z_]{0,10}", fullmatch=True)
ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32,
              torch.int64, torch.uint8, torch.bool, torch.complex64)
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX = (torch.int32, torch.int64)


def _raises(exc, name, fn, *args, **kw):
    """``fn(*args, **kw)`` raises ``exc`` (exactly that class or a subclass) whose message starts with ``name:``."""
    with pytest.raises(exc) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert msg.startswith(f"{name}:"), msg
    return msg


@st.composite
def tensors(draw, dtypes=ALL_DTYPES, max_ndim=4):
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=max_ndim)))
    dtype = draw(st.sampled_from(dtypes))
    t = torch.zeros(shape, dtype=dtype)
    if len(shape) >= 2 and draw(st.booleans()):
        t = t.transpose(0, 1)  # strides do not matter to the checks
    return t


NOT_TENSORS = st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), st.text(max_size=3),
                        st.lists(st.integers(), max_size=3), st.just(np.zeros(2)))


# ------------------------------------------------------------------------------------------------ tensor checks
@settings(max_examples=150)
@given(name=NAMES, t=st.one_of(tensors(), NOT_TENSORS), ndim=st.one_of(st.none(), st.integers(0, 4)),
       min_ndim=st.one_of(st.none(), st.integers(0, 4)),
       dtypes=st.one_of(st.none(), st.lists(st.sampled_from(ALL_DTYPES), min_size=1, max_size=4)))
def test_tensor_check_passes_exactly_the_tensors_of_that_rank_and_dtype(name, t, ndim, min_ndim, dtypes):
    """tensor(): a non-tensor or a dtype outside ``dtypes`` is a TypeError, a wrong rank a ValueError, each naming
    the argument; anything else comes back as the same object."""
    if not isinstance(t, torch.Tensor):
        _raises(TypeError, name, chk.tensor, name, t, ndim=ndim, min_ndim=min_ndim, dtypes=dtypes)
        return
    wrong = set()
    if ndim is not None and len(t.shape) != ndim:
        wrong.add(ValueError)
    if min_ndim is not None and len(t.shape) < min_ndim:
        wrong.add(ValueError)
    if dtypes is not None and all(t.dtype != d for d in dtypes):
        wrong.add(TypeError)
    if not wrong:
        assert chk.tensor(name, t, ndim=ndim, min_ndim=min_ndim, dtypes=dtypes) is t
        return
    with pytest.raises((TypeError, ValueError)) as info:
        chk.tensor(name, t, ndim=ndim, min_ndim=min_ndim, dtypes=dtypes)
    assert type(info.value) in wrong and str(info.value).startswith(f"{name}:")
    if type(info.value) is ValueError:
        assert str(tuple(t.shape)) in str(info.value)  # says what it got


@settings(max_examples=100)
@given(name=NAMES, t=st.one_of(tensors(), NOT_TENSORS), table=st.booleans())
@example(name="pos", t=torch.zeros(1, 4, 2), table=True)  # the official layout
@example(name="pos", t=torch.zeros(4, 2, dtype=torch.int64), table=True)
def test_float_tensor_and_position_table(name, t, table):
    """float_tensor(): float16/bfloat16/float32/float64 only; position_table(): a 2-D float table, and the official
    [1, P, D] parameter is a ValueError that says to pass ``name[0]``."""
    fn = chk.position_table if table else chk.float_tensor
    if not isinstance(t, torch.Tensor):
        _raises(TypeError, name, fn, name, t)
        return
    is_float = t.dtype in FLOATS
    if table and t.dim() == 3 and t.shape[0] == 1:
        msg = _raises(ValueError, name, fn, name, t)
        assert f"pass {name}[0]" in msg
    elif table and t.dim() != 2:
        _raises(ValueError, name, fn, name, t)
    elif not is_float:
        _raises(TypeError, name, fn, name, t)
    else:
        assert fn(name, t) is t


@settings(max_examples=150)
@given(name=NAMES, upper=st.integers(0, 12), shape=st.lists(st.integers(0, 4), min_size=0, max_size=3),
       dtype=st.sampled_from(INDEX + (torch.int16, torch.uint8, torch.float32, torch.bool)), data=st.data(),
       what=st.sampled_from(["", "pos_embed has 9 rows"]), trusted=st.booleans())
def test_index_tensor_passes_exactly_the_indices_in_range(name, upper, shape, dtype, data, what, trusted):
    """index_tensor(): int32/int64 only (TypeError naming it, bool and int16 too); every value in [0, upper), else a
    ValueError naming the argument and the offending value (the lowest when one is negative, else the highest);
    CPU tensors are checked inside trusted_device_indices() too; an empty tensor always passes."""
    n = math.prod(shape)
    lo = -3 if dtype != torch.uint8 else 0
    vals = data.draw(st.lists(st.integers(lo, upper + 3), min_size=n, max_size=n))
    t = torch.tensor(vals, dtype=torch.int64).reshape(shape).to(dtype)
    if t.dim() >= 2 and data.draw(st.booleans()):
        t = t.transpose(0, 1)
    with chk.trusted_device_indices() if trusted else nullcontext():
        if dtype not in INDEX:
            _raises(TypeError, name, chk.index_tensor, name, t, upper=upper, what=what)
            return
        bad = [v for v in vals if not 0 <= v < upper]
        if not bad:
            assert chk.index_tensor(name, t, upper=upper, what=what) is t
            assert chk.index_range(name, t, upper=upper) is t
            return
        msg = _raises(ValueError, name, chk.index_tensor, name, t, upper=upper, what=what)
        worst = min(vals) if min(vals) < 0 else max(vals)
        assert msg.endswith(f"got {worst}") and f"[0, {upper})" in msg
        assert (f"({what})" in msg) == bool(what)
    # both offending ends present: the negative one is named
    msg = _raises(ValueError, name, chk.index_tensor, name, torch.tensor([upper + 2, -2, 0], dtype=dtype),
                  upper=upper)
    assert msg.endswith("got -2")
    # meta tensors (shape inference) have no values to read
    assert chk.index_range(name, torch.empty(shape, dtype=torch.int64, device="meta"), upper=0).device.type == "meta"


# ------------------------------------------------------------------------------------------------ signature
_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=False), st.text(max_size=2),
                  st.builds(lambda s: torch.zeros(s), st.lists(st.integers(0, 3), max_size=2)))
_OTHER = st.one_of(st.just({}), st.just(set()), st.builds(object), st.just(1j), st.just(np.float32(1.0)))


@settings(max_examples=120)
@given(values=st.lists(st.recursive(_LEAF, lambda k: st.one_of(st.lists(k, max_size=3), st.tuples(k, k)),
                                    max_leaves=6), max_size=4),
       other=st.one_of(st.none(), _OTHER), where=st.integers(0, 4))
def test_signature_is_hashable_metadata_or_none_for_another_kind(values, other, where):
    """signature(): equal for values of equal metadata (a tensor's values are not read); a value of another kind at
    any depth makes it None (that call is checked in full); a bool is not the int 1, nor a tuple a list."""
    sig = chk.signature(values)
    assert sig is not None and hash(sig) == hash(chk.signature(values))

    def twin(v):  # same metadata, other tensor values
        if isinstance(v, torch.Tensor):
            return torch.ones_like(v)
        if isinstance(v, (list, tuple)):
            return type(v)(twin(x) for x in v)
        return v
    assert chk.signature(twin(values)) == sig
    if other is not None:
        spiked = list(values)
        spiked.insert(min(where, len(spiked)), [other] if where % 2 else other)
        assert chk.signature(spiked) is None
    assert chk.signature([True]) != chk.signature([1]) and chk.signature([1]) != chk.signature([1.0])
    assert chk.signature([(1,)]) != chk.signature([[1]])


@settings(max_examples=60)
@given(shape=st.lists(st.integers(1, 3), min_size=2, max_size=3), change=st.sampled_from(["shape", "stride",
                                                                                          "dtype", "device"]))
def test_signature_tells_tensors_of_other_metadata_apart(shape, change):
    t = torch.zeros(shape)
    u = {"shape": lambda: torch.zeros(shape + [2]), "stride": lambda: torch.zeros(shape[::-1]).transpose(0, -1)
         if shape[0] != shape[-1] else torch.zeros(shape).as_strided(shape, [0] * len(shape)),
         "dtype": lambda: torch.zeros(shape, dtype=torch.float64),
         "device": lambda: torch.zeros(shape, device="meta")}[change]()
    assert chk.signature([t]) != chk.signature([u])


@settings(max_examples=60)
@given(limit=st.integers(1, 6), keys=st.lists(st.integers(0, 9), max_size=20))
def test_checked_signatures_is_bounded_and_never_holds_none(limit, keys):
    """CheckedSignatures: remembers what was added; an add to a set of ``limit`` entries clears it first; None never
    counts."""
    seen = chk.CheckedSignatures(limit)
    model = set()
    for k in keys:
        key = chk.signature([k])
        seen.add(key)
        if len(model) >= limit:  # (full: cleared before the next entry, even one it holds)
            model = set()
        model.add(key)
        seen.add(None)
        assert None not in seen and len(seen.seen) <= limit
        assert seen.seen == model
    assert seen.key([object()]) is None and seen.key([1, "a"]) == chk.signature([1, "a"])


# ------------------------------------------------------------------------------------------------ shapes and devices
@settings(max_examples=60)
@given(devices=st.lists(st.one_of(st.none(), st.sampled_from(["cpu", "meta"])), min_size=1, max_size=5),
       names=st.lists(NAMES, min_size=5, max_size=5, unique=True))
def test_same_device_names_the_first_tensor_on_another_device(devices, names):
    given_ = {n: (None if d is None else torch.zeros(1, device=d)) for n, d in zip(names, devices)}
    present = [(n, d) for n, d in zip(names, devices) if d is not None]
    if not present:
        return  # (callers always pass a tensor)
    first = present[0][1]
    odd = [n for n, d in present if d != first]
    if not odd:
        assert chk.same_device(**given_) == torch.device(first)
    else:
        msg = _raises(ValueError, odd[0], chk.same_device, **given_)
        assert f"that of {present[0][0]}" in msg


@settings(max_examples=80)
@given(name=NAMES, shape=st.lists(st.integers(0, 4), min_size=1, max_size=3), data=st.data(),
       expected=st.integers(0, 4), why=st.text(min_size=1, max_size=8))
def test_dim_equals(name, shape, data, expected, why):
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    t = torch.zeros(shape)
    if shape[dim] == expected:
        assert chk.dim_equals(name, t, dim, expected, why) is None
    else:
        msg = _raises(ValueError, name, chk.dim_equals, name, t, dim, expected, why)
        assert f"({why})" in msg and f"size {expected}" in msg


@settings(max_examples=200)
@given(d=st.integers(1, 5), e=st.integers(1, 5), D=st.integers(1, 5), E=st.one_of(st.none(), st.integers(1, 5)),
       b=st.one_of(st.none(), st.integers(1, 5)), name=NAMES)
@example(d=3, e=2, D=2, E=None, b=None, name="weight")  # transposed, no E known
@example(d=3, e=2, D=2, E=3, b=None, name="weight")  # transposed, E known
@example(d=3, e=2, D=2, E=None, b=2, name="weight")  # the bias agrees with D
@example(d=4, e=3, D=2, E=None, b=None, name="weight")  # another D, not transposed: left to the caller
def test_projection_weight_is_named_only_when_it_is_the_odd_one_out(d, e, D, E, b, name):
    """projection_weight(): ``[d, e]`` against D (and E): refused, by name, when its E is wrong, or its D is wrong
    and the bias agrees with D, or (no bias) it is ``[E, D]`` (then with the transposition hint); any other D
    mismatch passes (the caller names D's own argument)."""
    w, bias = torch.zeros(d, e), None if b is None else torch.zeros(b)
    e_wrong = E is not None and e != E
    looks_transposed = (d, e) != (D, E if E is not None else e) and e == D and (E is None or d == E)
    if b is not None:
        d_wrong = d != D and b == D
    else:
        d_wrong = d != D and looks_transposed
    if not (e_wrong or d_wrong):
        assert chk.projection_weight(name, w, D, "D_src", E=E, E_from="E_src", bias=bias) is None
        return
    msg = _raises(ValueError, name, chk.projection_weight, name, w, D, "D_src", E=E, E_from="E_src", bias=bias)
    assert f"[{D}, {E if E is not None else 'E'}]" in msg and "D = D_src" in msg and str((d, e)) in msg
    assert ("E = E_src" in msg) == (E is not None)
    assert ("looks transposed" in msg) == (d != D and looks_transposed)


@settings(max_examples=200)
@given(name=NAMES, lens=st.lists(st.integers(-2, 5), max_size=6), start=st.integers(-1, 1),
       total_shift=st.integers(-1, 1), empty=st.booleans())
@example(name="cu", lens=[3], start=0, total_shift=0, empty=False)  # one sequence: its length
@example(name="cu", lens=[2, -1, 1], start=0, total_shift=0, empty=False)  # a step back by one
@example(name="cu", lens=[], start=0, total_shift=0, empty=False)  # no sequence
def test_packed_offsets_accepts_exactly_nondecreasing_offsets_from_zero_to_the_total(name, lens, start, total_shift,
                                                                                     empty):
    """packed_offsets(): starts at 0, never decreases, ends at ``total``; returns the longest sequence (0 without
    any); otherwise a ValueError naming the argument."""
    if empty:
        _raises(ValueError, name, chk.packed_offsets, name, [], 0)
        return
    offsets = [start]
    for n in lens:
        offsets.append(offsets[-1] + n)
    total = offsets[-1] + total_shift
    good = start == 0 and total_shift == 0 and all(n >= 0 for n in lens)
    if good:
        assert chk.packed_offsets(name, offsets, total) == (max(lens) if lens else 0)
        assert chk.packed_offsets(name, tuple(offsets), total) == (max(lens) if lens else 0)  # any sequence
    else:
        _raises(ValueError, name, chk.packed_offsets, name, offsets, total)


# ------------------------------------------------------------------------------------------------ sizes
@settings(max_examples=80)
@given(rows=st.integers(0, 2 ** 32), d=st.integers(1, 2 ** 21), e=st.integers(1, 2 ** 21),
       rows_name=NAMES, what=st.sampled_from(["positions", "masked tokens"]))
@example(rows=2 ** 31 - 2 ** 16, d=2 ** 20, e=2 ** 10, rows_name="idx", what="positions")  # every bound, at it
@example(rows=2 ** 31 - 2 ** 16 + 1, d=1, e=1, rows_name="idx", what="positions")
@example(rows=0, d=2 ** 20 + 1, e=1, rows_name="idx", what="positions")
@example(rows=0, d=2 ** 16, e=2 ** 15, rows_name="idx", what="positions")  # 2**31 elements
@example(rows=0, d=2 ** 16, e=2 ** 15 - 1, rows_name="idx", what="positions")
def test_kernel_sizes_refuse_exactly_past_the_kernels_limits(rows, d, e, rows_name, what):
    """kernel_sizes(): at most 2**31 - 2**16 rows (named by ``rows_name``), W of fewer than 2**31 elements and both
    widths at most 2**20 (named ``weight``); kernel_widths() the last alone."""
    w = torch.empty(d, e, device="meta")
    too_wide = max(d, e) > 2 ** 20
    if too_wide:
        _raises(ValueError, "weight", chk.kernel_widths, w)
    else:
        assert chk.kernel_widths(w) is None
    if rows > 2 ** 31 - 2 ** 16:
        msg = _raises(ValueError, rows_name, chk.kernel_sizes, rows_name, rows, what, w)
        assert what in msg and str(rows) in msg
    elif d * e > 2 ** 31 - 1 or too_wide:
        _raises(ValueError, "weight", chk.kernel_sizes, rows_name, rows, what, w)
    else:
        assert chk.kernel_sizes(rows_name, rows, what, w) is None


# ------------------------------------------------------------------------------------------------ scalars
class _Int(int):
    pass


# (value, is an int, is a real number): kinds drawn with their expected answers, written out
SCALARS = st.one_of(
    st.integers().map(lambda v: (v, True, True)),
    st.integers(-5, 5).map(lambda v: (_Int(v), True, True)),
    st.booleans().map(lambda v: (v, False, False)),
    st.booleans().map(lambda v: (np.bool_(v), False, False)),
    st.floats().map(lambda v: (v, False, True)),
    st.integers(-5, 5).map(lambda v: (np.int64(v), False, True)),
    st.floats(width=32).map(lambda v: (np.float32(v), False, True)),
    st.fractions(max_denominator=5).map(lambda v: (v, False, True)),
    st.sampled_from([None, "3", 1j, [1], torch.tensor(1), torch.tensor(1.5)]).map(lambda v: (v, False, False)),
)


@settings(max_examples=200)
@given(case=SCALARS)
def test_is_int_and_is_number(case):
    value, want_int, want_number = case
    assert chk.is_int(value) is want_int
    assert chk.is_number(value) is want_number


@settings(max_examples=200)
@given(case=SCALARS, lo=st.integers(-3, 3), name=NAMES)
def test_int_at_least(case, lo, name):
    """int_at_least(): an int (not a bool, not 2.0) >= lo comes back as it is; a non-int is a TypeError, a smaller
    int a ValueError, both naming the argument."""
    value, is_int, _ = case
    if not is_int:
        _raises(TypeError, name, chk.int_at_least, name, value, lo)
    elif value < lo:
        msg = _raises(ValueError, name, chk.int_at_least, name, value, lo)
        assert f">= {lo}" in msg
    else:
        assert chk.int_at_least(name, value, lo) is value


@settings(max_examples=200)
@given(case=SCALARS, name=NAMES)
@example(case=(-0.0, False, True), name="noise_std")
@example(case=(float("nan"), False, True), name="noise_std")
@example(case=(np.float32("inf"), False, True), name="noise_std")
@example(case=(np.float32("nan"), False, True), name="noise_std")
def test_non_negative(case, name):
    """non_negative(): a finite real >= 0 (numpy scalars too) as a Python float; a bool or non-number is a
    TypeError, a negative, infinite or NaN one a ValueError, both naming the argument."""
    value, _, is_number = case
    if not is_number:
        _raises(TypeError, name, chk.non_negative, name, value)
        return
    if isinstance(value, (int, fractions.Fraction)):
        exact = fractions.Fraction(value)
    else:
        exact = fractions.Fraction(float(value)) if math.isfinite(float(value)) else None
    if exact is None or exact < 0:
        _raises(ValueError, name, chk.non_negative, name, value)
    else:
        got = chk.non_negative(name, value)
        assert type(got) is float and got == float(value) and got >= 0


@settings(max_examples=120)
@given(options=st.lists(st.text(max_size=4), max_size=5), value=st.text(max_size=4), name=NAMES,
       as_iter=st.booleans())
def test_choice(options, value, name, as_iter):
    """choice(): a value among ``options`` (any iterable, read once) passes; another is a ValueError naming the
    argument, the options and the value."""
    opts = iter(options) if as_iter else options
    if value in options:
        assert chk.choice(name, value, opts) is None
    else:
        msg = _raises(ValueError, name, chk.choice, name, value, opts)
        assert repr(value) in msg and str(tuple(options)) in msg


@settings(max_examples=60)
@given(outcome=st.sampled_from(["status", "value", "os", "file", "runtime", "keyboard"]),
       status=st.integers(0, 5), text=st.from_regex(r"[a-z =:]{1,20}", fullmatch=True), prog=NAMES)
def test_run_command_turns_user_errors_into_one_line_and_status_2(capsys, outcome, status, text, prog):
    """run_command(): exits with main()'s status; a ValueError or OSError becomes ``<prog>: error: <message>`` on
    stderr and status 2; any other exception is not swallowed."""
    excs = {"value": ValueError(text), "os": OSError(text), "file": FileNotFoundError(text),
            "runtime": RuntimeError(text), "keyboard": KeyboardInterrupt()}

    def main():
        if outcome == "status":
            return status
        raise excs[outcome]
    capsys.readouterr()
    if outcome in ("runtime", "keyboard"):
        with pytest.raises(type(excs[outcome])):
            chk.run_command(main, prog)
        return
    with pytest.raises(SystemExit) as info:
        chk.run_command(main, prog)
    err = capsys.readouterr().err
    if outcome == "status":
        assert info.value.code == status and err == ""
    else:
        assert info.value.code == 2 and err == f"{prog}: error: {text}\n"


@settings(max_examples=20)
@given(device=st.sampled_from(["cpu", "meta", "nonsense", "cuda"]), on=st.booleans())
def test_autocast_on(device, on):
    """autocast_on(): True exactly inside an enabled autocast of that device type; False (no error) for a device
    type autocast does not know."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=on):
        want = on and device == "cpu"
        if device == "cuda":  # (not entered here: autocast is off for CUDA)
            want = False
        assert chk.autocast_on(device) is want
    assert chk.autocast_on(device) is False


# ------------------------------------------------------------------------------------------------ JSON files
_JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False,
                                                                                    allow_infinity=False),
                               st.text(max_size=6)),
                     lambda k: st.one_of(st.lists(k, max_size=3), st.dictionaries(st.text(max_size=4), k,
                                                                                  max_size=3)), max_leaves=12)


@settings(max_examples=60)
@given(obj=_JSON, junk=st.sampled_from(["{", "[1,", "nan?", "{'a': 1}", "1 2", ""]), what=NAMES)
def test_json_written_atomically_reads_back_and_junk_is_named(tmp_path, obj, junk, what):
    """write_json_atomic() then read_json() gives the object back; a file that is not JSON is a ValueError naming
    ``what`` and the path; ``default`` serialises what json cannot."""
    folder = tempfile.mkdtemp(dir=tmp_path)
    path = os.path.join(folder, "x.json")
    chk.write_json_atomic(path, obj)
    assert chk.read_json(path, what) == obj
    chk.write_json_atomic(path, {"v": {1, 2}, "o": obj}, default=sorted)
    assert chk.read_json(path, what) == {"v": [1, 2], "o": obj}
    with open(path, "w") as fh:
        fh.write(junk)
    msg = _raises(ValueError, what, chk.read_json, path, what)
    assert path in msg and "is not JSON" in msg
    with pytest.raises(FileNotFoundError):
        chk.read_json(os.path.join(folder, "missing.json"), what)
    assert sorted(os.listdir(folder)) == ["x.json"]


class _Killed(BaseException):
    """A kill at that point (not an Exception: the cleanup must not depend on catching Exception only)."""


_OPS = ["open", "fdopen", "write", "flush", "fsync", "replace", "none"]


@settings(max_examples=80)
@given(old=st.one_of(st.none(), st.binary(min_size=1, max_size=40)), new=st.binary(max_size=80),
       fail=st.sampled_from(_OPS), kind=st.sampled_from([OSError, _Killed]), umask=st.sampled_from([0o022, 0o077,
                                                                                                     0o002]))
def test_an_atomic_write_failing_at_any_file_operation_leaves_the_old_file_or_the_new_one(tmp_path, old, new, fail,
                                                                                           kind, umask):
    """write_atomic(): a failure at the temporary file's creation, its opening as a file object, the write, the
    flush, the fsync or the rename leaves the previous file byte for byte (or none) and no temporary file, and
    raises; a write that completes leaves the new bytes, with mode 0666 less the umask, written through a temporary
    file of the same folder (the rename's source) and synced before the rename."""
    folder = tempfile.mkdtemp(dir=tmp_path)
    path = os.path.join(folder, "meta.bin")
    if old is not None:
        with open(path, "wb") as fh:
            fh.write(old)
    events = []
    real = {n: getattr(os, n) for n in ("open", "fdopen", "fsync", "replace")}

    def broken(*a, **k):
        raise kind(errno.EIO, "I/O error") if kind is OSError else kind()

    def spy(op):
        def call(*a, **k):
            events.append((op, a))
            if op == fail:
                broken()
            out = real[op](*a, **k)
            if op == "fdopen":
                real_flush = out.flush

                def flush():
                    events.append(("flush", ()))
                    if fail == "flush":
                        broken()
                    return real_flush()
                out.flush = flush
            return out
        return call

    def write(fh):
        fh.write(new[: len(new) // 2])
        if fail == "write":
            broken()
        fh.write(new[len(new) // 2:])
    old_umask = os.umask(umask)
    try:
        with mock.patch.multiple(os, **{n: spy(n) for n in real}):
            if fail == "none":
                chk.write_atomic(path, write)
            else:
                with pytest.raises(kind):
                    chk.write_atomic(path, write)
    finally:
        os.umask(old_umask)
    ops = [op for op, _ in events]
    if fail == "none":
        assert os.listdir(folder) == ["meta.bin"]
        with open(path, "rb") as fh:
            assert fh.read() == new
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
        (src, dst), = [a[:2] for op, a in events if op == "replace"]
        assert os.path.dirname(os.path.abspath(src)) == folder and os.path.abspath(dst) == os.path.abspath(path)
        assert ops.index("flush") < ops.index("fsync") < ops.index("replace")
    elif old is None:
        assert os.listdir(folder) == []
    else:
        assert os.listdir(folder) == ["meta.bin"]
        with open(path, "rb") as fh:
            assert fh.read() == old


@settings(max_examples=20)
@given(clashes=st.integers(1, 3), data=st.binary(max_size=20))
def test_two_writers_never_share_a_temporary_file(tmp_path, clashes, data):
    """write_atomic(): a temporary name another writer holds is never opened again (O_EXCL): its file is left as
    it is and the write goes through a fresh name."""
    folder = tempfile.mkdtemp(dir=tmp_path)
    path = os.path.join(folder, "f.json")
    tokens = [f"{i:012x}" for i in range(clashes)] + ["f" * 12]
    for tok in tokens[:-1]:
        with open(os.path.join(folder, f"f.json.{tok}.tmp"), "wb") as fh:
            fh.write(b"other writer")
    with mock.patch("secrets.token_hex", side_effect=tokens):
        chk.write_atomic(path, lambda fh: fh.write(data))
    with open(path, "rb") as fh:
        assert fh.read() == data
    for tok in tokens[:-1]:
        with open(os.path.join(folder, f"f.json.{tok}.tmp"), "rb") as fh:
            assert fh.read() == b"other writer"
    assert len(os.listdir(folder)) == clashes + 1


# ------------------------------------------------------------------------------------------------ backends
_TRUE = ("1", "true", "on", "yes", "y")


@settings(max_examples=150)
@given(value=st.one_of(st.none(), st.sampled_from(_TRUE + ("0", "false", "off", "no", "t", " 1", "2", "")),
                       st.text(max_size=4)), data=st.data())
def test_interpret_flag_and_the_decision_made_at_import(value, data):
    """interpret_flag(): 1/true/on/yes/y in any case (unset: off); the kernels are interpreted only when the flag
    was set at import and still is; set only afterwards it is reported (interpreter_set_after_import)."""
    if value is not None and value.lower() in _TRUE:
        value = "".join(data.draw(st.sampled_from([c.lower(), c.upper()])) for c in value)
    env = {} if value is None else {"TRITON_INTERPRET": value}
    want = value is not None and value.lower() in _TRUE
    for at_import in (False, True):
        with mock.patch.dict(os.environ, env), mock.patch.object(bk, "_INTERPRETED_AT_IMPORT", at_import):
            if value is None:
                os.environ.pop("TRITON_INTERPRET", None)
            assert bk.interpret_flag() is want
            assert bk.triton_interpreting() is (want and at_import)
            assert bk.interpreter_set_after_import() is (want and not at_import)
            assert se.interpreting() is (want and at_import)


@settings(max_examples=100)
@given(major=st.integers(0, 99), minor=st.integers(0, 99), rest=st.sampled_from(["", ".0", ".1rc1", "+cu130", "a0",
                                                                                   ".0.dev1"]),
       junk=st.sampled_from(["", "x", "v", "dev"]))
def test_version_reads_major_and_minor(major, minor, rest, junk):
    assert bk._version(f"{major}.{minor}{rest}") == (major, minor)
    assert bk._version(f"{junk}") == (0, 0)


@settings(max_examples=60)
@given(tri=st.tuples(st.integers(2, 4), st.integers(0, 9)), npy=st.tuples(st.integers(1, 3), st.integers(0, 6)))
@example(tri=(3, 6), npy=(2, 4))  # the bounds
@example(tri=(3, 7), npy=(2, 4))
@example(tri=(3, 6), npy=(2, 3))
def test_interpreter_problem_only_for_old_triton_with_new_numpy(tri, npy):
    """triton_interpreter_problem(): non-empty exactly for triton < 3.7 with numpy >= 2.4, naming both versions."""
    import triton
    tv, nv = f"{tri[0]}.{tri[1]}.0", f"{npy[0]}.{npy[1]}.1"
    with mock.patch.object(triton, "__version__", tv), mock.patch.object(np, "__version__", nv):
        problem = bk.triton_interpreter_problem()
    if tri < (3, 7) and npy >= (2, 4):
        assert tv in problem and nv in problem
    else:
        assert problem == ""


@settings(max_examples=40)
@given(flag=st.booleans(), at_import=st.booleans(), cuda=st.booleans(), problem=st.sampled_from(["", "too old"]),
       broken=st.sampled_from([None, "triton", "cuda", "xformers"]))
def test_backends_reports_each_backend_with_its_reason(flag, at_import, cuda, problem, broken):
    """backends(): reference always usable; triton usable on CUDA or in the interpreter (the flag set at import and
    now, and an interpreter that runs), refused with INTERPRET_LATE where the flag came after the import on a machine
    without CUDA; a reason for each unusable one; a probe that raises is reported, never raised."""
    def boom():
        raise RuntimeError("probe exploded")
    patches = [mock.patch.dict(os.environ, {"TRITON_INTERPRET": "1" if flag else "0"}),
               mock.patch.object(bk, "_INTERPRETED_AT_IMPORT", at_import),
               mock.patch.object(torch.cuda, "is_available", lambda: cuda),
               mock.patch.object(bk, "triton_interpreter_problem", lambda: problem)]
    if broken:
        patches.append(mock.patch.object(bk, "_" + broken, boom))
    with patches[0], patches[1], patches[2], patches[3], (patches[4] if broken else nullcontext()):
        got = bk.backends()
    assert set(got) == {"reference", "triton", "cuda", "xformers", "reasons"} and got["reference"] is True
    reasons = got["reasons"]
    assert all(got[n] is False for n in ("triton", "cuda", "xformers") if n in reasons and "probe" in reasons[n])
    for n in ("triton", "cuda", "xformers"):
        if not got[n]:
            assert reasons.get(n), n
    if broken:
        assert got[broken] is False and reasons[broken] == "probe failed: RuntimeError: probe exploded"
    if broken != "triton":
        interp = flag and at_import
        want = (interp and not problem) or (cuda and not interp and not (flag and not at_import and not cuda))
        assert got["triton"] is want
        if flag and not at_import and not cuda:
            assert reasons["triton"] == bk.INTERPRET_LATE
        if interp and problem:
            assert reasons["triton"] == "TRITON_INTERPRET=1, but " + problem
    if broken != "cuda" and not cuda:
        assert got["cuda"] is False


@settings(max_examples=20)
@given(off=st.integers(1, 200), dev=st.sampled_from(["cpu", "meta"]))
def test_off_cuda_launch_helpers(off, dev):
    """sm_count(): the caller's stand-in off CUDA; on_device(): nothing to switch off CUDA."""
    d = torch.device(dev)
    assert bk.sm_count(d, off) == off
    with bk.on_device(torch.zeros(1, device=dev)) as ctx:
        assert ctx is None


@settings(max_examples=200)
@given(backend=st.one_of(st.sampled_from(se.BACKENDS), st.sampled_from(["Triton", "torch", "", "sdpa", "auto "])),
       device=st.sampled_from(["cpu", "meta"]), interp_env=st.booleans(),
       dtypes=st.dictionaries(st.sampled_from(["pos_embed", "weight", "bias"]), st.sampled_from(FLOATS), min_size=1),
       name=st.sampled_from(["backend", "stop_backend"]))
def test_stop_embed_backend_resolution(backend, device, interp_env, dtypes, name):
    """check_backend(): "auto" → Triton for CPU tensors only under the interpreter (set at import and now) and with
    float16/bfloat16/float32 everywhere, else the reference; "reference" and "cuda" as given; "triton" refused with
    a TypeError naming the first float64 argument, or a ValueError naming ``name`` off the interpreter; an unknown
    name a ValueError naming ``name``."""
    dev = torch.device(device)
    env = {"TRITON_INTERPRET": "1" if interp_env else "0"}
    with mock.patch.dict(os.environ, env):
        interp = bk._INTERPRETED_AT_IMPORT and interp_env
        kernel_dtypes = all(d != torch.float64 for d in dtypes.values())
        if backend not in ("auto", "triton", "reference", "cuda"):
            msg = _raises(ValueError, name, se.check_backend, backend, dev, dtypes, name)
            assert repr(backend) in msg
        elif backend == "auto":
            want = "triton" if interp and device == "cpu" and kernel_dtypes else "reference"
            assert se.check_backend(backend, dev, dtypes, name) == want
        elif backend == "triton" and not kernel_dtypes:
            first = next(a for a, d in dtypes.items() if d == torch.float64)
            msg = _raises(TypeError, first, se.check_backend, backend, dev, dtypes, name)
            assert f"{name}='triton'" in msg
        elif backend == "triton" and not (interp and device == "cpu"):
            _raises(ValueError, name, se.check_backend, backend, dev, dtypes, name)
        else:
            assert se.check_backend(backend, dev, dtypes, name) == backend


@settings(max_examples=30)
@given(backend=st.sampled_from(["auto", "reference", "Reference", "cuda?", ""]), std=st.floats(0, 1))
def test_stop_embed_auto_on_cpu_is_the_reference_off_the_interpreter(backend, std):
    """stop_embed(): off the interpreter (TRITON_INTERPRET=0) "auto" on CPU tensors gives the reference's values for
    the same generator; an unknown backend is a ValueError naming ``backend`` before anything is computed."""
    pos, w, idx = torch.randn(6, 4), torch.randn(4, 3), torch.tensor([[1, 5, 0]])
    with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "0"}):
        if backend not in se.BACKENDS:
            _raises(ValueError, "backend", sk.stop_embed, pos, idx, w, noise_std=std, generator=_gen(),
                    backend=backend)
            return
        with mock.patch.object(se, "_StopEmbedFn", None), mock.patch.object(se, "_stop_embed_op", None):
            got = sk.stop_embed(pos, idx, w, noise_std=std, generator=_gen(), backend=backend)  # no kernel path
    torch.testing.assert_close(got, sk.stop_embed(pos, idx, w, noise_std=std, generator=_gen(), backend="reference"))


_ATTN_CALLS = ("attention", "_sdpa", "_xformers")


@settings(max_examples=120)
@given(backend=st.one_of(st.none(), st.sampled_from(attn.BACKENDS),
                         st.sampled_from(["SDPA", "flash", "", "cuda"])),
       default=st.sampled_from(attn.BACKENDS), dtype=st.sampled_from(FLOATS), head_dim=st.sampled_from([8, 12, 24]),
       cpu_auto=st.sampled_from([None, "triton", "sdpa"]), scale=st.sampled_from([None, 0.5, -1.0]))
def test_dispatch_attention_runs_the_named_backend(backend, default, dtype, head_dim, cpu_auto, scale):
    """dispatch_attention(): ``backend`` (None: the default, forced by use_attention_backend and restored after)
    picks the path: "triton" the kernels' attention(), "sdpa" SDPA, "xformers" xformers, "reference" the reference;
    "auto" for CPU tensors SDPA, except the kernels under TRITON_INTERPRET with STOP_KERNELS_CPU_AUTO=triton, a head
    dim and dtype they take (not float64) and a positive scale; an unknown name a ValueError naming ``backend``."""
    q = torch.zeros(1, 2, 1, head_dim, dtype=dtype)
    calls = []

    def record(which):
        return lambda *a, **k: calls.append(which) or "ran"
    env = {} if cpu_auto is None else {"STOP_KERNELS_CPU_AUTO": cpu_auto}
    before = attn.get_attention_backend()
    with mock.patch.dict(os.environ, env), attn.use_attention_backend(default), \
            mock.patch.object(attn, "attention", record("triton")), mock.patch.object(attn, "_sdpa", record("sdpa")), \
            mock.patch.object(attn, "_xformers", record("xformers")), \
            mock.patch.object(attn.reference, "attention", record("reference")):
        if cpu_auto is None:
            os.environ.pop("STOP_KERNELS_CPU_AUTO", None)
        assert attn.get_attention_backend() == default
        name = default if backend is None else backend
        if name not in attn.BACKENDS:
            msg = _raises(ValueError, "backend", attn.dispatch_attention, q, q, q, scale=scale, backend=backend)
            assert repr(name) in msg and not calls
            return
        if name == "auto":
            kernels = (attn._INTERPRET and cpu_auto == "triton" and dtype != torch.float64 and head_dim % 8 == 0
                       and (scale is None or scale > 0))
            name = "triton" if kernels else "sdpa"
        assert attn.dispatch_attention(q, q, q, scale=scale, backend=backend) == "ran"
    assert calls == [name]
    assert attn.get_attention_backend() == before


@settings(max_examples=40)
@given(name=st.text(max_size=6), fail=st.booleans())
def test_forcing_an_attention_backend_checks_the_name_and_restores_the_default(name, fail):
    before = attn.get_attention_backend()
    if name not in attn.BACKENDS:
        _raises(ValueError, "name", attn.set_attention_backend, name)
        with pytest.raises(ValueError, match="^name:"):
            with attn.use_attention_backend(name):
                pass
        _raises(ValueError, "name", attn.attention_backend_problem, name, "cpu")
    else:
        with pytest.raises(KeyError) if fail else nullcontext():
            with attn.use_attention_backend(name):
                assert attn.get_attention_backend() == name
                if fail:
                    raise KeyError("inside")
        # on the CPU, "sdpa", "reference" and "auto" (SDPA here) can always run
        if name in ("sdpa", "reference", "auto"):
            assert attn.attention_backend_problem(name, "cpu") == ""
        if name == "triton":
            assert (attn.attention_backend_problem(name, "cpu") == "") is attn._INTERPRET
    assert attn.get_attention_backend() == before


_MODES = ("compiled", "compiled_train", "compiled_fwd_only", "fwd_only", "train")


@settings(max_examples=100)
@given(items=st.dictionaries(st.tuples(st.sampled_from(_MODES), st.one_of(st.none(), st.sampled_from(range(8, 129,
                                                                                                           8)))),
                             st.sampled_from(["triton", "sdpa", "xformers"]), max_size=5),
       seps=st.sampled_from([",", ";", " , ", "; "]),
       bad=st.sampled_from([None, "compiled:23=sdpa", "compiled:136=sdpa", "train=flash", "warmup=sdpa",
                            "train", "train:x=sdpa", "train:²=sdpa"]))
def test_auto_policy_text_reads_back_and_bad_items_are_named(items, seps, bad):
    """parse_auto_policy(): ``mode=backend`` / ``mode:head_dim=backend`` items read back as the dict they spell;
    an unknown mode or backend, a head dim never looked up, an unreadable or repeated item a ValueError naming the
    policy; use_auto_policy() applies it on top of the current policy and restores it."""
    text = seps.join(f"{m}{'' if h is None else f':{h}'}={v}" for (m, h), v in items.items())
    want = {(m if h is None else (m, h)): v for (m, h), v in items.items()}
    assert attn.parse_auto_policy(text) == want
    before = attn.get_auto_policy()
    with attn.use_auto_policy(text):
        assert attn.get_auto_policy() == {**before, **want}
    assert attn.get_auto_policy() == before
    if items:
        first = text.split(seps.strip() or ",")[0]
        with pytest.raises(ValueError, match="^policy"):
            attn.parse_auto_policy(text + seps + first)  # repeated
    if bad:
        with pytest.raises(ValueError, match="^policy"):
            attn.parse_auto_policy(bad)


# ------------------------------------------------------------------------------------------------ plots
@st.composite
def log_files(draw):
    """A JSONL log's lines: records with or without a step, blank lines; the expected records with a step."""
    lines, want = [], []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["step", "step", "nostep", "blank"]))
        if kind == "blank":
            lines.append(draw(st.sampled_from(["", "  ", "\t"])))
            continue
        rec = {"loss": draw(st.floats(0, 10)), "note": draw(st.text(max_size=3))}
        if kind == "step":
            rec = {"step": draw(st.integers(0, 100)), **rec}
            want.append(rec)
        lines.append(json.dumps(rec))
    return lines, want


@settings(max_examples=80)
@given(log=log_files(), bad=st.sampled_from([None, "{not json", "[1, 2]", "3", '"s"']), at=st.integers(0, 8))
def test_read_log_keeps_the_records_with_a_step_and_names_a_bad_line(tmp_path, log, bad, at):
    """read_log(): the JSON objects carrying a ``step``, in file order (blank lines skipped); a line that is not a
    JSON object a ValueError naming the log and its line number; no record with a step a ValueError."""
    lines, want = log
    folder = tempfile.mkdtemp(dir=tmp_path)
    path = os.path.join(folder, "log.jsonl")
    if bad is not None:
        at = min(at, len(lines))
        lines = lines[:at] + [bad] + lines[at:]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    if bad is not None:
        msg = _raises(ValueError, "log", plots.read_log, path)
        assert f"{path}:{at + 1} " in msg
    elif not want:
        _raises(ValueError, "log", plots.read_log, path)
    else:
        assert plots.read_log(path) == want
    with pytest.raises(FileNotFoundError, match="^log: "):
        plots.read_log(os.path.join(folder, "none.jsonl"))


def test_read_log_reads_the_example_tests_log(tmp_path):
    recs = plots.read_log(write_log(tmp_path / "log.jsonl", n=7, extra_lines=["", '{"note": 1}']))
    assert [r["step"] for r in recs] == list(range(7))


@settings(max_examples=150)
@given(grid=st.integers(1, 20), pairs=st.lists(st.tuples(st.integers(-3, 23), st.integers(-3, 23)), max_size=4),
       spaces=st.sampled_from(["", " ", "  "]), junk=st.sampled_from([None, "1", "1,2,3", "a,b", "1;2", "1.0,2"]))
def test_parse_queries(grid, pairs, spaces, junk):
    """parse_queries(): ``"r,c"`` (spaces allowed) → (r, c) inside the grid; outside, unreadable or none at all: a
    ValueError naming --queries."""
    texts = [f"{spaces}{r}{spaces},{spaces}{c}{spaces}" for r, c in pairs]
    if junk is not None:
        _raises(ValueError, "--queries", plots.parse_queries, texts + [junk], grid)
    if not pairs or any(not (0 <= r < grid and 0 <= c < grid) for r, c in pairs):
        _raises(ValueError, "--queries", plots.parse_queries, texts, grid)
    else:
        assert plots.parse_queries(texts, grid) == pairs


@settings(max_examples=40)
@given(grid=st.integers(1, 64))
def test_default_queries_are_inside_the_grid(grid):
    qs = plots.default_queries(grid)
    assert len(qs) == 3 and qs[0] == (0, 0) and all(0 <= r < grid and 0 <= c < grid for r, c in qs)
    assert qs[2] == (grid // 2, grid // 2)


@settings(max_examples=40)
@given(g=st.integers(1, 4), D=st.integers(1, 5), E=st.integers(1, 4), seed=st.integers(0, 3), data=st.data(),
       samples=st.integers(1, 5))
def test_similarity_maps_are_the_cosines(g, D, E, seed, data, samples):
    """similarity_maps(): the deterministic map is cos(ψ_q, ψ_j) on the g × g grid (1 at the query itself); with
    σ = 0 the stochastic map equals it; both within [-1, 1], float32 [Q, g, g]; the same seed gives the same maps."""
    gen = torch.Generator().manual_seed(seed)
    psi, A = torch.randn(g * g, D, generator=gen, dtype=torch.float64), torch.randn(D, E, generator=gen)
    qs = data.draw(st.lists(st.tuples(st.integers(0, g - 1), st.integers(0, g - 1)), min_size=1, max_size=3))
    det, sto = plots.similarity_maps(psi, A, qs, noise_std=0.0, samples=samples, seed=seed)
    assert det.shape == sto.shape == (len(qs), g, g) and det.dtype == sto.dtype == torch.float32
    for i, (r, c) in enumerate(qs):
        a = psi[r * g + c].tolist()
        for j in range(g * g):
            b = psi[j].tolist()
            cos = sum(x * y for x, y in zip(a, b)) / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))
            assert det[i, j // g, j % g].item() == pytest.approx(cos, abs=1e-5)
        assert det[i, r, c].item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(sto, det, atol=1e-5, rtol=0)
    d2, s2 = plots.similarity_maps(psi, A, qs, noise_std=0.5, samples=samples, seed=seed)
    d3, s3 = plots.similarity_maps(psi, A, qs, noise_std=0.5, samples=samples, seed=seed)
    assert torch.equal(s2, s3) and torch.equal(d2, det)
    assert float(s2.abs().max()) <= 1 + 1e-5


@settings(max_examples=60)
@given(P=st.integers(1, 10), D=st.integers(1, 4), bad=st.sampled_from(["A_rows", "A_ndim", "samples", "std_nan",
                                                                        "std_neg", "std_inf", None]))
def test_similarity_maps_name_a_bad_argument(P, D, bad):
    psi, A = torch.randn(P, D), torch.randn(D, 2)
    kw = dict(noise_std=0.1, samples=2)
    g = math.isqrt(P)
    if g * g != P:
        _raises(ValueError, "psi", plots.similarity_maps, psi, A, [(0, 0)], **kw)
        return
    if bad == "A_rows":
        _raises(ValueError, "A", plots.similarity_maps, psi, torch.randn(D + 1, 2), [(0, 0)], **kw)
    elif bad == "A_ndim":
        _raises(ValueError, "A", plots.similarity_maps, psi, torch.randn(D), [(0, 0)], **kw)
    elif bad == "samples":
        _raises(ValueError, "--samples", plots.similarity_maps, psi, A, [(0, 0)], noise_std=0.1, samples=0)
    elif bad is not None:
        std = {"std_nan": float("nan"), "std_neg": -0.1, "std_inf": float("inf")}[bad]
        _raises(ValueError, "--noise-std", plots.similarity_maps, psi, A, [(0, 0)], noise_std=std, samples=2)
    else:
        det, _ = plots.similarity_maps(psi, A, [(0, 0)], **kw)
        assert det.shape == (1, g, g)


@st.composite
def bench_cases(draw):
    """Benchmark entries whose group and label are known by construction: an explicit group, a parametrised name,
    an ``impl`` parameter beside others, or a plain name split at its last ``_``."""
    entries, want = [], []
    for i in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["group", "param", "impl", "plain", "nounderscore"]))
        base = "test_" + draw(st.sampled_from(["a", "b", "stop"]))
        mean = draw(st.floats(1e-7, 10))
        quartiles = (mean * draw(st.floats(0.5, 1.2)), mean * draw(st.floats(0.8, 1.6)))
        if kind == "group":
            e = bench_entry(f"{base}[{draw(st.sampled_from(['x', 'y']))}]", mean, group="G")
            e["params"] = None
            want.append(("G", e["name"].partition("[")[2][:-1]))
        elif kind == "param":
            p = draw(st.sampled_from(["16-fp16", "x"]))
            e = bench_entry(f"{base}[{p}]", mean)
            e["params"] = {"shape": p}
            want.append((base, p))
        elif kind == "impl":
            impl, n = draw(st.sampled_from(["triton", "sdpa"])), draw(st.integers(1, 3))
            e = bench_entry(f"{base}[{n}-{impl}]", mean)
            e["params"] = {"n": n, "impl": impl}
            want.append((f"{base} [n={n}]", impl))
        elif kind == "plain":
            e = bench_entry(f"{base}_fused", mean)
            want.append((base, "fused"))
        else:
            e = bench_entry("loss", mean)
            want.append(("loss", "loss"))
        e["stats"]["q1"], e["stats"]["q3"] = quartiles
        entries.append(e)
    return entries, want


@settings(max_examples=120)
@given(case=bench_cases(), stat=st.sampled_from(plots.BENCH_STATS + ("ops", "p99")))
def test_group_benchmarks(case, stat):
    """group_benchmarks(): every entry in its group under its label, in input order, with its ``stat`` and its error
    bar (± stddev for the mean, q1 / q3 for the median, none otherwise); a stat that is not a time a ValueError
    naming --stat."""
    entries, want = case
    if stat not in ("mean", "median", "min", "max"):
        _raises(ValueError, "--stat", plots.group_benchmarks, entries, stat)
        return
    groups = plots.group_benchmarks(entries, stat)
    expected = {}
    for e, (group, label) in zip(entries, want):
        s = e["stats"]
        v = s[stat]
        if stat == "mean":
            err = (s["stddev"], s["stddev"])
        elif stat == "median":
            err = (max(v - s["q1"], 0.0), max(s["q3"] - v, 0.0))
        else:
            err = (0.0, 0.0)
        expected.setdefault(group, []).append((label, v, *err))
    assert groups.keys() == expected.keys()
    for g in expected:
        assert [it[0] for it in groups[g]] == [it[0] for it in expected[g]]
        assert [it[1:] for it in groups[g]] == [pytest.approx(it[1:]) for it in expected[g]]


@settings(max_examples=60)
@given(value=st.sampled_from([0.0, -1e-3, float("nan"), "fast"]), missing=st.booleans())
def test_group_benchmarks_refuses_a_stat_that_is_no_time(value, missing):
    e = bench_entry("test_x[a]", 1e-3)
    if missing:
        del e["stats"]["median"]
        _raises(ValueError, "--stat", plots.group_benchmarks, [e], "median")
    elif isinstance(value, str):
        e["stats"]["mean"] = value
        with pytest.raises(ValueError):
            plots.group_benchmarks([e], "mean")
    else:
        e["stats"]["mean"] = value
        _raises(ValueError, "--stat", plots.group_benchmarks, [e], "mean")


@settings(max_examples=60)
@given(entries=st.lists(st.one_of(st.builds(lambda m: bench_entry("test_x[a]", m), st.floats(1e-6, 1)),
                                  st.just({"name": "no stats"}), st.just({"stats": {}}), st.just(3)), max_size=4),
       top=st.sampled_from(["dict", "list", "nolist", "empty"]))
def test_read_benchmarks(tmp_path, entries, top):
    """read_benchmarks(): the entries with a name and a stats dict; an empty file, no ``benchmarks`` list or no
    usable entry a ValueError naming bench."""
    folder = tempfile.mkdtemp(dir=tmp_path)
    path = os.path.join(folder, "b.json")
    doc = {"dict": {"benchmarks": entries}, "list": entries, "nolist": {"benchmarks": {"a": 1}}, "empty": None}[top]
    with open(path, "w") as fh:
        fh.write("" if doc is None else json.dumps(doc))
    good = [e for e in entries if isinstance(e, dict) and "name" in e and isinstance(e.get("stats"), dict)]
    if top == "dict" and good:
        assert plots.read_benchmarks(path) == good
    else:
        _raises(ValueError, "bench", plots.read_benchmarks, path)


@settings(max_examples=150)
@given(n=st.integers(1, 20), ncols=st.integers(1, 5), bars=st.integers(0, 40))
def test_bench_size(n, ncols, bars):
    """bench_size(): at most ``ncols`` panels a row, at least two panels wide, every panel at least BENCH_PANEL
    tall and BENCH_BAR_PX per bar (plus its axes), a 50-px title band."""
    w, h = plots.bench_size(n, ncols, bars)
    cols = min(ncols, n)
    rows = -(-n // cols)
    assert w == plots.BENCH_PANEL[0] * max(cols, 2)
    assert (h - 50) % rows == 0
    panel = (h - 50) // rows
    assert panel >= plots.BENCH_PANEL[1] and panel >= plots.BENCH_BAR_PX * bars
    assert panel == max(plots.BENCH_PANEL[1], plots.BENCH_BAR_PX * bars + 120)


@settings(max_examples=150)
@given(seconds=st.floats(1e-12, 1e4))
def test_unit_puts_the_value_at_one_or_more_of_the_largest_unit(seconds):
    units = [("s", 1.0), ("ms", 1e3), ("µs", 1e6), ("ns", 1e9)]
    unit, scale = plots._unit(seconds)
    i = units.index((unit, scale))
    assert seconds * scale >= 1.0 or unit == "ns"
    assert all(seconds * s < 1.0 for _, s in units[:i])


@settings(max_examples=60)
@given(stem=st.text(min_size=1, max_size=6).filter(lambda s: "/" not in s and "\0" not in s),
       ext=st.sampled_from([".png", ".PNG", ".Png", ".jpg", "", ".png.txt", "png"]))
def test_out_must_be_a_png_name(stem, ext):
    out = stem + ext
    if out.lower().endswith(".png"):
        assert plots._check_out(out) is None
    else:
        msg = _raises(ValueError, "--out", plots._check_out, out)
        assert repr(out) in msg


@settings(max_examples=30)
@given(width=st.one_of(st.integers(-5, 40), st.just(20.0), st.just(True)), name=st.sampled_from(["width", "height",
                                                                                                  "dpi"]))
def test_figure_size_is_an_integer_of_at_least_16(width, name):
    skip_unless_installed("matplotlib")
    kw = {"width": 100, "height": 100, "dpi": 100, name: width}
    if type(width) is int and width >= 16:
        fig = plots._figure(**kw)
        assert tuple(round(x) for x in fig.get_size_inches() * fig.dpi) == (kw["width"], kw["height"])
    else:
        _raises(ValueError, f"--{name}", plots._figure, **kw)


# ------------------------------------------------------------------------------- defects found (fixed since)
@pytest.mark.parametrize("value", [10 ** 400, fractions.Fraction(10 ** 400)])
def test_a_noise_std_too_large_for_a_float_is_a_value_error_naming_it(value):
    with pytest.raises(ValueError, match="^noise_std: "):
        chk.non_negative("noise_std", value)
    with pytest.raises(ValueError, match="^noise_std: "):
        sk.stop_embed(torch.randn(4, 3), torch.tensor([1]), torch.randn(3, 2), noise_std=value, generator=_gen(),
                      backend="reference")
