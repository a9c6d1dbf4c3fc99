"""Property-based tests (hypothesis) of the training pipeline's pure parts: the configuration, the schedules, the
EMA, the checkpoint folder's naming, pruning and atomic writes, and the JSONL log's resume.

Contracts: ``stop_kernels/training/config.py`` (the module docstring's precedence, ``_coerce``, ``validate``: "raise
ConfigError naming the key", ``with_micro_batch`` / ``local_batch``) and the README's "Configuration keys" table;
``stop_kernels/training/schedules.py`` (step ``i`` is the official schedulers after ``i + 1`` calls of ``.step()``,
replayed here by the official I-JEPA ``WarmupCosineSchedule`` / ``CosineWDSchedule`` and the momentum generator,
written out statefully); ``stop_kernels/training/ema.py`` (``t ← m·t + (1 − m)·o``); the docstrings of
``stop_kernels/training/checkpoint.py`` (only complete ``step_*`` folders are checkpoints, ``prune`` keeps the newest
``keep``, a job killed at any point leaves the old set or the old set plus the new one) and of
``stop_kernels/_checks.write_atomic``; ``MetricsLogger`` (a resume keeps the log's records up to its step) and
``format_progress`` in ``stop_kernels/training/metrics.py``.

Every expectation is computed here, independently of the function under test; the examples (the profile in
``conftest.py``) are the same on every run. The example-based tests of the same code are in
``tests/test_training_basics.py``, ``tests/test_train_checkpoint.py`` and ``tests/test_train_resume_edge_cases.py``
(their helpers are imported, not copied). The three defects these properties found (an int beyond a float's range, a
list given for a folder key, a one-patch grid named by the collator's own argument) are fixed, and their
reproductions stay below as regression tests.
"""
import dataclasses
import errno
import functools
import json
import math
import os
import re
import tempfile
from contextlib import contextmanager, nullcontext
from unittest import mock

import pytest
import torch
import yaml
from conftest import skip_unless_installed

skip_unless_installed("hypothesis", module_level=True)
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from stop_kernels._checks import write_atomic, write_json_atomic  # noqa: E402
from stop_kernels.data import MultiBlockMaskCollator  # noqa: E402
from stop_kernels.training.checkpoint import (Checkpointer, CheckpointError, find_checkpoint,  # noqa: E402
                                              latest_checkpoint, list_checkpoints, load_state, read_meta,
                                              step_dirname)
from stop_kernels.training.config import (CHOICES, COMPILED_BLOCK_SETTINGS, ConfigError, TrainConfig,  # noqa: E402
                                          build_parser, config_from_dict, local_batch, parse_config,
                                          with_micro_batch)
from stop_kernels.training.ema import ema_update  # noqa: E402
from stop_kernels.training.metrics import MetricsLogger, format_progress  # noqa: E402
from stop_kernels.training.schedules import lr_at, momentum_at, wd_at  # noqa: E402

from test_train_checkpoint import model_and_opt, single, snapshot  # noqa: E402

FIELDS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


@functools.lru_cache(maxsize=None)
def _parser():
    return build_parser()


def _parse(argv):
    """``parse_config(argv)`` with one parser for the file (building it reads TrainConfig's source: 15 ms)."""
    return parse_config(argv, parser=_parser())


# ------------------------------------------------------------------------------------------------ config strategies
def _floats(lo: float = 0.0, hi: float = 1e6, **kw):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, **kw)


def _pair(lo: float, hi: float, **kw):
    """A (min, max) pair in [lo, hi] (as a tuple: the TrainConfig value)."""
    return st.tuples(_floats(lo, hi, **kw), _floats(lo, hi, **kw)).map(lambda p: (min(p), max(p)))


# folder names: printable text that is not blank (``out: "  "`` is refused)
_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FFF, blacklist_categories=("Cs", "Cc", "Cf",
                                                                                            "Zl", "Zp")),
                min_size=1, max_size=12).filter(lambda s: s.strip())
# the model names without a recipe (a recipe fills the keys a file leaves out: tests/test_training_basics.py)
MODELS = {"vit_tiny": "vit_tiny", "vit_t": "vit_tiny", "vit_small": "vit_small", "vit_s": "vit_small"}
POLICIES = ("", "compiled:24=triton", "compiled:24=sdpa", "compiled_train:80=triton", "fwd_only=sdpa;train:80=sdpa")
POSITIVE = ("pred_depth", "synthetic_size", "npred", "batch_size", "grad_accum", "keep_ckpts", "log_every",
            "benchmark_batches")
NON_NEGATIVE = ("num_workers", "micro_batch", "steps", "ckpt_every", "benchmark", "benchmark_warmup")
NON_NEGATIVE_FLOATS = ("noise_std", "start_lr", "lr", "final_lr", "weight_decay", "final_weight_decay", "peak_tflops")
FREE_BOOLS = ("hflip", "gaussian_blur", "grayscale", "pin_memory", "skip_nonfinite_grads", "bf16_residual",
              "fused_target_gelu", "packed", "resume", "export", "tensorboard")
FREE_CHOICES = ("noise_mode", "precision", "device", "sharding", "attention")

# keys whose valid values do not depend on any other key (given the others' defaults or a valid draw of them)
FREE = {
    **{k: st.integers(1, 2 ** 70) for k in POSITIVE},
    **{k: st.integers(0, 2 ** 70) for k in NON_NEGATIVE},
    "seed": st.integers(0, 2 ** 62 - 1),
    **{k: _floats() for k in NON_NEGATIVE_FLOATS},
    "ema_start": _floats(0.0, 1.0), "ema_end": _floats(0.0, 1.0),
    "color_jitter": _floats(0.0, 2.5),
    "crop_scale": _pair(0.0, 1.0, exclude_min=True),
    **{k: st.booleans() for k in FREE_BOOLS},
    **{k: st.sampled_from(CHOICES[k]) for k in FREE_CHOICES},
    "pred_emb_dim": st.integers(1, 2 ** 40).map(lambda k: 12 * k),  # a multiple of 4 and of 3 and 6 heads
    "attention_policy": st.sampled_from(POLICIES),
    "out": _TEXT,
    "data": st.one_of(st.just("synthetic"), _TEXT),
}


@st.composite
def grid_keys(draw):
    """img_size, patch_size and the mask keys, with a min_keep below the smallest block either mask can draw
    (the collator's own bound, as ``test_properties_masks.collator_settings`` draws it)."""
    patch, grid = draw(st.sampled_from([1, 2, 4, 8, 16])), draw(st.integers(2, 10))
    kw = dict(img_size=grid * patch, patch_size=patch, enc_mask_scale=draw(_pair(0.0, 1.0)),
              pred_mask_scale=draw(_pair(0.0, 1.0)), aspect_ratio=draw(_pair(1e-3, 1e3)))
    probe = MultiBlockMaskCollator(kw["img_size"], patch, kw["enc_mask_scale"], kw["pred_mask_scale"],
                                   kw["aspect_ratio"], min_keep=0)
    smallest = min(h * w for h, w in (probe.smallest_block(probe.pred_mask_scale, probe.aspect_ratio),
                                      probe.smallest_block(probe.enc_mask_scale, (1.0, 1.0))))
    kw["min_keep"] = draw(st.integers(0, smallest - 1))
    return kw


