"""Data-parallel runs under torchrun (two gloo processes on the CPU) and the pieces they rest on."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from ebtrain import checkpoint, distributed
from ebtrain.cli import main
from ebtrain.data import BatchLoader, ImageSet
from ebtrain.errors import UserError
from ebtrain.models import build_model

from conftest import ROOT, TINY_FLAGS

# eps 0.9 with a queue of 3: the p = 0.5 ticket emerges at epoch 3; its retrain is epoch 4
FLAGS = [*TINY_FLAGS, "--epochs", "4", "--ratios", "0.5", "--eps", "0.9", "--queue-length", "3", "--no-tensorboard"]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """Two processes through torch's own launcher, as a user starts them."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", *args],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """`torchrun --nproc_per_node=2 -m ebtrain ...`: the main job, search and retrain."""
    run = tmp_path_factory.mktemp("cli") / "run"
    result = torchrun("-m", "ebtrain", *FLAGS, "--out", str(run))
    assert result.returncode == 0, result.stderr[-4000:]
    return run, result


@pytest.fixture(scope="module")
def worker_run(tmp_path_factory):
    """tests/distributed_worker.py under torchrun: the same job and a resumed search, ranks compared."""
    out = tmp_path_factory.mktemp("worker")
    result = torchrun(str(ROOT / "tests" / "distributed_worker.py"), str(out), *FLAGS)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def without_seconds(value):
    """A summary without its wall-clock times, which differ between any two runs."""
    if isinstance(value, dict):
        return {k: without_seconds(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [without_seconds(v) for v in value]
    return value


def test_torchrun_main_job_writes_and_prints_once(cli_run):
    run, result = cli_run
    assert result.stdout.count("EB-Train") == 1  # the table, from rank 0 only
    lines = result.stderr.splitlines()
    assert [line.split(":")[0] for line in lines if " epoch " in line and "/4:" in line] == \
        ["search epoch 1/4", "search epoch 2/4", "search epoch 3/4", "retrain p50 (eb) epoch 4/4"]
    assert sum(line.startswith("Early-Bird ticket for p = 0.5 emerged at epoch 3") for line in lines) == 1
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert files == ["config.yaml", "init.pt", "retrain/p50/checkpoint.pt", "retrain/p50/metrics.jsonl",
                     "retrain/p50/model.pt", "retrain/p50/result.json", "search/checkpoint.pt",
                     "search/checkpoint.pt.prev", "search/distance_p50.png", "search/kept_channels.png",
                     "search/metrics.jsonl", "search/result.json", "summary.json", "tickets/p50.pt"]
    epochs = [json.loads(line)["epoch"] for line in (run / "search" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["tickets"]["p50"]["eb_epoch"] == 3
    assert summary["tickets"]["p50"]["first_epoch"] == summary["tickets"]["p50"]["last_epoch"] == 4
    # every epoch saw the whole training set once, between the two processes
    assert summary["search"]["cost"]["images"] == 3 * 256


def test_ranks_end_with_the_same_networks_tickets_and_metrics(worker_run):
    report = json.loads((worker_run / "report.json").read_text())
    assert [(phase["phase"], phase["epochs"]) for phase in report] == \
        [("main/search", 3), ("main/retrain/p50", 4), ("resumed/search", 2), ("resumed/search", 3)]
    for phase in report:
        # weights and BN statistics, the detector's masks, the (global) metrics of every epoch
        assert phase["weights_agree"] and phase["hooks_agree"] and phase["metrics_agree"], phase
        assert phase["shards"] == [[0, 2], [1, 2]]


def test_the_same_seed_gives_the_same_summary(cli_run, worker_run):
    run, _ = cli_run
    again = json.loads((worker_run / "main" / "summary.json").read_text())
    assert without_seconds(json.loads((run / "summary.json").read_text())) == without_seconds(again)


def test_resumed_distributed_search_draws_the_same_ticket(worker_run):
    straight = checkpoint.load(worker_run / "main" / "tickets" / "p50.pt")
    resumed = checkpoint.load(worker_run / "resumed" / "tickets" / "p50.pt")
    assert straight["epoch"] == resumed["epoch"] == 3
    assert all(torch.equal(a, b) for a, b in zip(straight["keep"], resumed["keep"]))
    assert all(torch.equal(straight["state_dict"][k], resumed["state_dict"][k]) for k in straight["state_dict"])


@pytest.mark.parametrize("command", ["lottery", "prune", "report", "models"])
def test_one_process_commands_refuse_torchrun(command, monkeypatch, capsys):
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):  # what torchrun sets
        monkeypatch.setenv(name, value)
    assert main([command, "x"] if command in ("prune", "report") else [command]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"'ebtrain {command}' runs in one process" in err[0]
    assert not distributed.is_distributed()


def test_a_process_that_was_in_a_group_ends_without_finalizing(monkeypatch, capsys):
    # past the interpreter's finalization a gloo thread can abort a finished run (distributed.end_process)
    ended = []
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "teardown", lambda: ended.append("left the group"))
    monkeypatch.setattr(os, "_exit", lambda code: ended.append(code))
    assert main(["models"]) == 0
    assert ended == ["left the group", 0] and "vgg16" in capsys.readouterr().out


def loader_batches(data, batch_size, **kwargs):
    loader = BatchLoader(data, batch_size, mean=(0.5,), std=(0.25,), seed=3, **kwargs)
    loader.set_epoch(2)
    return list(loader), loader.num_samples


def test_sharded_loaders_together_yield_the_one_process_batches():
    data = ImageSet(torch.randint(0, 256, (71, 1, 8, 8), dtype=torch.uint8), torch.arange(71))
    train = dict(shuffle=True, augment=True)
    whole, n = loader_batches(data, 16, **train)
    assert n == 71 and [len(y) for _, y in whole] == [16, 16, 16, 16, 7]
    shards = [loader_batches(data, 16, rank=r, world_size=2, even_shards=True, **train) for r in (0, 1)]
    assert shards[0][1] == shards[1][1] == 70  # the 71st image of the epoch's order is left out
    for (x, y), (x0, y0), (x1, y1) in zip(whole, shards[0][0], shards[1][0]):
        assert len(y0) == len(y1) == len(y) // 2
        assert torch.equal(torch.cat([x0, x1]), x[:len(y0) * 2]) and torch.equal(torch.cat([y0, y1]), y[:len(y0) * 2])
    # evaluation loaders split unevenly and leave nothing out
    pieces = [loader_batches(data, 16, rank=r, world_size=3)[0] for r in range(3)]
    assert [len(y) for _, y in pieces[0]] == [5, 5, 5, 5, 2] and [len(y) for _, y in pieces[2]] == [6, 6, 6, 6, 3]
    assert torch.equal(torch.cat([y for piece in zip(*pieces) for _, y in piece]), torch.arange(71))


def test_global_batch_must_split_evenly():
    data = ImageSet(torch.zeros(8, 1, 4, 4, dtype=torch.uint8), torch.zeros(8, dtype=torch.int64))
    with pytest.raises(UserError, match="global batch, make it a multiple of 2"):
        BatchLoader(data, 33, mean=(0.5,), std=(0.25,), rank=0, world_size=2, even_shards=True)


def test_sync_batchnorm_twin_shares_everything_with_the_model():
    model = build_model("vgg11", num_classes=4, in_channels=3, width=0.125, image_size=8)
    twin = distributed._with_sync_batchnorm(model)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in twin.modules())
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())  # the detector still sees BatchNorm2d
    assert [id(t) for t in twin.parameters()] == [id(t) for t in model.parameters()]
    assert [id(t) for t in twin.buffers()] == [id(t) for t in model.buffers()]
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    x, before = torch.randn(6, 3, 8, 8), bn.running_mean.clone()
    out = twin.train()(x)  # without a process group SyncBatchNorm normalizes like BatchNorm
    assert not torch.equal(bn.running_mean, before)  # the twin's step updated the model's statistics
    assert torch.equal(out, model.train()(x))
    with pytest.raises(UserError, match="--sync-bn"):
        distributed.data_parallel(model, torch.device("cpu"), sync_bn=True)
