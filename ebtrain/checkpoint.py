"""Crash-safe files: everything a run writes goes to a temporary name first and is renamed into place,
so a run killed at any moment leaves either the old file or the new one, never half of one."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch


def _replace(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)  # atomic on POSIX and Windows when both live on one filesystem


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save `obj` to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    _replace(tmp, path)


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write `text` to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    _replace(tmp, path)


def atomic_write_json(obj: Any, path: str | Path) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", path)


def save_checkpoint(obj: Any, path: str | Path) -> None:
    """Save a training checkpoint atomically, keeping the one before it as `<name>.prev`.

    If the newest file turns out unreadable (a disk that lied about fsync, a copy cut short), the
    previous epoch's checkpoint is still there for `load_checkpoint` to fall back on.
    """
    path = Path(path)
    if path.exists():
        os.replace(path, _previous(path))
    atomic_save(obj, path)


def load_checkpoint(path: str | Path) -> Any | None:
    """The newest readable checkpoint at `path` (or its `.prev`); None when there is none.

    A corrupt or truncated newest file is reported on stderr and the previous one is used.
    """
    path = Path(path)
    for candidate in (path, _previous(path)):
        if not candidate.exists():
            continue
        try:
            return load(candidate)
        except Exception as e:  # torch raises several types for truncated or foreign files
            print(f"ebtrain: checkpoint '{candidate}' is unreadable ({type(e).__name__}); "
                  "trying the previous one", file=sys.stderr, flush=True)
    return None


def _previous(path: Path) -> Path:
    return path.with_name(path.name + ".prev")


def load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load a file written by `atomic_save`."""
    return torch.load(path, map_location=map_location, weights_only=False)


def load_json(path: str | Path) -> Any:
    """Read a JSON file written by `atomic_write_json`."""
    return json.loads(Path(path).read_text())