@st.composite
def epoch_keys(draw):
    """epochs, warmup_epochs <= epochs, lr_hold_epoch 0 or in [warmup, epochs], wd_hold_epoch in [0, epochs]."""
    epochs = draw(st.integers(1, 10 ** 6))
    warm = draw(_floats(0.0, float(epochs)))
    return dict(epochs=epochs, warmup_epochs=warm,
                lr_hold_epoch=draw(st.one_of(st.just(0.0), _floats(warm, float(epochs)))),
                wd_hold_epoch=draw(_floats(0.0, float(epochs))))


@st.composite
def compile_keys(draw):
    """compile and the settings of the compiled blocks, ac, cuda_graph_target and overlap_target, consistent:
    compiled-block settings only with compile; reduce-overhead without cpp_wrapper, ac, cuda_graph_target and
    overlap_target; a stack scope without ac, 'stack' without cpp_wrapper."""
    kw = dict(compile=draw(st.booleans()))
    if kw["compile"]:
        kw.update(compile_mode=draw(st.sampled_from(CHOICES["compile_mode"])),
                  compile_scope=draw(st.sampled_from(CHOICES["compile_scope"])),
                  combo_kernels=draw(st.booleans()), multi_kernel=draw(st.booleans()),
                  cpp_wrapper=draw(st.booleans()))
        if kw["compile_scope"] == "stack" or kw["compile_mode"] == "reduce-overhead":
            kw["cpp_wrapper"] = False
    graphs = kw.get("compile_mode") == "reduce-overhead"
    kw["ac"] = "none" if graphs or kw.get("compile_scope", "block") != "block" else \
        draw(st.sampled_from(CHOICES["ac"]))
    for k in ("cuda_graph_target", "overlap_target"):
        kw[k] = False if graphs else draw(st.booleans())
    return kw


@st.composite
def valid_values(draw):
    """A valid set of keys (a random subset of every key but init_from) with their TrainConfig values."""
    values = {}
    for k in sorted(FREE):
        if draw(st.booleans()):
            values[k] = draw(FREE[k])
    if draw(st.booleans()):
        values["model"] = draw(st.sampled_from(sorted(MODELS)))
    for group in (grid_keys(), epoch_keys(), compile_keys()):
        if draw(st.booleans()):
            values.update(draw(group))
    return values


def expected_config(values) -> TrainConfig:
    """The TrainConfig ``values`` describe: the defaults with these values, the model's alias resolved."""
    cfg = TrainConfig(**values)
    return dataclasses.replace(cfg, model=MODELS[cfg.model])


def _yaml_file(folder, values) -> str:
    fd, path = tempfile.mkstemp(suffix=".yaml", dir=folder)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(yaml.safe_dump({k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}))
    return path


TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on", "TRUE", " Yes "), ("false", "0", "no", "off", "False")


def cli_args(draw, key, value):
    """``key: value`` as command-line tokens, in one of the documented spellings (pairs ``a,b``, booleans the bare
    flag or a word, ints with a decimal point or an exponent)."""
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        if value and draw(st.booleans()):
            return [flag]
        text = draw(st.sampled_from(TRUE_WORDS if value else FALSE_WORDS))
    elif isinstance(value, int):
        text = draw(st.sampled_from([str(value), f"{value}.0", f"{value}e0", f"+{value}"]))
    elif isinstance(value, float):
        text = repr(value)
    elif isinstance(value, tuple):
        a, b = map(repr, value)
        text = draw(st.sampled_from([f"{a},{b}", f"{a}, {b}", f"({a}, {b})", f"[{a},{b}]"]))
    else:
        text = value
    if text.startswith("-") or draw(st.booleans()):
        return [f"{flag}={text}"]
    return [flag, text]


# ------------------------------------------------------------------------------------------------ config properties
@settings(max_examples=60)
@given(values=valid_values(), data=st.data())
def test_a_valid_config_reads_the_same_from_yaml_a_dict_and_the_command_line(tmp_path, values, data):
    """Any valid set of keys: written to a YAML file and read with ``--config``, given to ``config_from_dict``, or
    given as flags (every key is a flag, in any documented spelling), it is the TrainConfig of these values; the
    keys left out keep their defaults."""
    want = expected_config(values)
    assert _parse(["--config", _yaml_file(tmp_path, values)]) == want
    assert config_from_dict({k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}) == want
    argv = [t for k, v in values.items() for t in cli_args(data.draw, k, v)]
    assert _parse(argv) == want, argv


@settings(max_examples=60)
@given(values=valid_values(), key=st.sampled_from(sorted(FREE)), data=st.data())
def test_a_command_line_flag_overrides_the_files_value(tmp_path, values, key, data):
    """The file's value of a key is replaced by the command line's, whatever the key and the two values; the
    file's other keys stay."""
    values[key] = data.draw(FREE[key], label="file value")
    flag = data.draw(FREE[key], label="flag value")
    argv = ["--config", _yaml_file(tmp_path, values)] + cli_args(data.draw, key, flag)
    assert _parse(argv) == expected_config(dict(values, **{key: flag})), argv


NON_DEFAULT_COMPILED = {"compile_mode": st.sampled_from(CHOICES["compile_mode"][1:]),
                        "compile_scope": st.sampled_from(CHOICES["compile_scope"][1:]),
                        "combo_kernels": st.just(True), "cpp_wrapper": st.just(True), "multi_kernel": st.just(True)}


@settings(max_examples=30)
@given(held=st.lists(st.sampled_from(COMPILED_BLOCK_SETTINGS), min_size=1, unique=True), data=st.data(),
       off=st.sampled_from(["absent", "file", "flag"]))
def test_compile_off_drops_the_files_compiled_block_settings_and_refuses_the_command_lines(tmp_path, held, data,
                                                                                           off):
    """With compile off in the end (absent, ``compile: false`` in the file, or ``--compile false`` over a file's
    ``compile: true``), the compiled-block settings a file holds are dropped (the module docstring); the same
    setting given as a flag is a ConfigError naming it."""
    values = {k: data.draw(NON_DEFAULT_COMPILED[k]) for k in held}
    if off != "absent":
        values["compile"] = off == "flag"
    argv = ["--config", _yaml_file(tmp_path, values)] + (["--compile", "false"] if off == "flag" else [])
    assert _parse(argv) == TrainConfig()
    key = data.draw(st.sampled_from(sorted(set(values) - {"compile"})))
    with pytest.raises(ConfigError, match=f"^{key}: "):
        _parse(argv + cli_args(data.draw, key, values[key]))


