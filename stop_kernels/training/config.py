"""Training configuration: one flat dataclass, YAML recipes in ``configs/``, and command-line overrides.

Precedence (lowest first):

1. the dataclass defaults: the *embedded default*, a vit_tiny run on synthetic 64-px images that
   finishes on a laptop CPU in under a minute (``python train.py``);
2. ``--config FILE`` (a YAML mapping of keys to values; unknown keys are an error);
3. the recipe preset of the model name (``MODEL_PRESETS``: ``--model vit_h`` picks
   ``configs/vit_h14_224.yaml``), for the keys that neither the file nor the command line set;
4. explicit command-line flags.

With ``compile`` off in the end, the settings of the compiled blocks (``COMPILED_BLOCK_SETTINGS``) that a recipe or
the file holds are dropped: ``--model vit_h --compile false`` runs eager blocks without the recipe's
``cpp_wrapper``, while ``--cpp-wrapper`` with ``--compile false`` on the command line is an error.

Every field is a flag: ``noise_std`` is ``--noise-std``; pairs are written ``--pred-mask-scale 0.15,0.2``;
booleans accept ``--compile`` (true), ``--compile false`` / ``0`` / ``no``.
"""
from __future__ import annotations

import argparse
import dataclasses
import decimal
import math
import os
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from .._checks import is_int

# the recipes: configs/ at the repository root (a source checkout or `pip install -e`); a built package
# (wheel, `pip install .`) carries a copy as stop_kernels/configs/ (setup.py's build_py)
_PACKAGED_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CONFIG_DIR = _PACKAGED_CONFIGS if os.path.isdir(_PACKAGED_CONFIGS) else \
    os.path.join(os.path.dirname(os.path.dirname(_PACKAGED_CONFIGS)), "configs")

# model name -> the paper recipe its name implies (a file in configs/). vit_tiny and vit_small have
# no paper recipe and keep the embedded, CPU-friendly defaults (64 px, patch 8).
MODEL_PRESETS: Dict[str, str] = {
    "vit_base": "vit_b16_224.yaml",
    "vit_large": "vit_l16_224.yaml",
    "vit_huge": "vit_h14_224.yaml",
    "vit_giant": "vit_g16_224.yaml",
}

CHOICES: Dict[str, Tuple[str, ...]] = {
    "noise_mode": ("learned", "isotropic", "none"),
    "precision": ("auto", "bf16", "fp32"),
    "device": ("auto", "cpu", "cuda"),
    "sharding": ("auto", "full", "hybrid", "none"),
    "ac": ("none", "block"),
    "attention": ("auto", "triton", "sdpa", "xformers", "reference"),
    # torch.compile modes for the blocks; "max-autotune-no-cudagraphs" lets Inductor time Triton GEMM
    # templates against cuBLAS and fuse epilogues (bias + GELU) into them, at minutes of compile time;
    # "reduce-overhead" replays every compiled block, forward and backward, from CUDA graphs (Inductor's
    # CUDA-graph trees: one recording per sequence length), for a step whose host time is its bound
    "compile_mode": ("default", "max-autotune-no-cudagraphs", "reduce-overhead"),
    # what one compiled graph holds: one block (a call per block), or a model's whole block stack (one call per
    # model pass; one process without FSDP, no AC): "stack" with the block a nested region compiled once,
    # "unrolled" with every block inlined (longer to compile; the only stack the C++ host code can run)
    "compile_scope": ("block", "stack", "unrolled"),
}


class ConfigError(ValueError):
    """A configuration value is invalid (the message names the key); also raised for a bad data folder."""


