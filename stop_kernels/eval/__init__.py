"""Evaluation of frozen encoders: feature extraction (cached) and the linear probe.

    python -m stop_kernels.eval.linear_probe --checkpoint in1k_vith14_ep300.pth.tar --data /imagenet \\
        --subset 1percent.txt

``run_probe``, ``fit_logistic_regression`` and ``sweep_logistic_regression`` live in
:mod:`.linear_probe`; they are re-exported lazily so that ``python -m stop_kernels.eval.linear_probe``
does not import the module twice.
"""
from .features import (ImageList, cached_features, encode, extract_features, list_images, load_encoder,
                       read_subset)

_PROBE = ("fit_logistic_regression", "run_probe", "sweep_logistic_regression")

__all__ = ["ImageList", "cached_features", "encode", "extract_features", "list_images", "load_encoder",
           "read_subset", *_PROBE]


def __getattr__(name):
    if name in _PROBE:
        from . import linear_probe

        return getattr(linear_probe, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
