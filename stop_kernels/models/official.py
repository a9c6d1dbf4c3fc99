"""Load checkpoints written by the official I-JEPA / StoP code, and write the project's models in their layout.

Official layout: a dict with ``encoder``, ``predictor`` and ``target_encoder`` state dicts whose
keys carry the DDP ``module.`` prefix (plus ``opt``, ``epoch`` … which are ignored here). The
project's modules use the same parameter names, so loading is a prefix strip plus a reshape of the
``[1, P, D]`` positional tables into the project's ``[P, D]`` buffers. Sizes (width, depth, patch,
image size, MLP ratio) are read from the weights; the head count is not stored in a checkpoint and
comes from the preset matching the width, or from ``num_heads``.

The way back, :func:`save_official_checkpoint`, writes the project's models in that layout, so code
built on the official checkpoints (their evaluation scripts, other people's fine-tuning) reads them
unchanged; ``python -m stop_kernels.training.checkpoint to-official`` converts a training run.
"""
from __future__ import annotations

import os
import pickle
import re
from typing import Any, Dict, Mapping, NamedTuple, Optional, Union

import torch

from .. import _checks as chk
from .predictor import VisionTransformerPredictor
from .vit import ALIASES, VIT_PRESETS, VisionTransformer, resolve_model_name


class OfficialModels(NamedTuple):
    encoder: VisionTransformer
    predictor: VisionTransformerPredictor
    target_encoder: Optional[VisionTransformer]
    epoch: Optional[int]


class EncoderSizes(NamedTuple):
    embed_dim: int
    depth: int
    num_heads: Optional[int]
    mlp_ratio: float
    patch_size: int
    img_size: int
    in_chans: int
    qkv_bias: bool = True


_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def clean_name(name: str) -> str:
    """A parameter name without the AC / compile / FSDP1 wrapper components (``blocks.0._orig_mod.norm1.weight``
    → ``blocks.0.norm1.weight``): the name of the plain module, the one checkpoints store."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str = "module.") -> Dict[str, torch.Tensor]:
    """``state`` with the DDP ``prefix`` and the wrapper components (:func:`clean_name`) removed from its keys."""
    return {clean_name(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def _depth(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    ids = {int(m.group(1)) for k in state for m in [re.match(rf"{prefix}\.(\d+)\.", k)] if m}
    return max(ids) + 1 if ids else 0


def _require(state: Mapping[str, torch.Tensor], key: str, where: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"checkpoint: {where} state dict has no '{key}' (is this an official I-JEPA/StoP checkpoint?)")
    return state[key]


def heads_for_width(embed_dim: int) -> Optional[int]:
    for spec in VIT_PRESETS.values():
        if spec.embed_dim == embed_dim:
            return spec.num_heads
    return None


def preset_of(sizes: "EncoderSizes") -> Optional[str]:
    """The preset name with the checkpoint's width and depth, or ``None``."""
    for name, spec in VIT_PRESETS.items():
        if (spec.embed_dim, spec.depth) == (sizes.embed_dim, sizes.depth):
            return name
    return None


