"""Data loading against training: can ebtrain's loaders feed the model on this machine?

    python scripts/bench_data.py --source cifar10-jpg --folder bench-jpg --out bench_data.json
    python scripts/bench_data.py --source DIR --folder bench-jpg --images 5000 --workers 4 --image-size 64

1. A folder of --images JPEGs of varying sizes: pictures of --source (an image folder, DIR/<class>/* or
   DIR/train/<class>/*, e.g. the CIFAR-10 copy extracted), each resized to a random width and height between
   100 and 500 pixels (seeded), as --folder/train/<class>/*.jpg (every tenth of each class, the first included, in test/).
   Written once: a folder already holding them is reused.
2. The loaders' images per second over one pass of the training split, each timed alone: the streaming
   loader (`ebtrain.stream.StreamLoader`: decoding in --workers processes, random resized crop to
   --image-size and flip, normalized) from the first batch on (the workers' start is left out), and the
   in-memory path (`BatchLoader`: crop with padding and flip on the device) on the same images decoded
   once and resized to --image-size (the decoding time is reported apart).
3. The model's consumption: images per second of ebtrain's Trainer training step for each --arch at
   --width and --image-size (the step timed after --warmup steps, on --device).
Writes JSON to --out with the ratio loader / model per arch and loader; the target is at least 1.5 for
the streaming loader on the CPU at a small width. Loader and model are timed apart: on a CPU they share
the cores in a real run, so there the ratio says whether the loader keeps up, not the training speed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout, uninstalled

from ebtrain.config import DataConfig, TrainConfig  # noqa: E402
from ebtrain.data import BatchLoader, DataBundle, FileSet, IMAGENET_STATS, ImageSet, load_data, read_image  # noqa: E402
from ebtrain.host_memory import retain_freed_memory  # noqa: E402
from ebtrain.models import build_model  # noqa: E402
from ebtrain.stream import StreamLoader, eval_transform  # noqa: E402
from ebtrain.train import Hook, Trainer, resolve_device  # noqa: E402

SIDES = (100, 500)  # the range of each generated image's width and height, in pixels
TEST_SHARE = 10  # one image in TEST_SHARE of each class goes to test/
TARGET_RATIO = 1.5


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", required=True, help="image folder the pictures are taken from")
    p.add_argument("--folder", default="bench-data-jpg", help="where the generated JPEGs are written (once)")
    p.add_argument("--images", type=int, default=2000, help="JPEGs to generate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="streaming loader's processes")
    p.add_argument("--image-size", type=int, default=64, help="side of the crop the model trains on")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--arch", nargs="+", default=["resnet18", "vgg16"])
    p.add_argument("--width", type=float, default=0.125, help="channel-width multiplier of the models")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps")
    p.add_argument("--steps", type=int, default=5, help="timed training steps")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="bench_data.json")
    args = p.parse_args(argv)
    args.device = resolve_device(args.device)
    return args


# ---- 1. the folder -------------------------------------------------------------------------------
def source_images(source: Path) -> list[tuple[Path, str]]:
    """(path, class) of every image of `source` (its train/ when it has one), sorted."""
    root = source / "train" if (source / "train").is_dir() else source
    if not root.is_dir():
        raise SystemExit(f"--source {source}: not a folder")
    found = [(path, folder.name) for folder in sorted(root.iterdir()) if folder.is_dir()
             for path in sorted(folder.iterdir()) if path.suffix.lower() in (".jpg", ".jpeg", ".png")]
    if not found:
        raise SystemExit(f"--source {source}: no <class>/*.jpg or *.png images")
    return found


def make_folder(source: Path, folder: Path, images: int, seed: int) -> dict:
    """Write the JPEGs unless `folder` holds them already; returns what was written (folder/made.json)."""
    made = folder / "made.json"
    wanted = {"source": str(source), "images": images, "seed": seed, "sides": list(SIDES)}
    if made.is_file() and {k: v for k, v in json.loads(made.read_text()).items() if k in wanted} == wanted:
        return json.loads(made.read_text())
    rng = np.random.default_rng(seed)
    pool = source_images(source)
    picked = rng.choice(len(pool), size=images, replace=images > len(pool))
    for split in ("train", "test"):  # what an earlier run with other settings wrote
        shutil.rmtree(folder / split, ignore_errors=True)
    started, written, per_class = time.perf_counter(), 0, {}
    for n, i in enumerate(picked):
        path, label = pool[i]
        k = per_class[label] = per_class.get(label, -1) + 1
        split = "test" if k % TEST_SHARE == 0 else "train"  # every class has test images
        out = folder / split / label / f"{n:06d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        width, height = (int(side) for side in rng.integers(SIDES[0], SIDES[1] + 1, 2))
        with Image.open(path) as im:
            im.convert("RGB").resize((width, height), Image.BILINEAR).save(out, quality=90)
        written += out.stat().st_size
    info = {**wanted, "bytes": written, "seconds_to_write": time.perf_counter() - started}
    made.write_text(json.dumps(info, indent=2) + "\n")
    return info


# ---- 2. the loaders ------------------------------------------------------------------------------
def pass_rate(loader) -> dict:
    """Images per second of one pass of `loader`, timed from its first batch on."""
    loader.set_epoch(0)
    batches = iter(loader)
    started = time.perf_counter()
    first, _ = next(batches)
    first_seconds = time.perf_counter() - started
    started, images = time.perf_counter(), 0
    for x, _ in batches:
        images += len(x)
    seconds = time.perf_counter() - started
    return {"images_per_s": images / seconds, "images": images, "seconds": seconds,
            "first_batch_seconds": first_seconds}


def resized_in_memory(files: FileSet, image_size: int) -> tuple[ImageSet, float]:
    """The images of `files` decoded and resized (eval transform) to image_size square; (set, seconds)."""
    started, resize = time.perf_counter(), eval_transform(image_size)
    images = torch.stack([resize(read_image(path)) for path in files.paths])
    return ImageSet(images, files.labels), time.perf_counter() - started


# ---- 3. the model --------------------------------------------------------------------------------
class StepTimer(Hook):
    """Seconds of the training steps after the first `warmup`; stops training after `warmup + steps`."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps, self.done, self.started, self.seconds = warmup, steps, 0, 0.0, None

    def step_end(self, trainer: Trainer) -> None:
        self.done += 1
        if self.done == self.warmup:
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            self.started = time.perf_counter()
        if self.done == self.warmup + self.steps:
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            self.seconds = time.perf_counter() - self.started


