"""Data: datasets (synthetic and ImageNet-layout folders) and the I-JEPA multi-block mask collator."""
from .datasets import SyntheticImages
from .masks import MultiBlockMaskCollator

__all__ = ["SyntheticImages", "MultiBlockMaskCollator"]