def check_sizes(sizes: "EncoderSizes", *, model: Optional[str] = None, num_heads: Optional[int] = None,
                patch_size: Optional[int] = None, img_size: Optional[int] = None, cli: bool = False) -> int:
    """Check the caller's settings against the sizes read from the weights; return the head count.

    A setting that contradicts the checkpoint is a ``ValueError`` naming it (as ``--model`` style
    flags when ``cli``). The head count is not stored in checkpoints: it comes from ``num_heads``, else
    from ``model``, else from the preset with the checkpoint's width.
    """
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-") if cli else name

    heads = sizes.num_heads
    if model is not None:
        if ALIASES.get(model, model) not in VIT_PRESETS:  # (resolve_model_name's error would name 'model' twice)
            raise ValueError(f"{flag('model')}: expected one of {tuple(VIT_PRESETS)} or an alias {tuple(ALIASES)}, "
                             f"got {model!r}")
        spec = VIT_PRESETS[resolve_model_name(model)]
        if (spec.embed_dim, spec.depth) != (sizes.embed_dim, sizes.depth):
            found = preset_of(sizes)
            raise ValueError(f"{flag('model')}: {model} has width {spec.embed_dim} and depth {spec.depth}, but the "
                             f"checkpoint holds width {sizes.embed_dim} and depth {sizes.depth}"
                             + (f" ({found})" if found else ""))
        heads = spec.num_heads
    if num_heads is not None:
        if not chk.is_int(num_heads):
            raise TypeError(f"{flag('num_heads')}: expected an integer, got {num_heads!r}")
        heads = num_heads
    if heads is None:
        raise ValueError(f"{flag('num_heads')}: the checkpoint's width {sizes.embed_dim} matches no preset; "
                         f"pass {flag('num_heads')}")
    if heads <= 0 or sizes.embed_dim % heads:
        raise ValueError(f"{flag('num_heads')}: {heads} does not divide the checkpoint's width {sizes.embed_dim}")
    for name, given, found in (("patch_size", patch_size, sizes.patch_size), ("img_size", img_size, sizes.img_size)):
        if given is not None and not chk.is_int(given):
            raise TypeError(f"{flag(name)}: expected an integer, got {given!r}")
        if given is not None and given != found:
            raise ValueError(f"{flag(name)}: given {given}, but the checkpoint was trained with {found}")
    return heads


def infer_encoder_sizes(state: Mapping[str, torch.Tensor]) -> EncoderSizes:
    """Read an encoder's sizes from its (prefix-stripped) state dict."""
    w = _require(state, "patch_embed.proj.weight", "encoder")
    E, C, p, _ = w.shape
    P = _require(state, "pos_embed", "encoder").reshape(-1, E).shape[0]
    g = int(round(P ** 0.5))
    depth = _depth(state, "blocks")
    # (a depth-0 encoder has no block to read them from: the defaults, which no weight depends on)
    hidden = _require(state, "blocks.0.mlp.fc1.weight", "encoder").shape[0] if depth else 4 * E
    return EncoderSizes(embed_dim=E, depth=depth, num_heads=heads_for_width(E), mlp_ratio=hidden / E, patch_size=p,
                        img_size=g * p, in_chans=C, qkv_bias=not depth or "blocks.0.attn.qkv.bias" in state)


def mlp_ratio_for(hidden: int, dim: int) -> float:
    """The ``mlp_ratio`` for which a block's ``int(dim * mlp_ratio)`` is exactly ``hidden`` (``hidden / dim``
    can land just below it in floating point: 240 / 176 · 176 = 239.99…)."""
    return (hidden + 0.5) / dim


