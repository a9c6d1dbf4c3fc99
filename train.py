#!/usr/bin/env python
"""Train I-JEPA with Stochastic Positional Embeddings.

    python train.py                                  # embedded default: vit_tiny, synthetic data, CPU-friendly
    python train.py --config configs/vit_h14_224.yaml --data /path/to/imagenet

Every key of stop_kernels.training.config.TrainConfig is a flag (--noise-std 0.2, --batch-size 64 …).
"""
import sys

from stop_kernels.training.config import parse_config
from stop_kernels.training.loop import train


def main(argv=None) -> int:
    cfg = parse_config(argv)
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
