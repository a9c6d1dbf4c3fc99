"""The training data pipeline: ImageNet-layout folders, corrupt images, bad paths, resumable sampling."""
import json
import math

import numpy as np
import pytest
import torch

from stop_kernels.data.datasets import ImageFolderDataset, ResumableDistributedSampler, SyntheticImages, TrainData
from stop_kernels.training.config import ConfigError, TrainConfig

from _train_helpers import TINY

# image folders need PIL to write and read the files and torchvision for the transforms (both optional:
# the other tests of this file run without them)
FOLDERS = pytest.mark.needs("PIL", "torchvision")


def make_transforms(*args, **kwargs):
    """stop_kernels.data.transforms.make_transforms, imported at the call (that module imports PIL and torchvision)."""
    from stop_kernels.data.transforms import make_transforms as make
    return make(*args, **kwargs)


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


@FOLDERS
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


@FOLDERS
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


@FOLDERS
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


def test_an_epoch_has_as_many_steps_as_iters_per_epoch_when_the_batch_does_not_divide_it():
    """iters_per_epoch drops the last partial step (drop-last) and steps() yields exactly that many: the loop
    numbers epochs by it (step // iters_per_epoch), so one step more than steps() yields left it asking the
    same epoch for a step it never gets, for ever. 7 images per rank, batches of 2 micro-batches of 1."""
    cfg = TrainConfig(**dict(TINY, synthetic_size=14, batch_size=4, grad_accum=2))
    data = TrainData(cfg, rank=1, world_size=2)
    assert (data.batch_size, data.micro_batch, data.iters_per_epoch) == (2, 1, 3)
    assert len(list(data.steps(0))) == len(list(data.steps(1, first_step=1))) + 1 == data.iters_per_epoch


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


# ----------------------------------------------------------------------------------------------
# mutation audit: datasets, transforms and devtools helpers
# ----------------------------------------------------------------------------------------------
def test_synthetic_images_labels_range_and_determinism():
    """Labels cycle through num_classes; image i is a function of (seed, i) only: equal when drawn again,
    different for another index or seed; out-of-range indices (negative ones too) raise IndexError."""
    ds = SyntheticImages(length=8, img_size=16, num_classes=3, seed=1)
    assert [ds[i][1] for i in range(8)] == [0, 1, 2, 0, 1, 2, 0, 1]
    torch.manual_seed(123)
    a = ds[4][0]
    torch.manual_seed(456)
    assert torch.equal(a, ds[4][0]) and a.shape == (3, 16, 16)
    assert not torch.equal(ds[1][0], ds[4][0])  # same label, another index
    assert not torch.equal(a, SyntheticImages(length=8, img_size=16, num_classes=3, seed=2)[4][0])
    for i in (-1, 8):
        with pytest.raises(IndexError):
            ds[i]


def test_build_dataset_synthetic_follows_the_seed():
    """The synthetic dataset of a config changes with its seed (runs with another seed see other images)."""
    from stop_kernels.data.datasets import build_dataset
    a = build_dataset(TrainConfig(**dict(TINY, seed=0)))[0][0]
    b = build_dataset(TrainConfig(**dict(TINY, seed=1)))[0][0]
    assert a.shape == (3, 32, 32) and not torch.equal(a, b)


@FOLDERS
def test_image_folder_layout_labels_and_train_subfolder(tmp_path):
    """Classes are the sorted sub-folders (of root/train when it exists) and each image's label is its
    folder's index."""
    names = ("c", "a", "e", "b", "d")  # created out of order
    make_folder(tmp_path / "imgs" / "train", per_class=1, classes=names, corrupt=False, size=8)
    (tmp_path / "imgs" / "val").mkdir()
    ds = ImageFolderDataset(str(tmp_path / "imgs"), make_transforms(8, (1.0, 1.0)))
    assert ds.classes == sorted(names)
    assert [(p.split("/")[-2], label) for p, label in ds.samples] == [(c, i) for i, c in enumerate(sorted(names))]
    assert [ds[i][1] for i in range(len(ds))] == list(range(5))


