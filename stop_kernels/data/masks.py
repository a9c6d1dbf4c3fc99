"""I-JEPA multi-block masking, faithful to the official ``MaskCollator`` and reproducible.

Per batch: one target-block size (scale in ``pred_mask_scale``, aspect ratio in ``aspect_ratio``, both
linear in one uniform draw, as in the official code: the aspect ratio is not log-uniform) and one
context-block size (scale in ``enc_mask_scale``, aspect ratio 1) are drawn; then for every
image ``npred`` target blocks are placed at random and one context block is placed and restricted
to the complement of that image's targets (context and targets disjoint). As in the official code,
if no context block keeping more than ``min_keep`` patches is found after 20 tries, one target's
restriction is dropped at a time (logged). Every mask is truncated to the batch minimum so masks
stack into tensors; ``truncate=False`` returns ragged masks instead (lists of 1-D tensors).

Reproducibility: all randomness comes from one ``torch.Generator`` per batch, seeded from
``(seed, epoch, batch index)``. The batch index is counted per DataLoader worker and mapped back to
the global index (workers take batches round-robin), so the masks of batch i are the same for any
number of workers and after a resume (``set_epoch(epoch, start_batch)``). Call ``set_epoch`` before every
pass over the DataLoader (``TrainData`` does): workers start each pass from the collator as the main process
holds it, so without it every pass with workers repeats the first pass's masks, while a single process
numbers its batches on (different masks for different worker counts).

How this differs from the official collator, whose mask distribution it keeps: the official code seeds
only the two block sizes, from a batch counter shared by a rank's workers (``multiprocessing.Value``,
taken in the order the workers collate, so not reproducible with workers; on resume advanced by
``start_epoch × ipe``), and places the blocks with the worker's global torch RNG. Every rank's counter
starts at 0, so all ranks draw the same block sizes at the same iteration (up to worker order). Here
each rank draws its own (``TrainData`` passes ``seed + 7919·rank``), and the block positions come from
the same per-batch generator.
"""
from __future__ import annotations

import logging
import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch.utils.data import default_collate, get_worker_info

from .. import _checks as chk
from .streams import stream_seed

log = logging.getLogger(__name__)


def _check_range(name: str, value: Sequence[float], lo: float, hi: float) -> Tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(chk.is_number(v) for v in value):
        raise TypeError(f"{name}: expected a pair of numbers (min, max), got {value!r}")
    a, b = float(value[0]), float(value[1])
    if not (lo <= a <= b <= hi):
        raise ValueError(f"{name}: expected {lo} <= min <= max <= {hi}, got {value!r}")
    return a, b


