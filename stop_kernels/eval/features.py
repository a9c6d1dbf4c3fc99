"""Frozen-encoder features for evaluation: image folders, checkpoint loading, extraction and a disk cache.

* :func:`list_images` reads an ImageNet-layout split (``DIR/<class>/<image>``), optionally restricted
  to a subset file (:func:`read_subset`: the official 1%-of-labels format).
* :func:`load_encoder` builds the frozen target (or context) encoder from an official I-JEPA / StoP
  ``.pth.tar`` checkpoint or from a plain encoder state dict (``.safetensors`` / ``.pt``), inferring
  the sizes from the weights with the converter's :func:`~stop_kernels.models.infer_encoder_sizes`
  and checking them against the flags. (Only the chosen encoder is built, on the meta device then
  assigned the weights; :func:`~stop_kernels.models.load_official_checkpoint` builds all three
  modules that way.)
* :func:`encode` turns images ``[B, 3, H, W]`` into average-pooled features ``[B, E]`` (the mean of
  the last K layers' LayerNorm'd outputs); :func:`extract_features` runs it over a dataset with a
  progress bar (bf16 autocast on GPU, fp32 on CPU and in the official protocol); :func:`cached_features`
  stores the result on disk under a key made of the checkpoint, the split's file list and every setting
  that changes the features, and reuses it.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset

from .. import _checks as chk
from ..data.datasets import IMAGENET_MEAN, IMAGENET_STD, IMG_EXTENSIONS  # (the extensions training reads)
from ..models.official import (EncoderSizes, build_encoder, check_sizes, infer_encoder_sizes,  # noqa: F401
                               load_torch_file, preset_of, strip_prefix)
from ..models.vit import VisionTransformer

# 'project': this project's evaluation; 'official': StoP's logistic_eval.py (its transform, fp32 features)
PROTOCOLS = ("project", "official")
CACHE_VERSION = 2  # (2: image sizes and mtimes in the key) bump when the extraction itself changes (transform, pooling)
ENCODERS = ("target", "context")

Sample = Tuple[str, int]  # (path relative to the split folder, class index)


# ----------------------------------------------------------------------------------------------
# image folders
# ----------------------------------------------------------------------------------------------
def read_subset(path: str) -> List[str]:
    """Read a subset file: one image per line, as ``class/file`` or (official I-JEPA / SimCLR 1%-of-labels
    format) a bare ``class_number.JPEG`` whose class is the part before the first ``_``.

    Blank lines and lines starting with ``#`` are skipped. Returns relative paths ``class/file``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--subset: no such file: {path}")
    out = []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            line = line.replace("\\", "/")
            if line.startswith("./"):
                line = line[2:]
            if "/" not in line:
                line = f"{line.split('_')[0]}/{line}"
            out.append(line)
    if not out:
        raise ValueError(f"--subset: {path} lists no images")
    return out