INT_KEYS = POSITIVE + NON_NEGATIVE + ("seed", "epochs")


@settings(max_examples=80)
@given(key=st.sampled_from(INT_KEYS), mantissa=st.integers(1, 2 ** 64), exp=st.integers(0, 12),
       spelling=st.sampled_from(["digits", "exponent", "point", "yaml int", "yaml text"]), fraction=st.integers(1, 9))
@example(key="seed", mantissa=2 ** 53 + 1, exp=0, spelling="digits", fraction=5)
def test_int_keys_are_read_exactly(tmp_path, key, mantissa, exp, spelling, fraction):
    """An int key reads the integer it is written as, exactly (no float round trip: above 2**53 one would be
    another seed): ``N``, ``Me+K``, ``N.0``, YAML's int and a YAML string; ``N.d`` (d ≠ 0) is a ConfigError naming
    the key."""
    if key == "seed":  # below 2**62
        mantissa = 1 + mantissa % ((2 ** 62 - 1) // 10 ** exp)
    value = mantissa * 10 ** exp
    text = {"digits": str(value), "exponent": f"{mantissa}e+{exp}", "point": f"{value}.0"}.get(spelling, str(value))
    if spelling == "yaml int":
        argv = ["--config", _yaml_file(tmp_path, {key: value})]
    elif spelling == "yaml text":
        argv = ["--config", _yaml_file(tmp_path, {key: f"{mantissa}E{exp}"})]
    else:
        argv = [f"--{key.replace('_', '-')}", text]
    got = getattr(_parse(argv), key)
    assert type(got) is int and got == value, (argv, got)
    with pytest.raises(ConfigError, match=f"^{key}: cannot read"):
        _parse([f"--{key.replace('_', '-')}", f"{value}.{fraction}"])


# --- bad values: every kind of bad value of every key, refused with the key named ----------------------------------
_JUNK_NUMBERS = ("ten", "0x10", "", " ", "1e", "1,5", "--1", "1.2.3", "one")


def bad_values(key):
    """``{kind: strategy}``: the kinds of value of ``key`` that ``_coerce`` / ``validate`` refuse, the other keys at
    their defaults: None (YAML ``key:``), values of another type (those a careless conversion would take: ``1``
    for a bool, ``True`` or ``2.5`` for an int, a bool inside a pair), text that is no value of the type, and
    values out of the key's range or against a rule with another key's default."""
    default = FIELDS[key]
    kinds = {"none": st.none()}
    if isinstance(default, bool):
        kinds.update(int=st.integers(-3, 3), float=_floats(-10, 10), list=st.lists(st.booleans(), max_size=2),
                     text=st.sampled_from(["maybe", "2", "tru", "", "nope", "y", "n", "null", "1.0", "-1"]))
        if key in ("combo_kernels", "cpp_wrapper", "multi_kernel"):  # on, without compile
            kinds["range"] = st.just(True)
    elif isinstance(default, int):
        lo = 1 if key in POSITIVE + ("epochs", "img_size", "patch_size", "pred_emb_dim") else 0
        ranges = [st.integers(max_value=lo - 1)]
        if key == "seed":
            ranges.append(st.integers(min_value=2 ** 62))
        if key == "min_keep":  # the default 8x8 grid: a mask keeps at most 64 patches
            ranges.append(st.integers(min_value=64))
        if key == "pred_emb_dim":  # vit_tiny's 3 heads and the sin-cos positions: a multiple of 12
            ranges.append(st.integers(1, 10 ** 6).filter(lambda v: v % 12))
        if key == "img_size":  # patch 8 (a 1x1 grid at 8: test_defect_a_one_patch_grid_names_img_size)
            ranges.append(st.integers(1, 10 ** 4).filter(lambda v: v % 8))
        if key == "patch_size":  # img 64
            ranges.append(st.integers(1, 10 ** 4).filter(lambda v: 64 % v))
        kinds.update(float=_floats(-1e6, 1e6).filter(lambda v: not v.is_integer()), bool=st.booleans(),
                     text=st.sampled_from(_JUNK_NUMBERS + ("nan", "inf", "1.5", "-inf", "1e-1", "2.50")),
                     list=st.lists(st.integers(0, 9), max_size=2), range=st.one_of(ranges))
    elif isinstance(default, float):
        ranges = [_floats(-1e6, 0.0, exclude_max=True)]
        if key in ("ema_start", "ema_end"):
            ranges.append(_floats(1.0, 1e6, exclude_min=True))
        if key == "color_jitter":
            ranges.append(_floats(2.5, 1e6, exclude_min=True))
        if key in ("warmup_epochs", "lr_hold_epoch", "wd_hold_epoch"):  # past the default 1 epoch
            ranges.append(_floats(1.0, 1e6, exclude_min=True))
        if key == "lr_hold_epoch":  # inside the default 0.1-epoch warm-up
            ranges.append(_floats(0.0, 0.1, exclude_min=True, exclude_max=True))
        kinds.update(bool=st.booleans(), text=st.sampled_from(_JUNK_NUMBERS + ("1.0.0", "0.1f")),
                     nonfinite=st.sampled_from([math.nan, math.inf, -math.inf, "nan", "inf", "-inf", "Infinity"]),
                     list=st.lists(_floats(0.0, 1.0), max_size=2), range=st.one_of(ranges))
    elif isinstance(default, tuple):
        lo, hi = {"aspect_ratio": (1e-3, 1e3)}.get(key, (0.0, 1.0))
        ranges = [st.tuples(_floats(lo, hi), _floats(lo, hi)).filter(lambda p: p[0] > p[1]),
                  st.tuples(_floats(-1e6, lo, exclude_max=True), _floats(lo, hi)),
                  st.tuples(_floats(lo, hi), _floats(hi, 1e9, exclude_min=True))]
        if key == "crop_scale":  # 0 < min
            ranges.append(st.tuples(st.just(0.0), _floats(0.0, 1.0)))
        kinds.update(length=st.lists(_floats(0.1, 1.0), max_size=4).filter(lambda v: len(v) != 2),
                     bool=st.one_of(st.tuples(_floats(0.1, 1.0), st.just(True)),
                                    st.tuples(st.just(False), _floats(0.1, 1.0))),
                     scalar=_floats(0.1, 1.0),
                     text=st.sampled_from(["a,b", "0.3", "0.3,1.0,0.5", "(0.3;1.0)", "", "0.3 1.0", "0.5,x"]),
                     nonfinite=st.tuples(st.sampled_from([math.nan, math.inf]), _floats(lo, hi)),
                     range=st.one_of(ranges))
    elif key in CHOICES:
        kinds.update(bool=st.booleans(), text=_TEXT.filter(lambda s: s not in CHOICES[key]),
                     case=st.sampled_from([c.upper() for c in CHOICES[key]] + [c + " " for c in CHOICES[key]]))
        if key in COMPILED_BLOCK_SETTINGS:  # a choice of the compiled blocks without compile
            kinds["range"] = st.sampled_from(CHOICES[key][1:])
    elif key == "model":
        kinds.update(bool=st.booleans(), text=_TEXT.filter(lambda s: s not in MODELS and s not in (
            "vit_base", "vit_large", "vit_huge", "vit_giant", "vit_b", "vit_l", "vit_h", "vit_g")),
                     case=st.sampled_from(["VIT_TINY", "vit_tiny ", "vit-tiny", "vit_x"]))
    elif key == "out":
        kinds.update(bool=st.booleans(), text=st.sampled_from(["", " ", "\t"]))
    elif key == "data":
        kinds.update(bool=st.booleans())
    elif key == "init_from":
        kinds.update(bool=st.booleans(), text=_TEXT.map(lambda s: "/nonexistent-" + s.replace("/", "_")))
    elif key == "attention_policy":
        kinds.update(bool=st.booleans(), text=st.sampled_from(["compiled:x=triton", "compiled:24=cudnn", "nonsense",
                                                                "=triton", "compiled:24=triton,compiled:24=sdpa"]))
    return kinds


@pytest.mark.parametrize("key", sorted(FIELDS))
@settings(max_examples=4)
@given(data=st.data())
def test_a_bad_value_is_a_config_error_naming_its_key(tmp_path, key, data):
    """Every kind of bad value of every key (``bad_values``), given in a dict (a checkpoint's meta.json), a YAML
    file or on the command line (where a value is text), is a ConfigError (a ValueError) whose message starts with
    the key (``img_size`` for a patch size that does not divide it, whose message names both)."""
    named = ("img_size", "patch_size") if key == "patch_size" else (key,)
    for kind, values in bad_values(key).items():
        value = data.draw(values, label=kind)
        route = data.draw(st.sampled_from(["dict", "yaml", "cli"] if isinstance(value, str) else ["dict", "yaml"]),
                          label="route")
        if route == "yaml" and key in COMPILED_BLOCK_SETTINGS:
            route = "dict"  # a file's compiled-block settings are dropped without compile (the test above)
        with pytest.raises(ConfigError) as e:
            if route == "dict":
                config_from_dict({key: value})
            elif route == "yaml":
                _parse(["--config", _yaml_file(tmp_path, {key: value})])
            else:
                _parse([f"--{key.replace('_', '-')}={value}"])
        assert re.match(rf"^({'|'.join(named)}): ", str(e.value)) and key in str(e.value), (kind, value, str(e.value))


# Defects these properties found (fixed; the reproductions stay as regression tests, not drawn)
@pytest.mark.parametrize("route", ["dict", "yaml"])
@pytest.mark.parametrize("key, value", [("lr", 10 ** 400), ("noise_std", 10 ** 309), ("crop_scale", [10 ** 400, 1.0])],
                         ids=["lr-10**400", "noise_std-10**309", "crop_scale-10**400,1"])
def test_an_int_too_large_for_a_float_key_is_a_config_error(tmp_path, key, value, route):
    """An int beyond a float's range (lr: 1000…0 written out) made float() raise OverflowError, which escaped as a
    traceback from train.py instead of a ConfigError naming the key."""
    with pytest.raises(ConfigError, match=f"^{key}: "):
        if route == "dict":
            config_from_dict({key: value})
        else:
            _parse(["--config", _yaml_file(tmp_path, {key: value})])


@pytest.mark.parametrize("key, value", [("out", ["runs", "a"]), ("data", {"root": "/data"}), ("out", [])])
def test_a_list_or_mapping_for_a_folder_key_is_a_config_error(tmp_path, key, value):
    """str() made a YAML list given for out (out: [runs, a]) the folder "['runs', 'a']"."""
    with pytest.raises(ConfigError, match=f"^{key}: "):
        _parse(["--config", _yaml_file(tmp_path, {key: value})])


@pytest.mark.parametrize("patch", [8, 16, 14])
def test_a_one_patch_grid_names_img_size(patch):
    """A 1x1 patch grid was refused by the mask collator naming its own input_size, no config key."""
    with pytest.raises(ConfigError, match="^(img_size|patch_size): "):
        _parse(["--img-size", str(patch), "--patch-size", str(patch)])


@settings(max_examples=200)
@given(world=st.integers(1, 64), local=st.integers(1, 600), accum=st.integers(1, 40), micro=st.integers(0, 700),
       rest=st.integers(0, 63), data=st.data())
def test_micro_batch_raises_grad_accum_to_the_fewest_even_micro_batches(world, local, accum, micro, rest, data):
    """``local_batch``: ``batch_size / world`` when the ranks share it evenly and ``grad_accum`` divides it, else a
    ConfigError naming batch_size, then grad_accum. ``with_micro_batch``: ``grad_accum`` raised to the smallest count
    >= its own that splits the rank's batch into equal micro-batches of at most ``micro_batch`` images (the config
    itself when ``micro_batch`` is 0 or the count is unchanged)."""
    batch = local * world + (rest % world if data.draw(st.booleans()) else 0)
    cfg = TrainConfig(batch_size=batch, grad_accum=accum, micro_batch=micro)
    before = dataclasses.replace(cfg)
    if batch % world:
        for f in (local_batch, with_micro_batch) if micro else (local_batch,):
            with pytest.raises(ConfigError, match="^batch_size: "):
                f(cfg, world)
        if not micro:  # micro_batch 0: unchanged, whatever the batch
            assert with_micro_batch(cfg, world) is cfg
        return
    if local % accum:  # (with_micro_batch: when it has micro-batches to fit)
        for f in (local_batch, with_micro_batch) if micro else (local_batch,):
            with pytest.raises(ConfigError, match="^grad_accum: "):
                f(cfg, world)
        if not micro:
            assert with_micro_batch(cfg, world) is cfg
        return
    assert local_batch(cfg, world) == local
    got = with_micro_batch(cfg, world)
    assert cfg == before  # not changed in place
    if micro == 0:
        assert got is cfg
        return
    k = got.grad_accum
    assert local % k == 0 and local // k <= micro and k >= accum, (local, accum, micro, k)
    assert not any(local % j == 0 and local // j <= micro for j in range(accum, k)), (local, accum, micro, k)
    assert dataclasses.replace(got, grad_accum=accum) == cfg  # nothing else changes
    assert (got is cfg) == (k == accum)
    assert local_batch(got, world) == local


# ------------------------------------------------------------------------------------------------ schedules
class OfficialWarmupCosine:
    """I-JEPA's ``src/utils/schedulers.WarmupCosineSchedule`` (its ``.step()`` returns the new lr), with the StoP
    ``fix_lr_thres`` / ``const`` hold in steps."""

    def __init__(self, warmup_steps, start_lr, ref_lr, T_max, final_lr, hold=0):
        self.start_lr, self.ref_lr, self.final_lr, self.warmup_steps = start_lr, ref_lr, final_lr, warmup_steps
        self.T_max, self.hold, self._step = T_max - warmup_steps, hold, 0.

    def step(self):
        self._step += 1
        s = min(self._step, self.hold) if self.hold > 0 else self._step
        if self._step < self.warmup_steps:
            progress = float(self._step) / float(max(1, self.warmup_steps))
            return self.start_lr + progress * (self.ref_lr - self.start_lr)
        progress = float(s - self.warmup_steps) / float(max(1, self.T_max))
        return max(self.final_lr,
                   self.final_lr + (self.ref_lr - self.final_lr) * 0.5 * (1. + math.cos(math.pi * progress)))


class OfficialCosineWD:
    """I-JEPA's ``CosineWDSchedule``, with the StoP ``fix_wd_thres`` / ``const`` hold in steps."""

    def __init__(self, ref_wd, T_max, final_wd, hold=0):
        self.ref_wd, self.final_wd, self.T_max, self.hold, self._step = ref_wd, final_wd, T_max, hold, 0.

    def step(self):
        self._step += 1
        s = min(self._step, self.hold) if self.hold > 0 else self._step
        new_wd = self.final_wd + (self.ref_wd - self.final_wd) * 0.5 * (1. + math.cos(math.pi * s / self.T_max))
        return max(self.final_wd, new_wd) if self.final_wd <= self.ref_wd else min(self.final_wd, new_wd)


def _close(a: float, b: float, scale: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12 * scale)


_LR = st.one_of(st.just(0.0), _floats(1e-8, 10.0))


@settings(max_examples=150)
@given(total=st.integers(1, 300), data=st.data(), start=_LR, ref=_LR, final=_LR)
def test_lr_is_the_official_warmup_cosine_at_every_step_in_any_order(total, data, start, ref, final):
    """For any warm-up <= total, start / peak / final lr and hold (0 or in [warmup, total], as validate allows):
    lr_at(i) is the official scheduler after i + 1 steps, queried in any order (a resumed run asks for its step
    first). Its shape: the warm-up a straight line from start_lr to lr, reached at step warmup − 1, then the
    cosine to final_lr at the last step (clamped at final_lr), each piece monotonic, no value outside the three
    values' range, no jump above the steepest slope, constant from the hold on."""
    warmup = data.draw(st.integers(0, total), label="warmup")
    hold = data.draw(st.one_of(st.just(0), st.integers(max(warmup, 1), total)), label="hold")
    order = data.draw(st.permutations(range(total)), label="order")
    kw = dict(warmup=warmup, total=total, start_lr=start, ref_lr=ref, final_lr=final, hold=hold)
    official = OfficialWarmupCosine(warmup, start, ref, total, final, hold)
    want = [official.step() for _ in range(total)]
    scale = max(start, ref, final, 1e-300)
    asked = {i: lr_at(i, **kw) for i in order}
    assert all(asked[i] == lr_at(i, **kw) for i in order)  # the same step, the same value
    got = [asked[i] for i in range(total)]
    assert all(_close(g, w, scale) for g, w in zip(got, want)), (got, want)
    lo, hi = min(start, ref, final), max(start, ref, final)
    assert all(lo - 1e-12 * scale <= v <= hi + 1e-12 * scale for v in got)
    if 1 <= warmup <= total:
        assert _close(got[warmup - 1], max(ref, final), scale)  # the peak at the warm-up's end
    ramp, rest = got[:max(warmup - 1, 0)], got[max(warmup - 1, 0):]
    sign = 1 if ref >= start else -1
    assert all(sign * (b - a) >= -1e-12 * scale for a, b in zip(ramp, ramp[1:]))
    assert all(b <= a + 1e-12 * scale for a, b in zip(rest, rest[1:]))  # never rising after the warm-up
    if hold == 0 and total > warmup:
        assert _close(got[-1], final, scale)  # the end of the cosine
    if hold:
        assert all(v == got[hold - 1] for v in got[hold - 1:])
        p = (hold - warmup) / max(1, total - warmup)
        assert _close(got[hold - 1], max(final, final + (ref - final) * (1 + math.cos(math.pi * p)) / 2), scale)
    slope = abs(ref - start) / max(1, warmup) + abs(ref - final) * math.pi / 2 / max(1, total - warmup)
    assert final > ref or all(abs(b - a) <= slope * (1 + 1e-9) + 1e-12 * scale for a, b in zip(got, got[1:]))


@settings(max_examples=120)
@given(total=st.integers(1, 300), ref=_LR, final=_LR, data=st.data())
def test_weight_decay_is_the_official_cosine_at_every_step(total, ref, final, data):
    """wd_at(i) is the official CosineWDSchedule after i + 1 steps: from weight_decay (step −1) to
    final_weight_decay at the last step, monotonic towards it and inside the two values' range; constant from the
    hold on; the same value for the same step in any order."""
    hold = data.draw(st.one_of(st.just(0), st.integers(1, total)), label="hold")
    kw = dict(total=total, ref_wd=ref, final_wd=final, hold=hold)
    official = OfficialCosineWD(ref, total, final, hold)
    want = [official.step() for _ in range(total)]
    scale = max(ref, final, 1e-300)
    order = data.draw(st.permutations(range(total)), label="order")
    asked = {i: wd_at(i, **kw) for i in order}
    got = [asked[i] for i in range(total)]
    assert all(_close(g, w, scale) for g, w in zip(got, want)), (got, want)
    assert _close(wd_at(-1, total=total, ref_wd=ref, final_wd=final), ref, scale)
    lo, hi = min(ref, final), max(ref, final)
    assert all(lo - 1e-12 * scale <= v <= hi + 1e-12 * scale for v in got)
    sign = 1 if final >= ref else -1
    assert all(sign * (b - a) >= -1e-12 * scale for a, b in zip(got, got[1:]))
    if hold == 0:
        assert _close(got[-1], final, scale)
    else:
        assert all(v == got[hold - 1] for v in got[hold - 1:])


@settings(max_examples=120)
@given(total=st.integers(1, 10 ** 6), start=_floats(0.0, 1.0), end=_floats(0.0, 1.0), data=st.data())
def test_ema_momentum_is_the_official_linear_generator(total, start, end, data):
    """momentum_at(i) is the official generator's i-th value ``start + i·(end − start)/total``: start at step 0, end
    at step ``total``, equal increments, inside [start, end]."""
    steps = data.draw(st.lists(st.integers(0, total), min_size=1, max_size=20), label="steps")
    scale = max(start, end, 1e-300)
    assert momentum_at(0, total=total, start=start, end=end) == start
    assert _close(momentum_at(total, total=total, start=start, end=end), end, scale)
    for i in steps:
        m = momentum_at(i, total=total, start=start, end=end)
        assert _close(m, start + i * (end - start) / total, scale), (i, m)
        assert min(start, end) - 1e-15 <= m <= max(start, end) + 1e-15
        if i < total:
            step = momentum_at(i + 1, total=total, start=start, end=end) - m
            assert math.isclose(step, (end - start) / total, rel_tol=1e-6, abs_tol=1e-15), (i, step)


# ------------------------------------------------------------------------------------------------ EMA
@st.composite
def ema_cases(draw):
    n = draw(st.integers(1, 4))
    shapes = [tuple(draw(st.lists(st.integers(1, 7), min_size=0, max_size=3))) for _ in range(n)]
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31)))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    # fresh values, never zero; target and online far enough apart that any mix-up of the weights shows
    t = [(torch.randn(s, generator=g, dtype=torch.float64) * scale + scale * 0.01).to(dtype) for s in shapes]
    o = [(torch.randn(s, generator=g, dtype=torch.float64) * scale - scale * 0.01).to(dtype) for s in shapes]
    m = draw(st.one_of(st.sampled_from([0.0, 1.0, 0.5, 0.996, 0.9999]), _floats(0.0, 1.0)))
    params = draw(st.booleans())
    return t, o, m, params


