"""Run directories: where a run's files go, and the rules for reusing one.

Under torchrun rank 0 alone creates and reads the run directory; the other ranks get the results.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from . import checkpoint, distributed
from .config import Config, apply_overrides, dump_yaml, load_yaml
from .errors import UserError

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
LOTTERY_FILE = "lottery.json"  # a lottery run's summary (ebtrain.lottery)


def default_run_dir(cfg: Config) -> Path:
    """runs/<arch>-<dataset>-<time>."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(cfg.run.runs_dir) / f"{cfg.model.arch}-{cfg.data.dataset}-{stamp}"


def config_for_resume(out: str | Path) -> Config:
    """The saved config of the run in `out`, marked to resume."""
    out = Path(out)
    cfg = distributed.from_main(_saved_config, out)
    cfg.run.resume, cfg.run.out = True, str(out)
    return cfg


def _saved_config(out: Path) -> Config:
    if not (out / CONFIG_FILE).is_file():
        raise UserError(f"nothing to resume in '{out}': it holds no {CONFIG_FILE}")
    return load_yaml(out / CONFIG_FILE)


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
            raise UserError(f"nothing to resume in '{out}': it holds no {CONFIG_FILE}")
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