def list_images(split_dir: str, classes: Optional[Sequence[str]] = None,
                subset: Optional[Sequence[str]] = None) -> Tuple[List[Sample], List[str]]:
    """List the images of an ImageNet-layout split ``split_dir/<class>/<image>``.

    Args:
        split_dir: the split folder (``DIR/train`` or ``DIR/val``).
        classes: the class names defining the label indices (the training split's); ``None`` takes
            the sorted sub-folders of ``split_dir``. A sub-folder that is not one of them is an error.
        subset: relative paths ``class/file`` to keep (see :func:`read_subset`); each must exist.
    Returns:
        ``(samples, classes)``: sorted ``(relative path, class index)`` pairs and the class names.
    """
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f"--data: no such folder: {split_dir} (expected an ImageNet layout "
                                f"DIR/train/<class>/*, DIR/val/<class>/*)")
    found = sorted(d.name for d in os.scandir(split_dir) if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise ValueError(f"--data: {split_dir} has no class sub-folders (expected {split_dir}/<class>/<image>)")
    if classes is None:
        classes = found
    index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in found if c not in index]
    if unknown:
        raise ValueError(f"--data: {split_dir} has classes absent from the training split: {unknown[:5]}"
                         + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
    if subset is not None:
        missing = [p for p in subset if not os.path.isfile(os.path.join(split_dir, p))]
        if missing:
            raise FileNotFoundError(f"--subset: {len(missing)} listed image(s) not found under {split_dir}, "
                                    f"e.g. {missing[:3]}")
        bad = sorted({p.split("/")[0] for p in subset if p.split("/")[0] not in index})
        if bad:
            raise ValueError(f"--subset: images of classes not in the training split: {bad[:5]}")
        samples = sorted({(p, index[p.split("/")[0]]) for p in subset})
    else:
        samples = []
        for c in found:
            for entry in os.scandir(os.path.join(split_dir, c)):
                if entry.is_file() and entry.name.lower().endswith(IMG_EXTENSIONS):
                    samples.append((f"{c}/{entry.name}", index[c]))
        samples.sort()
    if not samples:
        raise ValueError(f"--data: no images ({', '.join(IMG_EXTENSIONS)}) found under {split_dir}/<class>/")
    return samples, list(classes)


def eval_transform(img_size: int, protocol: str = "project") -> Callable:
    """Resize the short side, centre-crop ``img_size``, normalise like ImageNet.

    ``protocol='project'``: short side ``img_size·256/224``, bicubic (DeiT's and MAE's evaluation transform).
    ``protocol='official'``: the StoP ``logistic_eval.py`` transform: short side 256 for a 224 px model, else
    ``img_size`` itself (no margin), bilinear (torchvision's default there)."""
    from torchvision import transforms

    chk.choice("--protocol", protocol, PROTOCOLS)
    if protocol == "official":
        resize = transforms.Resize(256 if img_size == 224 else img_size,
                                   interpolation=transforms.InterpolationMode.BILINEAR)
    else:
        resize = transforms.Resize(round(img_size * 256 / 224), interpolation=transforms.InterpolationMode.BICUBIC)
    return transforms.Compose([
        resize,
        transforms.CenterCrop(img_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class ImageList(Dataset):
    """Images ``root/<relpath>`` of ``samples`` → ``(image [3, img_size, img_size] float32, label)``, transformed
    by :func:`eval_transform` of ``protocol``."""

    def __init__(self, root: str, samples: Sequence[Sample], img_size: int, protocol: str = "project"):
        self.root, self.samples = root, list(samples)
        self.transform = eval_transform(img_size, protocol)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        from PIL import Image

        rel, label = self.samples[i]
        path = os.path.join(self.root, rel)
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except OSError as e:
            raise OSError(f"cannot read image {path}: {e}") from e
        return self.transform(img), label


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------
class EncoderInfo(NamedTuple):
    sizes: EncoderSizes
    num_heads: int
    which: str            # 'target' or 'context'
    source: str           # 'official' or 'state_dict'
    model: Optional[str]  # the preset matching width and depth, if any


def check_checkpoint_path(path: str) -> str:
    """The ``--checkpoint`` errors that need no tensor read: a missing path, a folder without a complete
    training checkpoint (``FileNotFoundError`` / ``ValueError`` naming the flag).

    Returns the checkpoint meant now: ``path`` itself for a file, for a training run's folder its newest
    complete ``step_*`` folder. A caller that reads the checkpoint more than once passes that folder on, so
    that a checkpoint saved meanwhile by the running training is not mixed in."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--checkpoint: no such file or folder: {path}")
    if os.path.isdir(path):
        from ..training.checkpoint import find_checkpoint
        try:
            return find_checkpoint(path)
        except FileNotFoundError:
            raise ValueError(f"--checkpoint: {path} is a folder without a complete training checkpoint; pass a "
                             f"training run (its --out folder, checkpoints/ or a step_* folder), an official "
                             f".pth.tar, or a state dict file (.safetensors / .pt)") from None
    return path


def read_checkpoint(path: str) -> Mapping[str, Any]:
    """A checkpoint as a dict on the CPU: a training run of this project (its ``--out`` folder, ``checkpoints/``
    or one ``step_*``: the newest checkpoint's models in the official layout, float32), a ``.safetensors``
    file, or anything ``torch.load`` reads."""
    check_checkpoint_path(path)
    if os.path.isdir(path):
        from ..models.official import official_state_dict
        from ..training.checkpoint import load_run_models
        models, meta = load_run_models(path)
        return {**{name: official_state_dict(getattr(models, name), what=name)
                   for name in ("encoder", "predictor", "target_encoder")}, "epoch": int(meta["epoch"])}
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except SafetensorError as e:
            raise ValueError(f"--checkpoint: cannot read {path} as a safetensors file: {e}") from e
    obj = load_torch_file(path, "--checkpoint")
    if not isinstance(obj, Mapping):
        raise ValueError(f"--checkpoint: {path} holds a {type(obj).__name__}, expected a dict (official layout or "
                         "a state dict)")
    return obj


def _select_state_dict(obj: Mapping[str, Any], which: str, path: str) -> Dict[str, torch.Tensor]:
    """The encoder state dict inside a non-official file (flat, nested under ``encoder``/``target_encoder``,
    or flat with those key prefixes); ``module.`` prefixes are stripped."""
    key = "target_encoder" if which == "target" else "encoder"
    if isinstance(obj.get(key), Mapping):
        return strip_prefix(obj[key])
    if any(isinstance(v, Mapping) for v in obj.values()):
        nested = sorted(k for k, v in obj.items() if isinstance(v, Mapping))
        raise ValueError(f"--encoder: {which} requested but {path} has no '{key}' state dict (found {nested})")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    sd = strip_prefix(sd)
    for prefix in (key + ".", "module." + key + "."):
        if any(k.startswith(prefix) for k in sd):
            return strip_prefix({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    if any(k.startswith(("encoder.", "target_encoder.")) for k in sd):
        raise ValueError(f"--encoder: {which} requested but {path} has no '{key}.' keys")
    return sd


def load_encoder(checkpoint: str, *, which: str = "target", model: Optional[str] = None,
                 patch_size: Optional[int] = None, img_size: Optional[int] = None,
                 num_heads: Optional[int] = None) -> Tuple[VisionTransformer, EncoderInfo]:
    """Build the frozen encoder stored in ``checkpoint`` (eval mode, no gradients, on the CPU).

    Args:
        checkpoint: an official I-JEPA / StoP ``.pth.tar`` (``encoder``, ``predictor``, ``target_encoder``
            with ``module.`` prefixes), a training run of this project (its folder: the newest checkpoint),
            or a ``.safetensors`` / ``.pt`` encoder state dict with the keys
            of :class:`VisionTransformer` (optionally nested or prefixed by ``encoder``/``target_encoder``).
        which: ``'target'`` (the EMA encoder, I-JEPA's choice for evaluation) or ``'context'``.
        model, patch_size, img_size, num_heads: optional; inferred from the weights when omitted and
            checked against them when given (``ValueError`` naming the flag).
    """
    if which not in ENCODERS:
        raise ValueError(f"--encoder: expected one of {ENCODERS}, got {which!r}")
    obj = read_checkpoint(checkpoint)
    official = isinstance(obj.get("encoder"), Mapping) and isinstance(obj.get("predictor"), Mapping)
    if official:
        if which == "target" and not isinstance(obj.get("target_encoder"), Mapping):
            raise ValueError(f"--encoder: target requested but {checkpoint} has no target_encoder; "
                             "pass --encoder context")
        sd = strip_prefix(obj["target_encoder" if which == "target" else "encoder"])
    else:
        sd = _select_state_dict(obj, which, checkpoint)
    try:
        sizes = infer_encoder_sizes(sd)
    except ValueError as e:
        raise ValueError(f"--checkpoint: {checkpoint} is not an encoder checkpoint: {e}") from None
    heads = check_sizes(sizes, model=model, patch_size=patch_size, img_size=img_size, num_heads=num_heads, cli=True)
    enc = build_encoder(sizes, heads, sd, f"{which} encoder")
    enc.eval().requires_grad_(False)
    return enc, EncoderInfo(sizes, heads, which, "official" if official else "state_dict", preset_of(sizes))


# ----------------------------------------------------------------------------------------------
# features
# ----------------------------------------------------------------------------------------------
def encode(encoder: VisionTransformer, imgs: torch.Tensor, last_k: int = 1) -> torch.Tensor:
    """Average-pooled features ``[B, E]`` of images ``[B, C, H, W]``: the mean over the last ``last_k``
    blocks of ``mean_tokens(LayerNorm(block output))`` (the encoder's final LayerNorm); ``last_k=1`` is
    ``encoder(imgs).mean(1)``."""
    depth = len(encoder.blocks)
    if not 1 <= chk.int_at_least("--last-k", last_k, 1) <= depth:
        raise ValueError(f"--last-k: expected 1 … {depth} (the encoder's depth), got {last_k}")
    x = encoder.embed(imgs)
    pooled = []
    for i, blk in enumerate(encoder.blocks):
        x = blk(x)
        if i >= depth - last_k:
            pooled.append(encoder.norm(x).mean(1))
    return torch.stack(pooled, 0).mean(0)


class _Progress:
    """tqdm when installed, else one status line on stderr refreshed every ~2 s and at the end."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.n, self.enabled = total, desc, 0, enabled
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr)
            except ImportError:
                pass

    def update(self, n: int) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled:
            now = time.perf_counter()
            if now - self.last > 2.0 or self.n >= self.total:
                self.last = now
                rate = self.n / max(now - self.t0, 1e-9)
                end = "\n" if self.n >= self.total else ""
                print(f"\r{self.desc}: {self.n}/{self.total} images ({rate:.1f} img/s)", end=end,
                      file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def resolve_device(device: str) -> torch.device:
    """``'auto'`` → cuda when visible, else cpu; ``'cuda'`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        # (meta tensors hold no values to extract; there is one CPU device)
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: 'cuda' requested but no CUDA GPU is visible")
    return dev


def feature_precision(protocol: str, device: torch.device) -> str:
    """``'bf16'`` (autocast) for the project protocol on CUDA, else ``'fp32'``: the official script extracts
    in fp32, and the CPU has no fast bf16 path."""
    chk.choice("--protocol", protocol, PROTOCOLS)
    return "bf16" if protocol == "project" and device.type == "cuda" else "fp32"


@torch.no_grad()
def extract_features(encoder: VisionTransformer, dataset: Dataset, *, batch_size: int = 128,
                     device: str = "auto", last_k: int = 1, workers: int = 0, desc: str = "features",
                     progress: bool = True, protocol: str = "project") -> Tuple[torch.Tensor, torch.Tensor]:
    """Run the frozen encoder over ``dataset`` (items ``(image [C, H, W], label)``).

    In the precision of :func:`feature_precision` (bf16 autocast or fp32). Returns ``(features [N, E] float32,
    labels [N] int64)`` on the CPU.
    """
    dev = resolve_device(device)
    bf16 = feature_precision(protocol, dev) == "bf16"
    if batch_size < 1:
        raise ValueError(f"--batch-size: expected >= 1, got {batch_size}")
    encoder = encoder.to(dev).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=dev.type == "cuda", persistent_workers=False)
    feats, labels = [], []
    bar = _Progress(len(dataset), desc, progress)
    try:
        for imgs, y in loader:
            imgs = imgs.to(dev, non_blocking=True)
            if bf16:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    f = encode(encoder, imgs, last_k)
            else:
                f = encode(encoder, imgs.float(), last_k)
            feats.append(f.float().cpu())
            labels.append(torch.as_tensor(y, dtype=torch.int64))
            bar.update(len(y))
    finally:
        bar.close()
    return torch.cat(feats, 0), torch.cat(labels, 0)


def checkpoint_identity(path: str) -> Dict[str, Any]:
    """What identifies a checkpoint for the cache: absolute path, size and modification time of the file,
    or for a training run, of the checkpoint it resolves to now (its meta.json, written last): a run that
    has saved a newer checkpoint since is a new key."""
    if os.path.isdir(path):
        from ..training.checkpoint import find_checkpoint
        path = os.path.join(find_checkpoint(path), "meta.json")
    st = os.stat(path)
    return {"path": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_key(checkpoint: Union[str, Mapping[str, Any]], split_dir: str, samples: Sequence[Sample],
              settings: Mapping[str, Any]) -> str:
    """sha256 over the checkpoint identity, the split folder, its (path, label, size, mtime) list and
    the settings: an image replaced under the same name changes the key (one ``stat`` per image).

    ``checkpoint``: a path, or its :func:`checkpoint_identity` taken when its encoder was loaded (a running
    training may have deleted an older checkpoint since, or saved a newer one that its folder now means)."""
    identity = checkpoint_identity(checkpoint) if isinstance(checkpoint, str) else dict(checkpoint)
    h = hashlib.sha256()
    h.update(json.dumps({"version": CACHE_VERSION, "checkpoint": identity,
                         "split": os.path.realpath(split_dir), "settings": dict(settings)},
                        sort_keys=True).encode())
    for rel, label in samples:
        st = os.stat(os.path.join(split_dir, rel))
        h.update(f"{rel}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def default_cache_dir() -> str:
    return os.environ.get("STOP_KERNELS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "stop_kernels",
                                                                "features")


def cached_features(encoder_fn: Callable[[], VisionTransformer], *, checkpoint: Union[str, Mapping[str, Any]],
                    split: str, split_dir: str,
                    samples: Sequence[Sample], img_size: int, settings: Mapping[str, Any], cache_dir: str,
                    batch_size: int = 128, device: str = "auto", last_k: int = 1, workers: int = 0,
                    progress: bool = True, protocol: str = "project"
                    ) -> Tuple[torch.Tensor, torch.Tensor, str, bool]:
    """Features of one split, from the cache when present, else extracted once and stored.

    ``encoder_fn`` builds the encoder only when extraction is needed. The key covers the checkpoint
    (path, size, mtime; ``checkpoint`` as :func:`cache_key` takes it), the split folder, its files (name,
    size, mtime) and labels, ``settings`` (encoder choice, heads, precision …), last K, the image size and
    the ``protocol`` (its transform and precision differ). Returns ``(features [N, E], labels [N], cache file, hit)``.
    """
    chk.choice("--protocol", protocol, PROTOCOLS)
    # the project protocol adds nothing to the key, so that caches written before protocols existed stay valid
    key = cache_key(checkpoint, split_dir, samples, {**settings, "split": split, "last_k": last_k,
                                                     "img_size": img_size,
                                                     **({} if protocol == "project" else {"protocol": protocol})})
    check_cache_dir(cache_dir)
    path = os.path.join(cache_dir, f"{split}-{key[:20]}.pt")
    if os.path.isfile(path):
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data.get("key") == key and data["features"].shape[0] == len(samples):
            if progress:
                print(f"{split}: {len(samples)} cached features from {path}", file=sys.stderr, flush=True)
            return data["features"], data["labels"], path, True
    dataset = ImageList(split_dir, samples, img_size, protocol)
    feats, labels = extract_features(encoder_fn(), dataset, batch_size=batch_size, device=device, last_k=last_k,
                                     workers=workers, desc=f"{split} features", progress=progress,
                                     protocol=protocol)
    record = {"key": key, "features": feats, "labels": labels, "samples": [s for s, _ in samples]}
    try:
        chk.write_atomic(path, lambda fh: torch.save(record, fh))
    except OSError as e:  # a full disk or a quota: the features were extracted, so the probe goes on without a cache
        print(f"warning: --cache-dir: could not store the {split} features in {path} ({e}); continuing with them "
              f"in memory (the next run extracts them again)", file=sys.stderr, flush=True)
    return feats, labels, path, False


def check_cache_dir(cache_dir: str) -> None:
    """The feature cache folder exists (created) and is writable; ``ValueError`` naming ``--cache-dir`` before
    any extraction otherwise (a path that is a file, or a folder this user cannot write)."""
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--cache-dir: cannot create {cache_dir} ({e.strerror or e})") from None
    if not os.access(cache_dir, os.W_OK | os.X_OK):
        raise ValueError(f"--cache-dir: {cache_dir} is not writable")
