"""Seeds of the data pipeline's random streams, one per (stream, seed, epoch, item).

Each stream (the synthetic images, the augmentations, the masks, the loader's workers) seeds a
``torch.Generator`` per item. The seeds used to be one linear mix of the same numbers for every stream,
``(seed·1_000_003 + epoch)·1_000_000_007 + i``, so two streams coincided: rank 0's mask generator of batch b was
image b's augmentation generator (its first draw set both the blocks' sizes and the crop's area), and at seed 0,
epoch 0 the synthetic image i's too. :func:`stream_seed` hashes the stream's name with the numbers (SplitMix64's
finaliser, chained), so the streams are distinct, and each stays a pure function of its numbers (resumable,
the same in every worker)."""
from __future__ import annotations

import zlib

_MASK64 = 2 ** 64 - 1


def _mix64(x: int) -> int:
    """SplitMix64's step: a bijection of 64-bit integers that spreads every input bit over the output."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stream_seed(stream: str, *parts: int) -> int:
    """A 63-bit seed (``torch.Generator.manual_seed`` takes it) for item ``parts`` (e.g. seed, epoch, index) of the
    random stream named ``stream``; distinct streams or parts give unrelated seeds."""
    h = _mix64(zlib.crc32(stream.encode()))
    for p in parts:
        h = _mix64(h ^ (int(p) & _MASK64))
    return h & (2 ** 63 - 1)
