"""Tests of ebtrain.data: datasets by name, splits, the image-folder cache and the device batch loader.

Run `python -m tests.test_data` from the repository root to time the loader on CIFAR-sized synthetic data.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ebtrain import checkpoint, data
from ebtrain.config import DataConfig
from ebtrain.data import BatchLoader, ImageSet, crop_and_flip, derived_seed, load_data
from ebtrain.errors import UserError

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec; ebtrain still uses them.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


def synthetic(seed: int = 1, **overrides) -> data.DataBundle:
    settings = dict(dataset="synthetic", synthetic_size=64, image_size=16, num_classes=4, channels=3)
    return load_data(DataConfig(**{**settings, **overrides}), seed=seed)


def batches(loader: BatchLoader, epoch: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def pixels(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Undo a loader's normalization: back to uint8 pixel values."""
    mean_t, std_t = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return ((x * std_t + mean_t) * 255).round().to(torch.uint8)


def indexed_set(n: int, size: int = 6, channels: int = 3) -> ImageSet:
    """Images with no zero pixel (so zeros can only come from padding) and label = index."""
    images = torch.randint(1, 256, (n, channels, size, size), generator=torch.Generator().manual_seed(0))
    return ImageSet(images.to(torch.uint8), torch.arange(n))


# ----------------------------------------------------------------------------- datasets

def test_digits_shapes_and_fixed_test_split():
    bundle = load_data(DataConfig(dataset="digits"), seed=1)
    assert (len(bundle.train), len(bundle.test)) == (1797 - 360, 360)
    assert bundle.train.images.shape[1:] == (1, 8, 8) and bundle.train.images.dtype == torch.uint8
    assert bundle.train.labels.dtype == torch.int64 and bundle.test.labels.dtype == torch.int64
    assert int(bundle.train.images.max()) == 255  # 16 gray levels stretched to 0..255
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (10, 1, 8)
    assert bundle.val is None and bundle.augment is False and bundle.name == "digits"
    assert len(bundle.mean) == len(bundle.std) == 1
    other_seed = load_data(DataConfig(dataset="digits"), seed=7)
    assert torch.equal(bundle.test.images, other_seed.test.images)


def test_synthetic_shapes_seeding_and_stats():
    bundle = synthetic()
    assert bundle.train.images.shape == (64, 3, 16, 16) and bundle.test.images.shape == (16, 3, 16, 16)
    assert bundle.train.images.dtype == torch.uint8 and bundle.train.labels.dtype == torch.int64
    assert set(bundle.train.labels.tolist()) <= set(range(4)) and bundle.num_classes == 4
    assert torch.equal(bundle.train.images, synthetic().train.images)
    assert not torch.equal(bundle.train.images, synthetic(seed=2).train.images)
    expected_mean = bundle.train.images.double().mean(dim=(0, 2, 3)) / 255
    expected_std = (bundle.train.images.double() / 255).std(dim=(0, 2, 3), unbiased=False)
    assert np.allclose(bundle.mean, expected_mean) and np.allclose(bundle.std, expected_std)


def test_augment_setting():
    assert synthetic(image_size=32).augment is True  # colour, CIFAR-sized
    assert synthetic(image_size=16).augment is False
    assert synthetic(image_size=32, channels=1).augment is False
    assert synthetic(image_size=16, augment="on").augment is True
    assert synthetic(image_size=32, augment="off").augment is False


def test_synthetic_is_learnable_with_augmentation():
    torch.manual_seed(0)
    bundle = synthetic(synthetic_size=512, num_classes=10)
    stats = dict(mean=bundle.mean, std=bundle.std)
    train = BatchLoader(bundle.train, 64, shuffle=True, augment=True, pad=2, **stats)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    for epoch in range(3):
        for x, y in batches(train, epoch):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    x, y = next(iter(BatchLoader(bundle.test, len(bundle.test), **stats)))
    assert (model(x).argmax(1) == y).float().mean() > 0.5  # chance is 0.1


