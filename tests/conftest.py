import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ebtrain.config import Config, apply_overrides

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path: Path, **sections) -> Config:
    """A config that trains in about a second: synthetic 8x8 data, a narrow VGG11, CPU."""
    base = {
        "data": {"dataset": "synthetic", "synthetic_size": 256, "image_size": 8, "channels": 3,
                 "num_classes": 4, "data_dir": str(tmp_path / "data")},
        "model": {"arch": "vgg11", "width": 0.125},
        "train": {"epochs": 4, "batch_size": 32, "lr": 0.05, "device": "cpu", "eval_batch_size": 128},
        "run": {"out": str(tmp_path / "run"), "progress": "off"},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return apply_overrides(Config(), base)


def run_cli(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m ebtrain ARGS` in a subprocess, as a user would."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "ebtrain", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)


TINY_FLAGS = ["--dataset", "synthetic", "--synthetic-size", "256", "--image-size", "8", "--num-classes", "4",
              "--arch", "vgg11", "--width", "0.125", "--batch-size", "32", "--lr", "0.05", "--device", "cpu",
              "--progress", "off"]


@pytest.fixture
def tiny(tmp_path):
    return tiny_config(tmp_path)


@pytest.fixture
def one_thread():
    # tensors in the lottery tests are tiny: OpenMP threads only add synchronization, and on a busy
    # machine a lot of it; the killed runs of the reliability tests compute with one thread, and so must
    # the uninterrupted run they are compared with
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


LENET = {"model": {"arch": "lenet300_100", "width": 0.25},
         "data": {"channels": 1, "val_size": 64, "synthetic_size": 256, "image_size": 8},
         "train": {"optimizer": "adam", "lr": 2e-3, "weight_decay": 0.0, "milestones": []}}


def lottery_config(tmp_path: Path, lottery=None, **sections) -> Config:
    """A lottery experiment that runs in seconds: a narrow LeNet-300-100, 2 rounds of 12 iterations."""
    merged = {k: dict(v) for k, v in LENET.items()}
    for section, values in sections.items():
        merged.setdefault(section, {}).update(values)
    return tiny_config(tmp_path, lottery={"rounds": 2, "iterations": 12, "eval_every": 4, **(lottery or {})}, **merged)
