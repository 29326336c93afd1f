"""Datasets by name, held in memory as uint8 tensors, and a batch loader that augments on the device.

`load_data(cfg)` turns a `DataConfig` into a `DataBundle`: train / optional val / test `ImageSet`s plus
what a model and a loader need to know (channels, image size, classes, normalization constants, whether
to augment). `BatchLoader` keeps the uint8 images on the training device and builds each batch there:
random crop with zero padding and horizontal flip as batched tensor ops, then scaling and normalization,
so the accelerator never waits for Python (the airbench recipe).

An image folder whose decoded images would not fit in memory, or whose images differ in size, is not
decoded here: its splits are `FileSet`s (paths and labels) that `stream.StreamLoader` decodes batch by
batch in worker processes (`choose_loader` says which path a folder takes, and why). `imagenet` is an
image folder too (`FOLDERS` says how it differs: val/ for its test split, always streamed).

Randomness is explicit: the dataset splits depend on `seed`, a loader's order and augmentation depend on
(`seed`, epoch) only, so epoch e of a resumed run sees exactly the batches it would have seen unbroken.
"""
from __future__ import annotations

import functools
import hashlib
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed
from .checkpoint import UnreadableFile, atomic_save, load
from .config import DataConfig, check_allowed, resolve_image_size
from .errors import UserError


@dataclass
class ImageSet:
    """Images and their labels, in memory: `images` uint8 [N, C, H, W], `labels` int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: torch.Tensor) -> ImageSet:
        """The images at `indices`, in that order."""
        return ImageSet(self.images[indices], self.labels[indices])


@dataclass
class FileSet:
    """Image files and their labels, decoded only when a batch needs them (`stream.StreamLoader`):
    `paths` [N], `labels` int64 [N]."""

    paths: list[str]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: torch.Tensor) -> FileSet:
        """The files at `indices`, in that order."""
        return FileSet([self.paths[i] for i in indices.tolist()], self.labels[indices])


@dataclass
class DataBundle:
    """Everything `load_data` produces: the splits and what a model and a loader need to know.

    `mean` and `std` are per channel in [0, 1] pixel units; `augment` says whether training batches
    should get augmented (`BatchLoader(augment=...)`: random crop and flip; `StreamLoader`: random resized
    crop and flip). `loader` is "memory" (the splits are `ImageSet`s) or "stream" (`FileSet`s, decoded by
    `workers` processes, cropped to `image_size`).
    """

    train: ImageSet | FileSet
    val: ImageSet | FileSet | None
    test: ImageSet | FileSet
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool
    classes: list[str]
    name: str
    loader: str = "memory"
    workers: int = 0

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image as the model sees it."""
        return self.in_channels, self.image_size, self.image_size


Splits = tuple[ImageSet, ImageSet, list[str]]  # train, test, class names

# The constants every CIFAR and MNIST codebase uses, so runs compare with published ones; other
# datasets get theirs measured on the training images.
CIFAR_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
# A streamed folder is never decoded whole, so its statistics are not measured: ImageNet's, as everyone uses.
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
KNOWN_STATS = {"cifar10": CIFAR_STATS, "cifar100": CIFAR_STATS, "mnist": ((0.1307,), (0.3081,)),
               "imagenet": IMAGENET_STATS}

FOLDER_HELP = "use --dataset imagefolder --data-dir PATH for a folder of images"


# ----------------------------------------------------------------------------- torchvision datasets

def _as_nchw(data: np.ndarray | torch.Tensor) -> torch.Tensor:
    """torchvision keeps CIFAR as uint8 [N, H, W, C] numpy and MNIST as uint8 [N, H, W] tensors."""
    data = torch.as_tensor(data)
    return data.unsqueeze(1) if data.dim() == 3 else data.permute(0, 3, 1, 2).contiguous()