@settings(max_examples=120)
@given(case=ema_cases())
def test_ema_is_the_momentum_mix_of_target_and_online_per_element(case):
    """For any momentum in [0, 1] and any tensors: every target element becomes ``m·t + (1 − m)·o`` (float64
    reference, to a few ulps of the inputs' size), in place; momentum 1 leaves the target as it is and 0 copies the
    online tensors, bit for bit; the online tensors are not touched; nn.Parameters (requires_grad) alike, with no
    autograd graph; a list of another length is a ValueError naming target."""
    t, o, m, params = case
    want = [m * a.double() + (1 - m) * b.double() for a, b in zip(t, o)]
    t0, o0 = [a.clone() for a in t], [b.clone() for b in o]
    if params:
        t, o = [torch.nn.Parameter(a) for a in t], [torch.nn.Parameter(b) for b in o]
    ptrs = [a.data_ptr() for a in t]
    ema_update(t, o, m)
    for a, b, w, a0, b0, p in zip(t, o, want, t0, o0, ptrs):
        a, b = a.detach(), b.detach()
        assert a.data_ptr() == p and a.dtype == a0.dtype
        assert torch.equal(b, b0)
        if m == 1.0:
            assert torch.equal(a, a0)
        elif m == 0.0:
            assert torch.equal(a, b0)
        eps = torch.finfo(a.dtype).eps
        bound = 8 * eps * torch.maximum(a0.double().abs(), b0.double().abs())
        assert ((a.double() - w).abs() <= bound).all(), (m, (a.double() - w).abs().max())
    if params:
        assert all(a.grad_fn is None and a.grad is None for a in t)
    with pytest.raises(ValueError, match="^target: "):
        ema_update(t[:-1] if len(t) > 1 else t + t, o, m)