def test_subset_and_validation_split(monkeypatch):
    monkeypatch.setitem(data.SOURCES, "digits", lambda cfg, seed: (indexed_set(100), indexed_set(10), ["a"]))
    bundle = load_data(DataConfig(dataset="digits", train_subset=60, val_size=15), seed=3)
    train_ids, val_ids = set(bundle.train.labels.tolist()), set(bundle.val.labels.tolist())
    assert (len(bundle.train), len(bundle.val), len(train_ids), len(val_ids)) == (45, 15, 45, 15)
    assert not train_ids & val_ids
    again = load_data(DataConfig(dataset="digits", train_subset=60, val_size=15), seed=3)
    assert torch.equal(again.val.labels, bundle.val.labels)
    other = load_data(DataConfig(dataset="digits", train_subset=60), seed=4)
    assert len(other.train) == 60 and other.val is None
    assert set(other.train.labels.tolist()) != train_ids | val_ids
    with pytest.raises(UserError, match="101.*100"):
        load_data(DataConfig(dataset="digits", train_subset=101))
    with pytest.raises(UserError, match="60"):
        load_data(DataConfig(dataset="digits", train_subset=60, val_size=60))


def test_unknown_dataset_names_the_choices():
    with pytest.raises(UserError, match="cifar10.*synthetic"):
        load_data(DataConfig(dataset="svhn"))


def test_missing_cifar10_says_how_to_get_it(tmp_path):
    with pytest.raises(UserError, match="--download") as error:
        load_data(DataConfig(dataset="cifar10", data_dir=str(tmp_path)))
    assert str(tmp_path) in str(error.value) and "\n" not in str(error.value)


# ----------------------------------------------------------------------------- image folders

def write_tree(root, sizes=None, mode="RGB", classes=("cat", "dog"), per_class=(3, 2)) -> dict[str, np.ndarray]:
    """A train/ and test/ tree of small PNG files; returns the pixels written, by relative path."""
    rng = np.random.default_rng(0)
    written = {}
    for split, count in zip(("train", "test"), per_class):
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                name = f"{split}/{cls}/{i}.png"
                shape = (8, 8) if mode == "L" else (8, 8, 3)
                if sizes and name in sizes:
                    shape = sizes[name] + shape[2:]
                written[name] = rng.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(written[name], mode).save(root / name)
    return written


def test_imagefolder_loads_and_caches(tmp_path, monkeypatch):
    written = write_tree(tmp_path)
    bundle = load_data(DataConfig(dataset="imagefolder", data_dir=str(tmp_path)))
    assert bundle.classes == ["cat", "dog"] and bundle.num_classes == 2
    assert bundle.train.images.shape == (6, 3, 8, 8) and bundle.test.images.shape == (4, 3, 8, 8)
    assert bundle.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert np.array_equal(bundle.train.images[3].permute(1, 2, 0).numpy(), written["train/dog/0.png"])
    assert np.array_equal(bundle.test.images[1].permute(1, 2, 0).numpy(), written["test/cat/1.png"])

    def no_decoding(path):
        raise AssertionError("decoded again although the tree did not change")

    monkeypatch.setattr(data, "read_image", no_decoding)
    cached = load_data(DataConfig(dataset="imagefolder", data_dir=str(tmp_path)))
    assert torch.equal(cached.train.images, bundle.train.images)
    assert torch.equal(cached.test.labels, bundle.test.labels)

    Image.fromarray(written["train/cat/0.png"]).save(tmp_path / "train/cat/extra.png")  # the tree changed
    with pytest.raises(AssertionError, match="decoded again"):
        load_data(DataConfig(dataset="imagefolder", data_dir=str(tmp_path)))


