"""Image datasets (synthetic and ImageNet-layout folders) and the training data pipeline.

``SyntheticImages`` makes smooth, structured images (sums of random plane waves and blobs,
deterministic per index) so that a model has something learnable to predict; it needs no disk and
no download, which keeps every command of the project runnable on a bare machine.

``ImageFolderDataset`` reads an ImageNet-layout folder (``root/<class>/<image>``, or
``root/train/<class>/<image>`` when ``root/train`` exists) through PIL and the I-JEPA transforms.
A missing folder, or one without images, is a :class:`~stop_kernels.training.config.ConfigError`
raised at construction, i.e. before any model is built.

Unreadable images (a corrupt or truncated file, a non-image with an image extension) are
**substituted, never fatal**: sample ``i`` falls back to ``i+1``, ``i+2`` … (mod the dataset length)
until a readable file is found (at most ``max_substitutions`` tries, then a RuntimeError naming the
folder). Substituting rather than dropping keeps every batch full (static batch shapes for FSDP
and compiled graphs, identical batch sizes on every rank) and stays deterministic. Each skip is
logged with the path, and counted: the sample carries the count to the collate function, the
training loop sums it over ranks and logs it (``skipped_images`` in the JSONL log).

Augmentations are reproducible: the transform of sample ``i`` in epoch ``e`` runs under torch's
global CPU generator seeded from ``(seed, e, i)`` (and restored afterwards; the CUDA generators are not
touched), so the same image gets the same crop for any number of workers and after a resume.

``TrainData`` assembles dataset, :class:`ResumableDistributedSampler`, the mask collator and the
DataLoader (workers, pinned memory), and starts an epoch at any batch (resume).
"""
from __future__ import annotations

import itertools
import logging
import math
import os
from typing import Callable, Iterator, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .. import _checks as chk
from .streams import stream_seed

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class SyntheticImages(Dataset):
    """``length`` images ``[3, img_size, img_size]`` (normalised like ImageNet) with labels in
    ``[0, num_classes)``; image i is a deterministic function of ``(seed, i)``."""

    def __init__(self, length: int = 10_000, img_size: int = 224, num_classes: int = 10, seed: int = 0):
        for name, value in (("length", length), ("img_size", img_size), ("num_classes", num_classes)):
            chk.int_at_least(name, value, 1)  # (labels are i % num_classes: 2.5 gave labels like 0.5)
        if not chk.is_int(seed):
            raise TypeError(f"seed: expected an integer, got {seed!r}")
        self.length, self.img_size, self.num_classes, self.seed = length, img_size, num_classes, seed

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """Images do not depend on the epoch (present for the pipeline's uniform interface)."""

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} synthetic images")
        g = torch.Generator().manual_seed(stream_seed("synthetic", self.seed, i))
        label = i % self.num_classes
        s = self.img_size
        yy, xx = torch.meshgrid(torch.linspace(0, 1, s), torch.linspace(0, 1, s), indexing="ij")
        img = torch.zeros(3, s, s)
        # class-dependent base frequency plus random waves: learnable structure across positions
        for _ in range(4):
            freq = 1 + label % 5 + 3 * torch.rand(2, generator=g)
            phase = 2 * math.pi * torch.rand(1, generator=g)
            colour = torch.rand(3, 1, 1, generator=g) * 2 - 1
            img += colour * torch.sin(2 * math.pi * (freq[0] * xx + freq[1] * yy) + phase)
        cy, cx = torch.rand(2, generator=g)
        blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02)
        img += blob * (torch.rand(3, 1, 1, generator=g) * 2 - 1) * 2
        img += 0.05 * torch.randn(3, s, s, generator=g)
        return img, label


def _config_error(msg: str) -> Exception:
    from ..training.config import ConfigError
    return ConfigError(msg)