# ------------------------------------------------------------------------------------------------ checkpoint folder
KINDS = ("complete", "no meta.json", "no .metadata", "absent")


@st.composite
def checkpoint_folders(draw):
    """``{name: kind}``: step folders of drawn steps (plain and ``.old``, complete or not, 8 to 11 digits), plain
    files of a step's name, temporary folders, and names that are no checkpoint (short digits, a suffix, other
    files and folders)."""
    entries = {}
    steps = draw(st.lists(st.one_of(st.integers(0, 300), st.integers(10 ** 7, 10 ** 10)), max_size=7, unique=True))
    for s in steps:
        name = step_dirname(s)
        plain = draw(st.sampled_from(KINDS + ("file",)))
        if plain != "absent":
            entries[name] = plain
        old = draw(st.sampled_from(KINDS))
        if old != "absent":
            entries[name + ".old"] = old
    for name in draw(st.lists(st.sampled_from([
            ".tmp-step_00000007", ".tmp-deleted-step_00000003", ".tmp-deleted-step_00000009.old", "step_123",
            "step_00000004x", "step_00000005.old.bak", "Step_00000006", "notes", "export", "step_",
            "step_00000008.tmp"]), unique=True, max_size=5)):
        entries.setdefault(name, draw(st.sampled_from(("complete", "dir", "file"))))
    return entries


