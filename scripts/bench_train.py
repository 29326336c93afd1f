"""Training speed: ebtrain's pipeline against the reference code's loop, and pruned tickets against dense.

    python scripts/bench_train.py --out bench_train.json                  # vgg16 and preresnet101, synthetic images
    python scripts/bench_train.py --data-dir cifar10 --out bench_train.json   # CIFAR-10 as an image folder
    python scripts/bench_train.py --arch vgg16 --ticket RUN/tickets/p30.pt RUN/tickets/p50.pt

Per architecture, in one process, on CIFAR-sized data (3x32x32, 10 classes), two ways of training:
(a) ebtrain: its Trainer exactly as every phase uses it: uint8 images resident on the device and
    augmented there by BatchLoader, bf16 autocast and channels_last on CUDA, fused SGD;
(b) the reference code's loop (the Early-Bird authors' main.py): a torchvision dataset through a
    DataLoader with --workers worker processes (1, as there) and PIL transforms (RandomCrop(32,
    padding=4), RandomHorizontalFlip, ToTensor, Normalize), fp32, contiguous NCHW, plain SGD, the loss
    read back every step as that loop does to log it. The dataset is torchvision's ImageFolder on
    --data-dir/train, or without one FakeData: random images decoded through the same transforms.
Both train the same network (ebtrain's model) for --warmup steps, then --steps timed steps with the
device synchronized at both ends. Reported: images per second, seconds per 50,000-image epoch, FLOP/s
(training FLOPs per image as ebtrain.flops measures them, forward plus backward, x images per second),
and the model FLOP utilization against the device's peak: the bf16 dense tensor-core peak of a known
GPU, or --peak-tflops (the fp32 loop is held to the same peak: the question is how much of the GPU each
way uses). Then the step time of pruned networks at each ratio against the dense one, as drawn and
with every layer rounded up to a multiple of --round-channels (`ebtrain.prune.round_keep`), from masks
drawn from randomized BN weights the way the detector draws them, or from the --ticket files.
On a CPU it runs at width 0.125 and a few steps unless told otherwise, and says so: the numbers then
show that the script works, not how fast a GPU trains. Writes JSON to --out.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout, uninstalled

from ebtrain.config import DataConfig, TrainConfig  # noqa: E402
from ebtrain.data import CIFAR_STATS, DataBundle, ImageSet, load_data  # noqa: E402
from ebtrain.earlybird import channel_scores, draw_mask, prunable_bns  # noqa: E402
from ebtrain.flops import measure_cost  # noqa: E402
from ebtrain.host_memory import retain_freed_memory  # noqa: E402
from ebtrain.models import build_model  # noqa: E402
from ebtrain.tickets import dense_from_ticket, load_ticket, ratio_name  # noqa: E402
from ebtrain.prune import kept_channels, prune_channels, round_keep  # noqa: E402
from ebtrain.train import Hook, Trainer, resolve_device  # noqa: E402

IMAGE_SHAPE = (3, 32, 32)
NUM_CLASSES = 10
EPOCH_IMAGES = 50_000
LR = 0.01  # the speed does not depend on it; smaller than the recipe's 0.1 so random data cannot diverge
# bf16 dense tensor-core peaks (TFLOP/s, NVIDIA data sheets), matched in this order against
# torch.cuda.get_device_name(): the first entry the name contains wins.
PEAK_BF16_TFLOPS = (("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H200 NVL", 835.0),
                    ("H200", 989.0), ("A100", 312.0))
GPU_DEFAULTS = {"width": 1.0, "steps": 50, "warmup": 10}
CPU_DEFAULTS = {"width": 0.125, "steps": 2, "warmup": 1}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", nargs="+", default=["vgg16", "preresnet101"])
    p.add_argument("--width", type=float, help="channel-width multiplier (default: 1 on a GPU, 0.125 on a CPU)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, help="timed training steps (default: 50 on a GPU, 2 on a CPU)")
    p.add_argument("--warmup", type=int, help="untimed steps before them (default: 10 on a GPU, 1 on a CPU)")
    p.add_argument("--data-dir", help="an image folder of CIFAR-sized images (DIR/train/CLASS/*.jpg, DIR/test/...) "
                   "instead of synthetic random images")
    p.add_argument("--workers", type=int, default=1, help="DataLoader worker processes of the reference loop")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.7],
                   help="pruning ratios of the masks drawn from random BN weights")
    p.add_argument("--round-channels", type=int, default=8, help="the multiple pruned layers are rounded up to")
    p.add_argument("--ticket", nargs="+", default=[], help="ticket files (RUN/tickets/pNN.pt) to time instead "
                   "of masks drawn from random BN weights, for the architecture they belong to")
    p.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s (default: known GPUs' bf16 peak)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="bench_train.json")
    args = p.parse_args(argv)
    args.device = resolve_device(args.device)
    for name, value in (GPU_DEFAULTS if args.device.type == "cuda" else CPU_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.warmup < 1 or args.steps < 1 or args.batch_size < 1 or args.round_channels < 1:
        p.error("--warmup, --steps, --batch-size and --round-channels must be at least 1")
    return args


def device_peak(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """(peak TFLOP/s or None, where that figure comes from)."""
    if override:
        return override, f"--peak-tflops {override:g}"
    if device.type != "cuda":
        return None, "no peak is known for a CPU: FLOP/s only, no utilization"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops, f"{name}: bf16 dense tensor-core peak of an {key}, {tflops:g} TFLOP/s (data sheet)"
    return None, f"no peak known for {name}: pass --peak-tflops"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(step_seconds: float, batch_size: int, flops_per_image: float, peak_tflops: float | None) -> dict:
    """The figures of one way of training, from its seconds per step."""
    images_per_s = batch_size / step_seconds
    flops_per_s = flops_per_image * images_per_s
    return {"step_seconds": step_seconds, "images_per_s": images_per_s,
            "seconds_per_epoch": EPOCH_IMAGES / images_per_s, "tflops_per_s": flops_per_s / 1e12,
            "mfu": flops_per_s / (peak_tflops * 1e12) if peak_tflops else None}


# ---- (a) ebtrain ---------------------------------------------------------------------------------
class StepTimer(Hook):
    """Seconds of the training steps after the first `warmup`, the device synchronized at both ends."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.done = 0
        self.started = 0.0
        self.seconds: float | None = None

    def after_step(self, trainer: Trainer) -> None:
        self.done += 1
        if self.done in (self.warmup, self.warmup + self.steps):
            synchronize(trainer.device)
            if self.done == self.warmup:
                self.started = time.perf_counter()
            else:
                self.seconds = time.perf_counter() - self.started