def model_rate(arch: str, memory: ImageSet, num_classes: int, args: argparse.Namespace) -> dict:
    """Images per second of the Trainer's training step (one epoch over exactly warmup + steps batches)."""
    n = (args.warmup + args.steps) * args.batch_size
    train = memory.take(torch.arange(n) % len(memory))
    data = DataBundle(train=train, val=None, test=train.take(torch.arange(args.batch_size)), num_classes=num_classes,
                      in_channels=3, image_size=args.image_size, mean=IMAGENET_STATS[0], std=IMAGENET_STATS[1],
                      augment=True, classes=[str(c) for c in range(num_classes)], name="bench")
    model = build_model(arch, num_classes=num_classes, width=args.width, image_size=args.image_size)
    timer = StepTimer(args.warmup, args.steps)
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, lr=0.01, milestones=[], device=str(args.device),
                      compile="off")
    Trainer(model, data, cfg, device=args.device, hooks=[timer], tensorboard=False, name=f"bench {arch}").fit()
    return {"images_per_s": args.steps * args.batch_size / timer.seconds, "step_seconds": timer.seconds / args.steps}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    retain_freed_memory()  # as `ebtrain` does, so the timings are the tool's
    folder = Path(args.folder)
    made = make_folder(Path(args.source), folder, args.images, args.seed)
    load = os.getloadavg()[0]
    bundle = load_data(DataConfig(dataset="imagefolder", data_dir=str(folder), loader="stream",
                                  image_size=args.image_size, workers=args.workers))
    norm = dict(mean=bundle.mean, std=bundle.std, device=args.device)
    stream = StreamLoader(bundle.train, args.batch_size, image_size=args.image_size, shuffle=True, augment=True,
                          workers=args.workers, **norm)
    loaders = {"stream": pass_rate(stream)}
    del stream  # its workers end before the timings that follow
    memory, decode_seconds = resized_in_memory(bundle.train, args.image_size)
    loaders["memory"] = {**pass_rate(BatchLoader(memory, args.batch_size, shuffle=True, augment=True, **norm)),
                         "decode_and_resize_seconds": decode_seconds}
    models = {arch: model_rate(arch, memory, bundle.num_classes, args) for arch in args.arch}
    ratios = {arch: {name: loader["images_per_s"] / m["images_per_s"] for name, loader in loaders.items()}
              for arch, m in models.items()}
    report = {
        "note": f"loader and model timed apart on {args.device}; load average {load:.1f} on {os.cpu_count()} "
                "CPUs when the timings started (above the CPU count: a busy machine, the figures are low)",
        "device": str(args.device), "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "folder": {**made, "path": str(folder), "train_images": len(bundle.train), "test_images": len(bundle.test)},
        "workers": args.workers, "image_size": args.image_size, "batch_size": args.batch_size, "width": args.width,
        "timed_steps": args.steps, "warmup_steps": args.warmup,
        "loaders": loaders, "models": models, "ratio_loader_to_model": ratios, "target_ratio": TARGET_RATIO,
        "stream_meets_target": all(r["stream"] >= TARGET_RATIO for r in ratios.values()),
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"stream ({args.workers} workers): {loaders['stream']['images_per_s']:,.0f} img/s; "
          f"memory: {loaders['memory']['images_per_s']:,.0f} img/s")
    for arch, m in models.items():
        print(f"{arch} at width {args.width:g}, {args.image_size}px: {m['images_per_s']:,.0f} img/s; loader / model: "
              f"stream x{ratios[arch]['stream']:.2f}, memory x{ratios[arch]['memory']:.1f}")
    print(f"-> {args.out}")
    return report


if __name__ == "__main__":
    main()