@FOLDERS
def test_corrupt_last_image_wraps_to_the_first_and_counts_every_skip(tmp_path):
    """Substitution runs modulo the length (the last sample falls back to the first), two consecutive
    unreadable files count 2, and the collate function sums the counts (not the samples that skipped)."""
    from stop_kernels.data.datasets import SkipCountingCollate
    root = make_folder(tmp_path / "imgs", per_class=2, corrupt=False, size=16)
    for name in ("x1.JPEG", "x2.JPEG"):
        (root / "b" / name).write_bytes(b"not an image")
    ds = ImageFolderDataset(str(root), make_transforms(16, (1.0, 1.0)))
    assert len(ds) == 6  # a/0 a/1 b/0 b/1 b/x1 b/x2
    first = ds[0]
    x, label, skipped = ds[5]
    assert (label, skipped) == (0, 1) and torch.equal(x, first[0])
    assert ds[4][1:] == (0, 2)

    class Masks:
        def __call__(self, batch):
            return (torch.stack([s[0] for s in batch]),), "enc", "pred"
    out = SkipCountingCollate(Masks())([ds[4], ds[5], ds[0]])
    assert out[0].shape == (3, 3, 16, 16) and out[3] == 3


@FOLDERS
def test_augmentation_seed_depends_on_the_index_and_leaves_the_global_rng(tmp_path):
    """Two copies of one file get different crops (the seed includes the index), and loading a sample
    does not move torch's global generator (the training RNG stream is not the loader's business)."""
    root = make_folder(tmp_path / "imgs", per_class=1, classes=("a",), corrupt=False, size=48)
    (root / "a" / "1.JPEG").write_bytes((root / "a" / "0.JPEG").read_bytes())
    ds = ImageFolderDataset(str(root), make_transforms(16, (0.3, 1.0)), seed=0)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    x0, x1 = ds[0][0], ds[1][0]
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(x0, x1)


@FOLDERS
def test_train_data_redraws_folder_augmentations_each_epoch(tmp_path):
    """TrainData passes the epoch to the dataset: epoch 1's images are not a reordering of epoch 0's."""
    root = make_folder(tmp_path / "imgs", per_class=2, corrupt=False, size=48)
    ds = ImageFolderDataset(str(root), make_transforms(32, (0.3, 1.0)), seed=0)
    data = TrainData(TrainConfig(**dict(TINY, data=str(root), batch_size=4, num_workers=0)), dataset=ds)
    e0 = next(data.epoch(0))[0]
    e1 = next(data.epoch(1))[0]
    assert not any(torch.equal(a, b) for a in e0 for b in e1)


def _pil(size=(48, 48), seed=0):
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy())


def _expected(img, size):
    """The whole image resized (bilinear) and normalised with the published ImageNet constants."""
    from PIL import Image
    arr = np.asarray(img.resize((size, size), Image.BILINEAR), np.float32) / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return (torch.from_numpy(arr).permute(2, 0, 1) - mean) / std


@FOLDERS
def test_transform_crop_scale_flip_and_normalisation():
    """crop_scale (1, 1) keeps the whole image: the output is the resized image normalised with ImageNet's
    mean/std; without hflip it is never flipped, with it both orientations occur; the default scale crops."""
    img = _pil()
    want = _expected(img, 16)
    plain, flip = make_transforms(16, (1.0, 1.0)), make_transforms(16, (1.0, 1.0), hflip=True)
    seen = set()
    for s in range(12):
        torch.manual_seed(s)
        torch.testing.assert_close(plain(img), want, rtol=0, atol=2e-5)
        torch.manual_seed(s)
        y = flip(img)
        flipped = torch.allclose(y, want.flip(-1), atol=2e-5)
        assert flipped or torch.allclose(y, want, atol=2e-5)
        seen.add(flipped)
    assert seen == {True, False}
    torch.manual_seed(0)
    assert not torch.allclose(make_transforms(16)(img), want, atol=1e-2)


