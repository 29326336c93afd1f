"""The search phase (search.py): no ticket within the epochs, a killed search resumed, min_keep."""
import torch

from ebtrain import checkpoint
from ebtrain.pipeline import eb_train
from ebtrain.rundir import prepare_run_dir

from conftest import tiny_config


def test_no_ticket_within_max_search_epochs_is_reported(tmp_path, capsys):
    cfg = tiny_config(tmp_path, search={"ratios": [0.5], "eps": 1e-6, "max_search_epochs": 3})
    run = prepare_run_dir(cfg)
    summary = eb_train(cfg, run)
    assert summary["search"]["epochs_trained"] == 3
    assert summary["search"]["pending"] == [0.5] and summary["tickets"] == {}
    assert "No Early-Bird ticket emerged within 3 epochs for p = 0.5" in capsys.readouterr().err


def test_killed_search_resumes_to_the_same_ticket(tmp_path):
    search = {"ratios": [0.5], "eps": 0.9, "queue_length": 3, "retrain": False}
    straight_cfg = tiny_config(tmp_path / "a", search=search)
    straight = eb_train(straight_cfg, prepare_run_dir(straight_cfg))

    killed_cfg = tiny_config(tmp_path / "b", search={**search, "max_search_epochs": 2})
    run = prepare_run_dir(killed_cfg)
    eb_train(killed_cfg, run)
    # pretend the process died after epoch 2's checkpoint: drop the phase's finish marks and resume
    (run / "search" / "result.json").unlink()
    (run / "summary.json").unlink()
    resumed_cfg = tiny_config(tmp_path / "b", search=search, run={"resume": True})
    resumed = eb_train(resumed_cfg, run)
    assert resumed["search"]["detector"] == straight["search"]["detector"]
    a = checkpoint.load(tmp_path / "a" / "run" / "tickets" / "p50.pt")
    b = checkpoint.load(run / "tickets" / "p50.pt")
    assert a["epoch"] == b["epoch"]
    assert all(torch.equal(x, y) for x, y in zip(a["keep"], b["keep"]))
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_search_min_keep_reaches_the_ticket(tmp_path):
    cfg = tiny_config(tmp_path, search={"ratios": [0.9], "eps": 0.9, "queue_length": 2, "retrain": False,
                                        "min_keep": 0.5})
    summary = eb_train(cfg, prepare_run_dir(cfg))
    assert summary["search"]["detector"]["min_keep"] == 0.5
    ticket = checkpoint.load(tmp_path / "run" / "tickets" / "p90.pt")
    kept = [int(k.sum()) for k in ticket["keep"]]
    # a 0.9 global ranking keeps a tenth of the channels; the floor keeps half of every layer
    assert all(k >= (len(layer) + 1) // 2 for k, layer in zip(kept, ticket["keep"]))
