"""The training data pipeline: ImageNet-layout folders, corrupt images, bad paths, resumable sampling."""
import json
import math

import pytest
import torch

from stop_kernels.data.datasets import ImageFolderDataset, ResumableDistributedSampler, SyntheticImages, TrainData
from stop_kernels.data.transforms import make_transforms
from stop_kernels.training.config import ConfigError, TrainConfig

from _train_helpers import TINY


def make_folder(root, per_class=2, classes=("a", "b"), corrupt=True, size=40):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = (torch.rand(size, size + 8, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / c / f"{i}.JPEG", quality=90)
    if corrupt:
        (root / classes[0] / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" * 3)
    return root


def test_corrupt_image_is_substituted_and_counted(tmp_path):
    root = make_folder(tmp_path / "imgs")
    ds = ImageFolderDataset(str(root), make_transforms(32, (0.3, 1.0), hflip=True, color_jitter=0.5,
                                                       gaussian_blur=True, grayscale=True), seed=0)
    assert len(ds) == 5 and ds.classes == ["a", "b"]
    items = [ds[i] for i in range(len(ds))]
    assert sum(s for _, _, s in items) == 1
    assert all(x.shape == (3, 32, 32) and torch.isfinite(x).all() for x, _, _ in items)
    # augmentation is a function of (seed, epoch, index): reproducible, and new each epoch
    assert torch.equal(ds[1][0], items[1][0])
    ds.set_epoch(1)
    assert not torch.equal(ds[1][0], items[1][0])


def test_missing_or_empty_folder_fails_before_any_model(tmp_path, monkeypatch):
    from stop_kernels.training import loop

    def no_model(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(loop, "build_models", no_model)
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match="nowhere"):
        loop.train(TrainConfig(**dict(TINY, data=str(missing), out=str(tmp_path / "o"))))
    empty = tmp_path / "empty"
    (empty / "class0").mkdir(parents=True)
    (empty / "class0" / "notes.txt").write_text("no images here")
    with pytest.raises(ConfigError, match="empty"):
        loop.train(TrainConfig(**dict(TINY, data=str(empty), out=str(tmp_path / "o"))))


def test_training_on_a_folder_with_a_corrupt_jpeg(tmp_path, cpu_train):
    from stop_kernels.training.loop import train
    root = make_folder(tmp_path / "imgs")
    cfg = TrainConfig(**dict(TINY, data=str(root), batch_size=5, steps=2, num_workers=2, out=str(tmp_path / "o")))
    losses = train(cfg)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    recs = [json.loads(line) for line in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]
    assert recs[-1]["skipped_images"] == 2  # the whole folder each epoch: the broken file once per step


def test_resumable_sampler_skips_exactly_the_done_batches():
    ds = SyntheticImages(40, 8)
    full = ResumableDistributedSampler(ds, num_replicas=2, rank=1, batch_size=3, seed=5)
    full.set_epoch(2)
    order = list(full)
    part = ResumableDistributedSampler(ds, num_replicas=2, rank=1, batch_size=3, seed=5)
    part.set_epoch(2, start_batch=4)
    assert list(part) == order[12:] and len(part) == len(order) - 12


def test_train_data_resumes_mid_epoch_with_the_same_batches():
    cfg = TrainConfig(**dict(TINY, synthetic_size=48, batch_size=8))
    data = TrainData(cfg, rank=0, world_size=2)
    assert data.batch_size == 4 and data.iters_per_epoch == 6
    full = list(data.epoch(1))
    tail = list(data.epoch(1, start_batch=4))
    assert len(tail) == 2
    for a, b in zip(full[4:], tail):
        assert torch.equal(a[0], b[0])
        assert all(torch.equal(x, y) for x, y in zip(a[1] + a[2], b[1] + b[2]))
    with pytest.raises(ConfigError, match="batch_size"):
        TrainData(TrainConfig(**dict(TINY, synthetic_size=4, batch_size=8)))


def test_ranks_and_epochs_see_different_images_and_masks():
    """Two ranks of one epoch split the images and draw their own masks; the next epoch reshuffles."""
    cfg = TrainConfig(**dict(TINY, synthetic_size=48, batch_size=8))
    r0, r1 = TrainData(cfg, rank=0, world_size=2), TrainData(cfg, rank=1, world_size=2)
    a, b = next(iter(r0.epoch(0))), next(iter(r1.epoch(0)))
    assert not any(torch.equal(x, y) for x in a[0] for y in b[0])  # no image on both ranks
    assert not all(torch.equal(x, y) for x, y in zip(a[1] + a[2], b[1] + b[2]))
    e0 = torch.cat([batch[0] for batch in r0.epoch(0)])
    e1 = torch.cat([batch[0] for batch in r0.epoch(1)])
    assert not torch.equal(e0, e1)  # another order (synthetic images depend on their index only)