@FOLDERS
def test_optional_augmentations_follow_their_flags():
    """Each optional augmentation is present only when its flag (or the config's) asks for it, colour jitter
    with the official strengths and p 0.8; the blur's p and radius are honoured."""
    from torchvision import transforms as T

    from stop_kernels.data.transforms import RandomGaussianBlur, transforms_from_config

    def kinds(t):
        return [type(op).__name__ for op in t.transforms]
    assert kinds(make_transforms(16)) == ["RandomResizedCrop", "ToTensor", "Normalize"]
    t = make_transforms(16, (0.3, 1.0), color_jitter=0.5)
    assert kinds(t) == ["RandomResizedCrop", "RandomApply", "ToTensor", "Normalize"]
    assert t.transforms[0].scale == (0.3, 1.0)
    jitter = t.transforms[1]
    assert jitter.p == 0.8 and isinstance(jitter.transforms[0], T.ColorJitter)
    assert jitter.transforms[0].brightness == pytest.approx((0.6, 1.4)) and jitter.transforms[0].hue == pytest.approx(
        (-0.1, 0.1))
    for flags, extra in ((dict(gaussian_blur=True), "RandomGaussianBlur"), (dict(grayscale=True), "RandomGrayscale")):
        cfg = TrainConfig(**dict(TINY, **flags))
        assert kinds(transforms_from_config(cfg)) == ["RandomResizedCrop", extra, "ToTensor", "Normalize"]
    img = _pil(seed=1)
    never, always = RandomGaussianBlur(p=0.0), RandomGaussianBlur(p=1.0)
    outs = []
    for s in range(3):
        torch.manual_seed(s)
        assert never(img) is img
        outs.append(torch.from_numpy(np.asarray(always(img), dtype=np.float32)))
    assert not torch.equal(outs[0], torch.from_numpy(np.asarray(img, dtype=np.float32)))
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])  # a random radius each time


def test_rel_error_is_relative_to_the_reference():
    """‖a − b‖ / ‖b‖ with b the reference (not symmetric), 0 when both are zero, measured in float64."""
    from stop_kernels.devtools import rel_error
    g = torch.Generator().manual_seed(0)
    b = torch.randn(64, generator=g)
    assert rel_error(2 * b, b) == pytest.approx(1.0)
    assert rel_error(b, 2 * b) == pytest.approx(0.5)
    assert rel_error(torch.zeros(3), torch.zeros(3)) == 0.0
    x = torch.randn(1000, generator=g, dtype=torch.float64)
    assert rel_error(x * (1 + 1e-12), x) == pytest.approx(1e-12, rel=1e-3, abs=0)  # float32 would give 0


def test_offline_driver_is_restored():
    """The offline sm_90 driver answers inside the block only; Triton's own driver is back afterwards."""
    from triton.runtime import driver

    from stop_kernels.devtools import offline_driver
    before = driver._active
    with offline_driver(90, "cpu") as drv:
        assert driver.active.get_current_target().arch == 90 and drv.get_active_torch_device().type == "cpu"
    assert driver._active is before


@FOLDERS
def test_a_step_of_micro_batches_counts_the_skips_of_all_of_them(tmp_path):
    """With grad_accum, a step's unreadable-image count is the sum over its micro-batches: over an epoch it
    is every broken file once, wherever the shuffle put them."""
    root = make_folder(tmp_path / "imgs", per_class=3)
    (root / "b" / "broken2.JPEG").write_bytes(b"not an image either" * 4)
    cfg = TrainConfig(**dict(TINY, data=str(root), batch_size=8, grad_accum=4))
    data = TrainData(cfg)
    assert (data.iters_per_epoch, data.micro_batch) == (1, 2)
    for epoch in range(3):
        steps = list(data.steps(epoch))
        per_micro = [b[3] for b in data.epoch(epoch)]
        assert [s for _, s in steps] == [sum(per_micro)] == [2], (epoch, per_micro)