def _make(folder, entries):
    for name, kind in entries.items():
        path = os.path.join(folder, name)
        if kind == "file":
            with open(path, "w") as fh:
                fh.write(name)
            continue
        os.mkdir(path)
        with open(os.path.join(path, "__0_0.distcp"), "w") as fh:
            fh.write(name)
        if kind in ("complete", "no .metadata"):
            with open(os.path.join(path, "meta.json"), "w") as fh:
                json.dump({"name": name}, fh)
        if kind in ("complete", "no meta.json"):
            with open(os.path.join(path, ".metadata"), "w") as fh:
                fh.write(name)


@settings(max_examples=150)
@given(entries=checkpoint_folders(), keep=st.integers(-1, 5), missing=st.integers(0, 10 ** 10))
def test_checkpoints_are_listed_found_and_pruned_by_their_step(tmp_path, entries, keep, missing):
    """The checkpoints of a folder are its complete ``step_<8+ digits>`` folders (meta.json and .metadata), a
    ``step_N.old`` standing in for its step where ``step_N`` is no complete one, ordered by step (not by name:
    ``step_100000000`` comes after ``step_99999999``); find_checkpoint gives the newest or a step's, and names the
    step it cannot find. Pruning deletes the checkpoints beyond the newest ``max(1, keep)``, every ``.tmp-`` folder
    and every ``.old`` folder that is not a checkpoint, and nothing else: no other file or folder, no content of a
    kept one."""
    folder = tempfile.mkdtemp(dir=tmp_path)
    _make(folder, entries)
    ckpt = {}
    for name, kind in entries.items():
        m = re.fullmatch(r"step_(\d{8,})(\.old)?", name)
        if m and kind == "complete" and (m.group(2) is None or entries.get(name[:-4]) != "complete"):
            ckpt[int(m.group(1))] = os.path.join(folder, name)
    want = sorted(ckpt.items())
    assert list_checkpoints(folder) == want
    assert latest_checkpoint(folder) == (want[-1][1] if want else None)
    if want:
        assert find_checkpoint(folder) == want[-1][1]
        assert all(find_checkpoint(folder, s) == p for s, p in want)
        if missing not in ckpt:
            with pytest.raises(ValueError, match="^step: "):
                find_checkpoint(folder, missing)
    else:
        with pytest.raises(FileNotFoundError, match="^run: "):
            find_checkpoint(folder)

    Checkpointer(folder, single(), keep=keep).prune()
    kept = dict(want[-max(1, keep):])
    gone = {os.path.basename(p) for s, p in want if s not in kept}
    gone |= {n for n, k in entries.items() if k != "file" and n.startswith(".tmp-")}
    gone |= {n for n, k in entries.items() if k != "file" and re.fullmatch(r"step_\d{8,}\.old", n)
             and os.path.join(folder, n) not in kept.values()}
    assert sorted(os.listdir(folder)) == sorted(set(entries) - gone)
    for name in set(entries) - gone:  # what stays is as it was
        path = os.path.join(folder, name)
        if entries[name] == "file":
            with open(path) as fh:
                assert fh.read() == name
        else:
            with open(os.path.join(path, "__0_0.distcp")) as fh:
                assert fh.read() == name
    assert list_checkpoints(folder) == sorted(kept.items())