@dataclass
class TrainConfig:
    # ---- model ------------------------------------------------------------------------------
    model: str = "vit_tiny"            # encoder preset: vit_tiny … vit_giant (aliases vit_t … vit_g)
    img_size: int = 64                 # input resolution (a multiple of patch_size)
    patch_size: int = 8                # patch side in pixels
    pred_depth: int = 4                # predictor depth (12 in the paper's recipes, 6 in ViT-B's, 16 in vit_g's)
    pred_emb_dim: int = 192            # predictor width (384 in the paper's recipes)
    noise_mode: str = "learned"        # learned (StoP) | isotropic | none (plain I-JEPA)
    noise_std: float = 0.25            # σ of the StoP noise (0.2 for ViT-H)
    # ---- data -------------------------------------------------------------------------------
    data: str = "synthetic"            # 'synthetic' or an ImageNet-layout folder (class subfolders; root/train/ if present)
    synthetic_size: int = 2048         # images in the synthetic dataset (data: synthetic only)
    crop_scale: Tuple[float, float] = (0.3, 1.0)  # RandomResizedCrop area range (image folders; synthetic images take no augmentation)
    hflip: bool = False                # random horizontal flip (image folders)
    color_jitter: float = 0.0          # colour-jitter strength s (ColorJitter(0.8s,0.8s,0.8s,0.2s) with p 0.8); 0 = off (image folders)
    gaussian_blur: bool = False        # random Gaussian blur (p 0.5, radius 0.1–2) (image folders)
    grayscale: bool = False            # random grayscale (p 0.2) (image folders)
    num_workers: int = 0               # DataLoader worker processes per rank
    pin_memory: bool = True            # pinned host memory for batches (only used on CUDA)
    # ---- masks ------------------------------------------------------------------------------
    npred: int = 4                     # target blocks per image
    enc_mask_scale: Tuple[float, float] = (0.85, 1.0)  # area range of the context block (before removing the targets)
    pred_mask_scale: Tuple[float, float] = (0.15, 0.2)  # area range of each target block
    aspect_ratio: Tuple[float, float] = (0.75, 1.5)    # aspect-ratio range of the target blocks
    min_keep: int = 4                  # every mask keeps more than min_keep patches (the official rule)
    # ---- optimisation -----------------------------------------------------------------------
    batch_size: int = 16               # global batch (split evenly over the ranks)
    grad_accum: int = 1                # micro-batches per optimizer step and rank (each collated on its own, averaged like ranks)
    micro_batch: int = 0               # at most this many images per micro-batch, grad_accum raised to fit (0: off)
    epochs: int = 1                    # epochs when steps is 0
    steps: int = 60                    # total optimizer steps; 0 = epochs × iterations per epoch
    warmup_epochs: float = 0.1         # warm-up length in epochs (as a fraction of `epochs` when steps is set)
    start_lr: float = 2e-4             # learning rate at the start of the warm-up
    lr: float = 1e-3                   # peak learning rate
    final_lr: float = 1e-6             # learning rate at the end of the cosine
    weight_decay: float = 0.04         # weight decay at the start (cosine schedule)
    final_weight_decay: float = 0.4    # weight decay at the end
    lr_hold_epoch: float = 0.0         # > 0: from this epoch on the lr stays at the cosine's value there (official StoP ViT-H: 250)
    wd_hold_epoch: float = 0.0         # > 0: the same for the weight decay
    ema_start: float = 0.996           # EMA momentum of the target encoder at the start (linear schedule)
    ema_end: float = 1.0               # EMA momentum at the end
    skip_nonfinite_grads: bool = False  # a step whose gradients hold inf/NaN (finite loss) leaves weights and AdamW as they were, as the official GradScaler does; off: the run stops at the next save
    # ---- parallelism and speed --------------------------------------------------------------
    sharding: str = "auto"             # auto (full on several ranks, none on one) | full | hybrid | none
    ac: str = "none"                   # activation checkpointing: none | block (every encoder/predictor block)
    compile: bool = False              # torch.compile each transformer block
    compile_mode: str = "default"      # torch.compile mode of the blocks: default | max-autotune-no-cudagraphs | reduce-overhead
    compile_scope: str = "block"       # one compiled graph per block | per block stack: stack, unrolled (no FSDP, no AC)
    combo_kernels: bool = False        # Inductor's horizontal fusion in the compiled blocks (fewer small launches)
    cpp_wrapper: bool = False          # Inductor's host code of the compiled blocks in C++ (launches without Python)
    multi_kernel: bool = False         # Inductor's multi-kernel reductions: LayerNorms also compiled one-pass, the faster one timed in
    bf16_residual: bool = False        # keep the blocks' residual stream in bf16 under autocast (models.vit.run_blocks)
    fused_target_gelu: bool = False    # the target encoder's fc1 + bias + GELU (tanh form) as one GEMM (models.vit.MLP)
    cuda_graph_target: bool = False    # replay the target encoder's forward from a CUDA graph (one GPU, no FSDP)
    overlap_target: bool = False       # run the target encoder's forward on a second CUDA stream (one GPU, no FSDP)
    attention: str = "auto"            # attention backend of the models: auto (Triton on CUDA) | triton | sdpa | xformers | reference
    attention_policy: str = ""         # overrides of what "auto" picks, e.g. "compiled:24=triton" (stop_kernels.ops.attention.parse_auto_policy); "" = the measured default
    packed: bool = False               # keep every masked patch: ragged masks + packed (varlen) attention
    precision: str = "auto"            # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    device: str = "auto"               # auto | cpu | cuda
    # ---- checkpoints ------------------------------------------------------------------------
    ckpt_every: int = 0                # save every N steps (0: only at the end)
    keep_ckpts: int = 2                # complete checkpoints kept (older ones deleted)
    resume: bool = False               # continue from the latest checkpoint in <out>/checkpoints
    init_from: str = ""                # start from these weights (official .pth.tar, or a run / checkpoint folder)
    export: bool = True                # write <out>/export/{encoder,target_encoder}.safetensors at the end
    # ---- logging ----------------------------------------------------------------------------
    seed: int = 0                      # seed of initialisation, data order, masks and noise
    out: str = "runs/default"          # output folder (log.jsonl, checkpoints, export, tensorboard)
    log_every: int = 10                # progress line every N steps (the JSONL log has every step)
    tensorboard: bool = True           # also write TensorBoard scalars when tensorboard is installed
    peak_tflops: float = 0.0           # per-device peak TFLOP/s for MFU; 0: the card's dense bf16 peak by name (989 H100/H200 SXM, 835 NVL, 756 H100 PCIe; 989 others) on a GPU, no MFU on a CPU
    # ---- benchmark --------------------------------------------------------------------------
    benchmark: int = 0                 # N > 0: time N steps on synthetic data after warm-up, print one JSON line
    benchmark_warmup: int = 10         # warm-up steps before timing (compilation, autotuning); at least one per mask batch
    benchmark_batches: int = 8         # distinct synthetic mask batches the benchmark cycles through (at most benchmark of them)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# the settings of the compiled blocks, "off" at their defaults: refused without `compile` when the command line sets
