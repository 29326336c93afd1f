"""The scripts: reproduce_eb.py stops within its time budget and finishes when run again; it skips or
continues each step by what is on disk; bench_train.py, bench_lottery.py and bench_data.py write their figures on
a CPU."""
from __future__ import annotations

import argparse
import importlib.util
import json
from types import ModuleType

import pytest
import torch
from PIL import Image

from ebtrain.earlybird import Ticket, channel_scores, draw_mask
from ebtrain.models import build_model
from ebtrain.tickets import load_ticket, save_ticket

from conftest import ROOT, TINY_FLAGS


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def reproduce(monkeypatch) -> ModuleType:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the ebtrain commands it starts inherit it
    return load_script("reproduce_eb")


def test_reproduce_stops_within_its_budget_and_finishes_when_run_again(reproduce, tmp_path, capsys):
    out = tmp_path / "repro"
    # eps 0.9 with a queue of 2: the ticket emerges at epoch 2 of 4
    argv = ["--out", str(out), *TINY_FLAGS, "--data-dir", str(tmp_path / "data"), "--epochs", "4",
            "--ratios", "0.5", "--eps", "0.9", "--queue-length", "2", "--no-tensorboard"]
    assert reproduce.main([*argv, "--time-budget", "3"]) == reproduce.UNFINISHED
    assert "run me again to continue" in capsys.readouterr().out
    assert not (out / "eb" / "summary.json").exists()

    assert reproduce.main(argv) == 0
    table = (out / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| eb ")]
    assert [row.split("|")[2].strip() for row in rows] == ["dense", "EB-Train", "EB re-init"]
    assert "2.2x to 2.4x" in table and (out / "acc_vs_flops.png").stat().st_size > 1000
    assert (out / "eb" / "retrain" / "p50-reinit" / "result.json").is_file()


def test_reproduce_runs_only_what_is_not_on_disk(reproduce, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(reproduce, "run_ebtrain", lambda flags, deadline: calls.append(flags))
    run = tmp_path / "eb"
    reproduce.eb_train_and_baseline(run, "vgg16", ["--epochs", "4"], None)
    assert calls.pop() == ["search", "--arch", "vgg16", "--baseline", "--out", str(run), "--epochs", "4"]
    run.mkdir()
    (run / "config.yaml").write_text("{}")
    reproduce.eb_train_and_baseline(run, "vgg16", ["--epochs", "4"], None)
    assert calls.pop() == ["search", "--resume", "--out", str(run)]
    (run / "summary.json").write_text("{}")
    reproduce.eb_train_and_baseline(run, "vgg16", [], None)
    assert calls == []

    (run / "tickets").mkdir()
    for name in ("p30", "p50"):
        (run / "tickets" / f"{name}.pt").write_bytes(b"")
    (run / "retrain" / "p30-reinit").mkdir(parents=True)
    (run / "retrain" / "p30-reinit" / "result.json").write_text("{}")
    reproduce.eb_reinit(run, None)
    assert calls == [["retrain", str(run / "tickets" / "p50.pt"), "--init", "reinit"]]


def test_bench_train_writes_every_figure_on_a_cpu(tmp_path, capsys):
    # the eager step only: a captured (compiled) one compiles each network for a minute on a CPU; the
    # compiled Trainer step itself is tested in test_train
    bench = load_script("bench_train")
    out = tmp_path / "bench.json"
    bench.main(["--arch", "vgg16", "--device", "cpu", "--batch-size", "8", "--steps", "1", "--warmup", "1",
                "--modes", "eager", "--profile-steps", "1", "--ratios", "0.5", "--round-channels", "8", "16",
                "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["cpu_run"] and report["width"] == 0.125 and report["peak_tflops"] is None
    assert {"device", "torch", "batch_size", "note"} <= set(report) and report["modes"] == ["eager"]
    figures = report["archs"]["vgg16"]
    for way in ("eager", "reference"):
        assert figures[way]["images_per_s"] > 0 and figures[way]["mfu"] is None
        assert {"step_seconds", "seconds_per_epoch", "tflops_per_s"} <= set(figures[way])
    assert figures["speedup_over_reference"]["eager"] > 0
    profile = figures["profile"]["eager"]
    assert profile["steps"] == 1 and profile["device_idle_share"] is None
    assert profile["top"] and all(op["own_ms"] >= 0 for op in profile["top"])
    assert any("conv" in op["name"] for op in profile["top"])
    tickets = figures["tickets"]
    assert tickets["source"] == "random BN weights" and tickets["round_channels"] == [8, 16]
    row = tickets["ratios"]["p50"]
    drawn, by8, by16 = row["drawn"], row["rounded_8"], row["rounded_16"]
    assert drawn["channels_added"] == 0 and by8["channels"] == drawn["channels"] + by8["channels_added"]
    assert 0 < drawn["train_flops_ratio"] <= by8["train_flops_ratio"] <= by16["train_flops_ratio"] < 1
    assert drawn["step_ratio"]["eager"] > 0
    printed = capsys.readouterr().out
    assert "CPU run at width 0.125" in printed and "ebtrain eager" in printed


def test_bench_train_takes_the_masks_of_given_tickets(tmp_path):
    bench = load_script("bench_train")
    model = build_model("vgg16", width=0.125)
    ticket = load_ticket(save_ticket(Ticket(0.5, 3, draw_mask(channel_scores(model), 0.5), []), model,
                                     tmp_path / "p50.pt"))
    bench.check_tickets([ticket], ["vgg16"])
    dense, masks, source = bench.ticket_masks("vgg16", build_model("vgg16"), argparse.Namespace(), [ticket])
    assert source == "ticket files" and dense.arch == model.arch
    assert [r for r, _ in masks] == [0.5] and all(torch.equal(a, b) for a, b in zip(masks[0][1], ticket["keep"]))
    with pytest.raises(SystemExit, match="the benchmark trains preresnet101"):
        bench.check_tickets([ticket], ["preresnet101"])
    with pytest.raises(SystemExit, match="for 3x8x8 images"):
        bench.check_tickets([{**ticket, "arch": {**ticket["arch"], "image_size": 8}}], ["vgg16"])


def test_bench_lottery_times_plain_batched_and_block_sparse_training(tmp_path):
    out = tmp_path / "bench_lottery.json"
    load_script("bench_lottery").main(["--models", "1", "3", "--density", "0.1", "--iterations", "3",
                                       "--warmup", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["density"] == 0.1 and result["freed_memory_retained"] in (True, False)
    assert [(r["setup"], r["models"]) for r in result["results"]] == [
        ("plain nn.Module + ebtrain.train.make_optimizer", 1), ("ebtrain.lottery.population (one network)", 1),
        ("ebtrain.lottery.population (batched)", 3),
        ("ebtrain.lottery.population (batched, block-sparse input layer)", 3)]
    for row in result["results"]:
        assert row["network_steps_per_second"] == pytest.approx(row["models"] * row["iterations_per_second"], rel=0.01)
        assert row["iterations_per_second"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine gpu_check runs every check")
def test_gpu_check_needs_a_gpu_and_runs_its_checks_on_the_cpu_when_told(tmp_path, capsys):
    gpu_check = load_script("gpu_check")
    assert gpu_check.main([str(tmp_path / "none")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    everything_else = ["search_fp32_captured", "search_bfp8_eager", "search_bfp8_captured", "retrain_eb",
                       "retrain_reinit", "retrain_rewind", "torchrun_one_process", "lottery_batched",
                       "resume_cpu_to_cuda", "resume_cuda_to_cpu", "deterministic_repeat", "bench"]
    assert gpu_check.main([str(tmp_path / "out"), "--device", "cpu", "--skip", *everything_else]) == 0
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [(c["name"], c["passed"]) for c in summary["checks"]] == [("search_fp32_eager", True), ("prune", True)]
    assert summary["checks"][0]["tickets"] == ["p30", "p50", "p70"] and summary["checks"][0]["compiled"] is False
    assert "PASS prune" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
def test_bench_data_writes_the_folder_once_and_its_figures(tmp_path):
    source = tmp_path / "source"
    for label in ("cat", "dog"):
        (source / label).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (32, 32), (60 * i, 100 if label == "cat" else 200, 30)).save(source / label / f"{i}.png")
    folder, out = tmp_path / "jpg", tmp_path / "bench_data.json"
    argv = ["--source", str(source), "--folder", str(folder), "--images", "40", "--workers", "1", "--arch", "vgg11",
            "--image-size", "16", "--batch-size", "8", "--warmup", "1", "--steps", "1", "--out", str(out)]
    bench = load_script("bench_data")
    report = bench.main(argv)
    assert report == json.loads(out.read_text())
    jpegs = sorted(folder.rglob("*.jpg"))
    assert len(jpegs) == 40 and report["folder"]["train_images"] + report["folder"]["test_images"] == 40
    sides = {side for path in jpegs for side in Image.open(path).size}
    assert min(sides) >= 100 and max(sides) <= 500 and len(sides) > 2
    for name in ("stream", "memory"):
        assert report["loaders"][name]["images_per_s"] > 0 and report["ratio_loader_to_model"]["vgg11"][name] > 0
    assert report["models"]["vgg11"]["images_per_s"] > 0 and report["target_ratio"] == 1.5
    written = jpegs[0].stat().st_mtime_ns
    bench.main(argv)  # the folder is there: not written again
    assert jpegs[0].stat().st_mtime_ns == written