def load_exact(module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str) -> torch.nn.Module:
    """Fill ``module`` (built on the meta device) with ``state``: every key must match, any missing
    or unexpected key or shape mismatch is an error listing them (the one shape change taken is a
    leading 1, as the official code stores its position tables ``[1, P, D]``). Tensors are assigned as float32
    copies on the CPU (never aliasing ``state`` or a mapped file), so no time goes into a random
    initialisation that would be overwritten."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"checkpoint: {what} keys do not match the model: missing {missing}, unexpected {unexpected}")
    def fits(v: torch.Tensor, want: torch.Size) -> bool:  # exact, or a table stored as [1, P, D]
        return v.shape == want or (v.dim() == len(want) + 1 and v.shape[0] == 1 and v.shape[1:] == want)
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in state.items() if not fits(v, own[k].shape)]
    if bad:
        raise ValueError(f"checkpoint: {what} tensor shapes do not match the model: {bad}")
    module.load_state_dict({k: v.detach().reshape(own[k].shape).to("cpu", torch.float32, copy=True).contiguous()
                            for k, v in state.items()}, strict=True, assign=True)
    return module


def build_encoder(sizes: EncoderSizes, num_heads: int, state: Mapping[str, torch.Tensor],
                  what: str = "encoder") -> VisionTransformer:
    """A :class:`VisionTransformer` of ``sizes`` holding the (prefix-stripped) ``state``, float32 on the CPU."""
    with torch.device("meta"):
        enc = VisionTransformer(img_size=sizes.img_size, patch_size=sizes.patch_size, in_chans=sizes.in_chans,
                                embed_dim=sizes.embed_dim, depth=sizes.depth, num_heads=num_heads,
                                mlp_ratio=mlp_ratio_for(round(sizes.mlp_ratio * sizes.embed_dim), sizes.embed_dim),
                                qkv_bias=sizes.qkv_bias)
    return load_exact(enc, state, what)


class UnreadableCheckpoint(ValueError):
    """A file :func:`load_torch_file` cannot read as a checkpoint at all (as opposed to one of other sizes)."""


def load_torch_file(path: Union[str, os.PathLike], name: str, *, map_location="cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` (memory-mapped when ``mmap`` and the file allows it). A file it
    cannot read (empty, truncated, not written by ``torch.save``, or holding objects other than tensors and
    plain containers) is an :class:`UnreadableCheckpoint` (a ``ValueError``) naming ``name`` and the file, not
    pickle's bare ``KeyError`` / ``EOFError`` / ``UnpicklingError`` (whose advice, ``weights_only=False``, would run
    code from the file)."""
    if mmap:
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        except RuntimeError:  # a legacy (pre-zipfile) torch.save file cannot be mapped: read it whole below
            pass
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, EOFError, KeyError, RuntimeError) as e:
        why = ("the file ends early (empty or truncated)" if isinstance(e, EOFError) else
               "not a torch.save file, or it holds objects other than tensors and plain containers"
               if isinstance(e, (pickle.UnpicklingError, KeyError)) else str(e).splitlines()[0])
        raise UnreadableCheckpoint(f"{name}: cannot read {os.fspath(path)} as a torch checkpoint: {why}") from e


def stop_noise_std(embed_dim: int) -> float:
    """σ of StoP's recipes for an encoder of width ``embed_dim``: 0.25 (ViT-B/16, ViT-L/16) and 0.2 for ViT-H
    (width 1280; StoP's ``configs/pretrain`` ``var``); the wider ViT-g takes ViT-H's, as ``configs/`` does."""
    return 0.2 if embed_dim >= 1280 else 0.25