# them; a recipe's or a --config file's follow its `compile` (parse_config)
COMPILED_BLOCK_SETTINGS: Tuple[str, ...] = ("compile_mode", "combo_kernels", "cpp_wrapper", "multi_kernel", "compile_scope")


def _field_types() -> Dict[str, Any]:
    return {f.name: f for f in fields(TrainConfig)}


def _coerce(name: str, value: Any) -> Any:
    f = _field_types()[name]
    default = f.default
    try:
        if value is None:  # YAML `key:` or `key: null`: str(None) would be the folder 'None'
            raise ValueError
        if isinstance(value, bool) != isinstance(default, bool) and not isinstance(value, str):
            raise ValueError  # YAML `batch_size: true` (int(True) = 1) or `compile: 2` (bool(2) = True)
        if isinstance(value, (list, dict)) and not isinstance(default, tuple):
            raise ValueError  # YAML `out: [runs, a]`: str() would make the folder "['runs', 'a']"
        if isinstance(default, tuple):
            if isinstance(value, str):
                value = [v for v in value.replace("(", "").replace(")", "").replace("[", "").replace("]", "").split(",")
                         if v.strip()]
            if any(isinstance(v, bool) for v in value):  # YAML `crop_scale: [0.3, true]` (float(True) = 1.0)
                raise ValueError
            value = tuple(type(default[0])(v) for v in value)
            if len(value) != len(default):
                raise ValueError
            return value
        if isinstance(default, bool):
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            return value
        if isinstance(default, int) and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if isinstance(default, int) and isinstance(value, str):
            # exactly: through a float, an int above 2**53 was rounded (another seed, silently); "1e3" is taken as
            # the decimal number it writes, which must be integral
            try:
                d = decimal.Decimal(value.strip())
            except decimal.InvalidOperation:  # ("0x10", "ten": an ArithmeticError, not a ValueError)
                raise ValueError from None
            if not d.is_finite() or d != d.to_integral_value():
                raise ValueError
            return int(d)
        return type(default)(value)
    except (TypeError, ValueError, OverflowError):  # (OverflowError: an int beyond a float's range, lr: 1e400 written out)
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise ConfigError(f"{name}: cannot read {shown} as {type(default).__name__}"
                          + (f" of {len(default)}" if isinstance(default, tuple) else "")) from None