@FOLDERS
def test_loading_a_sample_leaves_the_device_generators_alone(tmp_path, monkeypatch):
    """Review finding: the per-sample augmentation seed went through torch.manual_seed, which reseeds every
    CUDA device's generator too, while fork_rng(devices=[]) restores only the CPU one: with num_workers 0 a
    GPU run's CUDA stream was overwritten with each loaded sample's seed. The crop is still the one of the
    CPU generator seeded from (seed, epoch, index)."""
    root = make_folder(tmp_path / "imgs", per_class=1, classes=("a", "b"), corrupt=False, size=24)
    ds = ImageFolderDataset(str(root), make_transforms(16, (0.3, 1.0)), seed=3)
    ds.set_epoch(2)
    reseeded = []
    for name in ("manual_seed", "manual_seed_all"):
        monkeypatch.setattr(torch.cuda, name, lambda seed, _n=name: reseeded.append((_n, seed)))
    cuda_before = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    x, label, skipped = ds[1]
    assert reseeded == [] and (label, skipped) == (1, 0)
    assert all(torch.equal(a, b) for a, b in zip(cuda_before, torch.cuda.get_rng_state_all() if cuda_before else []))
    monkeypatch.undo()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(ds._sample_seed(1))
        assert torch.equal(x, ds.transform(ds.load(ds.samples[1][0])))


@FOLDERS
def test_image_folder_refuses_out_of_range_indices(tmp_path):
    """Review finding: the substitution's wrap-around (i + k) mod n also served indices outside the dataset,
    ds[len(ds)] as ds[0] and ds[-1] as the last image, and iterating the dataset (the __getitem__ protocol,
    which stops at IndexError) never ended. Like SyntheticImages, an index outside [0, len) is an IndexError."""
    import itertools
    root = make_folder(tmp_path / "imgs", per_class=1, classes=("a", "b"), corrupt=False, size=16)
    ds = ImageFolderDataset(str(root), make_transforms(8, (1.0, 1.0)))
    assert [ds[i][1] for i in range(len(ds))] == [0, 1]
    for i in (-1, len(ds), 100):
        with pytest.raises(IndexError, match=f"index {i} out of range"):
            ds[i]
    assert len(list(itertools.islice(iter(ds), 5))) == 2


