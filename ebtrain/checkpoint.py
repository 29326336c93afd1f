"""Crash-safe files: everything a run writes goes to a temporary name first and is renamed into place,
so a run killed at any moment leaves either the old file or the new one, never half of one; and every
file is checked whole when it is read back, so a damaged one is reported instead of trusted."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import zipfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import torch

from .errors import UserError


class UnreadableFile(Exception):
    """A file that `load` cannot trust: cut short, damaged, or not written by `atomic_save`."""


def _replace(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)  # atomic on POSIX and Windows when both live on one filesystem


@contextlib.contextmanager
def finishing_before_interrupt() -> Iterator[None]:
    """Ctrl-C inside the block takes effect when the block ends, so the file being written is finished
    (a kill still leaves the old file, thanks to the rename). Only the main thread receives signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
        if received:
            signal.raise_signal(signal.SIGINT)  # now, to the handler that was in place: KeyboardInterrupt


def _write_then_rename(path: str | Path, mode: str, write: Callable[[IO], Any]) -> None:
    """`write` the file to a temporary name beside `path`, then rename it into place. The temporary name
    is this process's own, so two processes writing one file (two runs filling one data cache) each
    rename a whole file of their own, and the last one wins."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with finishing_before_interrupt():
        try:
            with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            _replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)  # left only when writing or renaming failed


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save `obj` to `path` atomically."""
    _write_then_rename(path, "wb", lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write `text` to `path` atomically."""
    _write_then_rename(path, "w", lambda f: f.write(text))


def atomic_write_json(obj: Any, path: str | Path) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", path)


def save_checkpoint(obj: Any, path: str | Path) -> None:
    """Save a training checkpoint atomically, keeping the one before it as `<name>.prev`.

    If the newest file turns out unreadable (a disk that lied about fsync, a copy cut short), the
    previous epoch's checkpoint is still there for `load_checkpoint` to fall back on.
    """
    path = Path(path)
    with finishing_before_interrupt():
        if path.exists():
            os.replace(path, _previous(path))
        atomic_save(obj, path)


def load_checkpoint(path: str | Path) -> Any | None:
    """The newest readable checkpoint at `path` (or its `.prev`); None when there is none.

    A truncated or damaged file is reported on stderr, naming what is wrong with it, and the previous
    one is used; when neither is readable the phase starts from its beginning.
    """
    path = Path(path)
    candidates = [c for c in (path, _previous(path)) if c.exists()]
    for i, candidate in enumerate(candidates):
        try:
            return load(candidate)
        except UnreadableFile as e:
            fallback = (f"using the previous one, '{candidates[i + 1]}'" if i + 1 < len(candidates)
                        else "no readable checkpoint is left, so this phase starts from its beginning")
            print(f"ebtrain: checkpoint '{candidate}' is unreadable ({e}); {fallback}", file=sys.stderr, flush=True)
    return None


def _previous(path: Path) -> Path:
    return path.with_name(path.name + ".prev")


def load(path: str | Path, map_location: str | torch.device = "cpu", weights_only: bool = False) -> Any:
    """Load a file written by `atomic_save`, after checking that it is whole.

    torch.save writes a zip archive with a CRC-32 of every record, but torch.load does not check them:
    a flipped byte in the weights would load silently. Raises FileNotFoundError for a missing file and
    UnreadableFile, saying what is wrong, for a truncated, damaged or foreign one.
    """
    _check_whole(Path(path))
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as e:  # torch raises many types for files it cannot unpickle
        reason = str(e).splitlines()[0] if str(e) else "cannot load it"
        raise UnreadableFile(f"{type(e).__name__}: {reason}") from None


def _check_whole(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # reads every record and compares its CRC-32
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise UnreadableFile(f"not a whole file written by torch.save: {e}") from None
    if damaged is not None:
        raise UnreadableFile(f"damaged: record '{damaged}' fails its CRC-32 check")


def load_json(path: str | Path) -> Any:
    """Read a JSON file written by `atomic_write_json`; a damaged one raises UserError naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"'{path}' is damaged ({e}): delete it and resume the run (--resume) to write it "
                        "again") from None