def load_yaml(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config: {'a folder, not a YAML file' if os.path.isdir(path) else 'no such file'}: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()
        raise ConfigError(f"config: cannot read {path} as YAML ({type(e).__name__}: "
                          f"{' '.join(line.strip() for line in first[:4])})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping of keys to values")
    known = _field_types()
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"config: {path} has unknown keys {unknown}; known keys: {sorted(known)}")
    return data


def preset_values(model: str) -> Dict[str, Any]:
    """The recipe values implied by a model name (empty for vit_tiny / vit_small)."""
    from ..models.vit import resolve_model_name
    name = MODEL_PRESETS.get(resolve_model_name(model))
    return load_yaml(os.path.join(CONFIG_DIR, name)) if name else {}


def _check_types(cfg: TrainConfig) -> None:
    """Every key holds its default's type (a TrainConfig built in Python skips :func:`_coerce`): bools are
    bools (the string "false" is truthy), ints are ints (2.5 steps), numbers are finite (an infinite
    lr or noise_std passes every range check and diverges)."""
    for f in fields(TrainConfig):
        value, default = getattr(cfg, f.name), f.default
        items = value if isinstance(default, tuple) and isinstance(value, tuple) else (value,)
        kind = type(default[0]) if isinstance(default, tuple) else type(default)
        ok = (not isinstance(default, tuple) or len(items) == len(default)) and all(
            isinstance(v, bool) if kind is bool else
            is_int(v) if kind is int else
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) if kind is float else
            isinstance(v, kind) for v in items)
        if not ok:
            what = f"a tuple of {len(default)} {kind.__name__}s" if isinstance(default, tuple) else \
                "a finite float" if kind is float else f"a {kind.__name__}"
            raise ConfigError(f"{f.name}: expected {what}, got {value!r}")


AUGMENTATION_KEYS = ("crop_scale", "hflip", "color_jitter", "gaussian_blur", "grayscale")


def unused_data_keys(cfg: TrainConfig) -> List[str]:
    """The data keys ``cfg`` sets away from their defaults that its data does not read: the augmentations on
    synthetic images (which take none), ``synthetic_size`` with an image folder. A run says so at its start."""
    defaults = TrainConfig()
    unused = AUGMENTATION_KEYS if cfg.data == "synthetic" else ("synthetic_size",)
    return [k for k in unused if getattr(cfg, k) != getattr(defaults, k)]


def several_ranks() -> bool:
    """Launched by torchrun with more than one rank (a path check then waits for the process group)."""
    return os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1")


def init_from_applies(cfg: TrainConfig) -> bool:
    """Whether ``init_from`` seeds this run: it is set, and the run does not continue a checkpoint of its own
    (``resume`` with a complete one in ``<out>/checkpoints``). A requeued job then neither reads the seed again
    (gigabytes at ViT-H, overwritten by the resume) nor needs it to still exist."""
    if not cfg.init_from:
        return False
    from .checkpoint import latest_checkpoint
    return not (cfg.resume and latest_checkpoint(os.path.join(cfg.out, "checkpoints")) is not None)


