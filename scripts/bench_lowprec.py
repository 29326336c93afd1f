"""Time the Early-Bird search in simulated block floating point against the same search in fp32.

    python scripts/bench_lowprec.py                       # digits, vgg11 at width 0.25, CPU, 3 epochs
    python scripts/bench_lowprec.py --dataset synthetic --image-size 32 --arch vgg16 --width 0.125

Both searches run in this process on the same model, data, seed and epochs, through ebtrain's own
`search.run_search` (L1 sparsity and detector included; eps is set so low that no ticket ends a search early).
The rounding is simulated in float32, so the ratio bfp/fp32 is the overhead of the simulation, not a
speedup. An epoch's seconds are the Trainer's (training plus test evaluation); the first epoch of each
search is left out of the median as warm-up. With --repeats N the two precisions alternate N times and
each keeps its fastest median, so load from other processes weighs on both alike. Writes JSON to --out.
On a small shared CPU, OMP_NUM_THREADS=1 keeps torch's threads from fighting other processes for cores.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout, uninstalled

from ebtrain.config import Config, apply_overrides  # noqa: E402
from ebtrain.data import load_data  # noqa: E402
from ebtrain.host_memory import retain_freed_memory  # noqa: E402
from ebtrain.search import run_search  # noqa: E402
from ebtrain.train import resolve_device  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="vgg11")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--dataset", default="digits", help="digits or synthetic (no download needed), or any "
                   "dataset ebtrain knows that is already in --data-dir")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--image-size", type=int, default=32, help="synthetic dataset: image side")
    p.add_argument("--synthetic-size", type=int, default=1024, help="synthetic dataset: training images")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--bits", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="bench_lowprec.json")
    return p.parse_args()


def search_config(args: argparse.Namespace, precision: str, run_dir: Path) -> Config:
    return apply_overrides(Config(), {
        "data": {"dataset": args.dataset, "data_dir": args.data_dir, "image_size": args.image_size,
                 "synthetic_size": args.synthetic_size},
        "model": {"arch": args.arch, "width": args.width},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "device": args.device},
        "search": {"precision": precision, "bits": args.bits, "eps": 1e-9, "retrain": False},
        "run": {"out": str(run_dir), "tensorboard": False, "progress": "off"},
    })


def time_search(args: argparse.Namespace, precision: str) -> dict:
    """One search in a throw-away run directory: seconds per epoch and the final test accuracy."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = search_config(args, precision, Path(tmp))
        result = run_search(cfg, Path(tmp), load_data(cfg.data, seed=cfg.train.seed),
                            resolve_device(cfg.train.device))
        epochs = [json.loads(line) for line in (Path(tmp) / "search" / "metrics.jsonl").read_text().splitlines()]
    seconds = [m["seconds"] for m in epochs]
    return {"epoch_seconds": seconds, "median_seconds": statistics.median(seconds[1:] or seconds),
            "final_test_acc": result["final_test_acc"]}


def main() -> None:
    args = parse_args()
    retain_freed_memory()  # as `ebtrain` does, so the timings are the tool's
    runs: dict[str, list[dict]] = {"fp32": [], "bfp8": []}  # bfp8 is the setting's name; --bits sets the width
    for _ in range(args.repeats):
        for precision, results in runs.items():
            results.append(time_search(args, precision))
    fp32, bfp = (min(runs[p], key=lambda r: r["median_seconds"]) for p in ("fp32", "bfp8"))
    report = {
        "overhead_ratio": bfp["median_seconds"] / fp32["median_seconds"],
        "fp32": fp32, "bfp": bfp,
        "setup": {"arch": args.arch, "width": args.width, "dataset": args.dataset, "epochs": args.epochs,
                  "batch_size": args.batch_size, "bits": args.bits, "repeats": args.repeats,
                  "device": args.device, "image_size": args.image_size if args.dataset == "synthetic" else None},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "machine": platform.machine(), "processor": platform.processor() or None,
                        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "cuda": torch.cuda.get_device_name() if args.device.startswith("cuda") else None},
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"median epoch: fp32 {fp32['median_seconds']:.3f}s, bfp{args.bits} {bfp['median_seconds']:.3f}s, "
          f"overhead x{report['overhead_ratio']:.2f} -> {args.out}")


if __name__ == "__main__":
    main()
