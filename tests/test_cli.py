import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from ebtrain import checkpoint
from ebtrain.cli import main
from ebtrain.models import load_model

from conftest import ROOT, TINY_FLAGS, run_cli


def write_file(name: str, text: str):
    """Setup: a file `name` in the test's folder (named as {tmp}/NAME in argv)."""
    def setup(tmp_path, run):
        (tmp_path / name).write_text(text)
    return setup


def image_folder(damage: str):
    """Setup: {tmp}/images with train/ and test/, two classes of 8x8 PNGs, then `damage` done to it."""
    def setup(tmp_path, run):
        root = tmp_path / "images"
        for split in ("train", "test"):
            for label in ("cat", "dog"):
                (root / split / label).mkdir(parents=True)
                for i in range(3):
                    Image.new("RGB", (8, 8), (40 * i, 100, 0)).save(root / split / label / f"{i}.png")
        if damage == "no-test":
            shutil.rmtree(root / "test")
        elif damage == "classes-differ":
            (root / "test" / "dog").rename(root / "test" / "bird")
        elif damage == "corrupt":
            (root / "train" / "cat" / "1.png").write_bytes(b"\x89PNG not really")
        elif damage == "one-class":
            shutil.rmtree(root / "train" / "dog")
            shutil.rmtree(root / "test" / "dog")
    return setup


