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

from ebtrain.config import GPU_ROUND_CHANNELS, DataConfig, TrainConfig  # noqa: E402
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
CPU_DEFAULTS = {"width": 0.125, "steps": 3, "warmup": 3}
MODES = ("eager", "captured")
CAPTURE_WARMUP = 3


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
    p.add_argument("--round-channels", type=int, nargs="+", default=[GPU_ROUND_CHANNELS],
                   help="the multiples pruned layers are rounded up to, one row each (default: ebtrain's CUDA "
                   f"default, {GPU_ROUND_CHANNELS})")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="ebtrain's step: eager, and captured (compiled; on CUDA replayed as CUDA graphs)")
    p.add_argument("--profile-steps", type=int, default=5, help="steps of each network traced by "
                   "torch.profiler in each mode, for the top kernels and the device's idle share (0: none)")
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
    if args.warmup < 1 or args.steps < 1 or args.batch_size < 1 or min(args.round_channels) < 1:
        p.error("--warmup, --steps, --batch-size and --round-channels must be at least 1")
    if "captured" in args.modes and args.warmup < CAPTURE_WARMUP:
        p.error(f"--warmup {args.warmup}: a captured step compiles in its first {CAPTURE_WARMUP} steps (the "
                "optimizer's state appears at the first); give at least that many")
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
    """Seconds of the training steps after the first `warmup`, the device synchronized at both ends;
    with `profile_steps`, a torch.profiler trace of that many steps after the timed ones."""

    def __init__(self, warmup: int, steps: int, profile_steps: int = 0):
        self.warmup, self.steps, self.profile_steps = warmup, steps, profile_steps
        self.done = 0
        self.started = 0.0
        self.seconds: float | None = None
        self.profiler: torch.profiler.profile | None = None
        self.profile_seconds = 0.0

    def step_end(self, trainer: Trainer) -> None:
        self.done += 1
        timed_end, profile_end = self.warmup + self.steps, self.warmup + self.steps + self.profile_steps
        if self.done in (self.warmup, timed_end, profile_end):
            synchronize(trainer.device)
        if self.done == self.warmup:
            self.started = time.perf_counter()
        if self.done == timed_end:
            self.seconds = time.perf_counter() - self.started
            if self.profile_steps:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if trainer.device.type == "cuda":
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                self.profiler = torch.profiler.profile(activities=activities)
                self.profiler.__enter__()
                self.started = time.perf_counter()
        if self.profile_steps and self.done == profile_end:
            self.profiler.__exit__(None, None, None)
            self.profile_seconds = time.perf_counter() - self.started


def profile_summary(timer: StepTimer, device: torch.device, top: int = 10) -> dict:
    """The top kernels of the traced steps by their time on the device (the top operators by their own CPU
    time on a CPU), and on a GPU the share of the traced wall time in which no kernel ran (kernels of one
    stream do not overlap). Only the device's own events count: an operator on the host also carries the
    device time of the kernels it launched, which would count them twice. The profiler slows the host,
    so the idle share of traced steps is an upper bound for untraced ones."""
    events = timer.profiler.key_averages()
    cuda = device.type == "cuda"
    if cuda:
        events = [e for e in events if e.device_type != torch.autograd.DeviceType.CPU]

    def own_us(e) -> float:
        return e.self_device_time_total if cuda else e.self_cpu_time_total

    ranked = sorted(events, key=own_us, reverse=True)[:top]
    busy_us = sum(map(own_us, events))
    wall_us = timer.profile_seconds * 1e6
    return {"steps": timer.profile_steps, "wall_seconds": timer.profile_seconds,
            "clock": "device kernels" if cuda else "CPU operators",
            "device_ms_per_step": busy_us / 1e3 / timer.profile_steps if cuda else None,
            "top": [{"name": e.key, "calls": e.count, "own_ms": own_us(e) / 1e3,
                     "share_of_wall": own_us(e) / wall_us} for e in ranked],
            "device_idle_share": max(0.0, 1 - busy_us / wall_us) if cuda else None}


def bench_data(args: argparse.Namespace) -> DataBundle:
    """Exactly the images of warmup, timed and profiled steps (one epoch of ebtrain's Trainer): the first of
    --data-dir's training images (cycled if too few), or random ones; one batch as the test set."""
    n = (args.warmup + args.steps + args.profile_steps) * args.batch_size
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