class _Killed(BaseException):
    """The job killed at a file operation (a BaseException: no ``except Exception`` handler takes it)."""


@contextmanager
def _interrupted(at: int, mode: str):
    """The ``at``-th rename, replace, fsync, unlink or rmdir (of the save, DCP's writer and rmtree alike) fails:
    ``kill``: it and every later one raise :class:`_Killed` (a dead process touches no file); ``error``: it alone
    raises an OSError (a full disk), the rest run."""
    count = [0]
    reals = {name: getattr(os, name) for name in ("rename", "replace", "fsync", "unlink", "rmdir")}

    def wrapped(name):
        def op(*args, **kwargs):
            count[0] += 1
            if count[0] == at or (mode == "kill" and count[0] > at):
                if mode == "kill":
                    raise _Killed(f"killed at {name} #{count[0]}")
                raise OSError(errno.ENOSPC, f"No space left on device ({name} #{count[0]})")
            return reals[name](*args, **kwargs)
        return op
    with mock.patch.multiple(os, **{name: wrapped(name) for name in reals}):
        yield count


@settings(max_examples=25)
@given(before=st.lists(st.integers(1, 40), max_size=3, unique=True), keep=st.integers(1, 3), again=st.booleans(),
       ahead=st.integers(1, 5), at=st.integers(1, 30), mode=st.sampled_from(["kill", "error"]),
       seed=st.integers(0, 2 ** 16))
# killed between the two renames of a step saved again (its old copy, step_N.old, stands in), and right after them
@example(before=[3], keep=1, again=True, ahead=1, at=9, mode="kill", seed=0)
@example(before=[3], keep=1, again=True, ahead=1, at=10, mode="kill", seed=0)
# killed while the pruning deletes the old checkpoint, file by file
@example(before=[1, 2], keep=1, again=False, ahead=1, at=12, mode="kill", seed=0)
def test_a_save_interrupted_at_any_file_operation_keeps_every_listed_checkpoint_whole(tmp_path, before, keep, again,
                                                                                     ahead, at, mode, seed):
    """A save killed (or failing with a full disk) at any rename, fsync or unlink, of its own, of DCP's writer or of
    the pruning: the listed checkpoints are the old ones, or the old ones and the new one (with the newest ``keep``
    of them, pruning happening only after the new one is published); every listed checkpoint loads the weights
    saved at its step (a step saved again: the old or the new ones); a full disk is a CheckpointError or a
    completed save, never another error. The next save completes and leaves exactly the newest ``keep`` steps."""
    folder = tempfile.mkdtemp(dir=tmp_path)
    ck = Checkpointer(folder, single(), keep=keep)
    m, opt = model_and_opt(seed)
    g = torch.Generator().manual_seed(seed)

    def moved():
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        return snapshot(m)
    saved = {}
    for s in sorted(before):
        saved[s] = moved()
        ck.save(s, m, opt, {"epoch": 0})
    listed = sorted(saved)[-keep:]
    assert [s for s, _ in list_checkpoints(folder)] == listed
    new = listed[-1] if again and listed else max(listed, default=0) + ahead
    old = {s: saved[s] for s in listed}
    new_weights = moved()
    try:
        with _interrupted(at, mode):
            ck.save(new, m, opt, {"epoch": 0})
    except _Killed:
        assert mode == "kill"
    except CheckpointError:
        pass
    after = list_checkpoints(folder)
    steps = [s for s, _ in after]
    assert set(steps) <= set(old) | {new}, (steps, sorted(old), new)
    if new in steps and new not in old:  # published: the pruning may have begun, never on the newest keep
        assert set(sorted(set(old) | {new})[-keep:]) <= set(steps), (steps, sorted(old), new)
    else:  # not published (or a step saved again, whose old copy stands in): nothing pruned
        assert set(steps) == set(old), (steps, sorted(old), new)
    probe, _ = model_and_opt(seed + 1)
    for s, path in after:
        meta = load_state(path, probe)
        assert meta["step"] == s and read_meta(path)["step"] == s
        got = snapshot(probe)
        candidates = ([old[s]] if s in old else []) + ([new_weights] if s == new else [])
        assert any(all(torch.equal(got[k], c[k]) for k in c) for c in candidates), (s, path)

    last = max(steps + [new]) + 1
    ck.save(last, m, opt, {"epoch": 0})
    final = list_checkpoints(folder)
    assert [s for s, _ in final] == sorted(set(steps) | {last})[-keep:]
    assert sorted(os.listdir(folder)) == sorted(os.path.basename(p) for _, p in final)


@settings(max_examples=100)
@given(old=st.one_of(st.none(), st.binary(min_size=1, max_size=64)), new=st.binary(max_size=200),
       cut=st.integers(0, 200), fail=st.sampled_from(["write", "fsync", "replace", "none"]))
def test_an_interrupted_atomic_write_leaves_the_previous_file(tmp_path, old, new, cut, fail):
    """write_atomic: a write interrupted at any point (inside the caller's write after ``cut`` bytes, at the fsync,
    at the rename) leaves the previous file byte for byte (or no file, where there was none) and no temporary file
    beside it; one that completes leaves the new bytes."""
    folder = tempfile.mkdtemp(dir=tmp_path)
    path = os.path.join(folder, "meta.json")
    if old is not None:
        with open(path, "wb") as fh:
            fh.write(old)

    def write(fh):
        fh.write(new[:cut])
        if fail == "write":
            raise _Killed("killed mid-write")
        fh.write(new[cut:])

    def broken(*args, **kwargs):
        raise OSError(errno.EIO, "I/O error")
    with mock.patch.object(os, fail, broken) if fail in ("fsync", "replace") else nullcontext():
        if fail == "none":
            write_atomic(path, write)
        else:
            with pytest.raises((_Killed, OSError)):
                write_atomic(path, write)
    if fail == "none":
        assert os.listdir(folder) == ["meta.json"]
        with open(path, "rb") as fh:
            assert fh.read() == new
    elif old is None:
        assert os.listdir(folder) == []
    else:
        assert os.listdir(folder) == ["meta.json"]
        with open(path, "rb") as fh:
            assert fh.read() == old


_JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), _floats(-1e9, 1e9), st.text(max_size=8)),
                     lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=6), kids,
                                                                                        max_size=4)), max_leaves=20)


@settings(max_examples=40)
@given(first=st.dictionaries(st.text(max_size=6), _JSON, max_size=5),
       second=st.dictionaries(st.text(max_size=6), _JSON, max_size=5), poison=st.booleans())
def test_write_json_atomic_reads_back_or_keeps_the_previous_object(tmp_path, first, second, poison):
    """meta.json's writer: what it wrote reads back equal; a second object that json cannot serialise half-way
    through (json.dump has already streamed its first part) leaves the first file as it was."""
    folder = tempfile.mkdtemp(dir=tmp_path)
    path = os.path.join(folder, "meta.json")
    write_json_atomic(path, first)
    with open(path) as fh:
        assert json.load(fh) == first
    if poison:
        with pytest.raises(TypeError):
            write_json_atomic(path, dict(second, zzz_last=[1, 2, object()]))
        want = first
    else:
        write_json_atomic(path, second)
        want = second
    assert os.listdir(folder) == ["meta.json"]
    with open(path) as fh:
        assert json.load(fh) == want


# ------------------------------------------------------------------------------------------------ metrics
@st.composite
def log_lines(draw):
    """A log.jsonl's lines as a run and its kills leave them: records of steps (resumed runs repeat steps),
    lines cut by a kill, blank lines; the last one maybe without its newline."""
    lines = []
    for _ in range(draw(st.integers(0, 12))):
        rec = json.dumps({"step": draw(st.integers(1, 50)), "loss": draw(_floats(0.0, 10.0))})
        kind = draw(st.sampled_from(["record", "record", "record", "cut", "blank"]))
        if kind == "cut":
            rec = rec[:draw(st.integers(0, len(rec) - 1))]
        lines.append("" if kind == "blank" else rec)
    text = "".join(line + "\n" for line in lines)
    if text and draw(st.booleans()):
        text = text[:-1]
    return text


@settings(max_examples=80)
@given(text=log_lines(), resume=st.integers(0, 60))
def test_a_resumed_log_keeps_exactly_the_records_up_to_its_step(tmp_path, text, resume):
    """MetricsLogger of a run resumed at step ``resume``: log.jsonl keeps, in their order, the complete records of
    steps <= resume, each on its own line, and drops the later ones and the lines a kill cut; a fresh run (0)
    starts an empty log."""
    out = tempfile.mkdtemp(dir=tmp_path)
    with open(os.path.join(out, "log.jsonl"), "w") as fh:
        fh.write(text)
    want = []
    if resume > 0:
        for line in text.split("\n"):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec["step"] <= resume:
                want.append(line + "\n")
    logger = MetricsLogger(TrainConfig(out=out, tensorboard=False), torch.device("cpu"), 1, is_main=True,
                           resume_step=resume)
    logger.close()
    assert logger.failed is None
    with open(os.path.join(out, "log.jsonl")) as fh:
        assert fh.read() == "".join(want)


_OPT = lambda s: st.one_of(st.none(), s)  # noqa: E731


@settings(max_examples=100)
@given(total=st.integers(1, 10 ** 7), data=st.data(), loss=_floats(-1e3, 1e3), lr=_floats(0.0, 1.0),
       wd=_floats(0.0, 1.0), mom=_floats(0.0, 1.0), speed=_OPT(_floats(0.0, 1e5)), tflops=_OPT(_floats(0.0, 1e3)),
       mfu=_OPT(st.one_of(_floats(0.0, 1.0), st.just(math.nan))), mem=_OPT(_floats(0.0, 200.0)),
       skipped=st.integers(0, 100), nonfinite=st.integers(0, 100), has_mfu=st.booleans())
def test_the_progress_line_shows_the_records_values(total, data, loss, lr, wd, mom, speed, tflops, mfu, mem, skipped,
                                                    nonfinite, has_mfu):
    """format_progress: ``step`` right-aligned to the width of ``total``, every value of the record rounded to its
    shown precision, ``-`` for an untimed (None) or NaN value, ``MFU n/a`` without a peak, memory and skip counts
    only where there are some."""
    step = data.draw(st.integers(1, total), label="step")
    rec = dict(step=step, epoch=data.draw(st.integers(0, 1000)), loss=loss, lr=lr, wd=wd, momentum=mom,
               images_per_s=speed, tflops=tflops, mfu=mfu, peak_mem_gib=mem, skipped_images=skipped,
               nonfinite_steps_skipped=nonfinite)
    line = format_progress(rec, total, has_mfu=has_mfu)

    def num(name):
        return rf"(?P<{name}>-|-?[0-9.]+(?:e[+-]\d+)?)"
    m = re.fullmatch(rf"step (?P<pad>\s*)(?P<step>\d+)/(?P<total>\d+)  ep (?P<epoch>\d+)  loss {num('loss')}  "
                     rf"lr {num('lr')}  wd {num('wd')}  mom {num('mom')}  {num('speed')} img/s  {num('tflops')} "
                     rf"TFLOP/s  MFU (?P<mfu>n/a|-%|[0-9.]+%)(?:  mem (?P<mem>[0-9.]+) GiB)?"
                     rf"(?:  skipped (?P<skipped>\d+) img)?(?:  skipped (?P<nonfinite>\d+) non-finite steps)?", line)
    assert m, line
    g = m.groupdict()
    assert len(g["pad"] + g["step"]) == len(str(total)) and int(g["step"]) == step and int(g["total"]) == total
    assert int(g["epoch"]) == rec["epoch"]

    def shown(text, value, unit):
        if value is None or math.isnan(value):
            return text == "-"
        return text != "-" and abs(float(text) - value) <= unit / 2 * (1 + 1e-9) + 1e-12 * abs(value)
    assert shown(g["loss"], loss, 1e-4) and shown(g["wd"], wd, 1e-3) and shown(g["mom"], mom, 1e-4), line
    assert float(g["lr"]) == pytest.approx(lr, rel=0.006, abs=1e-300), line  # 3 significant digits
    assert shown(g["speed"], speed, 0.1) and shown(g["tflops"], tflops, 0.01), line
    if not has_mfu:
        assert g["mfu"] == "n/a", line
    else:
        assert shown(g["mfu"][:-1], None if mfu is None else 100 * mfu, 0.1), line
    assert (g["mem"] is None) == (mem is None) and (mem is None or shown(g["mem"], mem, 0.1)), line
    assert (g["skipped"] is None) == (skipped == 0) and (not skipped or int(g["skipped"]) == skipped), line
    assert (g["nonfinite"] is None) == (nonfinite == 0) and (not nonfinite or int(g["nonfinite"]) == nonfinite), line