def scan_image_folder(root: str, name: str = "data") -> Tuple[List[Tuple[str, int]], List[str]]:
    """``(samples, classes)`` of an ImageNet-layout folder, sorted; errors name the argument (``name``: the
    config key ``data``, or ``root`` of :class:`ImageFolderDataset`) and the path.

    ``classes`` are the sorted sub-folder names and a sample's label is its folder's index in them, as
    in torchvision's ``ImageFolder`` (the official loader) with two differences: hidden folders
    (``.name``, e.g. ``.ipynb_checkpoints``) are not classes (``ImageFolder`` would shift every label
    after one), and a class folder without images keeps its index instead of being an error."""
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"{name}: expected a folder path, got {type(root).__name__}")
    if not os.path.exists(root):
        raise _config_error(f"{name}: folder {root!r} does not exist (expected an ImageNet-layout folder with one "
                            "subfolder per class" + (", or 'synthetic')" if name == "data" else ")"))
    if not os.path.isdir(root):
        raise _config_error(f"{name}: {root!r} is not a folder")
    base = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else root
    with os.scandir(base) as it:
        classes = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    samples: List[Tuple[str, int]] = []
    for ci, cname in enumerate(classes):
        cdir = os.path.join(base, cname)
        for dirpath, _, files in sorted(os.walk(cdir, followlinks=True)):
            for f in sorted(files):
                if f.lower().endswith(IMG_EXTENSIONS):
                    samples.append((os.path.join(dirpath, f), ci))
    if not samples:
        raise _config_error(f"{name}: folder {base!r} holds no images (expected <class>/<image> files with extensions "
                            f"{', '.join(IMG_EXTENSIONS)})")
    return samples, classes