def time_ebtrain(model: nn.Module, data: DataBundle, args: argparse.Namespace, name: str, mode: str,
                 profile: bool = False) -> tuple[float, dict | None]:
    """(seconds per training step of a copy of `model` in ebtrain's Trainer with the `mode` step, the
    profile of --profile-steps more steps when `profile`)."""
    torch._dynamo.reset()  # each network compiles afresh: one process times many, past dynamo's recompile limit
    timer = StepTimer(args.warmup, args.steps, args.profile_steps if profile else 0)
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, lr=LR, milestones=[], device=str(args.device),
                      compile="on" if mode == "captured" else "off")
    Trainer(copy.deepcopy(model), data, cfg, device=args.device, hooks=[timer], tensorboard=False,
            name=f"ebtrain {name} ({mode})").fit()
    return timer.seconds / args.steps, profile_summary(timer, args.device) if timer.profiler else None


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
                 tickets: list[dict], dense_seconds: dict[str, float]) -> dict:
    """Step time of each pruned network, as drawn and rounded to each --round-channels multiple, in
    each mode, against its dense network's in the same mode."""
    dense, masks, source = ticket_masks(arch, model, args, tickets)
    if source == "ticket files":  # the tickets' own dense network: time it too
        dense_seconds = {mode: time_ebtrain(dense, data, args, f"{arch} dense", mode)[0] for mode in args.modes}
    dense_flops = measure_cost(dense, IMAGE_SHAPE, args.batch_size).train_flops_per_image
    scores = channel_scores(dense)
    total = sum(bn.num_features for _, bn in prunable_bns(dense))
    out = {"source": source, "round_channels": args.round_channels, "dense_step_seconds": dense_seconds,
           "ratios": {}}
    for ratio, keep in masks:
        row = {}
        for multiple in (1, *args.round_channels):
            rounded = round_keep(keep, scores, multiple)
            pruned = prune_channels(dense, rounded)
            label = "drawn" if multiple == 1 else f"rounded_{multiple}"
            timed = {mode: time_ebtrain(pruned, data, args, f"{arch} {ratio_name(ratio)} {label}", mode,
                                        profile=args.profile_steps > 0) for mode in args.modes}
            seconds = {mode: step for mode, (step, _) in timed.items()}
            row[label] = {"channels": sum(kept_channels(rounded)), "channels_total": total,
                          "channels_added": sum(kept_channels(rounded)) - sum(kept_channels(keep)),
                          "train_flops_ratio": measure_cost(pruned, IMAGE_SHAPE, args.batch_size)
                          .train_flops_per_image / dense_flops,
                          "step_seconds": seconds,
                          "step_ratio": {mode: seconds[mode] / dense_seconds[mode] for mode in args.modes},
                          "profile": {mode: profile for mode, (_, profile) in timed.items()}}
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
               "train_flops_per_image": cost.train_flops_per_image, "profile": {}}
    step_seconds = {}
    for mode in args.modes:
        step_seconds[mode], profile = time_ebtrain(model, data, args, arch, mode, profile=args.profile_steps > 0)
        figures["profile"][mode] = profile
    step_seconds["reference"] = time_reference(model, args)
    for way, seconds in step_seconds.items():
        figures[way] = throughput(seconds, args.batch_size, cost.train_flops_per_image, peak)
    figures["speedup_over_reference"] = {mode: figures[mode]["images_per_s"] / figures["reference"]["images_per_s"]
                                         for mode in args.modes}
    if len(args.modes) == 2:
        figures["speedup_captured_over_eager"] = step_seconds["eager"] / step_seconds["captured"]
    figures["tickets"] = time_tickets(arch, model, data, args, tickets,
                                      {mode: step_seconds[mode] for mode in args.modes})
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
        ref = f["reference"]
        print(f"{arch}: reference loop {ref['images_per_s']:,.0f} img/s ({ref['seconds_per_epoch']:.1f} s/epoch)")
        for mode in report["modes"]:
            m = f[mode]
            mfu = f", MFU {100 * m['mfu']:.1f}%" if m["mfu"] is not None else ""
            print(f"  ebtrain {mode}: {m['images_per_s']:,.0f} img/s ({m['seconds_per_epoch']:.1f} s/epoch, "
                  f"{m['tflops_per_s']:.2f} TFLOP/s{mfu}), x{f['speedup_over_reference'][mode]:.2f} the reference")
            profile = f["profile"].get(mode)
            if profile and profile["device_idle_share"] is not None:
                print(f"    device busy {profile['device_ms_per_step']:.2f} ms per step, idle "
                      f"{100 * profile['device_idle_share']:.0f}% of the traced steps")
        for name, row in f["tickets"]["ratios"].items():
            cells = "; ".join(f"{label} (FLOPs x{r['train_flops_ratio']:.2f}, +{r['channels_added']} ch): "
                              + ", ".join(f"{mode} x{r['step_ratio'][mode]:.2f}" for mode in report["modes"])
                              for label, r in row.items())
            print(f"  {name} step time vs dense: {cells}")


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
              "timed_steps": args.steps, "profiled_steps": args.profile_steps, "modes": args.modes,
              "lr": LR, "reference_workers": args.workers,
              "data": f"image folder {Path(args.data_dir).name}" if args.data_dir else
              "synthetic: random uint8 images (ebtrain), torchvision FakeData (reference)",
              "mfu_convention": "training FLOPs per image (ebtrain.flops: forward + backward) x images/s / peak",
              "archs": {}}
    for arch in args.arch:  # written after each, so a run cut short keeps the architectures it finished
        report["archs"][arch] = bench_arch(arch, data, args, env["peak_tflops"], tickets)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print_summary(report)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