def load_official_checkpoint(ckpt: Union[str, os.PathLike, Mapping], *, model: Optional[str] = None,
                             num_heads: Optional[int] = None, patch_size: Optional[int] = None,
                             img_size: Optional[int] = None, noise_mode: str = "learned",
                             noise_std: Optional[float] = None, predictor_num_heads: Optional[int] = None,
                             map_location="cpu") -> OfficialModels:
    """Build the project's encoder, predictor and target encoder from an official checkpoint.

    Args:
        ckpt: path to a ``.pth.tar`` / ``.pt`` file or an already loaded dict.
        model, num_heads, patch_size, img_size: optional; inferred from the weights when omitted
            and checked against them when given (a contradiction is a ``ValueError``).
        noise_mode, noise_std: the predictor's setting, which official checkpoints do not store. StoP's
            checkpoints: ``"learned"`` (the default). I-JEPA's, trained with mask tokens: pass ``"none"`` (the
            predictor then uses the checkpoint's ``mask_token``; the StoP modes keep it unused).
            ``noise_std`` None: StoP's recipe for the checkpoint's width (:func:`stop_noise_std`: 0.2 for
            ViT-H and wider, 0.25 below).
        predictor_num_heads: the predictor's heads, which the weights do not show; None: the encoder's, as every
            official predictor has (and this project's training).
    """
    if predictor_num_heads is not None and (not chk.is_int(predictor_num_heads) or predictor_num_heads < 1):
        raise ValueError(f"predictor_num_heads: expected a positive integer, got {predictor_num_heads!r}")
    if isinstance(ckpt, (str, os.PathLike)):
        if not os.path.isfile(ckpt):
            raise FileNotFoundError(f"ckpt: no such file: {os.fspath(ckpt)}")
        # memory-mapped: only the tensors used are read (not the optimizer state), and ranks loading the
        # same file share its pages
        ckpt = load_torch_file(ckpt, "ckpt", map_location=map_location, mmap=True)
    if not isinstance(ckpt, Mapping):
        raise TypeError(f"ckpt: expected a path or a dict, got {type(ckpt).__name__}")
    for key in ("encoder", "predictor"):
        if key not in ckpt:
            raise ValueError(f"ckpt: missing key '{key}' (found {sorted(ckpt)}); expected the official layout "
                             "with 'encoder', 'predictor' and 'target_encoder'")
    for key in ("encoder", "predictor", "target_encoder"):  # (a target_encoder of None is absent)
        if not isinstance(ckpt.get(key, {}), Mapping) and not (key == "target_encoder" and ckpt[key] is None):
            raise TypeError(f"ckpt['{key}']: expected a state dict, got {type(ckpt[key]).__name__}")
    epoch = ckpt.get("epoch")
    try:
        epoch = int(epoch) if epoch is not None else None
    except (TypeError, ValueError):
        raise ValueError(f"ckpt['epoch']: expected an integer, got {epoch!r}") from None
    enc_sd = strip_prefix(ckpt["encoder"])
    sizes = infer_encoder_sizes(enc_sd)
    heads = check_sizes(sizes, model=model, num_heads=num_heads, patch_size=patch_size, img_size=img_size)
    pred_sd = strip_prefix(ckpt["predictor"])
    D = _require(pred_sd, "predictor_embed.weight", "predictor").shape[0]
    pdepth = _depth(pred_sd, "predictor_blocks")
    with torch.device("meta"):
        pred = VisionTransformerPredictor(
            num_patches=(sizes.img_size // sizes.patch_size) ** 2, embed_dim=sizes.embed_dim, predictor_embed_dim=D,
            depth=pdepth, num_heads=predictor_num_heads or heads,
            mlp_ratio=(mlp_ratio_for(_require(pred_sd, "predictor_blocks.0.mlp.fc1.weight", "predictor").shape[0], D)
                       if pdepth else 4.0),
            qkv_bias=not pdepth or "predictor_blocks.0.attn.qkv.bias" in pred_sd,
            noise_mode=noise_mode, noise_std=stop_noise_std(sizes.embed_dim) if noise_std is None else noise_std)
    load_exact(pred, pred_sd, "predictor")
    # the encoder before the target: the sizes come from the encoder, so a mismatch there is the encoder's
    encoder = build_encoder(sizes, heads, enc_sd, "encoder")
    target = (build_encoder(sizes, heads, strip_prefix(ckpt["target_encoder"]), "target_encoder")
              if ckpt.get("target_encoder") is not None else None)
    return OfficialModels(encoder, pred, target, epoch)


def official_state_dict(module: torch.nn.Module, *, what: str = "module") -> Dict[str, torch.Tensor]:
    """``module``'s weights as the official code stores them: keys with the DDP ``module.`` prefix and the
    position tables (``pos_embed``, ``predictor_pos_embed``) as ``[1, P, D]`` views; the tensors stay where
    they are (:func:`official_checkpoint` makes the float32 CPU copies).

    ``module`` must hold whole tensors: a model sharded by FSDP2 is converted from its checkpoint instead
    (``python -m stop_kernels.training.checkpoint to-official``)."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"{what}: expected a torch.nn.Module, got {type(module).__name__}")
    # DDP's own "module." is the official one, under or over torch.compile's wrapper (whose _orig_mod. clean_name
    # drops): torch.compile(DDP(m)) is the order PyTorch recommends
    while isinstance(module, (torch.nn.parallel.DistributedDataParallel, torch._dynamo.eval_frame.OptimizedModule)):
        module = module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module._orig_mod
    out = {}
    for k, v in _unparametrized_state(module).items():
        if hasattr(v, "device_mesh"):
            raise ValueError(f"{what}: holds sharded (FSDP2) tensors ({k}); convert the run's checkpoint with "
                             f"python -m stop_kernels.training.checkpoint to-official")
        k = clean_name(k)  # (a compiled or checkpoint-wrapped block's keys hold _orig_mod. and the like)
        out["module." + k] = v.detach()[None] if k.endswith("pos_embed") else v.detach()
    return out


def _unparametrized_state(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """``module.state_dict()`` with each parametrized tensor (``torch.nn.utils.parametrize``, e.g. a constrained
    ``predictor_embed.weight``, which the predictor supports) under its own name and with the value the model
    computes with, in place of the ``<name>.parametrizations.<tensor>.original`` entries no official loader reads."""
    from torch.nn.utils import parametrize
    state = module.state_dict()
    for prefix, sub in module.named_modules():
        if not parametrize.is_parametrized(sub):
            continue
        dot = prefix + "." if prefix else ""
        for tensor in sub.parametrizations:
            state = {k: v for k, v in state.items() if not k.startswith(f"{dot}parametrizations.{tensor}.")}
            state[f"{dot}{tensor}"] = getattr(sub, tensor)
    return state


def official_checkpoint(encoder: torch.nn.Module, predictor: torch.nn.Module,
                        target_encoder: Optional[torch.nn.Module] = None, *,
                        epoch: Optional[int] = None) -> Dict[str, Any]:
    """The dict the official code saves: ``encoder``, ``predictor``, ``target_encoder`` (when given) in
    :func:`official_state_dict` layout, and ``epoch`` (when given). No optimizer state: it is for the
    official evaluation and fine-tuning code and for :func:`load_official_checkpoint`, not for resuming the
    official trainer."""
    if epoch is not None and (not chk.is_int(epoch) or epoch < 0):
        raise ValueError(f"epoch: expected an integer >= 0 or None, got {epoch!r}")
    def copy(module, what):  # float32 on the CPU, never sharing memory with the live model
        return {k: v.to("cpu", torch.float32, copy=True).contiguous()
                for k, v in official_state_dict(module, what=what).items()}
    ck: Dict[str, Any] = {"encoder": copy(encoder, "encoder"), "predictor": copy(predictor, "predictor")}
    if target_encoder is not None:
        ck["target_encoder"] = copy(target_encoder, "target_encoder")
    if epoch is not None:
        ck["epoch"] = epoch
    return ck


def save_official_checkpoint(path: Union[str, os.PathLike], encoder: torch.nn.Module, predictor: torch.nn.Module,
                             target_encoder: Optional[torch.nn.Module] = None, *,
                             epoch: Optional[int] = None) -> str:
    """Write :func:`official_checkpoint` to ``path`` with ``torch.save``, atomically (a crash leaves the
    previous file, never a torn one); returns the path. ``load_official_checkpoint(path)`` gives the
    models back exactly, in float32 (pass it the predictor's ``noise_mode`` and ``noise_std``, and its
    ``predictor_num_heads`` where they are not the encoder's: the official layout stores none of them)."""
    ck = official_checkpoint(encoder, predictor, target_encoder, epoch=epoch)
    path = check_output_file(path, "path")
    chk.write_atomic(path, lambda fh: torch.save(ck, fh))
    return path


def check_output_file(path: Union[str, os.PathLike], name: str) -> str:
    """``path`` as a string, checked as the name of a file to write (atomically): its folder exists and it is no
    folder itself. Errors name the argument ``name`` (``to-official`` checks its ``out`` before loading a run)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{name}: no such folder: {folder}")
    if os.path.isdir(path):  # os.replace of the temporary file onto it would fail with IsADirectoryError
        raise ValueError(f"{name}: {path} is a folder; expected the name of the file to write, e.g. "
                         f"{os.path.join(path, 'checkpoint.pth.tar')}")
    return path
