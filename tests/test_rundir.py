"""rundir.py: the names inside a run folder stay those old runs were written with, and the resume policy."""
from pathlib import Path

import pytest

from ebtrain import rundir
from ebtrain.errors import UserError

from conftest import tiny_config


def test_paths_are_the_run_folder_layout():
    run = Path("runs/r")
    assert rundir.ticket_file(run, 0.3) == run / "tickets" / "p30.pt"
    assert rundir.run_of_ticket(run / "tickets" / "p30.pt") == run
    assert rundir.retrain_dir(run, 0.3) == run / "retrain" / "p30"
    assert rundir.retrain_dir(run, 0.5, "reinit") == run / "retrain" / "p50-reinit"
    assert (rundir.search_dir(run), rundir.baseline_dir(run)) == (run / "search", run / "baseline")
    assert rundir.distance_figure(run, 0.7) == run / "search" / "distance_p70.png"
    assert rundir.pruned_model_file(run / "tickets" / "p30.pt", 0.3) == run / "tickets" / "p30-pruned.pt"
    assert (rundir.CONFIG_FILE, rundir.SUMMARY_FILE, rundir.INIT_FILE, rundir.RESULT_FILE, rundir.METRICS_FILE,
            rundir.CHECKPOINT_FILE, rundir.MODEL_FILE) == ("config.yaml", "summary.json", "init.pt", "result.json",
                                                           "metrics.jsonl", "checkpoint.pt", "model.pt")


def test_ticket_files_and_phases_found_on_disk(tmp_path):
    for path in ("tickets/p30.pt", "tickets/p12.5.pt", "tickets/p30-pruned.pt", "search/metrics.jsonl",
                 "retrain/p30/metrics.jsonl", "retrain/p30-reinit/metrics.jsonl", "retrain/p50/result.json"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("")
    assert list(rundir.ticket_files(tmp_path)) == ["p12.5", "p30"]  # not the pruned model beside them
    assert rundir.phases(tmp_path) == [("search", tmp_path / "search"), ("retrain p30", tmp_path / "retrain" / "p30"),
                                       ("retrain p30-reinit", tmp_path / "retrain" / "p30-reinit")]
    assert rundir.finished(tmp_path / "search") is None


def test_resume_may_change_only_where_and_how_a_run_reports(tmp_path):
    cfg = tiny_config(tmp_path)
    run = rundir.prepare_run_dir(cfg)
    resumed = rundir.config_to_resume({"run": {"out": str(run), "resume": True}, "train": {"device": "cpu"}})
    assert resumed.run.resume and resumed.train.epochs == cfg.train.epochs
    with pytest.raises(UserError, match="drop --config, --epochs"):
        rundir.config_to_resume({"run": {"out": str(run), "resume": True}, "train": {"epochs": 9}}, "other.yaml")
    with pytest.raises(UserError, match="--resume needs --out"):
        rundir.config_to_resume({"run": {"resume": True}})
    with pytest.raises(UserError, match="nothing to resume"):
        rundir.config_for_resume(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="nothing to resume in .*start the run without --resume"):  # not "drop --epochs"
        rundir.config_to_resume({"run": {"out": str(tmp_path / "elsewhere"), "resume": True}, "train": {"epochs": 9}})