def test_two_runs_fill_one_cache_at_once(tmp_path, monkeypatch, capsys):
    """Two runs started together on one folder both decode it and both write its cache: the second
    renames its file into place while the first is still writing, and neither loses its write."""
    write_tree(tmp_path)
    load_in_another_process = ("from ebtrain.config import DataConfig; from ebtrain.data import load_data; "
                               f"load_data(DataConfig(dataset='imagefolder', data_dir={str(tmp_path)!r}))")
    rename = checkpoint._replace

    def other_run_finishes_first(tmp, path):
        subprocess.run([sys.executable, "-c", load_in_another_process], check=True,
                       cwd=Path(__file__).resolve().parents[1], capture_output=True)
        assert path.is_file()  # the other run's cache is in place
        rename(tmp, path)

    monkeypatch.setattr(checkpoint, "_replace", other_run_finishes_first)
    bundle = load_data(DataConfig(dataset="imagefolder", data_dir=str(tmp_path)))
    assert "could not write the cache" not in capsys.readouterr().err
    monkeypatch.setattr(data, "read_image", lambda path: pytest.fail("decoded again: no cache was left"))
    assert torch.equal(load_data(DataConfig(dataset="imagefolder", data_dir=str(tmp_path))).train.images,
                       bundle.train.images)
    assert not list(tmp_path.rglob("*.tmp"))


def test_imagefolder_channels(tmp_path):
    write_tree(tmp_path / "gray", mode="L")
    gray = load_data(DataConfig(dataset="imagefolder", data_dir=str(tmp_path / "gray")))
    assert gray.in_channels == 1 and gray.train.images.shape == (6, 1, 8, 8)
    written = write_tree(tmp_path / "mixed")
    Image.fromarray(written["train/cat/0.png"][..., 0], "L").save(tmp_path / "mixed/train/cat/0.png")
    palette = Image.fromarray(written["train/cat/1.png"]).convert("P")  # stores indices into a colour table
    palette.save(tmp_path / "mixed/train/cat/1.png")
    mixed = load_data(DataConfig(dataset="imagefolder", data_dir=str(tmp_path / "mixed")))
    assert mixed.in_channels == 3
    assert torch.equal(mixed.train.images[0], torch.from_numpy(written["train/cat/0.png"][..., 0]).expand(3, 8, 8))
    assert np.array_equal(mixed.train.images[1].permute(1, 2, 0).numpy(), np.asarray(palette.convert("RGB")))


@pytest.mark.parametrize("breakage, message", [
    ("no folder", "not found"),
    ("no test", "no test/ folder"),
    ("classes differ", "only in train: dog; only in test: fox"),
    ("unreadable image", "train/dog/1.png"),
    ("mixed sizes", "differ in size"),
])
def test_imagefolder_errors(tmp_path, breakage, message):
    root = tmp_path / "images"
    if breakage != "no folder":
        write_tree(root, sizes={"test/cat/0.png": (9, 9)} if breakage == "mixed sizes" else None)
    if breakage == "no test":
        shutil.rmtree(root / "test")
    if breakage == "classes differ":
        (root / "test/dog").rename(root / "test/fox")
    if breakage == "unreadable image":
        (root / "train/dog/1.png").write_bytes(b"this is not a png")
    with pytest.raises(UserError, match=message) as error:
        load_data(DataConfig(dataset="imagefolder", data_dir=str(root), loader="memory"))
    assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------- batch loader

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def test_loader_batches_and_normalization():
    images = indexed_set(10)
    loader = BatchLoader(images, 4, mean=MEAN, std=STD)
    got = batches(loader)
    assert (len(loader), loader.num_samples, [len(y) for _, y in got]) == (3, 10, [4, 4, 2])
    x, y = got[0]
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (4, 3, 6, 6)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    expected = (images.images[:4].float() / 255 - mean) / std
    assert torch.allclose(x, expected, atol=1e-5) and y.tolist() == [0, 1, 2, 3]
    dropping = BatchLoader(images, 4, mean=MEAN, std=STD, drop_last=True)
    assert (len(dropping), dropping.num_samples, len(batches(dropping))) == (2, 8, 2)


def test_loader_order_depends_on_seed_and_epoch_only():
    images = indexed_set(50)

    def order(seed: int, epoch: int) -> list[int]:
        loader = BatchLoader(images, 8, mean=MEAN, std=STD, shuffle=True, augment=True, seed=seed)
        return [i for _, y in batches(loader, epoch) for i in y.tolist()]

    assert sorted(order(0, 3)) == list(range(50))
    assert order(0, 3) == order(0, 3)  # a fresh loader (a restarted process) repeats epoch 3
    assert order(0, 3) != order(0, 4) and order(0, 3) != order(1, 3)
    first, second = (BatchLoader(images, 8, mean=MEAN, std=STD, shuffle=True, augment=True, seed=5)
                     for _ in range(2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches(first, 2), batches(second, 2)))


