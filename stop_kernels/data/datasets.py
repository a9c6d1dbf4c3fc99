"""Image datasets: a synthetic one that runs anywhere, and ImageNet-layout folders.

``SyntheticImages`` makes smooth, structured images (sums of random plane waves and blobs,
deterministic per index) so that a model has something learnable to predict; it needs no disk and
no download, which keeps every command of the project runnable on a bare machine.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch.utils.data import Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SyntheticImages(Dataset):
    """``length`` images ``[3, img_size, img_size]`` (normalised like ImageNet) with labels in
    ``[0, num_classes)``; image i is a deterministic function of ``(seed, i)``."""

    def __init__(self, length: int = 10_000, img_size: int = 224, num_classes: int = 10, seed: int = 0):
        if length < 1:
            raise ValueError(f"length: expected >= 1, got {length}")
        if img_size < 1:
            raise ValueError(f"img_size: expected >= 1, got {img_size}")
        self.length, self.img_size, self.num_classes, self.seed = length, img_size, num_classes, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} synthetic images")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
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
