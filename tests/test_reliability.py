"""Runs survive being killed, numerical faults stop a run cleanly, and damaged files are caught.

The kill test SIGKILLs a real `python -m ebtrain` process at exact points of the main job (search,
a ticket just saved, between search and pruning, retrain, baseline): a small bootstrap patches
`checkpoint._replace`, the rename every file write ends with, to kill the process just before or after
a chosen file lands.
"""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from ebtrain import checkpoint, cli, train
from ebtrain.cli import main
from ebtrain.config import load_yaml
from ebtrain.errors import UserError
from ebtrain.models import load_model

from conftest import ROOT, TINY_FLAGS

# tickets p30 at epoch 3 and p50 at epoch 4 of a 6-epoch schedule; retrains of 3 and 2 epochs; baseline
MAIN_JOB = [*TINY_FLAGS, "--epochs", "6", "--ratios", "0.3", "0.5", "--eps", "0.2", "--queue-length", "2",
            "--baseline", "--no-tensorboard"]

KILL_BOOTSTRAP = """
import os, runpy, signal
from ebtrain import checkpoint

suffix, nth, when = os.environ["EBTRAIN_TEST_KILL"].split("|")
hits = []
rename = checkpoint._replace

def rename_then_maybe_die(tmp, path):
    hit = path.as_posix().endswith(suffix)
    if hit:
        hits.append(path)
    now = hit and len(hits) == int(nth)
    if now and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    rename(tmp, path)
    if now and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)

checkpoint._replace = rename_then_maybe_die
runpy.run_module("ebtrain", run_name="__main__")
"""


