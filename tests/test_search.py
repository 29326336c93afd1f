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


def test_tickets_drawn_at_fixed_epochs_are_retrained_and_plotted(tmp_path, capsys):
    from ebtrain.cli import main
    from ebtrain.earlybird import channel_scores, draw_mask
    from ebtrain.tickets import dense_from_ticket

    # the detector's ticket emerges at epoch 2 (eps 0.9, queue 2); the search goes on to draw at epoch 3
    cfg = tiny_config(tmp_path, train={"epochs": 5},
                      search={"ratios": [0.5], "eps": 0.9, "queue_length": 2, "draw_epochs": [1, 3], "baseline": True})
    run = prepare_run_dir(cfg)
    summary = eb_train(cfg, run)
    assert summary["search"]["epochs_trained"] == 3 and summary["tickets"]["p50"]["eb_epoch"] == 2
    for epoch in (1, 3):
        ticket = checkpoint.load(run / "tickets" / f"p50-e{epoch}.pt")
        assert ticket["epoch"] == epoch and ticket["drawn"]
        # the mask the detector's rule draws from the weights of that epoch, saved with them
        mask = draw_mask(channel_scores(dense_from_ticket(ticket)), 0.5).per_layer()
        assert all(torch.equal(a, b) for a, b in zip(mask, ticket["keep"]))
        retrained = summary["tickets"][f"p50-e{epoch}"]
        assert retrained["drawn"] and retrained["first_epoch"] == epoch + 1 and retrained["last_epoch"] == 5
        assert (run / "retrain" / f"p50-e{epoch}" / "result.json").is_file()
    assert not summary["tickets"]["p50"]["drawn"] and (run / "draw_epochs.png").stat().st_size > 0
    # report: a row per drawn ticket, and the figure of two runs side by side
    assert main(["report", str(run), "--format", "json", "--draw-plot", str(tmp_path / "draw.png")]) == 0
    import json
    rows = json.loads(capsys.readouterr().out)
    assert [(r["method"], r["eb_epoch"]) for r in rows] == [
        ("dense", None), ("EB-Train", 2), ("EB-Train (drawn)", 1), ("EB-Train (drawn)", 3)]
    assert (tmp_path / "draw.png").stat().st_size > 0


def test_draw_epochs_must_leave_epochs_to_retrain(tmp_path, capsys):
    from ebtrain.cli import main
    from conftest import TINY_FLAGS
    assert main(["search", *TINY_FLAGS, "--epochs", "4", "--draw-epochs", "2", "4", "--out", str(tmp_path / "r")]) == 2
    assert "--draw-epochs 2 4: each must be a whole epoch from 1 to 3" in capsys.readouterr().err