def bench_data(args: argparse.Namespace) -> DataBundle:
    """Exactly the images of warmup + timed steps (one epoch of ebtrain's Trainer): the first of
    --data-dir's training images (cycled if too few), or random ones; one batch as the test set."""
    n = (args.warmup + args.steps) * args.batch_size
    if args.data_dir:
        train = load_data(DataConfig(dataset="imagefolder", data_dir=args.data_dir)).train
        if tuple(train.images.shape[1:]) != IMAGE_SHAPE:
            raise SystemExit(f"{args.data_dir}: images are {tuple(train.images.shape[1:])}, expected {IMAGE_SHAPE}")
        train = train.take(torch.arange(n) % len(train))
    else:
        generator = torch.Generator().manual_seed(0)
        train = ImageSet(torch.randint(0, 256, (n, *IMAGE_SHAPE), dtype=torch.uint8, generator=generator),
                         torch.randint(0, NUM_CLASSES, (n,), generator=generator))
    test = train.take(torch.arange(args.batch_size))
    return DataBundle(train=train, val=None, test=test, num_classes=NUM_CLASSES, in_channels=3, image_size=32,
                      mean=CIFAR_STATS[0], std=CIFAR_STATS[1], augment=True,
                      classes=[str(c) for c in range(NUM_CLASSES)], name="bench")


def time_ebtrain(model: nn.Module, data: DataBundle, args: argparse.Namespace, name: str) -> float:
    """Seconds per training step of a copy of `model` in ebtrain's Trainer."""
    timer = StepTimer(args.warmup, args.steps)
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, lr=LR, milestones=[], device=str(args.device))
    Trainer(copy.deepcopy(model), data, cfg, device=args.device, hooks=[timer], tensorboard=False,
            name=f"ebtrain {name}").fit()
    return timer.seconds / args.steps