def _load_torchvision(class_name: str, cfg: DataConfig, seed: int) -> Splits:
    import torchvision.datasets

    dataset_class = getattr(torchvision.datasets, class_name)
    try:
        train, test = [dataset_class(cfg.data_dir, train=is_train, download=cfg.download)
                       for is_train in (True, False)]
    except (RuntimeError, OSError) as e:  # torchvision: "Dataset not found"; urllib: no network
        if cfg.download:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"downloading {cfg.dataset} into '{cfg.data_dir}' failed ({reason}): check the "
                            f"network, or {FOLDER_HELP}") from None
        raise UserError(f"{cfg.dataset} not found in '{cfg.data_dir}': pass --download to fetch it, or "
                        f"{FOLDER_HELP}") from None
    train_set, test_set = [ImageSet(_as_nchw(split.data), torch.as_tensor(split.targets, dtype=torch.int64))
                           for split in (train, test)]
    return train_set, test_set, list(train.classes)


# ----------------------------------------------------------------------------- small built-in datasets

DIGITS_TEST_SIZE = 360


def _load_digits(cfg: DataConfig, seed: int) -> Splits:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 17 gray levels (0..16) stretched to the usual 0..255 so the loader's /255 applies unchanged.
    images = torch.from_numpy(np.rint(digits.images * (255 / 16))).to(torch.uint8).unsqueeze(1)
    everything = ImageSet(images, torch.from_numpy(digits.target).to(torch.int64))
    # Seed 0 whatever the run's seed: every run is scored on the same test images.
    order = torch.randperm(len(everything), generator=torch.Generator().manual_seed(0))
    return (everything.take(order[DIGITS_TEST_SIZE:]), everything.take(order[:DIGITS_TEST_SIZE]),
            [str(d) for d in range(10)])


