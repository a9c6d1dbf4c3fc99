"""Training configuration: one flat dataclass, YAML files in ``configs/``, and command-line overrides.

Precedence: dataclass defaults < ``--config FILE`` < ``--model`` preset defaults not set by the file
< explicit command-line flags. Every field is a flag: ``noise_std`` is ``--noise-std``; pairs are
written ``--pred-mask-scale 0.15,0.2``.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml


@dataclass
class TrainConfig:
    # model
    model: str = "vit_tiny"            # encoder preset (vit_tiny … vit_giant; vit_h style aliases)
    img_size: int = 64                 # input resolution (multiple of patch_size)
    patch_size: int = 8
    pred_depth: int = 4                # predictor depth (12 in the paper's recipes)
    pred_emb_dim: int = 192            # predictor width (384 in the paper's recipes)
    noise_mode: str = "learned"        # learned (StoP) | isotropic | none (plain I-JEPA)
    noise_std: float = 0.25            # σ of the StoP noise (0.2 for ViT-H)
    # data
    data: str = "synthetic"            # 'synthetic' or an ImageNet-layout folder (class subfolders)
    synthetic_size: int = 2048         # images in the synthetic dataset
    crop_scale: Tuple[float, float] = (0.3, 1.0)
    num_workers: int = 0
    # masks
    npred: int = 4                     # target blocks per image
    enc_mask_scale: Tuple[float, float] = (0.85, 1.0)
    pred_mask_scale: Tuple[float, float] = (0.15, 0.2)
    aspect_ratio: Tuple[float, float] = (0.75, 1.5)
    min_keep: int = 4
    # optimisation
    batch_size: int = 16               # global batch
    epochs: int = 1
    steps: int = 60                    # total optimizer steps; 0 = epochs × iterations per epoch
    warmup_epochs: float = 0.1         # warm-up length (scaled to `steps` when steps is set)
    start_lr: float = 2e-4
    lr: float = 1e-3                   # peak learning rate
    final_lr: float = 1e-6
    weight_decay: float = 0.04
    final_weight_decay: float = 0.4
    ema_start: float = 0.996
    ema_end: float = 1.0
    # run
    precision: str = "auto"            # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    device: str = "auto"               # auto | cpu | cuda
    seed: int = 0
    out: str = "runs/default"          # output folder (JSONL log, checkpoints)
    log_every: int = 10

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _field_types() -> Dict[str, Any]:
    return {f.name: f for f in fields(TrainConfig)}


def _coerce(name: str, value: Any) -> Any:
    f = _field_types()[name]
    default = f.default
    try:
        if isinstance(default, tuple):
            if isinstance(value, str):
                value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
            value = tuple(type(default[0])(v) for v in value)
            if len(value) != len(default):
                raise ValueError
            return value
        if isinstance(default, bool):
            if isinstance(value, str):
                return value.lower() in ("1", "true", "yes", "on")
            return bool(value)
        return type(default)(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: cannot read {value!r} as {type(default).__name__}"
                         + (f" of {len(default)}" if isinstance(default, tuple) else "")) from None


def load_yaml(path: str) -> Dict[str, Any]:
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config: {path} must hold a mapping of keys to values")
    known = _field_types()
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"config: {path} has unknown keys {unknown}; known keys: {sorted(known)}")
    return data


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train I-JEPA with Stochastic Positional Embeddings.")
    p.add_argument("--config", help="YAML file under configs/ (keys as in TrainConfig)")
    for f in fields(TrainConfig):
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                       help=f"(default {f.default!r})")
    return p


def parse_config(argv: Optional[Sequence[str]] = None, parser: Optional[argparse.ArgumentParser] = None) -> TrainConfig:
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    values: Dict[str, Any] = {}
    if args.config:
        values.update(load_yaml(args.config))
    for f in fields(TrainConfig):
        v = getattr(args, f.name)
        if v is not None:
            values[f.name] = v
    cfg = TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
    from ..models.vit import resolve_model_name
    cfg.model = resolve_model_name(cfg.model)
    return cfg
