"""A loader that streams an image folder from disk: for images that do not fit in memory or differ in size.

`StreamLoader` decodes each batch in DataLoader worker processes, crops it to one size with the ImageNet
transforms (training: random resized crop and horizontal flip; evaluation: resize to 8/7 of the crop,
center crop), hands it over in pinned memory and normalizes it on the training device, so decoding the
next batches overlaps the step. It has `BatchLoader`'s interface and the same order, epochs and rank
shares (`data.EpochBatches`); `make_loader` gives a Trainer whichever of the two its data needs.

Augmentation is seeded per image, by (seed, epoch, image index): a batch is the same whichever worker
decodes it and however many there are, and epoch e of a resumed run sees the batches it would have seen.
"""
from __future__ import annotations

import weakref
from functools import partial
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from .data import BatchLoader, DataBundle, EpochBatches, FileSet, derived_seed, normalization, read_image


def train_transform(image_size: int) -> v2.Transform:
    """The ImageNet training augmentation on a uint8 [3, H, W] tensor: a random crop of 8% to 100% of the
    area at aspect 3/4 to 4/3, resized to `image_size` square, flipped left-right half of the time."""
    return v2.Compose([v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()])


def eval_transform(image_size: int) -> v2.Transform:
    """The ImageNet evaluation transform: shorter side to image_size * 8 / 7 (256 for 224), center crop."""
    return v2.Compose([v2.Resize(image_size * 8 // 7, antialias=True), v2.CenterCrop(image_size)])


class _Decoded(Dataset):
    """One image by key (index, epoch): decoded, transformed, as (uint8 [3, S, S], label). Random transforms
    draw from torch's generator seeded by (seed, epoch, index) for that image alone."""

    def __init__(self, files: FileSet, transform: v2.Transform, random: bool, seed: int) -> None:
        self.paths, self.labels = files.paths, files.labels.tolist()
        self.transform, self.random, self.seed = transform, random, seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, epoch = key
        image = read_image(self.paths[index])
        if self.random:
            # forked: the training process's generator (workers=0) is left as it was
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derived_seed(self.seed, epoch, "image", index))
                image = self.transform(image)
        else:
            image = self.transform(image)
        return image, self.labels[index]


class _RankBatches:
    """The batch sampler: this rank's (index, epoch) keys of each batch of the loader's current epoch."""

    def __init__(self, loader: StreamLoader) -> None:
        # weak: no reference cycle, so a loader no longer used ends its workers at once, not at the next collection
        self.loader = weakref.proxy(loader)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        loader = self.loader
        order = loader._order(torch.Generator())
        for share in loader._rank_shares():
            yield [(i, loader.epoch) for i in order[share].tolist()]

    def __len__(self) -> int:
        return len(self.loader)


def _collate(image_size: int, samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    if not samples:  # a rank's empty share of a last batch smaller than the number of ranks
        return torch.empty(0, 3, image_size, image_size, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
    images, labels = zip(*samples)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


class StreamLoader(EpochBatches):
    """Batches of a `FileSet`, decoded from disk by `workers` processes, normalized on `device`.

    Each iteration yields `(x, y)` as `BatchLoader` does: x float32 [B, 3, image_size, image_size] on
    `device`, normalized with `mean`/`std`; y int64 [B]. With `augment` the images get `train_transform`,
    otherwise `eval_transform`. Order, epochs and ranks as in `EpochBatches`; the image transforms are
    seeded per image, so the batches do not depend on `workers`. With `workers` 0 the training process
    decodes. The workers live as long as the loader (persistent between epochs).
    """

    def __init__(self, data: FileSet, batch_size: int, *, image_size: int, mean: Sequence[float],
                 std: Sequence[float], device: str | torch.device = "cpu", shuffle: bool = False,
                 augment: bool = False, seed: int = 0, drop_last: bool = False, rank: int = 0, world_size: int = 1,
                 even_shards: bool = False, workers: int = 0) -> None:
        super().__init__(len(data), batch_size, device=device, shuffle=shuffle, seed=seed, drop_last=drop_last,
                         rank=rank, world_size=world_size, even_shards=even_shards)
        self.image_size, self.augment, self.workers = image_size, augment, workers
        transform = train_transform(image_size) if augment else eval_transform(image_size)
        self._scale, self._shift = normalization(mean, std, self.device)
        self._batches = DataLoader(_Decoded(data, transform, augment, seed), batch_sampler=_RankBatches(self),
                                   num_workers=workers, collate_fn=partial(_collate, image_size),
                                   pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
                                   generator=torch.Generator())  # its draw of worker seeds leaves torch's alone

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self._batches:
            x = images.to(self.device, non_blocking=True)
            yield torch.addcmul(self._shift, x.float(), self._scale), labels.to(self.device, non_blocking=True)


def make_loader(data: DataBundle, split: str, batch_size: int, *, train: bool = False, seed: int = 0,
                **placement) -> BatchLoader | StreamLoader:
    """The loader of `data`'s split "train", "val" or "test": a `BatchLoader` for data in memory, a
    `StreamLoader` for a streamed folder. `train`: shuffled, augmented as `data.augment` says, equal shares
    among ranks. `placement`: `device`, `rank`, `world_size`."""
    options = dict(mean=data.mean, std=data.std, shuffle=train, augment=train and data.augment, seed=seed,
                   even_shards=train, **placement)
    images = getattr(data, split)
    if data.loader == "stream":
        return StreamLoader(images, batch_size, image_size=data.image_size, workers=data.workers, **options)
    return BatchLoader(images, batch_size, **options)
