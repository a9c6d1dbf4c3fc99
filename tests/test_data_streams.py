"""The data pipeline's random streams are distinct (stop_kernels.data.streams)."""
import torch

from stop_kernels.data.datasets import ImageFolderDataset, SyntheticImages
from stop_kernels.data.masks import MultiBlockMaskCollator
from stop_kernels.data.streams import stream_seed


def test_masks_augmentations_and_synthetic_images_draw_from_distinct_streams():
    """Rank 0's mask generator of batch b was image b's augmentation generator (the same linear mix of seed,
    epoch and index): the first draw set both a batch's block sizes and an image's crop area, and at seed 0, epoch 0
    the synthetic image's pixels came from that stream too (audit, session 30). No seed is shared now."""
    for seed, epoch in ((0, 0), (0, 3), (5, 1)):
        c = MultiBlockMaskCollator(input_size=224, patch_size=16, seed=seed)
        c.set_epoch(epoch)
        ds = ImageFolderDataset.__new__(ImageFolderDataset)
        ds.seed, ds.epoch = seed, epoch
        masks = {c.generator_for(b).initial_seed() for b in range(500)}
        augment = {ds._sample_seed(i) for i in range(500)}
        synthetic = {stream_seed("synthetic", seed, i) for i in range(500)}
        assert len(masks) == len(augment) == len(synthetic) == 500
        assert not (masks & augment) and not (masks & synthetic) and not (augment & synthetic)


def test_stream_seeds_are_pure_63_bit_functions_of_their_numbers():
    a = stream_seed("masks", 3, 1, 7)
    assert a == stream_seed("masks", 3, 1, 7) and 0 <= a < 2 ** 63
    assert len({stream_seed("masks", 3, 1, i) for i in range(10_000)}) == 10_000
    assert stream_seed("masks", 3, 1, 7) != stream_seed("augment", 3, 1, 7) != stream_seed("masks", 3, 7, 1)
    torch.Generator().manual_seed(stream_seed("x", 2 ** 62, -1))  # any ints; a seed the generator takes
    img, label = SyntheticImages(4, 16, seed=1)[2]
    assert torch.equal(img, SyntheticImages(4, 16, seed=1)[2][0]) and not torch.equal(img, SyntheticImages(4, 16, seed=2)[2][0])
