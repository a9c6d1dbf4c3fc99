"""I-JEPA image transforms (torchvision), as in the official ``make_transforms``.

RandomResizedCrop to ``img_size`` with area scale ``crop_scale`` (0.3–1.0 in the paper's recipes),
then the optional augmentations of the official code (the official StoP configs turn on the flip, the blur and
``use_color_distortion`` at jitter strength 0, which leaves its RandomGrayscale(0.2): ``hflip``, ``gaussian_blur``,
``grayscale`` in ``configs/vit_{b16,l16,h14,h16}*.yaml``; the I-JEPA configs turn all off):

* ``hflip``: RandomHorizontalFlip (p 0.5);
* ``color_jitter`` = s > 0: ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) applied with p 0.8 (the official
  ``get_color_distortion`` also adds RandomGrayscale(0.2); here that is the separate ``grayscale`` flag);
* ``gaussian_blur``: PIL Gaussian blur with radius U(0.1, 2.0), p 0.5;
* ``grayscale``: RandomGrayscale (p 0.2);

then ToTensor and ImageNet normalisation. All randomness comes from ``torch``'s global CPU generator,
which :class:`~stop_kernels.data.datasets.ImageFolderDataset` seeds per (seed, epoch, index), so the
augmentation of every sample is reproducible for any number of workers and after a resume.
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch
from PIL import ImageFilter
from torchvision import transforms as T

from .. import _checks as chk
from .datasets import IMAGENET_MEAN, IMAGENET_STD


class RandomGaussianBlur:
    """PIL Gaussian blur with probability ``p`` and radius uniform in ``[radius_min, radius_max]``."""

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img):
        if torch.rand(()).item() >= self.p:
            return img
        radius = self.radius_min + torch.rand(()).item() * (self.radius_max - self.radius_min)
        return img.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, radius=({self.radius_min}, {self.radius_max}))"


def check_transform_args(img_size, crop_scale, color_jitter) -> None:
    """The values :func:`make_transforms` takes (the training config checks its keys with it): ``img_size`` an
    integer >= 1, ``crop_scale`` a pair ``0 < min <= max <= 1`` (RandomResizedCrop's area range), ``color_jitter``
    a strength in [0, 2.5] (the hue jitter 0.2·s must stay <= 0.5). Errors name the argument."""
    chk.int_at_least("img_size", img_size, 1)
    if not isinstance(crop_scale, (tuple, list)) or len(crop_scale) != 2 or \
            not all(chk.is_number(v) for v in crop_scale):
        raise TypeError(f"crop_scale: expected a pair of numbers (min, max), got {crop_scale!r}")
    lo, hi = crop_scale
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"crop_scale: expected 0 < min <= max <= 1, got {tuple(crop_scale)!r}")
    if not chk.is_number(color_jitter):
        raise TypeError(f"color_jitter: expected a number, got {color_jitter!r}")
    if not 0.0 <= color_jitter <= 2.5:
        raise ValueError(f"color_jitter: expected a value in [0, 2.5] (the hue jitter 0.2·s must stay <= 0.5), got "
                         f"{color_jitter!r}")


def make_transforms(img_size: int = 224, crop_scale: Tuple[float, float] = (0.3, 1.0), *, hflip: bool = False,
                    color_jitter: float = 0.0, gaussian_blur: bool = False, grayscale: bool = False) -> Callable:
    """The I-JEPA training transform: PIL image → normalised ``[3, img_size, img_size]`` float tensor (arguments
    checked by :func:`check_transform_args`)."""
    check_transform_args(img_size, crop_scale, color_jitter)
    ops = [T.RandomResizedCrop(img_size, scale=tuple(crop_scale))]
    if hflip:
        ops.append(T.RandomHorizontalFlip())
    if color_jitter > 0:
        s = float(color_jitter)
        ops.append(T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8))
    if grayscale:
        ops.append(T.RandomGrayscale(p=0.2))
    if gaussian_blur:
        ops.append(RandomGaussianBlur(p=0.5))
    ops += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(ops)


def transforms_from_config(cfg) -> Callable:
    return make_transforms(cfg.img_size, cfg.crop_scale, hflip=cfg.hflip, color_jitter=cfg.color_jitter,
                           gaussian_blur=cfg.gaussian_blur, grayscale=cfg.grayscale)


__all__ = ["make_transforms", "check_transform_args", "transforms_from_config", "RandomGaussianBlur"]