def run_killed(args: list[str], kill: str) -> subprocess.CompletedProcess:
    """`python -m ebtrain ARGS`, SIGKILLed at `kill` = 'PATH_SUFFIX|N|before' or '...|after': just before
    or after the N-th file whose path ends with PATH_SUFFIX is renamed into place."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", EBTRAIN_TEST_KILL=kill)
    result = subprocess.run([sys.executable, "-c", KILL_BOOTSTRAP, *args], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == -signal.SIGKILL, f"never reached {kill}:\n{result.stderr}"
    return result


def summary_numbers(run) -> dict:
    """What must not depend on kills: EB epochs, accuracies and epochs of every phase."""
    summary = json.loads((run / "summary.json").read_text())
    phases = {"baseline": summary["baseline"], **summary["tickets"]}
    return {"eb_epochs": {r: v["eb_epoch"] for r, v in summary["search"]["detector"]["ratios"].items()},
            **{name: {key: phase[key] for key in ("final_test_acc", "best_test_acc", "first_epoch", "last_epoch",
                                                   "steps")} for name, phase in phases.items()}}


def assert_same_weights(a, b) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), rtol=1e-5, atol=1e-6), name


def test_main_job_killed_at_every_phase_resumes_to_the_uninterrupted_result(tmp_path, capsys, one_thread):
    straight = tmp_path / "straight"
    assert main([*MAIN_JOB, "--out", str(straight)]) == 0

    run = tmp_path / "killed"
    run_killed([*MAIN_JOB, "--out", str(run)], "search/checkpoint.pt|2|before")  # mid-checkpoint, epoch 2
    assert (run / "search" / "checkpoint.pt.prev").exists() and not (run / "search" / "checkpoint.pt").exists()
    resume = ["--resume", "--out", str(run)]
    run_killed(resume, "tickets/p30.pt|1|after")  # the ticket has emerged, its epoch is not checkpointed
    run_killed(resume, "search/result.json|1|after")  # the search is done, nothing is pruned yet
    assert not (run / "retrain").exists()
    run_killed(resume, "retrain/p30/checkpoint.pt|2|after")  # retraining the pruned network
    # and the newest retrain checkpoint is cut short, as by a disk that lied about fsync
    newest = run / "retrain" / "p30" / "checkpoint.pt"
    newest.write_bytes(newest.read_bytes()[:5000])
    damaged = run_killed(resume, "baseline/checkpoint.pt|3|before")
    assert f"checkpoint '{newest}' is unreadable" in damaged.stderr and "using the previous one" in damaged.stderr
    assert main(resume) == 0, capsys.readouterr().err

    assert summary_numbers(run) == summary_numbers(straight)
    for phase in ("retrain/p30", "retrain/p50", "baseline"):
        assert_same_weights(load_model(run / phase / "model.pt").state_dict(),
                            load_model(straight / phase / "model.pt").state_dict())
    for ticket in ("p30", "p50"):
        assert_same_weights(checkpoint.load(run / "tickets" / f"{ticket}.pt")["state_dict"],
                            checkpoint.load(straight / "tickets" / f"{ticket}.pt")["state_dict"])


def test_non_finite_loss_stops_naming_epoch_and_step_and_keeps_the_last_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    # epoch 1 trains at lr 0.05; the milestone then multiplies it by 1e12 and the loss overflows
    assert main(["train", *TINY_FLAGS, "--epochs", "3", "--milestones", "1", "--gamma", "1e12", "--no-tensorboard",
                 "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    error = err.strip().splitlines()[-1]
    assert error.startswith("ebtrain: error: dense: the training loss became nan in epoch 2, at step ")
    assert "the checkpoint of epoch 1 is kept" in error and "--lr (this epoch's is 5e+10)" in error
    assert checkpoint.load_checkpoint(run / "checkpoint.pt")["epoch"] == 1


def out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_in_a_training_step_is_one_line_naming_the_batch_size(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "_layout", out_of_memory)  # called inside every training step
    assert main(["train", *TINY_FLAGS, "--epochs", "2", "--no-tensorboard", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "ebtrain: error: dense: out of cpu memory in epoch 1: start again with a smaller --batch-size (now 32), "
        "or a smaller --eval-batch-size (now 1024) if it ran out while evaluating")


def test_out_of_memory_outside_training_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_data", out_of_memory)  # e.g. the data set does not fit on the GPU
    assert main(["train", *TINY_FLAGS, "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == ("ebtrain: error: out of GPU memory (CUDA out of memory. Tried to allocate "
                                       "2.00 GiB): try a smaller --batch-size or --eval-batch-size, a smaller "
                                       "--width, or a --train-subset\n")


def test_ctrl_c_during_a_write_lets_the_write_finish(tmp_path, monkeypatch):
    save = torch.save

    def interrupted_save(obj, f):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C arrives while the checkpoint is being written
        save(obj, f)

    checkpoint.save_checkpoint({"epoch": 1}, tmp_path / "checkpoint.pt")
    monkeypatch.setattr(torch, "save", interrupted_save)
    # Python's own Ctrl-C handler, also when the suite was started in the background with SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            checkpoint.save_checkpoint({"epoch": 2}, tmp_path / "checkpoint.pt")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert checkpoint.load(tmp_path / "checkpoint.pt") == {"epoch": 2}
    assert checkpoint.load(tmp_path / "checkpoint.pt.prev") == {"epoch": 1}


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_damaged_checkpoint_is_named_and_the_previous_one_used(tmp_path, capsys, damage):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_checkpoint({"epoch": 1, "w": torch.arange(10_000.0)}, path)
    checkpoint.save_checkpoint({"epoch": 2, "w": torch.arange(10_000.0) + 1}, path)
    data = bytearray(path.read_bytes())
    if damage == "flip":  # one bit in the middle of the weights: torch.load alone would not notice
        data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data[:len(data) // 2]) if damage == "truncate" else
                     b"not a checkpoint" if damage == "garbage" else bytes(data))
    state = checkpoint.load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.arange(10_000.0))
    err = capsys.readouterr().err
    assert f"checkpoint '{path}' is unreadable (" in err and f"using the previous one, '{path}.prev'" in err
    if damage == "flip":
        assert "fails its CRC-32 check" in err


def test_no_readable_checkpoint_starts_the_phase_over(tmp_path, capsys):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"cut")
    assert checkpoint.load_checkpoint(path) is None
    assert "no readable checkpoint is left, so this phase starts from its beginning" in capsys.readouterr().err


def test_ticket_at_the_last_epoch_is_kept_but_not_retrained(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*TINY_FLAGS, "--epochs", "2", "--ratios", "0.5", "--eps", "0.9", "--queue-length", "2",
                 "--no-tensorboard", "--out", str(run)]) == 0
    assert "the ticket p50 emerged at the schedule's last epoch, so no epoch is left to retrain it" in \
        capsys.readouterr().err
    assert (run / "tickets" / "p50.pt").exists() and json.loads((run / "summary.json").read_text())["tickets"] == {}


def test_yaml_on_and_off_for_a_choice_read_as_the_words(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("data:\n  augment: off\nrun:\n  progress: on\n")  # YAML 1.1 reads these as false / true
    cfg = load_yaml(path)
    assert (cfg.data.augment, cfg.run.progress) == ("off", "on")


def test_binary_config_file_is_named_not_decoded(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(UserError, match=f"config file '{path}' is not UTF-8 text"):
        load_yaml(path)