class ImageFolderDataset(Dataset):
    """ImageNet-layout folder with I-JEPA transforms, deterministic augmentation and skip-on-corrupt.

    ``__getitem__`` returns ``(image, label, skipped)`` where ``skipped`` counts the unreadable
    files substituted for this sample (see the module docstring).
    """

    def __init__(self, root: str, transform: Callable, seed: int = 0, max_substitutions: int = 64, *,
                 name: str = "root"):
        """``name``: what errors about ``root`` call it (:func:`build_dataset`: the config key ``data``)."""
        # checked here: a bad value otherwise surfaced at the first sample, max_substitutions=0 as a RuntimeError
        # about "0 consecutive unreadable images" and seed=1.5 silently as seed 1
        if not callable(transform):
            raise TypeError(f"transform: expected a callable (PIL image -> tensor), got {transform!r}")
        if not chk.is_int(seed):
            raise TypeError(f"seed: expected an integer, got {seed!r}")
        chk.int_at_least("max_substitutions", max_substitutions, 1)
        self.root = root
        self.samples, self.classes = scan_image_folder(root, name)
        self.transform, self.seed, self.epoch = transform, int(seed), 0
        self.max_substitutions = max_substitutions

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _sample_seed(self, i: int) -> int:
        return stream_seed("augment", self.seed, self.epoch, i)

    @staticmethod
    def load(path: str):
        from PIL import Image
        with open(path, "rb") as fh:
            img = Image.open(fh)
            return img.convert("RGB")  # decodes now: a truncated / corrupt file raises here

    def __getitem__(self, i: int):
        from PIL import Image
        n = len(self.samples)
        if not 0 <= i < n:  # the substitution below wraps around: without this ds[n] would be ds[0]
            raise IndexError(f"index {i} out of range for the {n} images of {self.root!r}")
        skipped, first_failure = 0, ""
        for k in range(min(self.max_substitutions, n)):
            path, label = self.samples[(i + k) % n]
            try:
                img = self.load(path)
                break
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                skipped += 1
                failure = f"{path} ({type(e).__name__}: {e})"
                first_failure = first_failure or failure
                log.warning("data: skipping unreadable image %s", failure)
        else:
            # the error a worker sends back is what the user sees (worker logs may be lost): name a file
            raise RuntimeError(f"data: {skipped} consecutive unreadable images from index {i} in {self.root!r}, "
                               f"the first {first_failure}")
        # the CPU generator only (the one the transforms draw from): fork_rng(devices=[]) restores just
        # that one, and torch.manual_seed would reseed every CUDA device's generator as well, leaving a
        # main-process loader (num_workers 0) to overwrite the training's CUDA stream with each sample's seed
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self._sample_seed(i))
            x = self.transform(img)
        return x, label, skipped


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler (shuffled per epoch from ``seed + epoch``) that can start an epoch at a batch.

    ``drop_last=True``: the fewer than ``num_replicas`` samples past a multiple of the world size sit
    out the epoch (the official loader's sampler pads them up by repeating some instead), so no image
    repeats within an epoch and every rank has the same number of samples.

    ``set_epoch(epoch, start_batch)`` skips the first ``start_batch`` batches of this rank's order:
    a resumed run sees exactly the samples the uninterrupted run would have seen next.
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, batch_size: int, seed: int = 0,
                 shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.batch_size, self.start = int(batch_size), 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = int(start_batch) * self.batch_size

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


class SkipCountingCollate:
    """Wrap the mask collator: strip the per-sample skip counts, return ``(imgs, masks_enc, masks_pred, skipped)``."""

    def __init__(self, mask_collator):
        self.mask_collator = mask_collator

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.mask_collator.set_epoch(epoch, start_batch)

    def __call__(self, batch):
        skipped = 0
        if batch and len(batch[0]) == 3:
            skipped = sum(int(s[2]) for s in batch)
            batch = [(s[0], s[1]) for s in batch]
        collated, masks_enc, masks_pred = self.mask_collator(batch)
        return collated[0], masks_enc, masks_pred, skipped


def build_dataset(cfg) -> Dataset:
    """The dataset of a TrainConfig: synthetic, or the folder ``cfg.data`` (validated here, before any model)."""
    if cfg.data == "synthetic":
        return SyntheticImages(cfg.synthetic_size, cfg.img_size, seed=cfg.seed)
    from .transforms import transforms_from_config
    return ImageFolderDataset(cfg.data, transforms_from_config(cfg), seed=cfg.seed, name="data")


class TrainData:
    """Dataset + resumable distributed sampler + mask collator + DataLoader for one rank.

    ``batch_size`` is the per-rank batch of an optimizer step, loaded as ``grad_accum`` micro-batches of
    ``micro_batch`` images, each collated on its own (its own mask sizes and truncation, as one rank of a
    job with ``grad_accum`` times the ranks would draw them); ``iters_per_epoch`` optimizer steps per
    epoch (drop-last). :meth:`steps` yields steps, :meth:`epoch` the loader's micro-batches.
    """

    def __init__(self, cfg, *, rank: int = 0, world_size: int = 1, pin_memory: bool = False,
                 dataset: Optional[Dataset] = None):
        from ..training.config import local_batch
        from .masks import MultiBlockMaskCollator
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.batch_size = local_batch(cfg, world_size)
        self.grad_accum = cfg.grad_accum
        self.micro_batch = self.batch_size // self.grad_accum
        self.dataset = dataset if dataset is not None else build_dataset(cfg)
        self.sampler = ResumableDistributedSampler(self.dataset, num_replicas=world_size, rank=rank,
                                                   batch_size=self.micro_batch, seed=cfg.seed)
        masks = MultiBlockMaskCollator.from_config(cfg, seed=cfg.seed + 7919 * rank)
        self.collator = SkipCountingCollate(masks)
        self.iters_per_epoch = self.sampler.num_samples // self.batch_size
        if self.iters_per_epoch < 1:
            where = "synthetic_size" if cfg.data == "synthetic" else f"the {len(self.dataset)} images of {cfg.data!r}"
            raise _config_error(f"batch_size: a per-rank batch of {self.batch_size} is larger than the "
                                f"{self.sampler.num_samples} samples per rank ({where})")
        self.pin_memory = pin_memory

    def steps(self, epoch: int, first_step: int = 0) -> Iterator:
        """The optimizer steps ``first_step …`` of ``epoch``: ``(micro, skipped)`` with ``micro`` the step's
        ``grad_accum`` micro-batches ``[(imgs, masks_enc, masks_pred)]`` and ``skipped`` their unreadable
        images. A resumed run (``first_step`` > 0) gets exactly the micro-batches the uninterrupted one would."""
        loader = self.epoch(epoch, first_step * self.grad_accum)
        for _ in range(first_step, self.iters_per_epoch):
            group = list(itertools.islice(loader, self.grad_accum))
            if len(group) < self.grad_accum:
                return
            yield [g[:3] for g in group], sum(g[3] for g in group)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator:
        """Iterator over the loader's (micro-)batches ``start_batch …`` of ``epoch``:
        ``(imgs, masks_enc, masks_pred, skipped)``."""
        self.sampler.set_epoch(epoch, start_batch)
        self.collator.set_epoch(epoch, start_batch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        workers = self.cfg.num_workers
        # the loader draws the workers' base seed (their torch, random and numpy seeds) from this generator, not
        # the global one (left untouched): one per (seed, rank, epoch), so workers differ across ranks and epochs
        # as well as among themselves (a fixed seed gave every rank and every epoch the same worker streams)
        base = torch.Generator().manual_seed(stream_seed("workers", self.cfg.seed, self.rank, epoch))
        loader = DataLoader(self.dataset, batch_size=self.micro_batch, sampler=self.sampler, drop_last=True,
                            collate_fn=self.collator, num_workers=workers, pin_memory=self.pin_memory,
                            generator=base, persistent_workers=False, prefetch_factor=4 if workers > 0 else None)
        return iter(loader)


__all__ = ["SyntheticImages", "ImageFolderDataset", "ResumableDistributedSampler", "SkipCountingCollate",
           "TrainData", "build_dataset", "scan_image_folder", "IMAGENET_MEAN", "IMAGENET_STD"]
