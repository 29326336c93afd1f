"""Iterations per second of lottery-ticket training: K networks trained together as one batched model
(the path `ebtrain lottery` takes for the arms and seeds of a round), against one network alone.

    python scripts/bench_lottery.py --out bench_lottery.json [--arch lenet300_100] [--models 1 9] [--density 0.2]

Times `ebtrain.lottery.population.train_step` on MNIST-shaped synthetic batches (batch 60, Adam), each network
with its own mask (--density of the weights kept) and data; and, as the plain baseline, one nn.Module
stepped by the Trainer's optimizer (`ebtrain.train.make_optimizer`) with its gradients masked. For K > 1
and a linear input layer it also times that layer held block-sparse (`ebtrain.lottery.sparse.BlockSparse`,
which `ebtrain lottery` uses on the CPU below `SPARSE_BELOW`), so runs at several densities show where
the sparse path starts to pay. Writes the numbers with the hardware, versions and machine load they
were measured under.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout, uninstalled

from ebtrain.config import TrainConfig  # noqa: E402
from ebtrain.host_memory import retain_freed_memory  # noqa: E402
from ebtrain.models import build_model  # noqa: E402
from ebtrain.lottery.masks import prunable_weights  # noqa: E402
from ebtrain.lottery.population import Member, Population, train_step  # noqa: E402
from ebtrain.train import make_optimizer  # noqa: E402

CFG = TrainConfig(optimizer="adam", lr=1.2e-3, weight_decay=0.0, batch_size=60)


def _rates(step: Callable[[], None], iterations: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """(iterations per wall-clock second, per CPU second of this process)."""
    for i in range(warmup + iterations):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started, cpu = time.perf_counter(), time.process_time()
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return iterations / (time.perf_counter() - started), iterations / (time.process_time() - cpu)


def _network(arch: str, image: tuple[int, int, int], density: float) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    model = build_model(arch, in_channels=image[0], image_size=image[1])
    return model, {n: torch.rand(model.state_dict()[n].shape) < density for n in prunable_weights(model)}


def population_rates(arch: str, k: int, image: tuple[int, int, int], density: float, device: torch.device,
                     sparse: bool = False, **timing: int) -> tuple[float, float]:
    torch.manual_seed(0)
    members = [Member(seed, "ticket", model.state_dict(), masks)
               for seed, (model, masks) in enumerate(_network(arch, image, density) for _ in range(k))]
    pop = Population(build_model(arch, in_channels=image[0], image_size=image[1]), members, device,
                     sparse_below=2.0 if sparse else 0.0)  # at any density, or at none
    optimizer = make_optimizer(list(pop.params.values()), CFG, fused=True)  # as the population trains
    x = torch.randn(k, CFG.batch_size, *image, device=device)
    y = torch.randint(10, (k, CFG.batch_size), device=device)
    return _rates(lambda: train_step(pop, optimizer, x, y), device=device, **timing)


def plain_rates(arch: str, image: tuple[int, int, int], density: float, device: torch.device,
                **timing: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model, masks = _network(arch, image, density)
    model.to(device)
    weights = [(p, masks[n].to(device, p.dtype)) for n, p in model.named_parameters() if n in masks]
    optimizer = make_optimizer(list(model.parameters()), CFG, fused=device.type == "cuda")  # as the Trainer does
    x = torch.randn(CFG.batch_size, *image, device=device)
    y = torch.randint(10, (CFG.batch_size,), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        for p, mask in weights:
            p.grad.mul_(mask)
        optimizer.step()

    return _rates(step, device=device, **timing)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="lenet300_100")
    parser.add_argument("--models", type=int, nargs="+", default=[1, 9])
    parser.add_argument("--density", type=float, default=0.2, help="fraction of every layer's weights kept")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--malloc", choices=("retain", "default"), default="retain",
                        help="retain: keep freed memory for reuse, as `ebtrain` does (ebtrain.host_memory); "
                             "default: glibc's own behaviour, for comparison")
    parser.add_argument("--out", default="bench_lottery.json")
    args = parser.parse_args(argv)
    retained = args.malloc == "retain" and retain_freed_memory()
    device = torch.device(args.device)
    image = (1, 28, 28) if args.arch == "lenet300_100" else (3, 32, 32)
    timing = dict(iterations=args.iterations, warmup=args.warmup)
    plain = plain_rates(args.arch, image, args.density, device, **timing)
    rows = [{"setup": "plain nn.Module + ebtrain.train.make_optimizer", "models": 1, "rates": plain}]
    rows += [{"setup": "ebtrain.lottery.population (batched)" if k > 1 else "ebtrain.lottery.population (one network)",
              "models": k, "rates": population_rates(args.arch, k, image, args.density, device, **timing)}
             for k in args.models]
    if args.arch == "lenet300_100":  # the conv nets' input layer is a convolution: no block-sparse path
        rows += [{"setup": "ebtrain.lottery.population (batched, block-sparse input layer)", "models": k,
                  "rates": population_rates(args.arch, k, image, args.density, device, sparse=True, **timing)}
                 for k in args.models if k > 1]
    results = [{"setup": row["setup"], "models": row["models"], "iterations_per_second": round(row["rates"][0], 2),
                "network_steps_per_second": round(row["models"] * row["rates"][0], 2),
                "iterations_per_cpu_second": round(row["rates"][1], 2),  # the work itself, whatever the load
                "speedup_vs_plain": round(row["models"] * row["rates"][0] / plain[0], 2)} for row in rows]
    result = {
        "arch": args.arch, "density": args.density, "batch_size": CFG.batch_size, "optimizer": CFG.optimizer,
        "iterations_timed": args.iterations, "freed_memory_retained": retained, "results": results,
        "device": str(device), "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "load_average": os.getloadavg(), "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        **({"gpu": torch.cuda.get_device_name(device)} if device.type == "cuda" else {}),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    for row in results:
        print(row)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