# ---- (b) the reference loop ----------------------------------------------------------------------
def reference_loader(args: argparse.Namespace) -> DataLoader:
    """The reference code's data path: a torchvision dataset, PIL transforms, a DataLoader."""
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(*CIFAR_STATS)])
    if args.data_dir:
        dataset = torchvision.datasets.ImageFolder(str(Path(args.data_dir) / "train"), transform)
    else:
        dataset = torchvision.datasets.FakeData((args.warmup + args.steps) * args.batch_size, IMAGE_SHAPE,
                                                NUM_CLASSES, transform)
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                      pin_memory=args.device.type == "cuda")


def time_reference(model: nn.Module, args: argparse.Namespace) -> float:
    """Seconds per training step of a copy of `model` in the reference loop: fp32, plain SGD."""
    device = args.device
    model = copy.deepcopy(model).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)
    batches = iter(reference_loader(args))
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            synchronize(device)
            started = time.perf_counter()
        x, y = next(batches)
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.item()  # the reference reads the loss back every step, to log it: a host synchronization
        loss.backward()
        optimizer.step()
    synchronize(device)
    return (time.perf_counter() - started) / args.steps


# ---- pruned tickets ------------------------------------------------------------------------------
def ticket_masks(arch: str, model: nn.Module, args: argparse.Namespace,
                 tickets: list[dict]) -> tuple[nn.Module, list[tuple[float, list[torch.Tensor]]], str]:
    """(the dense network the masks belong to, (ratio, keep) per ticket, where the masks come from):
    the given tickets of `arch`, or masks drawn from `model` with its BN weights randomized."""
    mine = [t for t in tickets if t["arch"]["name"] == arch]
    if mine:
        if any(t["arch"] != mine[0]["arch"] for t in mine):
            raise SystemExit(f"the --ticket files of {arch} come from differently shaped networks")
        return dense_from_ticket(mine[0]), [(t["ratio"], t["keep"]) for t in mine], "ticket files"
    dense = copy.deepcopy(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for _, bn in prunable_bns(dense):
            bn.weight.uniform_(0, 1)
    scores = channel_scores(dense)
    return dense, [(r, draw_mask(scores, r).per_layer()) for r in args.ratios], "random BN weights"


def check_tickets(tickets: list[dict], archs: list[str]) -> None:
    """Tickets must be of a benchmarked architecture built for CIFAR-sized data."""
    for t in tickets:
        shape = (t["arch"]["in_channels"], t["arch"]["image_size"], t["arch"]["num_classes"])
        if t["arch"]["name"] not in archs or shape != (IMAGE_SHAPE[0], IMAGE_SHAPE[1], NUM_CLASSES):
            raise SystemExit(f"a --ticket of {t['arch']['name']} for {shape[0]}x{shape[1]}x{shape[1]} images "
                             f"and {shape[2]} classes: the benchmark trains {', '.join(archs)} on "
                             f"{'x'.join(map(str, IMAGE_SHAPE))} images of {NUM_CLASSES} classes")


def time_tickets(arch: str, model: nn.Module, data: DataBundle, args: argparse.Namespace,
                 tickets: list[dict]) -> dict:
    """Step time of each pruned network, as drawn and rounded, against its dense network's."""
    dense, masks, source = ticket_masks(arch, model, args, tickets)
    dense_flops = measure_cost(dense, IMAGE_SHAPE, args.batch_size).train_flops_per_image
    dense_seconds = time_ebtrain(dense, data, args, f"{arch} dense")
    scores = channel_scores(dense)
    total = sum(bn.num_features for _, bn in prunable_bns(dense))
    out = {"source": source, "round_channels": args.round_channels, "dense_step_seconds": dense_seconds,
           "ratios": {}}
    for ratio, keep in masks:
        row = {}
        for label, multiple in (("drawn", 1), ("rounded", args.round_channels)):
            rounded = round_keep(keep, scores, multiple)
            pruned = prune_channels(dense, rounded)
            seconds = time_ebtrain(pruned, data, args, f"{arch} {ratio_name(ratio)} {label}")
            row[label] = {"channels": sum(kept_channels(rounded)), "channels_total": total,
                          "channels_added": sum(kept_channels(rounded)) - sum(kept_channels(keep)),
                          "train_flops_ratio": measure_cost(pruned, IMAGE_SHAPE, args.batch_size)
                          .train_flops_per_image / dense_flops,
                          "step_seconds": seconds, "speedup": dense_seconds / seconds}
        out["ratios"][ratio_name(ratio)] = row
    return out


# ---- the whole benchmark -------------------------------------------------------------------------
def bench_arch(arch: str, data: DataBundle, args: argparse.Namespace, peak: float | None,
               tickets: list[dict]) -> dict:
    """Every figure of one architecture."""
    torch.manual_seed(0)
    model = build_model(arch, num_classes=NUM_CLASSES, width=args.width)
    cost = measure_cost(model, IMAGE_SHAPE, args.batch_size)
    figures = {"params": cost.params, "forward_flops_per_image": cost.forward_flops_per_image,
               "train_flops_per_image": cost.train_flops_per_image}
    step_seconds = {"ebtrain": time_ebtrain(model, data, args, arch), "reference": time_reference(model, args)}
    for way, seconds in step_seconds.items():
        figures[way] = throughput(seconds, args.batch_size, cost.train_flops_per_image, peak)
    figures["speedup_ebtrain_over_reference"] = (figures["ebtrain"]["images_per_s"]
                                                 / figures["reference"]["images_per_s"])
    figures["tickets"] = time_tickets(arch, model, data, args, tickets)
    return figures


def environment(args: argparse.Namespace, peak: float | None, peak_source: str) -> dict:
    cuda = args.device.type == "cuda"
    return {"device": torch.cuda.get_device_name(args.device) if cuda else platform.processor() or "cpu",
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "cuda": torch.version.cuda if cuda else None,
            "cudnn": torch.backends.cudnn.version() if cuda else None, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(), "peak_tflops": peak, "peak_source": peak_source}


def print_summary(report: dict) -> None:
    print(report["note"])
    for arch, f in report["archs"].items():
        eb, ref = f["ebtrain"], f["reference"]
        mfu = f", MFU {100 * eb['mfu']:.1f}% vs {100 * ref['mfu']:.1f}%" if eb["mfu"] is not None else ""
        print(f"{arch}: ebtrain {eb['images_per_s']:,.0f} img/s ({eb['seconds_per_epoch']:.1f} s/epoch, "
              f"{eb['tflops_per_s']:.2f} TFLOP/s) vs reference loop {ref['images_per_s']:,.0f} img/s "
              f"({ref['seconds_per_epoch']:.1f} s/epoch): x{f['speedup_ebtrain_over_reference']:.2f}{mfu}")
        multiple = f["tickets"]["round_channels"]
        for name, row in f["tickets"]["ratios"].items():
            drawn, rounded = row["drawn"], row["rounded"]
            print(f"  {name}: step x{drawn['speedup']:.2f} faster than dense "
                  f"(FLOPs x{drawn['train_flops_ratio']:.2f}); rounded to {multiple} "
                  f"(+{rounded['channels_added']} channels): x{rounded['speedup']:.2f} "
                  f"(FLOPs x{rounded['train_flops_ratio']:.2f})")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    retain_freed_memory()  # as `ebtrain` does, so the timings are the tool's
    env = environment(args, *device_peak(args.device, args.peak_tflops))
    cpu_run = args.device.type != "cuda"
    note = (f"CPU run at width {args.width:g}, {args.steps} timed steps: these numbers show that the script "
            "works, not how fast a GPU trains" if cpu_run else
            f"{env['device']}, width {args.width:g}, {args.steps} timed steps after {args.warmup}")
    tickets = [load_ticket(path) for path in args.ticket]
    check_tickets(tickets, args.arch)
    data = bench_data(args)
    report = {"note": note, "cpu_run": cpu_run, **env,
              "batch_size": args.batch_size, "width": args.width, "warmup_steps": args.warmup,
              "timed_steps": args.steps, "lr": LR, "reference_workers": args.workers,
              "data": f"image folder {Path(args.data_dir).name}" if args.data_dir else
              "synthetic: random uint8 images (ebtrain), torchvision FakeData (reference)",
              "mfu_convention": "training FLOPs per image (ebtrain.flops: forward + backward) x images/s / peak",
              "archs": {arch: bench_arch(arch, data, args, env["peak_tflops"], tickets) for arch in args.arch}}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print_summary(report)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
