"""Run by test_distributed.py under torchrun: ebtrain's own functions in every rank, then the ranks compare.

    python -m torch.distributed.run --nproc_per_node=2 --standalone tests/distributed_worker.py OUT FLAG...

Runs, with the settings FLAG... (command-line flags of `ebtrain search`):
- OUT/main: the main job (search, then retrain of every ticket), as `ebtrain search` runs it;
- OUT/resumed: the same search stopped after two epochs and resumed from its checkpoint (its finish
  marks removed, as if the process had died), to compare its tickets with the main job's.
Every phase's Trainer is kept (a spy on Trainer.fit); afterwards the ranks all_gather each trainer's
final weights and buffers, hook states (the Early-Bird detector's masks), metrics and data shard, and
rank 0 writes OUT/report.json: per phase, whether every rank ended with the same of each.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ebtrain import distributed
from ebtrain.cli import build_parser, resolve_config
from ebtrain.config import apply_overrides
from ebtrain.pipeline import eb_train
from ebtrain.rundir import RESULT_FILE, SUMMARY_FILE, prepare_run_dir
from ebtrain.train import Trainer

trainers: list[Trainer] = []
_fit = Trainer.fit


def _spy_fit(self: Trainer) -> dict:
    trainers.append(self)
    return _fit(self)


Trainer.fit = _spy_fit


def config(flags: list[str], out: Path, **sections):
    cfg = resolve_config(build_parser().parse_args(["search", *flags]))
    return apply_overrides(cfg, {"run": {"out": str(out)}, **sections})


def gathered(obj) -> list:
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, obj)
    return everyone


def same(values: list) -> bool:
    first = values[0]
    if isinstance(first, dict):
        return all(v.keys() == first.keys() and all(same([v[k], first[k]]) for k in first) for v in values)
    if isinstance(first, (list, tuple)):
        return all(len(v) == len(first) and all(same([a, b]) for a, b in zip(v, first)) for v in values)
    if isinstance(first, torch.Tensor):
        return all(torch.equal(v, first) for v in values)
    return all(v == first for v in values)


def final_state(trainer: Trainer) -> dict:
    return {"weights": {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()},
            "hooks": [hook.state_dict() for hook in trainer.hooks],
            # seconds are each rank's own clock; everything else in the metrics is global
            "history": [{k: v for k, v in m.items() if k != "seconds"} for m in trainer.history]}


def main() -> None:
    out, flags = Path(sys.argv[1]), sys.argv[2:]
    distributed.setup()
    main_cfg = config(flags, out / "main")
    eb_train(main_cfg, prepare_run_dir(main_cfg))

    search_only = {"retrain": False}
    cut_short = config(flags, out / "resumed", search={**search_only, "max_search_epochs": 2})
    run = prepare_run_dir(cut_short)
    eb_train(cut_short, run)
    if distributed.is_main():  # as if the process had died after epoch 2's checkpoint
        (run / "search" / RESULT_FILE).unlink()
        (run / SUMMARY_FILE).unlink()
    distributed.barrier()
    eb_train(config(flags, out / "resumed", search=search_only, run={"resume": True}), run)

    report = []
    for trainer in trainers:
        states = gathered(final_state(trainer))
        shards = gathered((trainer.train_loader.rank, trainer.train_loader.world_size))
        report.append({"phase": str(trainer.out_dir.relative_to(out)), "epochs": trainer.epoch,
                       "weights_agree": same([s["weights"] for s in states]),
                       "hooks_agree": same([s["hooks"] for s in states]),
                       "metrics_agree": same([s["history"] for s in states]), "shards": shards})
    if distributed.is_main():
        (out / "report.json").write_text(json.dumps(report, indent=1))
    distributed.teardown()
    distributed.end_process(0)  # as ebtrain's own entry point ends a process that was in a group


if __name__ == "__main__":
    main()