class MultiBlockMaskCollator:
    """Collate ``(image, label)`` samples and draw I-JEPA context / target masks.

    Returns ``(batch, masks_enc, masks_pred)``: ``masks_enc`` a list of ``nenc`` tensors
    ``[B, Nc]`` and ``masks_pred`` a list of ``npred`` tensors ``[B, Nt]`` of patch indices
    (row-major over the patch grid, sorted ascending). With ``truncate=False`` each entry is a
    list of ``B`` 1-D tensors of their own lengths.
    """

    def __init__(self, input_size: int = 224, patch_size: int = 16, enc_mask_scale=(0.85, 1.0),
                 pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5), nenc: int = 1, npred: int = 4,
                 min_keep: int = 10, allow_overlap: bool = False, seed: int = 0, truncate: bool = True):
        from ..models.vit import grid_size

        g = grid_size(input_size, patch_size, name="input_size")
        self.height = self.width = g
        self.patch_size = patch_size
        self.enc_mask_scale = _check_range("enc_mask_scale", enc_mask_scale, 0.0, 1.0)
        self.pred_mask_scale = _check_range("pred_mask_scale", pred_mask_scale, 0.0, 1.0)
        self.aspect_ratio = _check_range("aspect_ratio", aspect_ratio, 1e-3, 1e3)
        for name, v in (("nenc", nenc), ("npred", npred)):
            chk.int_at_least(name, v, 1)
        if g < 2:
            raise ValueError(f"input_size: the patch grid must be at least 2x2 to place mask blocks, got "
                             f"{g}x{g} ({input_size} px, patch {patch_size})")
        if not chk.is_int(min_keep):
            raise TypeError(f"min_keep: expected an integer, got {min_keep!r}")
        if not 0 <= min_keep < g * g:
            raise ValueError(f"min_keep: expected an integer in [0, {g * g}), got {min_keep!r}")
        if not chk.is_int(seed):
            raise TypeError(f"seed: expected an integer, got {seed!r}")
        for name, v in (("allow_overlap", allow_overlap), ("truncate", truncate)):
            if not isinstance(v, bool):
                raise TypeError(f"{name}: expected True or False, got {v!r}")
        self.nenc, self.npred, self.min_keep = nenc, npred, min_keep
        # a block must be able to keep more than min_keep patches whatever size a batch draws; else the
        # run would fail at the first batch that draws a small block, minutes or hours in
        for what, scale, ar in (("target", self.pred_mask_scale, self.aspect_ratio),
                                ("context", self.enc_mask_scale, (1.0, 1.0))):
            h, w = self.smallest_block(scale, ar)
            if h * w <= min_keep:
                raise ValueError(f"min_keep: the smallest {what} block this config can draw is {h}x{w} = {h * w} "
                                 f"patches on the {g}x{g} grid, and a mask must keep more than min_keep={min_keep}; "
                                 f"lower min_keep or raise the mask scale")
        self.allow_overlap, self.seed, self.truncate = allow_overlap, int(seed), truncate
        self.epoch = 0
        self._calls = 0  # batches collated by this process (worker) in this epoch

    @classmethod
    def from_config(cls, cfg, seed: int) -> "MultiBlockMaskCollator":
        """The collator of a training config (``stop_kernels.training.TrainConfig``): its mask keys,
        ragged masks when ``cfg.packed``; ``ValueError`` / ``TypeError`` naming a bad key."""
        return cls(cfg.img_size, cfg.patch_size, cfg.enc_mask_scale, cfg.pred_mask_scale, cfg.aspect_ratio,
                   npred=cfg.npred, min_keep=cfg.min_keep, seed=seed, truncate=not getattr(cfg, "packed", False))

    # -- reproducible batch numbering --------------------------------------------------------
    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Start an epoch (call it before every pass over the DataLoader, see the module docstring);
        ``start_batch`` batches are considered done already (resume)."""
        self.epoch, self._start, self._calls = int(epoch), int(start_batch), 0

    def _next_batch_index(self) -> int:
        info = get_worker_info()
        local = self._calls
        self._calls += 1
        start = getattr(self, "_start", 0)
        if info is None:
            return start + local
        return start + info.id + local * info.num_workers

    def generator_for(self, batch_index: int) -> torch.Generator:
        return torch.Generator().manual_seed(stream_seed("masks", self.seed, self.epoch, batch_index))

    # -- the official sampling -----------------------------------------------------------------
    def _block_size(self, rand: float, scale, aspect_ratio_scale) -> Tuple[int, int]:
        """The (h, w) of a block for the uniform draw ``rand`` in [0, 1) (the official formula: one
        draw sets both the scale and the aspect ratio)."""
        min_s, max_s = scale
        mask_scale = min_s + rand * (max_s - min_s)
        max_keep = int(self.height * self.width * mask_scale)
        min_ar, max_ar = aspect_ratio_scale
        aspect_ratio = min_ar + rand * (max_ar - min_ar)
        h = int(round(math.sqrt(max_keep * aspect_ratio)))
        w = int(round(math.sqrt(max_keep / aspect_ratio)))
        while h >= self.height:
            h -= 1
        while w >= self.width:
            w -= 1
        return max(h, 1), max(w, 1)

    def _sample_block_size(self, g: torch.Generator, scale, aspect_ratio_scale) -> Tuple[int, int]:
        return self._block_size(torch.rand(1, generator=g).item(), scale, aspect_ratio_scale)

    def smallest_block(self, scale, aspect_ratio_scale) -> Tuple[int, int]:
        """The block of fewest patches that ``_block_size`` can give for a draw in [0, 1].

        Its size is piecewise constant in the draw r and changes only where one of its three steps
        does: ``int(H·W·s)`` (s linear in r) at s = k / (H·W); ``round(sqrt(k·ar))`` at
        ar = (m + ½)² / k; ``round(sqrt(k / ar))`` at ar = k / (m + ½)² (ar linear in r). Evaluating at
        every such draw and midway between neighbours visits every piece, however narrow (a fixed
        grid of draws can miss one: a 3×9 piece 1e-4 wide between 3×10 pieces)."""
        min_s, max_s = scale
        min_ar, max_ar = aspect_ratio_scale
        cells = self.height * self.width
        points = {0.0, 1.0}

        def at(x, lo, hi):  # the draw r at which lo + r·(hi − lo) == x
            if hi != lo and 0.0 < (x - lo) / (hi - lo) < 1.0:
                points.add((x - lo) / (hi - lo))
        for k in range(int(cells * min(min_s, max_s)), int(cells * max(min_s, max_s)) + 1):
            at(k / cells, min_s, max_s)
            for m in range(max(self.height, self.width) + 1) if k > 0 else ():
                at((m + 0.5) ** 2 / k, min_ar, max_ar)
                at(k / (m + 0.5) ** 2, min_ar, max_ar)
        pts = sorted(points)
        draws = pts + [(a + b) / 2 for a, b in zip(pts, pts[1:])]
        return min((self._block_size(r, scale, aspect_ratio_scale) for r in draws), key=lambda hw: hw[0] * hw[1])

    def _sample_block_mask(self, g: torch.Generator, b_size, acceptable_regions: Optional[List[torch.Tensor]] = None):
        h, w = b_size
        tries, timeout, og_timeout = 0, 20, 20
        while True:
            top = int(torch.randint(0, self.height - h, (1,), generator=g))
            left = int(torch.randint(0, self.width - w, (1,), generator=g))
            mask = torch.zeros((self.height, self.width), dtype=torch.int32)
            mask[top:top + h, left:left + w] = 1
            if acceptable_regions is not None:
                for k in range(max(len(acceptable_regions) - tries, 0)):
                    mask *= acceptable_regions[k]
            idx = torch.nonzero(mask.flatten()).squeeze(1)
            if len(idx) > self.min_keep:
                break
            if (acceptable_regions is None or tries >= len(acceptable_regions)) and h * w <= self.min_keep:
                # unconstrained and still too small: the official loop would spin forever
                raise ValueError(f"min_keep: a {h}x{w} block can never keep more than min_keep={self.min_keep} "
                                 f"patches on a {self.height}x{self.width} grid; lower min_keep or raise the mask scale")
            timeout -= 1
            if timeout == 0:
                tries += 1
                timeout = og_timeout
                log.warning("mask collator: no valid mask found, dropping an acceptable region [%d]", tries)
        complement = torch.ones((self.height, self.width), dtype=torch.int32)
        complement[top:top + h, left:left + w] = 0
        return idx, complement

    def sample_masks(self, batch_size: int, g: torch.Generator):
        """Masks for one batch: ``(masks_enc, masks_pred)`` as nested lists [image][block] of 1-D tensors."""
        p_size = self._sample_block_size(g, self.pred_mask_scale, self.aspect_ratio)
        e_size = self._sample_block_size(g, self.enc_mask_scale, (1.0, 1.0))
        enc, pred = [], []
        for _ in range(batch_size):
            masks_p, masks_c = [], []
            for _ in range(self.npred):
                m, c = self._sample_block_mask(g, p_size)
                masks_p.append(m)
                masks_c.append(c)
            pred.append(masks_p)
            regions = None if self.allow_overlap else masks_c
            enc.append([self._sample_block_mask(g, e_size, regions)[0] for _ in range(self.nenc)])
        return enc, pred

    def __call__(self, batch):
        collated = default_collate(batch)
        g = self.generator_for(self._next_batch_index())
        enc, pred = self.sample_masks(len(batch), g)
        if not self.truncate:
            # per block: a list of B ragged 1-D tensors
            return (collated, [[img[j] for img in enc] for j in range(self.nenc)],
                    [[img[j] for img in pred] for j in range(self.npred)])
        keep_enc = min(len(m) for img in enc for m in img)
        keep_pred = min(len(m) for img in pred for m in img)
        masks_enc = [torch.stack([img[j][:keep_enc] for img in enc]) for j in range(self.nenc)]
        masks_pred = [torch.stack([img[j][:keep_pred] for img in pred]) for j in range(self.npred)]
        return collated, masks_enc, masks_pred
