import json

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ebtrain import checkpoint
from ebtrain.models import count_params, load_model
from ebtrain.pipeline import eb_train
from ebtrain.rundir import prepare_run_dir

from conftest import tiny_config


def test_eb_train_end_to_end_outputs_agree(tmp_path):
    # eps 0.9 with a queue of 2 makes every ticket emerge at epoch 2: d(0,1) and d(1,2) are below 0.9
    cfg = tiny_config(tmp_path, search={"ratios": [0.3, 0.5], "eps": 0.9, "queue_length": 2, "baseline": True},
                      train={"epochs": 5})
    run = prepare_run_dir(cfg)
    summary = eb_train(cfg, run)

    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    # CPU results depend on the thread count, so the summary says it
    assert summary["device"] == "cpu" and summary["threads"] == torch.get_num_threads()
    assert summary["search"]["epochs_trained"] == 2 and summary["search"]["pending"] == []
    assert set(summary["tickets"]) == {"p30", "p50"}
    for name, ratio in (("p30", 0.3), ("p50", 0.5)):
        ticket = checkpoint.load(run / "tickets" / f"{name}.pt")
        row = summary["tickets"][name]
        assert ticket["ratio"] == ratio and ticket["epoch"] == row["eb_epoch"] == 2
        total = sum(ticket["dense_channels"])
        assert sum(ticket["kept_channels"]) == row["channels_kept"] == total - int(ratio * total)
        assert [int(k.sum()) for k in ticket["keep"]] == ticket["kept_channels"]
        # the retrained pruned network on disk has exactly the ticket's channels and parameter count
        model = load_model(run / "retrain" / name / "model.pt")
        assert [bn.num_features for _, bn in model.prunable_bns()] == ticket["kept_channels"]
        assert count_params(model) == row["params_pruned"] < row["params_dense"]
        # the retrain continued the schedule: epochs 3..5
        assert (row["first_epoch"], row["last_epoch"], row["epochs_trained"]) == (3, 5, 3)
        assert (run / "search" / f"distance_{name}.png").stat().st_size > 1000
    assert summary["baseline"]["epochs_trained"] == 5
    assert (run / "search" / "kept_channels.png").exists()

    events = EventAccumulator(str(run / "search"))
    events.Reload()
    assert {"eb/p30/distance", "eb/p30/queue_max", "eb/p50/distance"} <= set(events.Tags()["scalars"])
    assert "eb/p30/distance_matrix" in events.Tags()["images"]
