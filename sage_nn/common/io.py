"""Files a run writes: atomic writes (a crash leaves the old file or none, never half of
one), netCDF, SHA-256 digests, and plain JSON of numpy-laden values."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # xarray loads where a Dataset is read or written (not for --help)
    import xarray as xr


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write to a temporary name in the same directory, flush it to disk, then rename:
    a crash or a full disk leaves the old file or none, never half a file."""
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_netcdf(ds: xr.Dataset, path: Path) -> None:
    """Write atomically, so an interrupted write never looks like a finished stage."""
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        ds.to_netcdf(tmp, engine="h5netcdf")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_dir(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(directory)`` into a side directory that replaces ``path`` once complete."""
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        write(partial)
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(partial, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def read_netcdf(path: Path) -> xr.Dataset:
    import xarray as xr

    with xr.open_dataset(path, engine="h5netcdf") as ds:
        return ds.load()


def jsonable(value: Any) -> Any:
    """Plain JSON: numpy scalars and arrays to Python, NaN/inf to null, dataclasses to
    dicts, anything else exotic to str."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "__dataclass_fields__"):
        from dataclasses import asdict
        return jsonable(asdict(value))
    return str(value)
