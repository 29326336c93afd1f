"""Run directories: every path inside one, and the rules for reusing one (resume, overwrite).

    RUN/config.yaml        the resolved settings            RUN/summary.json   the finished run's results
    RUN/init.pt            the weights at initialization    RUN/tickets/p30.pt  a ticket (tickets.py)
    RUN/rewind5.pt         the weights after epoch 5 (--rewind-epoch 5)
    RUN/search/            the search phase                 RUN/retrain/p30/    a ticket's retrain (EB weights)
    RUN/retrain/p30-reinit/  a retrain from another init    RUN/baseline/       the dense baseline
    (p30-rewind, p30-rewind5, p30-reinit-seed7: see retrain_dir)
A phase folder holds metrics.jsonl, checkpoint.pt, TensorBoard events, and when the phase has finished
result.json (and model.pt for a trained network); the `train` command's run folder is itself one phase.
Under torchrun rank 0 alone creates and reads the run directory; the other ranks get the results.
"""
from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from . import checkpoint, distributed
from .config import Config, apply_overrides, dump_yaml, flag, load_yaml
from .errors import UserError
from .tickets import ratio_name


def _name(ratio: float | str) -> str:
    """A ticket's name: 'p30' for ratio 0.3; a name ('f50') as it is."""
    return ratio if isinstance(ratio, str) else ratio_name(ratio)

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
LOTTERY_FILE = "lottery.json"  # a lottery run's summary (ebtrain.lottery)
INIT_FILE = "init.pt"
# in a phase folder
RESULT_FILE = "result.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.pt"


def search_dir(run_dir: Path) -> Path:
    return run_dir / "search"


def tickets_dir(run_dir: Path) -> Path:
    return run_dir / "tickets"


def ticket_file(run_dir: Path, ratio: float | str) -> Path:
    """RUN/tickets/p30.pt for ratio 0.3, RUN/tickets/f50.pt for the ticket named 'f50' (FLOPs target 0.5)."""
    return tickets_dir(run_dir) / f"{_name(ratio)}.pt"


def drawn_ticket_name(ratio: float | str, epoch: int) -> str:
    """'p30-e10': the ticket of ratio 0.3 drawn at epoch 10 by --draw-epochs (not by the detector)."""
    return f"{_name(ratio)}-e{epoch}"


def drawn_ticket_file(run_dir: Path, ratio: float, epoch: int) -> Path:
    """RUN/tickets/p30-e10.pt."""
    return tickets_dir(run_dir) / f"{drawn_ticket_name(ratio, epoch)}.pt"


def ticket_files(run_dir: Path) -> dict[str, Path]:
    """Every Early-Bird ticket file of a run by name ('p30', 'f50'), in name order (not the pruned models
    `prune` writes there, nor the tickets drawn at fixed epochs)."""
    return {p.stem: p for p in sorted(tickets_dir(run_dir).glob("*.pt"))
            if re.fullmatch(r"[pf][0-9.]+(e-[0-9]+)?", p.stem)}


def pruned_model_file(ticket: str | Path, ratio: float | str) -> Path:
    """Where `ebtrain prune` writes a ticket's pruned network by default: beside it, RUN/tickets/p30-pruned.pt."""
    return Path(ticket).with_name(f"{_name(ratio)}-pruned.pt")


def run_of_ticket(ticket: str | Path) -> Path:
    """The run folder a ticket file was written into (RUN for RUN/tickets/p30.pt)."""
    return Path(ticket).parent.parent


def rewind_file(run_dir: Path, epoch: int) -> Path:
    """The dense weights the search saved after epoch `epoch` for --init rewind: RUN/rewind5.pt for 5,
    and for 0 the initialization, RUN/init.pt."""
    return run_dir / (INIT_FILE if epoch == 0 else f"rewind{epoch}.pt")


def retrain_dir(run_dir: Path, ratio: float | str, init: str = "eb", rewind_epoch: int = 0, reinit_seed: int = -1,
                drawn_at: int | None = None) -> Path:
    """RUN/retrain/p30 for a ticket retrained from its EB weights (a ratio, or a ticket's name: RUN/retrain/f50),
    RUN/retrain/p30-reinit for init 'reinit' (p30-reinit-seed7 with --reinit-seed 7), p30-rewind for 'rewind'
    to the initialization (p30-rewind5 to epoch 5): a folder per setting the result depends on, so one
    retrain never stands in for another. A ticket drawn at a fixed epoch (--draw-epochs) is named by it:
    p30-e10, p30-e10-reinit, ..."""
    name = _name(ratio) if drawn_at is None else drawn_ticket_name(ratio, drawn_at)
    if init != "eb":
        name += f"-{init}"
    if init == "rewind" and rewind_epoch:
        name += str(rewind_epoch)
    if init == "reinit" and reinit_seed >= 0:
        name += f"-seed{reinit_seed}"
    return run_dir / "retrain" / name


def retrain_dirs(run_dir: Path) -> list[Path]:
    """Every retrain folder of a run, in name order."""
    return sorted(p for p in (run_dir / "retrain").glob("*") if p.is_dir())