def ticket_copy(damage: str):
    """Setup: {tmp}/ticket.pt, a copy of the run's ticket with `damage` done to it."""
    def setup(tmp_path, run):
        data = bytearray((run / "tickets" / "p50.pt").read_bytes())
        if damage == "bit-flip":
            data[len(data) // 2] ^= 0x01
        (tmp_path / "ticket.pt").write_bytes(bytes(data))
        if damage == "other-arch":  # the weights of a vgg11 under the name of a resnet20
            ticket = checkpoint.load(tmp_path / "ticket.pt")
            ticket["arch"] = {**{k: v for k, v in ticket["arch"].items() if k != "cfg"}, "name": "resnet20"}
            checkpoint.atomic_save(ticket, tmp_path / "ticket.pt")
    return setup


FOLDER = ["--dataset", "imagefolder", "--data-dir", "{tmp}/images", "--arch", "vgg11", "--width", "0.125",
          "--device", "cpu"]
# argv ({tmp}: the test's folder, {run}: a finished search, {ticket}: its ticket), the text the error line
# must hold, and what to create first
BAD_INPUTS = [
    pytest.param(["--arch", "vgg17"], "unknown arch 'vgg17'", None, id="unknown-arch"),
    pytest.param(["--dataset", "svhn"], "data.dataset = 'svhn' is not allowed", None, id="unknown-dataset"),
    pytest.param(["--dataset", "cifar10", "--data-dir", "/nonexistent/ebtrain"], "--download", None,
                 id="missing-cifar"),
    pytest.param(["--dataset", "imagefolder", "--data-dir", "/nonexistent/ebtrain"], "/nonexistent/ebtrain", None,
                 id="missing-folder"),
    pytest.param(["--ratios", "0.3", "1.5"], "--ratios 0.3 1.5: each must lie in (0, 1)", None, id="ratio-1.5"),
    pytest.param(["--ratios", "0.3", "0.3"], "--ratios 0.3 0.3: each ratio once", None, id="ratio-twice"),
    pytest.param(["--flops-targets", "0.5", "0.5000001"], "--flops-targets 0.5 0.5000001: each target once", None,
                 id="flops-target-twice"),
    pytest.param(["--flops-targets", "0"], "--flops-targets 0: each must lie in (0, 1)", None, id="flops-target-0"),
    pytest.param(["--ratios"], "--ratios is empty and no --flops-targets are given", None, id="no-ratio-no-target"),
    pytest.param(["--sparsity-weight", "l2"], "choose from uniform, flops", None, id="sparsity-weight"),
    pytest.param(["--eps", "0"], "--eps 0.0: must lie in (0, 1)", None, id="eps-0"),
    pytest.param(["--queue-length", "1"], "--queue-length 1: must be at least 2", None, id="queue-1"),
    pytest.param(["--min-keep", "1"], "--min-keep 1.0: must lie in [0, 1)", None, id="min-keep-1"),
    pytest.param(["--epochs", "0"], "--epochs 0: must be positive", None, id="epochs-0"),
    pytest.param(["--batch-size", "-4"], "--batch-size -4: must be positive", None, id="batch-negative"),
    pytest.param(["--milestones", "200"], "--milestones 200: each must be a fraction in (0, 1) or a whole epoch "
                 "inside the 160-epoch schedule", None, id="milestone-past-end"),
    pytest.param(["--milestones", "1.5"], "--milestones 1.5: each must be a fraction in (0, 1) or a whole epoch",
                 None, id="milestone-fractional-epoch"),
    pytest.param(["--lr", "fast"], "argument --lr: invalid float value: 'fast'", None, id="lr-not-a-number"),
    pytest.param(["--lr", "inf"], "--lr inf: must be a positive number", None, id="lr-inf"),
    pytest.param(["--momentum", "-0.5"], "--momentum -0.5: must lie in [0, 1)", None, id="momentum-negative"),
    pytest.param(["--eb-rule", "papr"], "choose from paper, reference", None, id="eb-rule-typo"),
    pytest.param(["--no-such-flag"], "unrecognized arguments: --no-such-flag", None, id="unknown-flag"),
    pytest.param(["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "device", None,
                 id="no-such-device"),
    pytest.param([*TINY_FLAGS, "--arch", "lenet300_100"], "--arch lenet300_100 has no BatchNorm layers to draw "
                 "Early-Bird masks from: choose one of vgg11", None, id="search-without-batchnorm"),
    pytest.param(["train", *TINY_FLAGS, "--arch", "conv6", "--image-size", "4"],
                 "arch 'conv6' pools 3 times: image_size 4 is too small", None, id="image-too-small-for-arch"),
    pytest.param([*TINY_FLAGS, "--synthetic-size", "257"], "--batch-size 32 leaves a batch of 1 image (257 "
                 "training images), and vgg11 cannot train on one 8x8 image", None, id="batch-of-one"),
    pytest.param([*TINY_FLAGS, "--out", "{tmp}/a-file"], "--out {tmp}/a-file: is a file, not a folder",
                 write_file("a-file", "x"), id="out-is-a-file"),
    pytest.param(["--resume", "--out", "{run}", "--epochs", "9"], "--resume continues '{run}' with the settings it "
                 "started with ({run}/config.yaml): drop --epochs", None, id="resume-with-other-settings"),
    pytest.param(["train", "--config", "{tmp}/bad.yaml"], "ebtrain: error: unknown setting 'train.epoch' (did you "
                 "mean 'epochs'?)", write_file("bad.yaml", "train:\n  epoch: 3\n"), id="yaml-unknown-key"),
    pytest.param(["--config", "{tmp}/bad.yaml"], "train.epochs = 'ten' is not allowed: expected a whole number",
                 write_file("bad.yaml", "train:\n  epochs: ten\n"), id="yaml-epochs-ten"),
    pytest.param(["--config", "{tmp}/bad.yaml"], "search.ratios = [0.3, 'half'] is not allowed: expected a list of "
                 "numbers", write_file("bad.yaml", "search:\n  ratios: [0.3, half]\n"), id="yaml-ratio-not-number"),
    pytest.param(["--config", "{tmp}/bad.yaml"], "train.device = ['cpu'] is not allowed: expected text",
                 write_file("bad.yaml", "train:\n  device: [cpu]\n"), id="yaml-list-for-text"),
    pytest.param(FOLDER, "'{tmp}/images' has no test/ folder: expected {tmp}/images/train/<class>/* and "
                 "{tmp}/images/test/<class>/*", image_folder("no-test"), id="folder-without-test"),
    pytest.param(FOLDER, "classes differ between {tmp}/images/train and {tmp}/images/test: only in train: dog; "
                 "only in test: bird", image_folder("classes-differ"), id="folder-classes-differ"),
    pytest.param(FOLDER, "cannot read image '{tmp}/images/train/cat/1.png'", image_folder("corrupt"),
                 id="folder-corrupt-image"),
    pytest.param(FOLDER, "'{tmp}/images/train' holds one class (cat): a classifier needs at least 2",
                 image_folder("one-class"), id="folder-one-class"),
    pytest.param(["retrain", "{ticket}", "--arch", "resnet20"], "--arch resnet20: '{ticket}' is a ticket of vgg11 at "
                 "width 0.125, and its pruned network keeps that architecture: drop --arch", None,
                 id="retrain-other-arch"),
    pytest.param(["retrain", "{ticket}", "--dataset", "digits"], "'{ticket}' is a ticket for 3x8x8 images in 4 "
                 "classes, but --dataset digits gives 1x8x8 images in 10 classes", None, id="retrain-other-data"),
    pytest.param(["retrain", "{tmp}/p50.pt"], "ticket file '{tmp}/p50.pt' not found", None, id="retrain-no-ticket"),
    pytest.param(["retrain", "{run}/config.yaml"], "'{run}/config.yaml' is not a readable ticket file (not a whole "
                 "file written by torch.save", None, id="retrain-not-a-ticket"),
    pytest.param(["prune", "{tmp}/ticket.pt"], "'{tmp}/ticket.pt' is not a readable ticket file (damaged: record",
                 ticket_copy("bit-flip"), id="prune-damaged-ticket"),
    pytest.param(["prune", "{tmp}/ticket.pt"], "the ticket for p = 0.5 does not fit its arch resnet20",
                 ticket_copy("other-arch"), id="prune-ticket-of-other-arch"),
]


@pytest.fixture(scope="module")
def finished_search(tmp_path_factory):
    """A finished search with the ticket tickets/p50.pt (drawn at epoch 2 of 4), made in-process."""
    run = tmp_path_factory.mktemp("search") / "run"
    assert main([*TINY_FLAGS, "--epochs", "4", "--ratios", "0.5", "--eps", "0.9", "--queue-length", "2",
                 "--no-retrain", "--no-tensorboard", "--out", str(run)]) == 0
    return run


@pytest.mark.parametrize("argv,expected,setup", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_code_2(argv, expected, setup, tmp_path, finished_search):
    if setup:
        setup(tmp_path, finished_search)
    names = {"tmp": tmp_path, "run": finished_search, "ticket": finished_search / "tickets" / "p50.pt"}
    argv = [arg.format(**names) for arg in argv]
    takes_out = argv[0] not in ("prune", "report") and "--out" not in argv
    result = run_cli(*argv, *(["--out", str(tmp_path / "run")] if takes_out else []), timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("ebtrain: error: ") and expected.format(**names) in lines[0]
    assert not (tmp_path / "run").exists()  # checked before any work: no run directory is left behind


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
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                            # as from a terminal: a suite started in the background inherits SIGINT ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
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