def _make_synthetic(cfg: DataConfig, seed: int) -> Splits:
    generator = torch.Generator().manual_seed(seed)
    k, c, s = cfg.num_classes, cfg.channels, resolve_image_size(cfg)
    # One smooth prototype per class (a random 4x4 pattern blown up to the image size): it survives a
    # few pixels of random crop and a flip, so the task stays learnable with augmentation on.
    prototypes = F.interpolate(torch.rand(k, c, 4, 4, generator=generator), size=(s, s),
                               mode="bilinear", align_corners=False)

    def draw(n: int) -> ImageSet:
        labels = torch.randint(k, (n,), generator=generator)
        images = torch.empty(n, c, s, s, dtype=torch.uint8)
        for start in range(0, n, 4096):  # chunks keep the float temporaries small for large n
            part = labels[start:start + 4096]
            noisy = prototypes[part] + 0.3 * torch.randn(len(part), c, s, s, generator=generator)
            images[start:start + 4096] = noisy.clamp(0, 1).mul(255).round().to(torch.uint8)
        return ImageSet(images, labels)

    return draw(cfg.synthetic_size), draw(max(1, cfg.synthetic_size // 4)), [f"class{i}" for i in range(k)]


# ----------------------------------------------------------------------------- image folders

@dataclass(frozen=True)
class FolderDataset:
    """A dataset read from DIR/train/<class>/* and DIR/<test>/<class>/* (any extension case: .jpg, .JPEG): its
    test split's folder, and whether `--loader auto` streams it without judging its size (ImageNet's 1.3M
    images of every size never fit; its default `--image-size` is in config.DEFAULT_IMAGE_SIZE)."""

    test: str
    always_streams: bool = False


FOLDERS = {"imagefolder": FolderDataset("test"), "imagenet": FolderDataset("val", always_streams=True)}

CACHE_DIR = ".ebtrain-cache"
CACHE_VERSION = 1  # bump when the cached layout or the decoding changes
ANNOUNCE_AFTER_S = 1.0  # decoding that takes longer than this is announced on stderr


def read_image(path: str) -> torch.Tensor:
    """One image file as uint8 RGB [3, H, W]; gray, palette and alpha images are converted."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    try:
        # RGB, not UNCHANGED: UNCHANGED hands back the palette indices of a palette PNG.
        image = decode_image(read_file(path), mode=ImageReadMode.RGB)
    except RuntimeError:  # a format torchvision does not decode (BMP, TIFF, ...) or a broken file
        image = _decode_with_pil(path)
    if image.dtype != torch.uint8:  # 16-bit PNG
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    return image


def _decode_with_pil(path: str) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(path) as im:
            array = np.array(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read image '{path}': {e}") from None
    return torch.from_numpy(array).permute(2, 0, 1)


def _list_folder(root: Path) -> tuple[list[tuple[str, int]], list[str]]:
    from torchvision.datasets import ImageFolder

    try:
        folder = ImageFolder(str(root))
    except FileNotFoundError as e:  # no class folders, or a class folder without images
        raise UserError(f"{root}: {e.args[-1]}") from None
    return folder.samples, folder.classes


def _tree_key(root: Path, paths: list[str]) -> str:
    """A hash of every file's relative path, size and modification time: any change to the tree changes it."""
    digest = hashlib.sha256(f"v{CACHE_VERSION}\n".encode())
    skip = len(str(root)) + 1  # the paths start with root/ (ImageFolder joins them); slicing beats relpath
    for path in paths:
        info = os.stat(path)
        digest.update(f"{path[skip:]}\t{info.st_size}\t{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _decode_all(paths: list[str], root: Path) -> list[torch.Tensor]:
    """Decode on a thread pool (torchvision's decoders release the GIL), reporting progress on stderr
    when decoding takes long enough to be worth a word (a small folder decodes silently)."""
    started = time.time()
    note = f"ebtrain: decoding {len(paths)} images in '{root}' (once; cached in {root / CACHE_DIR})"
    announce = threading.Timer(ANNOUNCE_AFTER_S, lambda: print(note, file=sys.stderr, flush=True))
    announce.start()
    chunks = [paths[i:i + 512] for i in range(0, len(paths), 512)]
    images: list[torch.Tensor] = []
    live = sys.stderr.isatty()  # a running count only where it can overwrite itself
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        try:
            for decoded in pool.map(lambda chunk: [read_image(p) for p in chunk], chunks):
                images.extend(decoded)
                if live:
                    print(f"\r  {len(images)}/{len(paths)}", end="", file=sys.stderr, flush=True)
        except BaseException:  # an unreadable file or Ctrl-C: stop now instead of decoding the rest
            pool.shutdown(cancel_futures=True)
            raise
        finally:
            announce.cancel()
    if live:
        print(file=sys.stderr)
    seconds = time.time() - started
    if seconds >= ANNOUNCE_AFTER_S:
        print(f"ebtrain: decoded {len(paths)} images in {seconds:.1f} s", file=sys.stderr, flush=True)
    return images


class MixedSizes(UserError):
    """The images of a folder loaded into memory differ in size (`--loader auto` then streams it)."""


def _stack(images: list[torch.Tensor], paths: list[str], root: Path) -> torch.Tensor:
    """One uint8 [N, C, H, W] tensor: C = 1 if every image is grayscale, else 3."""
    sizes = {tuple(im.shape[1:]): p for im, p in zip(images, paths)}
    if len(sizes) > 1:
        examples = ", ".join(f"{h}x{w} (e.g. {os.path.relpath(p, root)})" for (h, w), p in list(sizes.items())[:3])
        raise MixedSizes(f"images in '{root}' differ in size: {examples}; resize them to one size first, or "
                         "stream them (--loader stream --image-size N)")
    (h, w), = sizes
    if h != w:
        raise UserError(f"images in '{root}' are {h}x{w}: ebtrain needs square images, resize or crop them first")
    stacked = torch.stack(images)
    # Grayscale files decode to three equal channels: keep one when every image is gray.
    return stacked[:, :1].clone() if bool((stacked[:, 1:] == stacked[:, :1]).all()) else stacked


def _list_imagefolder(root: Path, test: str) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[str]]:
    """The (path, label) samples of train/ and of the test split's folder `test`/, and the class names, checked."""
    layout = f"expected {root / 'train'}/<class>/* and {root / test}/<class>/*"
    if not root.is_dir():
        raise UserError(f"image folder '{root}' not found: {layout}")
    for split in ("train", test):
        if not (root / split).is_dir():
            raise UserError(f"'{root}' has no {split}/ folder: {layout}")
    (train_samples, classes), (test_samples, test_classes) = _list_folder(root / "train"), _list_folder(root / test)
    if classes != test_classes:
        only_train, only_test = sorted(set(classes) - set(test_classes)), sorted(set(test_classes) - set(classes))
        raise UserError(f"classes differ between {root / 'train'} and {root / test}: only in train: "
                        f"{', '.join(only_train) or '-'}; only in {test}: {', '.join(only_test) or '-'}")
    if len(classes) < 2:
        raise UserError(f"'{root / 'train'}' holds one class ({classes[0]}): a classifier needs at least 2 class "
                        "folders")
    return train_samples, test_samples, classes


def _decode_imagefolder(root: Path, train_samples: list[tuple[str, int]], test_samples: list[tuple[str, int]],
                        classes: list[str]) -> Splits:
    samples = train_samples + test_samples
    paths = [p for p, _ in samples]
    cache = root / CACHE_DIR / f"imagefolder-{_tree_key(root, paths)}.pt"
    cached = _read_cache(cache)
    if cached is None:
        images = _stack(_decode_all(paths, root), paths, root)
        labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
        _write_cache({"images": images, "labels": labels}, cache)
    else:
        images, labels = cached["images"], cached["labels"]
    # Train and test stay views of one tensor: no second copy of a possibly large dataset.
    n = len(train_samples)
    return ImageSet(images[:n], labels[:n]), ImageSet(images[n:], labels[n:]), classes


def _read_cache(cache: Path) -> dict[str, torch.Tensor] | None:
    if not cache.is_file():
        return None
    try:
        return load(cache, weights_only=True)
    except UnreadableFile as e:  # a damaged cache is rebuilt, never fatal
        print(f"ebtrain: ignoring unreadable cache {cache} ({e})", file=sys.stderr)
        return None


def _write_cache(blob: dict[str, torch.Tensor], cache: Path) -> None:
    try:
        atomic_save(blob, cache)
        for stale in cache.parent.glob("imagefolder-*.pt"):  # caches of earlier versions of the tree
            if stale != cache:
                stale.unlink()
    except OSError as e:  # e.g. a read-only data folder: still usable, just slower next time
        print(f"ebtrain: could not write the cache {cache} ({e}); the next load decodes again", file=sys.stderr)


# ----------------------------------------------------------------------------- which loader

MEMORY_FRACTION = 0.25  # the in-memory path takes a folder whose decoded images fit in this share of memory
SIZE_SAMPLE = 256  # image headers read to judge a folder's sizes (every header would take minutes on ImageNet)


def memory_limit(device: torch.device | None = None) -> int:
    """Bytes a folder's decoded images may take on the in-memory path: `MEMORY_FRACTION` of the machine's RAM,
    and of the GPU's memory when training on CUDA (BatchLoader keeps the whole set on the device)."""
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if device is not None and device.type == "cuda":
        available = min(available, torch.cuda.get_device_properties(device).total_memory)
    return int(MEMORY_FRACTION * available)


def _header_size(path: str) -> tuple[int, int] | None:
    """(width, height) from the file's header, without decoding it; None if unreadable (decoding says why)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError):
        return None


def choose_loader(setting: str, paths: list[str], device: torch.device | None = None) -> tuple[str, str]:
    """("memory" or "stream", why) for a folder of `paths` under `--loader setting`.

    auto streams when the images differ in size or their decoded bytes (3 x H x W each) would exceed
    `memory_limit(device)`; both are judged from the headers of `SIZE_SAMPLE` files spread over the folder,
    and a difference in size the sample missed is found by the decoding (`load_data` then streams)."""
    n = len(paths)
    if setting == "memory":
        return "memory", f"{n} images, --loader memory"
    if setting == "stream":
        return "stream", f"{n} images, --loader stream"
    sizes = [size for size in map(_header_size, paths[::max(1, n // SIZE_SAMPLE)]) if size is not None]
    if len(set(sizes)) > 1:
        return "stream", f"{n} images of mixed sizes"
    w, h = sizes[0] if sizes else (0, 0)
    decoded, limit = 3 * w * h * n, memory_limit(device)
    where = "GPU memory" if device is not None and device.type == "cuda" else "RAM"
    within = f"{decoded / 2 ** 20:,.0f} MiB decoded, limit {limit / 2 ** 20:,.0f} MiB ({MEMORY_FRACTION:.0%} of {where})"
    if decoded > limit:
        return "stream", f"{n} images of {w}x{h}, {within}"
    return "memory", f"{n} images of {w}x{h}, {within}"


def resolve_workers(workers: int) -> int:
    """`--workers`: -1 means min(8, the CPU count)."""
    return min(8, os.cpu_count() or 1) if workers == -1 else workers


def _load_imagefolder(cfg: DataConfig, device: torch.device | None) -> tuple[ImageSet | FileSet, ImageSet | FileSet,
                                                                             list[str], str]:
    """train, test, classes and the loader chosen ("memory": `ImageSet`s, "stream": `FileSet`s); prints the
    choice and its reason once."""
    root, folder = Path(cfg.data_dir), FOLDERS[cfg.dataset]
    train_samples, test_samples, classes = _list_imagefolder(root, folder.test)
    paths = [p for p, _ in train_samples + test_samples]
    if folder.always_streams and cfg.loader == "auto":
        loader, reason = "stream", f"{len(paths)} images, --dataset {cfg.dataset}"
    else:
        loader, reason = choose_loader(cfg.loader, paths, device)
    train = test = None
    if loader == "memory":
        try:
            train, test, classes = _decode_imagefolder(root, train_samples, test_samples, classes)
        except MixedSizes:
            if cfg.loader == "memory":
                raise
            loader, reason = "stream", f"{len(paths)} images of mixed sizes"
    if distributed.is_main():
        print(f"loader: {loader} ({reason})", file=sys.stderr, flush=True)
    if loader == "stream":
        train, test = [FileSet([p for p, _ in samples], torch.tensor([y for _, y in samples], dtype=torch.int64))
                       for samples in (train_samples, test_samples)]
    return train, test, classes, loader


# ----------------------------------------------------------------------------- load_data

SOURCES: dict[str, Callable[[DataConfig, int], Splits]] = {
    "cifar10": functools.partial(_load_torchvision, "CIFAR10"),
    "cifar100": functools.partial(_load_torchvision, "CIFAR100"),
    "mnist": functools.partial(_load_torchvision, "MNIST"),
    "fashion-mnist": functools.partial(_load_torchvision, "FashionMNIST"),
    "digits": _load_digits,
    "synthetic": _make_synthetic,
}


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images in [0, 1] pixel units.

    Exact, from a 256-bin histogram per channel, so it never makes a float copy of the dataset.
    """
    levels = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for c in range(images.shape[1]):
        weights = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        weights /= weights.sum()
        mean = float((weights * levels).sum())
        means.append(mean)
        # A constant channel has std 0; 1/255 keeps normalization finite without changing real data.
        stds.append(max(float((weights * (levels - mean) ** 2).sum().sqrt()), 1 / 255))
    return tuple(means), tuple(stds)


def _split(train: ImageSet, subset: int, val_size: int, seed: int, name: str) -> tuple[ImageSet, ImageSet | None]:
    """Keep the first `subset` images of a seeded shuffle, then hold the first `val_size` of those out."""
    n = len(train)
    if subset > n:
        raise UserError(f"train_subset = {subset} is more than the {n} training images of {name}")
    kept = subset or n
    if val_size >= kept:
        raise UserError(f"val_size = {val_size} leaves no training images: {name} has {kept} to split "
                        f"(train_subset = {subset})")
    if not subset and not val_size:
        return train, None
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:kept]
    return train.take(order[val_size:]), train.take(order[:val_size]) if val_size else None


def _should_augment(setting: str, name: str, channels: int, size: int, loader: str) -> bool:
    if setting != "auto":
        return setting == "on"
    if loader == "stream":  # the ImageNet recipe: a random resized crop of any image, at any crop size
        return True
    # Crop-and-flip is the CIFAR recipe; it hurts digits (a mirrored 2 is not a 2) and tiny images.
    cifar_like = (name in FOLDERS or name == "synthetic") and channels == 3 and size >= 32
    return name in ("cifar10", "cifar100") or cifar_like


def load_data(cfg: DataConfig, seed: int = 1, device: torch.device | None = None) -> DataBundle:
    """Load the dataset `cfg.dataset` into memory (or, for an image folder that streams, list its files),
    split it and describe it.

    `seed` fixes the synthetic data, the training subset and the validation split; `device`, the one
    training will run on, sets the memory limit of `choose_loader`. Raises UserError (one line) for
    settings outside their bounds (`config.check_allowed`), unknown names, missing data and subset or
    validation sizes the data cannot give.
    """
    check_allowed(cfg)
    if cfg.dataset in FOLDERS:
        train, test, classes, loader = _load_imagefolder(cfg, device)
    elif cfg.loader == "stream":
        raise UserError(f"--loader stream reads image folders, and {cfg.dataset} is held in memory: drop --loader, "
                        f"or {FOLDER_HELP}")
    else:
        (train, test, classes), loader = SOURCES[cfg.dataset](cfg, seed), "memory"
    train, val = _split(train, cfg.train_subset, cfg.val_size, seed, cfg.dataset)
    if loader == "stream":  # decoded to RGB and cropped to cfg.image_size batch by batch
        (mean, std), channels, size = IMAGENET_STATS, 3, resolve_image_size(cfg)
    else:
        mean, std = KNOWN_STATS.get(cfg.dataset) or channel_stats(train.images)
        channels, size = train.images.shape[1], train.images.shape[2]
    return DataBundle(train=train, val=val, test=test, num_classes=len(classes), in_channels=channels,
                      image_size=size, mean=mean, std=std,
                      augment=_should_augment(cfg.augment, cfg.dataset, channels, size, loader),
                      classes=classes, name=cfg.dataset, loader=loader,
                      workers=resolve_workers(cfg.workers) if loader == "stream" else 0)


# ----------------------------------------------------------------------------- batch loader

def crop_and_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int) -> torch.Tensor:
    """Random-crop-with-padding and horizontal flip of a batch, as one gather.

    `images` [B, C, H, W] sits in a frame of `pad` zero pixels; output image b is the H x W window at
    row `offsets[b, 0]`, column `offsets[b, 1]` of that frame (both in [0, 2 * pad]; (pad, pad) is the
    image itself), mirrored left-right where `flips[b]`. Same dtype and device as `images`.
    """
    b, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = offsets[:, :1] + torch.arange(h, device=images.device)
    columns = torch.arange(w, device=images.device)
    columns = offsets[:, 1:] + torch.where(flips[:, None], columns.flip(0), columns)
    # One flat index per output pixel, shared by all channels (expand is a view, not a copy).
    index = (rows[:, :, None] * (w + 2 * pad) + columns[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.view(b, c, -1).gather(2, index).view(b, c, h, w)


def derived_seed(*parts: object, bits: int = 64) -> int:
    """A seed for one purpose, a hash of `parts`: (seed, epoch) for a loader's epoch, so a resumed run
    repeats it; ('reinit', seed, round) for a lottery control, so no two purposes share a seed.
    `bits` 32 gives a seed NumPy accepts (the low 32 bits of the 64-bit one)."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:bits // 8], "little")


class EpochBatches:
    """What every loader shares: the epoch's order and this rank's share of each global batch.

    With `shuffle` the order comes from a generator seeded by (`seed`, epoch): call `set_epoch(e)` before
    iterating epoch e (iterating twice without it repeats the epoch). With `world_size` > 1 the loader
    yields rank `rank`'s share of every batch: every rank draws the same order (and augmentation), cuts
    the same global batches of `batch_size` images and takes the `rank`-th of `world_size` contiguous,
    near-equal pieces of each, so together the ranks see the batches one process would, and every rank
    yields the same number of batches. `even_shards` (for training) makes the pieces equal: `batch_size`
    must then be a multiple of `world_size`, and the last `n % world_size` images of each epoch's order
    are left out (none with one process).
    """

    def __init__(self, n: int, batch_size: int, *, device: str | torch.device, shuffle: bool, seed: int,
                 drop_last: bool, rank: int, world_size: int, even_shards: bool) -> None:
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        if even_shards and batch_size % world_size:
            raise UserError(f"batch size {batch_size} does not split evenly among {world_size} processes: under "
                            f"torchrun --batch-size is the global batch, make it a multiple of {world_size}")
        self.n, self.device = n, torch.device(device)
        self.batch_size, self.shuffle, self.seed, self.drop_last, self.epoch = batch_size, shuffle, seed, drop_last, 0
        self.rank, self.world_size, self.even_shards = rank, world_size, even_shards

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration produces."""
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        """Images yielded per epoch by all ranks together (fewer than the data when `drop_last` drops a
        partial batch or `even_shards` the images that do not split evenly among the ranks)."""
        n = self.n
        if self.drop_last:
            return n - n % self.batch_size
        return n - n % self.world_size if self.even_shards else n

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def _order(self, generator: torch.Generator) -> torch.Tensor:
        """The epoch's order of the n images, from `generator` (seeded here by (seed, epoch))."""
        generator.manual_seed(derived_seed(self.seed, self.epoch))
        if self.shuffle:
            return torch.randperm(self.n, generator=generator, device=generator.device)
        return torch.arange(self.n, device=generator.device)

    def _rank_shares(self) -> Iterator[slice]:
        """This rank's piece of each global batch, as a slice of the epoch's order."""
        rank, ranks = self.rank, self.world_size
        for start in range(0, self.num_samples, self.batch_size):
            size = min(self.batch_size, self.num_samples - start)  # the global batch [start, start + size)
            yield slice(start + size * rank // ranks, start + size * (rank + 1) // ranks)


def normalization(mean: Sequence[float], std: Sequence[float], device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) [1, C, 1, 1] with x = pixel * scale + shift = (pixel / 255 - mean) / std: one multiply-add
    per element (`torch.addcmul(shift, pixels.float(), scale)`)."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return 1 / (255 * std_t), -mean_t / std_t


class BatchLoader(EpochBatches):
    """Batches of an `ImageSet` kept on `device`, augmented and normalized there.

    The uint8 images move to `device` once. Each iteration yields `(x, y)`: x float32 [B, C, H, W],
    scaled to [0, 1] and normalized with `mean`/`std`; y int64 [B]. With `shuffle` the order, and with
    `augment` the crop offsets and flips, come from a generator seeded by (`seed`, epoch); order, epochs
    and ranks as in `EpochBatches`.
    """

    def __init__(self, data: ImageSet, batch_size: int, *, mean: Sequence[float], std: Sequence[float],
                 device: str | torch.device = "cpu", shuffle: bool = False, augment: bool = False, pad: int = 4,
                 seed: int = 0, drop_last: bool = False, rank: int = 0, world_size: int = 1,
                 even_shards: bool = False) -> None:
        super().__init__(len(data), batch_size, device=device, shuffle=shuffle, seed=seed, drop_last=drop_last,
                         rank=rank, world_size=world_size, even_shards=even_shards)
        if pad < 0:
            raise UserError(f"crop padding must not be negative, got {pad}")
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        self.augment, self.pad = augment, pad
        self._scale, self._shift = normalization(mean, std, self.device)
        self._generator = torch.Generator(device=self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, device, generator = self.n, self.device, self._generator
        # The order is drawn first, so loaders with and without augmentation share it.
        order = self._order(generator)
        if self.augment:
            offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=generator, device=device)
            flips = torch.rand(n, generator=generator, device=device) < 0.5
        for batch in self._rank_shares():
            index = order[batch]
            x = self.images[index]
            if self.augment:
                x = crop_and_flip(x, offsets[batch], flips[batch], self.pad)
            yield torch.addcmul(self._shift, x.float(), self._scale), self.labels[index]
