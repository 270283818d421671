"""Batched prompts, and the labeled activation store.

:func:`collect` runs prompts through the model, one trace per batch, and returns an
``xarray.Dataset`` with one variable per site kind::

    resid_pre (prompt, position, layer, d_model)
    z         (prompt, position, layer, head, d_head)

Task attributes ride along as coordinates on ``prompt``, so
``ds.z.sel(layer=9, head=3, position="END").groupby("io")`` reads as it says.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

# sae_lens before any trace runs (why: sage_nn/saes.py, top): collect may trace a model
# that sage_nn did not build
import sae_lens  # noqa: F401
import torch
import xarray as xr
from tqdm.auto import tqdm

from .remote import run_kernel
from .sites import HEAD_KINDS, KINDS, Site, adapter, channels, site_tensor, stop_after_reads

STORE_FORMAT = "sage_nn.activations/1"


class StoreError(ValueError):
    """A store file that cannot be used: truncated, corrupt, or from another model."""


class NonFiniteActivationError(ValueError):
    pass


# -- batches --------------------------------------------------------------------------

@dataclass
class Batch:
    """A left-padded batch: model inputs, and where each prompt's tokens start."""

    inputs: dict[str, torch.Tensor]
    offsets: torch.Tensor  # [batch] index of each prompt's first token in the padded row
    lengths: torch.Tensor  # [batch] number of real tokens

    def index(self, positions: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Padded token index of a per-prompt token index (negative counts from the end)."""
        return token_index(self.offsets, self.lengths, positions)

    def plain(self) -> dict:
        """The batch as plain data, for a request (a server gets no class of sage_nn's)."""
        return {"inputs": self.inputs, "offsets": self.offsets, "lengths": self.lengths}


def token_index(offsets: torch.Tensor, lengths: torch.Tensor, positions) -> torch.Tensor:
    """Padded token index of a per-prompt token index (negative counts from the end), in a
    left-padded batch whose prompts start at ``offsets`` and have ``lengths`` tokens."""
    pos = torch.as_tensor(np.asarray(positions), dtype=torch.long)
    pos = torch.where(pos < 0, pos + lengths, pos)
    if bool(((pos < 0) | (pos >= lengths)).any()):
        raise IndexError(f"position out of range of the prompt: {pos.tolist()} vs lengths "
                         f"{lengths.tolist()}")
    return offsets + pos


def encode(model: Any, prompts: Sequence[str], device: Any = None) -> Batch:
    """Tokenize ``prompts`` left-padded, with position ids that ignore the padding."""
    tok = model.tokenizer
    enc = tok(list(prompts), return_tensors="pt", padding=True)
    mask = enc["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    lengths = mask.sum(-1)
    inputs = {"input_ids": enc["input_ids"], "attention_mask": mask, "position_ids": position_ids}
    if device is not None:
        inputs = {k: v.to(device) for k, v in inputs.items()}
    return Batch(inputs, mask.shape[1] - lengths, lengths)


def batches(n: int, batch_size: int, progress: bool | str = False):
    """Index ranges covering ``range(n)`` in batches, with an optional progress bar."""
    starts = range(0, n, batch_size)
    if progress:
        desc = progress if isinstance(progress, str) else None
        starts = tqdm(starts, desc=desc, total=len(starts), leave=False,
                      disable=len(starts) < 2)
    for start in starts:
        yield np.arange(start, min(start + batch_size, n))


def model_device(model: Any) -> torch.device:
    """Where inputs go: the weights' device (the CPU for a remote model's meta weights)."""
    device = next(model._module.parameters()).device
    return torch.device("cpu") if device.type == "meta" else device


# -- collection -----------------------------------------------------------------------

def _as_prompt_set(data: Any, positions: Any, coords: Any):
    """Accept a list of prompts, or a task dataset (prompts, positions, attributes)."""
    if hasattr(data, "prompts"):
        positions = data.positions if positions is None else positions
        coords = data.attributes if coords is None else coords
        data = data.prompts
    prompts = [data] if isinstance(data, str) else list(data)
    if not prompts:
        raise ValueError("no prompts to collect")
    if coords is not None:
        coords = pd.DataFrame(coords).reset_index(drop=True)
        if len(coords) != len(prompts):
            raise ValueError(f"{len(coords)} rows of attributes for {len(prompts)} prompts")
    if positions is not None:
        if isinstance(positions, Mapping):
            positions = {str(k): np.broadcast_to(np.asarray(v, dtype=int), (len(prompts),))
                         for k, v in positions.items()}
        else:  # a list of token indices shared by all prompts, e.g. [-1]
            positions = {str(p): np.full(len(prompts), int(p)) for p in positions}
    return prompts, positions, coords


@dataclass
class _Grid:
    """What one collection reads: every kind at the union of the requested layers/heads.

    Kinds share the ``layer`` coordinate so the Dataset aligns without NaN padding; the
    extra layers cost nothing, they come from the same forward pass.
    """

    kinds: list[str]
    layers: list[int]
    heads: dict[str, list[int]]  # per head kind


def _grid(model: Any, sites: Sequence[Site | str]) -> _Grid:
    ad = adapter(model)
    sites = [ad.check(s) for s in sites]
    if not sites:
        raise ValueError("no sites to collect")
    kinds = sorted({s.kind for s in sites}, key=KINDS.index)
    heads: dict[str, set] = {}
    for s in sites:
        if s.head is not None:
            heads.setdefault(ad.head_dim(s.kind), set()).add(s.head)
    return _Grid(kinds, sorted({s.layer for s in sites}),
                 {k: sorted(heads[ad.head_dim(k)]) for k in kinds if k in HEAD_KINDS})


def _run_batch(model, arch: dict, inputs: dict, grid: dict, rows_positions) -> dict:
    """One trace reads every (layer, kind) of the grid (:class:`_Grid`'s fields as a dict),
    in execution order (a remote kernel)."""
    saved = {}
    with torch.no_grad(), model.trace(inputs, use_cache=False, logits_to_keep=1) as tracer:
        for layer in grid["layers"]:
            for kind in grid["kinds"]:
                t = site_tensor(model, arch, layer, kind)
                if kind in HEAD_KINDS:
                    t = t[..., channels(arch, kind, grid["heads"][kind])]
                if rows_positions is not None:
                    rows, cols = rows_positions
                    t = t[rows, cols]  # [batch, n_positions, channels]
                saved[(layer, kind)] = t.save()
        stop_after_reads(model, tracer)
    return saved


def collect(
    model: Any,
    prompts: Any,
    sites: Sequence[Site | str],
    *,
    positions: Mapping[str, Sequence[int]] | Sequence[int] | None = None,
    coords: Any = None,
    batch_size: int = 32,
    store: str | Path | None = None,
    progress: bool = True,
    remote: Any = None,
) -> xr.Dataset:
    """Collect activations at ``sites`` for ``prompts``, one trace per batch.

    ``prompts`` is a list of strings or a task dataset (its positions and attributes are
    used). ``positions`` maps names to per-prompt token indices (negative counts from the
    end), or lists shared indices like ``[-1]``; ``None`` keeps every token, with NaN past
    a prompt's end. ``coords`` (a table, one row per prompt) becomes prompt coordinates.
    ``store`` (``.zarr`` or ``.nc``) writes to disk and returns the lazily reopened store;
    zarr is written batch by batch so it may exceed memory. ``remote`` runs the traces
    elsewhere (see :mod:`sage_nn.remote`): full activations are then downloaded.
    """
    prompts, positions, coords = _as_prompt_set(prompts, positions, coords)
    ad = adapter(model)
    grid = _grid(model, sites)
    store = Path(store) if store is not None else None
    if store is not None and store.suffix not in (".zarr", ".nc"):
        raise ValueError(f"store {store}: use a .zarr directory or a .nc file")
    device = model_device(model)
    lengths = [len(ids) for ids in model.tokenizer(prompts)["input_ids"]]
    max_len = max(lengths)
    parts, written, prepared = [], False, []

    def chunks():
        for idx in batches(len(prompts), batch_size, progress and "collect"):
            batch = encode(model, [prompts[i] for i in idx], device)
            rows_positions = None
            if positions is not None:
                cols = torch.stack([batch.index(p[idx]) for p in positions.values()], 1)
                rows_positions = (torch.arange(len(idx))[:, None], cols.to(device))
            prepared.append((idx, batch))
            yield batch.inputs, vars(grid), rows_positions

    for saved in run_kernel(model, _run_batch, chunks(), remote, stage="collect"):
        idx, batch = prepared.pop(0)
        part = _to_dataset(ad, grid, saved, batch, idx, positions, max_len)
        _check_finite(part, batch)
        if store is not None and store.suffix == ".zarr":
            part.to_zarr(store, mode="w" if not written else None,
                         append_dim="prompt" if written else None, consolidated=False)
            written = True
        else:
            parts.append(part)
    ds = xr.concat(parts, "prompt") if parts else None
    attrs = {
        "format": STORE_FORMAT,
        "model": str(model.config._name_or_path),
        "architecture": ad.arch.name,
        "dtype": str(next(model._module.parameters()).dtype),
        "n_prompts": len(prompts),
    }
    prompt_coords = {"text": ("prompt", np.asarray(prompts, dtype=object).astype(str)),
                     "n_tokens": ("prompt", np.asarray(lengths))}
    if coords is not None:
        for col in coords.columns:
            prompt_coords[str(col)] = ("prompt", _coord_values(coords[col]))
    if store is None:
        return ds.assign_coords(prompt_coords).assign_attrs(attrs)
    if store.suffix == ".nc":
        ds = ds.assign_coords(prompt_coords).assign_attrs(attrs)
        attrs["checksum"] = _checksum(ds)
        ds.assign_attrs(attrs).to_netcdf(store, engine="h5netcdf")
    else:
        ds = xr.open_zarr(store, consolidated=False).assign_coords(prompt_coords)
        attrs["checksum"] = _checksum(ds)
        extra = xr.Dataset(coords=prompt_coords).assign_attrs(attrs)
        extra.to_zarr(store, mode="a", consolidated=False)
    return open_store(store, model=model)


def _coord_values(series: pd.Series) -> np.ndarray:
    values = series.to_numpy()
    return values.astype(str) if values.dtype == object else values


def _to_dataset(ad, grid: _Grid, saved, batch: Batch, idx, positions, max_len) -> xr.Dataset:
    data_vars, coords = {}, {"prompt": idx, "layer": grid.layers}
    coords["position"] = list(positions) if positions is not None else np.arange(max_len)
    for kind in grid.kinds:
        arr = torch.stack([saved[(layer, kind)] for layer in grid.layers], 2).float().cpu().numpy()
        if positions is None:
            arr = _unpad(arr, batch, max_len)
        if kind in HEAD_KINDS:
            head_dim = ad.head_dim(kind)
            arr = arr.reshape(*arr.shape[:3], len(grid.heads[kind]), ad.d_head)
            data_vars[kind] = (["prompt", "position", "layer", head_dim, "d_head"], arr)
            coords[head_dim] = grid.heads[kind]
        else:
            data_vars[kind] = (["prompt", "position", "layer", "d_model"], arr)
    return xr.Dataset(data_vars, coords=coords)


def _unpad(arr: np.ndarray, batch: Batch, max_len: int) -> np.ndarray:
    """Shift left-padded rows so token i of every prompt is at index i; NaN past its end."""
    out = np.full((arr.shape[0], max_len, *arr.shape[2:]), np.nan, dtype=arr.dtype)
    for row, (off, n) in enumerate(zip(batch.offsets.tolist(), batch.lengths.tolist())):
        out[row, :n] = arr[row, off:off + n]
    return out


def _check_finite(part: xr.Dataset, batch: Batch) -> None:
    """Raise on NaN/inf at real tokens (the NaN tails of short prompts are by design)."""
    for name, var in part.data_vars.items():
        finite = np.isfinite(var.values).reshape(*var.shape[:3], -1).all(-1)  # prompt, pos, layer
        if np.issubdtype(var.position.dtype, np.integer):
            finite |= (var.position.values[None, :] >= batch.lengths.numpy()[:, None])[..., None]
        if not finite.all():
            rows = part.prompt.values[~finite.all((1, 2))].tolist()
            layers = part.layer.values[~finite.all((0, 1))].tolist()
            raise NonFiniteActivationError(
                f"NaN or inf in {name} activations at layers {layers} for prompts {rows[:10]}: "
                "check the model's dtype (float16 overflows on some models: use float32 or "
                "bfloat16) and its weights and inputs")


def _checksum(ds: xr.Dataset) -> str:
    h = hashlib.sha256()
    for name in sorted(ds.data_vars):
        values = np.asarray(ds[name].astype("float64").sum(skipna=True).values)
        h.update(name.encode() + values.tobytes() + str(ds[name].shape).encode())
    return h.hexdigest()[:16]


def open_store(path: str | Path, model: Any = None, verify: bool = True) -> xr.Dataset:
    """Reopen an activation store lazily (dask), checking it is whole and from ``model``.

    ``verify`` reads every value once to compare with the checksum written at the end of
    :func:`collect`: a truncated or corrupt store raises :class:`StoreError`.
    """
    path = Path(path)
    if not path.exists():
        raise StoreError(f"activation store {path} does not exist")
    try:
        if path.suffix == ".zarr":
            ds = xr.open_zarr(path, consolidated=False)
        else:
            ds = xr.open_dataset(path, engine="h5netcdf", chunks={})
    except Exception as err:
        raise StoreError(f"activation store {path} cannot be read ({err}); it is truncated or "
                         "corrupt: delete it and collect again") from err
    if ds.attrs.get("format") != STORE_FORMAT or "checksum" not in ds.attrs:
        raise StoreError(f"activation store {path} is incomplete (collection was interrupted "
                         "or it is not a sage_nn store): delete it and collect again")
    if model is not None and ds.attrs["model"] != str(model.config._name_or_path):
        raise StoreError(f"activation store {path} was collected from model "
                         f"{ds.attrs['model']!r}, not {model.config._name_or_path!r}")
    if verify:
        try:
            ok = _checksum(ds) == ds.attrs["checksum"]
        except Exception as err:
            raise StoreError(f"activation store {path} has unreadable data ({err}): delete it "
                             "and collect again") from err
        if not ok:
            raise StoreError(f"activation store {path} does not match its checksum (corrupt or "
                             "modified): delete it and collect again")
    return ds