def test_worker_random_streams_differ_across_ranks_and_epochs_and_repeat_across_runs():
    """Review finding: the loader's worker base seed came from a generator seeded with cfg.seed alone, so every
    rank and every epoch started its workers' torch / random / numpy generators in the same state: a dataset
    drawing from them (a custom one passed to TrainData) gave both ranks the same draws, every epoch. Now they
    are seeded per (seed, rank, epoch): distinct there, identical in a rerun."""
    import random

    class GlobalRandom(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.tensor([torch.rand(()).item(), random.random(), float(np.random.rand())]), i

    cfg = TrainConfig(**dict(TINY, batch_size=4, num_workers=1))

    def draws(rank, epoch):
        data = TrainData(cfg, rank=rank, world_size=2, dataset=GlobalRandom())
        return next(data.epoch(epoch))[0]
    r0e0 = draws(0, 0)
    assert torch.equal(r0e0, draws(0, 0))
    for other in (draws(1, 0), draws(0, 1)):
        assert not (r0e0[:, None] == other[None]).any()  # not one draw of any of the three generators repeats


@FOLDERS
def test_class_index_mapping_skips_hidden_folders_and_keeps_empty_classes(tmp_path):
    """What scan_image_folder's docstring states against torchvision's ImageFolder: a hidden folder is no
    class (labels do not shift after it), a class folder without images keeps its index."""
    from stop_kernels.data.datasets import scan_image_folder
    root = make_folder(tmp_path / "imgs", per_class=1, classes=("a", "c"), corrupt=False, size=8)
    (root / "b").mkdir()
    make_folder(root / ".ipynb_checkpoints", per_class=1, classes=("x",), corrupt=False, size=8)
    samples, classes = scan_image_folder(str(root))
    assert classes == ["a", "b", "c"]
    assert [(p.split("/")[-2], label) for p, label in samples] == [("a", 0), ("c", 2)]


@FOLDERS
@pytest.mark.parametrize("kw, exc, name", [
    (dict(max_substitutions=0), ValueError, "max_substitutions"), (dict(max_substitutions=2.0), TypeError,
                                                                    "max_substitutions"),
    (dict(seed=1.5), TypeError, "seed"), (dict(seed="0"), TypeError, "seed"),
    (dict(transform=None), TypeError, "transform"),
])
def test_image_folder_names_a_bad_argument(tmp_path, kw, exc, name):
    """Review finding: max_substitutions=0 built a dataset whose every sample raised "0 consecutive unreadable
    images", seed=1.5 ran as seed 1 and transform=None failed at the first sample."""
    root = make_folder(tmp_path / "imgs", per_class=1, classes=("a",), corrupt=False, size=8)
    args = {"transform": make_transforms(8, (1.0, 1.0)), **kw}
    with pytest.raises(exc, match=f"^{name}:"):
        ImageFolderDataset(str(root), **args)


@FOLDERS
def test_a_run_of_unreadable_images_names_the_first_file(tmp_path):
    """Review finding: when max_substitutions unreadable files in a row stopped the loader, the RuntimeError
    (all the main process sees of a worker's failure) named the folder only, not one of the files."""
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    for name in ("0.JPEG", "1.JPEG", "2.JPEG"):
        (root / "a" / name).write_bytes(b"not an image")
    ds = ImageFolderDataset(str(root), make_transforms(8, (1.0, 1.0)), max_substitutions=2)
    with pytest.raises(RuntimeError, match=r"2 consecutive unreadable images from index 1 .*the first \S*1\.JPEG \("):
        ds[1]


@FOLDERS
def test_augmentations_are_the_official_recipes_parameters():
    """The pipeline's parameters, as the official I-JEPA / StoP code sets them (mutation run, session 31: grayscale
    p 0.5, blur p 1.0 or another jitter passed every test): RandomResizedCrop over crop_scale, the flip, ColorJitter
    (0.8s, 0.8s, 0.8s, 0.2s) applied with p 0.8, RandomGrayscale p 0.2, the blur with p 0.5 and radius 0.1–2,
    then ImageNet normalisation."""
    import torchvision.transforms as T
    from stop_kernels.data.transforms import IMAGENET_MEAN, IMAGENET_STD, RandomGaussianBlur
    ops = make_transforms(96, (0.3, 1.0), hflip=True, color_jitter=0.5, grayscale=True, gaussian_blur=True).transforms
    crop, flip, jitter, gray, blur, to_tensor, norm = ops
    assert isinstance(crop, T.RandomResizedCrop) and crop.size == (96, 96) and crop.scale == (0.3, 1.0)
    assert isinstance(flip, T.RandomHorizontalFlip) and flip.p == 0.5
    assert isinstance(jitter, T.RandomApply) and jitter.p == 0.8
    (cj,) = jitter.transforms
    assert (cj.brightness, cj.contrast, cj.saturation, cj.hue) == ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1))
    assert isinstance(gray, T.RandomGrayscale) and gray.p == 0.2
    assert isinstance(blur, RandomGaussianBlur) and (blur.p, blur.radius_min, blur.radius_max) == (0.5, 0.1, 2.0)
    assert isinstance(to_tensor, T.ToTensor) and isinstance(norm, T.Normalize)
    assert tuple(norm.mean) == tuple(IMAGENET_MEAN) == (0.485, 0.456, 0.406)
    assert tuple(norm.std) == tuple(IMAGENET_STD) == (0.229, 0.224, 0.225)
    plain = make_transforms(96, (0.3, 1.0)).transforms  # the flags off: crop, tensor, normalisation only
    assert [type(t) for t in plain] == [T.RandomResizedCrop, T.ToTensor, T.Normalize]


@FOLDERS
@pytest.mark.parametrize("error", [ValueError, SyntaxError, OSError])
def test_every_kind_of_unreadable_image_is_substituted(tmp_path, monkeypatch, error):
    """PIL reports a broken file as OSError, but also as ValueError or SyntaxError (and DecompressionBombError):
    each is skipped and counted like an unreadable file (mutation run, session 31: catching OSError alone passed)."""
    root = make_folder(tmp_path / "imgs", corrupt=False)
    ds = ImageFolderDataset(str(root), transform=make_transforms(32, (0.3, 1.0)))
    real = ds.load
    bad = ds.samples[0][0]

    def load(path):
        if path == bad:
            raise error("broken image")
        return real(path)
    monkeypatch.setattr(ds, "load", load)
    img, label, skipped = ds[0]
    assert skipped == 1 and img.shape == (3, 32, 32) and label == ds.samples[1][1]