def test_derived_seeds_stay_what_saved_runs_used():
    # a resumed run repeats its data order, and a lottery round its controls, only while these hold
    assert derived_seed(1, 0) == 18193369737572870310 and derived_seed(7, 12) == 8773422669287023117
    assert derived_seed("reinit", 1, 2, bits=32) == 3086702298
    assert derived_seed("random-prune", 3, 1, bits=32) == 1534737130
    assert derived_seed("reinit", 1, 2, bits=32) == derived_seed("reinit", 1, 2) % 2 ** 32


def test_augmentation_is_a_padded_crop_or_flip_of_the_original():
    images, pad = indexed_set(64), 2
    plain = BatchLoader(images, 16, mean=MEAN, std=STD, shuffle=True, seed=9)
    augmented = BatchLoader(images, 16, mean=MEAN, std=STD, shuffle=True, augment=True, pad=pad, seed=9)
    shifted = bordered = 0
    for (x, y), (x_aug, y_aug) in zip(batches(plain, 1), batches(augmented, 1)):
        assert torch.equal(y, y_aug)  # same order, labels untouched
        originals, outputs = pixels(x, MEAN, STD), pixels(x_aug, MEAN, STD)
        framed = torch.nn.functional.pad(originals, (pad,) * 4)
        for original, framed_one, out in zip(originals, framed, outputs):
            windows = [framed_one[:, r:r + 6, c:c + 6] for r in range(2 * pad + 1) for c in range(2 * pad + 1)]
            assert any(torch.equal(out, w) or torch.equal(out, w.flip(-1)) for w in windows)
            shifted += not torch.equal(out, original)
            bordered += bool((out[:, 0] == 0).all() or (out[:, :, 0] == 0).all() or (out[:, :, -1] == 0).all())
    assert shifted > 32 and bordered > 0  # zero pixels exist only in the padding


def test_flip_mirrors_images():
    images = indexed_set(8).images
    flips = torch.tensor([True, False] * 4)
    out = crop_and_flip(images, torch.zeros(8, 2, dtype=torch.int64), flips, pad=0)
    assert torch.equal(out[flips], images[flips].flip(-1)) and torch.equal(out[~flips], images[~flips])
    loader = BatchLoader(indexed_set(64), 64, mean=MEAN, std=STD, augment=True, pad=0)
    (x, _), = batches(loader)
    mirrored = (pixels(x, MEAN, STD) != indexed_set(64).images).flatten(1).any(1)
    assert torch.equal(pixels(x, MEAN, STD)[mirrored], indexed_set(64).images[mirrored].flip(-1))
    assert 10 < int(mirrored.sum()) < 54  # p = 0.5


# ----------------------------------------------------------------------------- timing

def loader_throughput(n: int = 50_000, batch_size: int = 512, epochs: int = 3, device: str = "cpu") -> float:
    """Images per second of an augmenting BatchLoader over CIFAR-sized synthetic data (best epoch)."""
    bundle = load_data(DataConfig(dataset="synthetic", synthetic_size=n, image_size=32, channels=3))
    loader = BatchLoader(bundle.train, batch_size, mean=bundle.mean, std=bundle.std, device=device,
                         shuffle=True, augment=True)
    best = 0.0
    for epoch in range(epochs):
        started = time.perf_counter()
        for x, _ in batches(loader, epoch):
            pass
        if x.is_cuda:
            torch.cuda.synchronize()
        best = max(best, loader.num_samples / (time.perf_counter() - started))
    return best


if __name__ == "__main__":
    print(f"BatchLoader with augmentation, 50k x 3x32x32, batch 512, {torch.get_num_threads()} threads: "
          f"{loader_throughput():,.0f} images/s (torch {torch.__version__})")