def baseline_dir(run_dir: Path) -> Path:
    return run_dir / "baseline"


def distance_figure(run_dir: Path, ratio: float | str) -> Path:
    return search_dir(run_dir) / f"distance_{_name(ratio)}.png"


def kept_channels_figure(run_dir: Path) -> Path:
    return search_dir(run_dir) / "kept_channels.png"


def drawing_epochs_figure(run_dir: Path) -> Path:
    """Retrained accuracy against the epoch each ticket was drawn at (--draw-epochs)."""
    return run_dir / "draw_epochs.png"


def phases(run_dir: Path) -> list[tuple[str, Path]]:
    """(label, folder) of every training phase of a run that wrote metrics: a `train` run is one dense
    phase in the run folder itself; an EB-Train run has search/, retrain/*/ and baseline/."""
    candidates = [("dense", run_dir), ("search", search_dir(run_dir)),
                  *((f"retrain {d.name}", d) for d in retrain_dirs(run_dir)), ("dense", baseline_dir(run_dir))]
    return [(label, folder) for label, folder in candidates if (folder / METRICS_FILE).is_file()]


def finished(phase_dir: Path) -> dict | None:
    """The phase's result if it has finished, else None (read on rank 0 under torchrun, handed to every rank)."""
    path = phase_dir / RESULT_FILE
    return distributed.from_main(lambda: checkpoint.load_json(path) if path.exists() else None)


def default_run_dir(cfg: Config) -> Path:
    """runs/<arch>-<dataset>-<time>."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(cfg.run.runs_dir) / f"{cfg.model.arch}-{cfg.data.dataset}-{stamp}"


# ---- reusing a run folder ----------------------------------------------------------------------
# What a resumed run may change: where it runs and how it reports, nothing its results depend on.
RESUME_MAY_SET = {"run.out", "run.resume", "run.progress", "run.tensorboard", "train.device", "train.eval_batch_size"}


def config_to_resume(overrides: dict[str, dict], config_file: str | None = None) -> Config:
    """The saved config of the run in overrides' run.out, with the `overrides` that RESUME_MAY_SET; any other
    setting (or a `config_file`) is refused, naming its flag."""
    out = overrides.get("run", {}).get("out")
    if not out:
        raise UserError("--resume needs --out RUN_DIR: the run to continue")
    saved = config_for_resume(out)  # a folder with no run to continue is named first, whatever else is wrong
    given = [f"{section}.{name}" for section, values in overrides.items() for name in values]
    refused = (["--config"] if config_file else []) + [flag(key.split(".")[1]) for key in given
                                                       if key not in RESUME_MAY_SET]
    if refused:
        raise UserError(f"--resume continues '{out}' with the settings it started with ({Path(out) / CONFIG_FILE}): "
                        f"drop {', '.join(refused)}, or start a new run (--overwrite replaces this one)")
    return apply_overrides(saved, overrides)  # only settings of RESUME_MAY_SET are left


def config_for_resume(out: str | Path) -> Config:
    """The saved config of the run in `out`, marked to resume."""
    out = Path(out)
    cfg = saved_config(out)
    if cfg is None:
        raise _nothing_to_resume(out)
    cfg.run.resume, cfg.run.out = True, str(out)
    return cfg


def _nothing_to_resume(out: Path) -> UserError:
    return UserError(f"nothing to resume in '{out}': it holds no {CONFIG_FILE}; start the run without --resume")


def saved_config(run_dir: Path) -> Config | None:
    """The config a run folder was made with, None if it holds none (read on rank 0, handed to every rank)."""
    path = run_dir / CONFIG_FILE
    return distributed.from_main(lambda: load_yaml(path) if path.is_file() else None)


def prepare_run_dir(cfg: Config) -> Path:
    """Create (or reopen, with --resume) the run directory and write the resolved config into it.

    A directory that already holds a run is refused unless --resume (continue it) or --overwrite
    (delete it and start over) is given. Under torchrun rank 0 does this and every rank gets the path.
    """
    return distributed.from_main(_prepare_run_dir, cfg)


def _prepare_run_dir(cfg: Config) -> Path:
    out = Path(cfg.run.out) if cfg.run.out else default_run_dir(cfg)
    holds_run = (out / CONFIG_FILE).exists()
    if cfg.run.resume:
        if not holds_run:
            raise _nothing_to_resume(out)
        return out
    if holds_run:
        if not cfg.run.overwrite:
            state = "a finished run" if (out / SUMMARY_FILE).exists() else "an unfinished run"
            raise UserError(f"'{out}' already holds {state}: pass --resume to continue it, --overwrite to "
                            "replace it, or choose another --out")
        shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()) and not cfg.run.overwrite:
        raise UserError(f"'{out}' exists and is not empty: choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    saved = apply_overrides(cfg, {"run": {"out": str(out), "resume": False, "overwrite": False}})
    checkpoint.atomic_write_text(dump_yaml(saved), out / CONFIG_FILE)
    return out