def check_init_from(cfg: TrainConfig) -> None:
    """``init_from`` names an existing file or folder where it applies (:func:`init_from_applies`). A path seen
    from this process only: under torchrun with several ranks :func:`stop_kernels.training.loop.train` checks
    it once the process group exists, with every rank's result shared, since a rank on a node that does not
    see the file and stopped here, before ``init_process_group``, would leave the other nodes waiting for it
    for the whole collective timeout."""
    if init_from_applies(cfg) and not os.path.exists(cfg.init_from):
        raise ConfigError(f"init_from: no such file or folder: {cfg.init_from}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every key's type and range; raise :class:`ConfigError` naming the key."""
    _check_types(cfg)
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"{key}: expected one of {list(allowed)}, got {getattr(cfg, key)!r}")
    positive = ("img_size", "patch_size", "pred_depth", "pred_emb_dim", "synthetic_size", "npred", "batch_size",
                "grad_accum", "epochs", "keep_ckpts", "log_every", "benchmark_batches")
    for key in positive:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key}: expected an integer >= 1, got {getattr(cfg, key)!r}")
    for key in ("steps", "num_workers", "ckpt_every", "benchmark", "benchmark_warmup", "min_keep", "micro_batch"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key}: expected an integer >= 0, got {getattr(cfg, key)!r}")
    for key in ("noise_std", "warmup_epochs", "start_lr", "lr", "final_lr", "weight_decay", "final_weight_decay",
                "color_jitter", "lr_hold_epoch", "wd_hold_epoch"):
        if not getattr(cfg, key) >= 0:
            raise ConfigError(f"{key}: expected a value >= 0, got {getattr(cfg, key)!r}")
    if cfg.warmup_epochs > cfg.epochs:
        raise ConfigError(f"warmup_epochs: {cfg.warmup_epochs} is longer than the run's {cfg.epochs} epochs (the "
                          f"learning rate would never reach lr nor decay); lower it with the epochs")
    for key in ("lr_hold_epoch", "wd_hold_epoch"):
        if getattr(cfg, key) > cfg.epochs:
            raise ConfigError(f"{key}: {getattr(cfg, key)} is past the run's {cfg.epochs} epochs (0 turns the hold off)")
    if 0 < cfg.lr_hold_epoch < cfg.warmup_epochs:
        raise ConfigError(f"lr_hold_epoch: {cfg.lr_hold_epoch} falls inside the warm-up ({cfg.warmup_epochs} epochs); "
                          f"the learning rate is held on its cosine, after the warm-up")
    if not cfg.out.strip():
        raise ConfigError("out: expected an output folder, got an empty string")
    if not several_ranks():  # (with several, train() checks it on all ranks at once)
        check_init_from(cfg)
    if not 0 <= cfg.seed < 2 ** 62:  # torch and numpy seeds, plus 1_000_003 per rank and the resume step
        raise ConfigError(f"seed: expected an integer in [0, 2**62), got {cfg.seed!r}")
    if not cfg.peak_tflops >= 0:
        raise ConfigError(f"peak_tflops: expected a value >= 0 (0: the GPU's peak), got {cfg.peak_tflops!r}")
    for key in ("ema_start", "ema_end"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            raise ConfigError(f"{key}: expected a value in [0, 1], got {getattr(cfg, key)!r}")
    for key in COMPILED_BLOCK_SETTINGS:
        if getattr(cfg, key) != getattr(TrainConfig, key) and not cfg.compile:  # a setting of the compiled blocks would silently do nothing
            raise ConfigError(f"{key}: applies to compiled blocks only; add --compile (or drop {key})")
    if cfg.compile_scope == "stack" and cfg.cpp_wrapper:  # torch 2.14: "codegen invoke_subgraph is not implemented
        # for cpp wrapper", raised when the first step compiles
        raise ConfigError("cpp_wrapper: Inductor's C++ host code cannot call the nested block region of "
                          "compile_scope 'stack'; use one of the two (--cpp-wrapper false turns the C++ host code "
                          "off, which the ViT-H recipe turns on)")
    if uses_cuda_graph_trees(cfg):
        check_cuda_graph_trees(cfg)
    if cfg.compile_scope != "block" and cfg.ac != "none":
        raise ConfigError(f"compile_scope: {cfg.compile_scope!r} runs each block's forward inside one compiled graph, "
                          f"where the activation checkpointing of each block cannot wrap it; use ac none (got {cfg.ac!r})")
    if cfg.img_size % cfg.patch_size:
        raise ConfigError(f"img_size: expected a multiple of patch_size={cfg.patch_size}, got {cfg.img_size}")
    if cfg.img_size < 2 * cfg.patch_size:  # (the mask collator would say so naming its own input_size)
        raise ConfigError(f"img_size: expected at least 2 patches per side (2 x patch_size = {2 * cfg.patch_size}) to "
                          f"place mask blocks, got {cfg.img_size}")
    from ..data.transforms import check_transform_args  # (the transforms' own rule for crop_scale, color_jitter)
    try:
        check_transform_args(cfg.img_size, cfg.crop_scale, cfg.color_jitter)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None
    from ..ops.attention import parse_auto_policy
    try:
        parse_auto_policy(cfg.attention_policy)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"attention_policy: {e}") from None
    if cfg.pred_emb_dim % 4:
        raise ConfigError(f"pred_emb_dim: expected a multiple of 4 (2-D sin-cos positions), got {cfg.pred_emb_dim}")
    from ..models.vit import VIT_PRESETS, resolve_model_name
    try:
        cfg.model = resolve_model_name(cfg.model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    from ..data.masks import MultiBlockMaskCollator
    try:  # the mask keys, checked by the collator itself (against the patch grid)
        MultiBlockMaskCollator.from_config(cfg, seed=cfg.seed)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None
    heads = VIT_PRESETS[cfg.model].num_heads
    if cfg.pred_emb_dim % heads:
        raise ConfigError(f"pred_emb_dim: the predictor uses the encoder's {heads} heads, so its width must be a "
                          f"multiple of {heads}; got {cfg.pred_emb_dim}")
    return cfg


def uses_cuda_graph_trees(cfg: TrainConfig) -> bool:
    """Whether the compiled blocks replay from Inductor's CUDA-graph trees (``compile_mode: reduce-overhead``)."""
    return cfg.compile and cfg.compile_mode == "reduce-overhead"


def check_cuda_graph_trees(cfg: TrainConfig) -> None:
    """Refuse, by key, what cannot share a step with the CUDA-graph trees of ``compile_mode: reduce-overhead``.

    - ``cpp_wrapper``: a replay runs no host code at all, so the C++ host code would only cost its compile,
      and Inductor turns CUDA graphs off for C++ host code (torch 2.11, the GPU image's: always; torch 2.14:
      under its graph partitions, on by default).
    - ``ac: block``: checkpointing re-runs each block's forward inside the backward, a forward call where the
      tree expects the backward's graphs.
    - ``cuda_graph_target`` / ``overlap_target``: the target encoder's blocks are then replayed by the tree
      already (a capture around them would nest two captures), and its graphs run on the step's stream.
    FSDP2 sharding (parameters gathered into new memory at every step, not static graph inputs) is refused
    by the Trainer, which knows the rank count."""
    for key, bad, why in (
            ("cpp_wrapper", cfg.cpp_wrapper, "the replays run no host code, and Inductor turns CUDA graphs off for "
                                             "C++ host code; add --cpp-wrapper false (the ViT-H recipe turns it "
                                             "on)"),
            ("ac", cfg.ac != "none", "activation checkpointing re-runs each block's forward inside the backward, "
                                     "where the CUDA-graph tree expects the backward's graphs; use ac none"),
            ("cuda_graph_target", cfg.cuda_graph_target, "the tree replays the target encoder's blocks already; "
                                                         "drop --cuda-graph-target"),
            ("overlap_target", cfg.overlap_target, "the tree replays the graphs on the step's own stream; drop "
                                                   "--overlap-target")):
        if bad:
            raise ConfigError(f"{key}: does not combine with compile_mode 'reduce-overhead': {why}")


def with_micro_batch(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """``cfg`` with ``grad_accum`` raised to the smallest count >= its own that splits each rank's batch evenly
    into micro-batches of at most ``micro_batch`` images (unchanged when ``micro_batch`` is 0).

    Why: every micro-batch is collated on its own, and the mask collator truncates each mask to the shortest of
    its micro-batch, as the official code does over each GPU's loader batch (64 images in every StoP recipe). A
    recipe's global batch split over fewer GPUs would otherwise truncate over more images and keep less context
    (ViT-H/14, mean context tokens kept per image: ≈ 72 at 64, 66 at 256, 57 at 2048). The recipes set
    ``micro_batch: 64``: on 8 GPUs the global 2048 is 4 micro-batches of 64 per rank; a rank's batch of 64 or
    less is one."""
    if not cfg.micro_batch:
        return cfg
    local = local_batch(cfg, world_size)
    k = next(k for k in range(cfg.grad_accum, local + 1) if local % k == 0 and local // k <= cfg.micro_batch)
    return cfg if k == cfg.grad_accum else dataclasses.replace(cfg, grad_accum=k)


def local_batch(cfg: TrainConfig, world_size: int) -> int:
    """The per-rank batch, ``batch_size / world_size``; :class:`ConfigError` unless the ranks share the
    global batch evenly and ``grad_accum`` divides each rank's part."""
    local, rest = divmod(cfg.batch_size, world_size)
    if rest:
        raise ConfigError(f"batch_size: the global batch {cfg.batch_size} must be a multiple of the "
                          f"{world_size} ranks")
    if local % cfg.grad_accum:
        raise ConfigError(f"grad_accum: the per-rank batch {local} (batch_size {cfg.batch_size} over "
                          f"{world_size} rank(s)) must be a multiple of grad_accum={cfg.grad_accum}")
    return local


def field_help() -> Dict[str, str]:
    """Each key's one-line description: its comment in :class:`TrainConfig`'s source (one place for both
    the code and ``--help``)."""
    import inspect
    import re
    found = {}
    try:
        source = inspect.getsource(TrainConfig)
    except (OSError, TypeError):  # installed without its .py sources: --help shows the defaults only
        return found
    for line in source.splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.+)$", line)
        if m:
            found[m.group(1)] = m.group(2).strip()
    return found


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train I-JEPA with Stochastic Positional Embeddings (StoP). Every "
                                "TrainConfig key is a flag; the defaults shown are the embedded CPU-sized run, and "
                                "--model vit_b, vit_l, vit_h or vit_g loads its recipe (configs/) for the keys "
                                "not given. More: docs/training.md and the README's table of keys.",
                                allow_abbrev=False)  # (a prefix of one key was taken as it: --wd set wd_hold_epoch)
    p.add_argument("--config", help="YAML recipe (keys as in TrainConfig), e.g. configs/vit_h14_224.yaml")
    helps = field_help()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        text = helps.get(f.name, "")
        if f.name in CHOICES and not all(c in text for c in CHOICES[f.name]):
            text += f" [one of {', '.join(CHOICES[f.name])}]"
        text += f" (default {str(default).lower() if isinstance(default, bool) else repr(default)})"
        if isinstance(f.default, bool):
            p.add_argument(flag, dest=f.name, default=None, nargs="?", const="true", metavar="BOOL", help=text)
        else:
            p.add_argument(flag, dest=f.name, default=None, help=text)
    return p


def parse_config(argv: Optional[Sequence[str]] = None, parser: Optional[argparse.ArgumentParser] = None) -> TrainConfig:
    """Parse ``argv`` (``sys.argv[1:]`` when None) into a validated :class:`TrainConfig`."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    values: Dict[str, Any] = {}
    if args.config:
        values.update(load_yaml(args.config))
    cli = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    model = cli.get("model", values.get("model", TrainConfig.model))
    try:
        preset = preset_values(str(model))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for k, v in preset.items():
        values.setdefault(k, v)
    values.update(cli)
    if not _coerce("compile", values.get("compile", TrainConfig.compile)):
        # `--compile false` on a recipe (vit_huge's turns on cpp_wrapper) turns its compiled-block settings off with
        # it; one the command line itself sets is still refused without compile (validate)
        for k in COMPILED_BLOCK_SETTINGS:
            if k not in cli:
                values.pop(k, None)
    return config_from_dict(values)


def config_from_dict(values: Dict[str, Any]) -> TrainConfig:
    """A validated :class:`TrainConfig` from a mapping of keys to values as YAML, the command line or a
    checkpoint's ``meta.json`` hold them (pairs as lists or ``"a,b"``); keys left out keep their defaults,
    unknown keys are a :class:`ConfigError`."""
    unknown = sorted(set(values) - set(_field_types()))
    if unknown:
        raise ConfigError(f"config: unknown keys {unknown}")
    return validate(TrainConfig(**{k: _coerce(k, v) for k, v in values.items()}))
