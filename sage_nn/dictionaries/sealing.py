"""The on-disk cache of trained SAEs: each SAE directory sealed with its files' SHA-256
(a reader tells a complete SAE from a truncated one), and a lock two processes take turns
on."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path

__all__ = ["SEAL", "cache_lock", "seal", "sealed_problem"]

SEAL = "sha256.json"


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def seal(directory: str | Path) -> None:
    """Flush an SAE directory's files to disk and record their SHA-256 in ``sha256.json``,
    so a reader tells a complete SAE from a truncated or corrupted one."""
    directory = Path(directory)
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != SEAL)
    for path in files:
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
    digests = {p.name: _digest(p) for p in files}
    with open(directory / SEAL, "w") as f:
        json.dump(digests, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def sealed_problem(directory: str | Path) -> str | None:
    """What is wrong with a sealed SAE directory (``None``: intact). A directory without a
    seal (written before seals existed, or by hand) is left to the loader to judge."""
    directory = Path(directory)
    try:
        digests = json.loads((directory / SEAL).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return f"its {SEAL} is corrupt"
    for name, digest in digests.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if _digest(path) != digest:
            return f"{name} is truncated or corrupt (SHA-256 differs from its seal)"
    return None


@contextlib.contextmanager
def cache_lock(path: str | Path):
    """Hold an exclusive lock on ``path`` (a ``.lock`` file beside it) for the ``with``
    block: two processes that need the same cached SAEs take turns, and the second reads
    what the first wrote. The operating system drops the lock when a process dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
