import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from ebtrain.models import load_model

from conftest import ROOT, TINY_FLAGS, run_cli

BAD_INPUTS = [
    (["--arch", "vgg17"], "unknown arch 'vgg17'"),
    (["--dataset", "imagenet"], "data.dataset = 'imagenet' is not allowed"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent/ebtrain"], "--download"),
    (["--dataset", "imagefolder", "--data-dir", "/nonexistent/ebtrain"], "/nonexistent/ebtrain"),
    (["--ratios", "0.3", "1.5"], "--ratios"),
    (["--eps", "0"], "--eps"),
    (["--queue-length", "1"], "--queue-length"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "-4"], "--batch-size"),
    (["--milestones", "200"], "--milestones"),
    (["--lr", "fast"], "invalid"),
    (["--eb-rule", "papr"], "choose from paper, reference"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
]


@pytest.mark.parametrize("argv,expected", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_code_2(argv, expected, tmp_path):
    result = run_cli(*argv, "--out", str(tmp_path / "run"), timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert expected in lines[0]


def test_bad_yaml_key_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epoch: 3\n")
    result = run_cli("train", "--config", str(path), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "ebtrain: error: unknown setting 'train.epoch' (did you mean 'epochs'?)"


def test_models_lists_every_architecture():
    result = run_cli("models", "--width", "0.25", timeout=120)
    assert result.returncode == 0
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert {"vgg16", "preresnet101", "resnet20", "resnet18", "lenet300_100", "conv6"} <= set(names)


def test_main_job_then_prune_and_retrain_commands(tmp_path):
    run = tmp_path / "run"
    result = run_cli(*TINY_FLAGS, "--epochs", "4", "--ratios", "0.5", "--eps", "0.9", "--queue-length", "2",
                     "--out", str(run))
    assert result.returncode == 0, result.stderr
    assert "EB-Train" in result.stdout and "0.5" in result.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tickets"]["p50"]["eb_epoch"] == 2

    pruned = run_cli("prune", str(run / "tickets" / "p50.pt"), "--output", str(tmp_path / "p50.pt"))
    assert pruned.returncode == 0, pruned.stderr
    assert "parameters:" in pruned.stdout
    model = load_model(tmp_path / "p50.pt")
    kept = summary["tickets"]["p50"]["kept_per_layer"]
    assert [bn.num_features for _, bn in model.prunable_bns()] == kept

    again = run_cli("retrain", str(run / "tickets" / "p50.pt"), "--init", "reinit")
    assert again.returncode == 0, again.stderr
    result = json.loads((run / "retrain" / "p50-reinit" / "result.json").read_text())
    assert result["first_epoch"] == 1 and result["epochs_trained"] == 4

    refused = run_cli(*TINY_FLAGS, "--out", str(run))
    assert refused.returncode == 2 and "--overwrite" in refused.stderr


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    flags = [*TINY_FLAGS, "--synthetic-size", "2048", "--epochs", "3", "--no-tensorboard"]
    straight = run_cli("train", *flags, "--out", str(tmp_path / "a"))
    assert straight.returncode == 0, straight.stderr

    run = tmp_path / "b"
    env_cmd = [sys.executable, "-m", "ebtrain", "train", *flags, "--out", str(run)]
    proc = subprocess.Popen(env_cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    metrics = run / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_cli("train", "--resume", "--out", str(run))
    assert resumed.returncode == 0, resumed.stderr
    a = load_model(tmp_path / "a" / "model.pt").state_dict()
    b = load_model(run / "model.pt").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((run / "summary.json").read_text())["baseline"]["final_test_acc"] == \
        json.loads((tmp_path / "a" / "summary.json").read_text())["baseline"]["final_test_acc"]


def test_ctrl_c_exits_130_and_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ebtrain", "train", *TINY_FLAGS, "--synthetic-size", "2048", "--epochs", "5",
           "--no-tensorboard", "--out", str(run)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "checkpoint.pt").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert f"python -m ebtrain train --resume --out {run}" in err and "Traceback" not in err
    resumed = run_cli("train", "--resume", "--out", str(run))
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run / "summary.json").read_text())["baseline"]["last_epoch"] == 5
