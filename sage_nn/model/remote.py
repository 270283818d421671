"""Where a stage's forward passes run: here, on NDIF, or in a faithful simulation of NDIF.

Every stage that runs the model is split in three: *prepare* here (tokenize, build patch
indices), a *kernel* that runs the traces (plain torch: the only code that touches the
model), and *assemble* here (xarray, scikit-learn). :func:`run_kernel` runs the kernel over
the prepared chunks of prompts. Locally it calls it chunk by chunk; remotely all chunks go
in one nnsight session, so one request (or one per ``max_prompts`` prompts), and only what
the kernel returns comes back::

    with model.session(remote=True):          # one request
        out = [kernel(model, *chunk) for chunk in chunks]
        nnsight.save(out)

The kernel and what it calls ship by value (``sage_nn`` registers itself, so a pip or
editable install works) and import only torch and nnsight, which an NDIF server has.
The NDIF API key is nnsight's (``NDIF_API_KEY`` or nnsight's config); sage_nn never stores it.

Backends for testing without a server: nnsight's own ``remote="local"`` (serialize, hide
local modules, deserialize, run in-process) and :class:`FreshProcessBackend`, which runs
each request in a new Python process that cannot import sage_nn or any non-server package.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from nnsight.tracing.backend import Backend

log = logging.getLogger(__name__)

#: sage_nn's own dependencies that a server does not have; the fresh-process backend blocks them.
NOT_ON_SERVER = ("sage_nn", "sae_lens", "xarray", "sklearn", "pandas", "zarr", "dask",
                 "h5netcdf", "h5py", "matplotlib")

_SERVER_SCRIPT = Path(__file__).with_name("_server.py")


@dataclass
class Remote:
    """How a stage runs its traces.

    ``backend``: ``False`` (here, no session), ``True`` (NDIF), ``"local"`` (nnsight's
    offline simulation of NDIF), a host URL, or an nnsight ``Backend`` object.
    With ``blocking=False`` each request is submitted and its job id kept in ``jobs`` (a
    JSON file); the stage raises :class:`RemotePending` until every job has finished, and
    calling it again with the same arguments collects the results instead of resubmitting.
    ``max_prompts`` caps the rows per request (``None``: the whole stage in one request):
    the stage's batches are grouped into requests, a batch over the cap going alone (so
    choose ``batch_size`` at most the cap); a patched variant of a prompt counts as a row.
    A request that fails to reach the server is retried ``retries`` times, waiting
    ``backoff_s``, then twice that, and so on. ``transport="bfloat16"`` sends patch values
    and SAE weights (the read's encoders and frozen maps; floors are a seed anyway) and
    returns read activations and codes in bfloat16: half the bytes each way, numbers to bf16
    precision (the server computes in its own dtype either way).
    """

    backend: Any = False
    max_prompts: int | None = None
    retries: int = 3
    backoff_s: float = 5.0
    blocking: bool = True
    jobs: str | Path | None = None
    verbose: bool = False
    transport: str = "float32"
    requests: list = field(default_factory=list, repr=False)  # (stage, rows, tokens) sent

    def __post_init__(self):
        if self.transport not in ("float32", "bfloat16"):
            raise ValueError(f"transport {self.transport!r}: use 'float32' or 'bfloat16'")
        if not self.blocking and (self.jobs is None or not isinstance(self.backend, (bool, str))
                                  or self.backend in (False, "local")):
            raise ValueError("blocking=False submits jobs to an NDIF server (backend True or a "
                             "host URL) and needs a jobs file to keep their ids in")

    @property
    def is_remote(self) -> bool:
        return self.backend is not False and self.backend is not None

    @property
    def transport_dtype(self) -> torch.dtype | None:
        """The dtype activations travel in (``None`` here: nothing travels)."""
        return getattr(torch, self.transport) if self.is_remote else None

    def session(self, model: Any) -> Any:
        if isinstance(self.backend, Backend):
            return model.session(backend=self.backend)
        return model.session(remote=self.backend, blocking=self.blocking, verbose=self.verbose)

    def record(self, stage: str, group: list[tuple]) -> None:
        tokens = sum(x["input_ids"].numel() for chunk in group for x in _inputs(chunk))
        self.requests.append((stage, sum(map(_size, group)), tokens))


class RemotePending(RuntimeError):
    """Jobs were submitted (or are still running); run the same call again to collect."""

    def __init__(self, stage: str, job_ids: list[str], jobs: Path):
        self.stage, self.job_ids = stage, job_ids
        super().__init__(f"{stage}: {len(job_ids)} remote job(s) not finished yet "
                         f"({', '.join(job_ids)}; ids kept in {jobs}); run again to collect")


LOCAL = Remote()


def as_remote(remote: Any) -> Remote:
    """``None``/``False`` -> local; ``True``/``"local"``/a URL/a Backend -> that backend."""
    if isinstance(remote, Remote):
        return remote
    return LOCAL if remote is None or remote is False else Remote(backend=remote)


def register() -> None:
    """Ship sage_nn by value, so a server without sage_nn can run its kernels."""
    import nnsight

    nnsight.register("sage_nn")


def _inputs(chunk: tuple) -> list[dict]:
    """A kernel's first argument: the model inputs, or a list of them (a kernel that runs
    all batches of a stage itself, in one request)."""
    return chunk[0] if isinstance(chunk[0], list) else [chunk[0]]


def _size(chunk: tuple) -> int:
    return sum(len(x["input_ids"]) for x in _inputs(chunk))


def _requests(chunks: Iterable[tuple], max_prompts: int | None) -> Iterator[list[tuple]]:
    group, n = [], 0
    for chunk in chunks:
        if group and max_prompts is not None and n + _size(chunk) > max_prompts:
            yield group
            group, n = [], 0
        group.append(chunk)
        n += _size(chunk)
    if group:
        yield group


def _is_transient(error: BaseException) -> bool:
    """A failure to reach the server or a busy server (worth retrying), not an error in the
    request. nnsight wraps HTTP failures in its RemoteError: look at the cause."""
    cause = error.__cause__ if error.__cause__ is not None else error
    status = getattr(getattr(cause, "response", None), "status_code", None)
    if status is not None:
        return status >= 500 or status == 429
    if isinstance(cause, (ConnectionError, TimeoutError)):
        return True
    return type(cause).__module__.split(".")[0] in ("httpx", "httpcore", "websocket")


def run_kernel(model: Any, kernel: Callable, chunks: Iterable[tuple], remote: Any = None,
               *, stage: str = "") -> Iterator[Any]:
    """Yield ``kernel(model, *chunk)`` for each chunk, in order.

    Locally each chunk runs as it is consumed. Remotely, chunks are grouped into requests of
    at most ``max_prompts`` prompts; each request is one nnsight session, retried on
    connection failures; a request's results are yielded once it returns.
    """
    remote, stage = as_remote(remote), stage or kernel.__name__
    if not remote.is_remote:
        for chunk in chunks:
            yield kernel(model, *chunk)
        return
    register()
    if not remote.blocking:
        yield from _submitted(model, kernel, chunks, remote, stage)
        return
    for group in _requests(chunks, remote.max_prompts):
        for attempt in range(remote.retries + 1):
            try:
                out = _session(model, kernel, group, remote)
                break
            except Exception as error:  # noqa: BLE001 (re-raised unless transient)
                if not _is_transient(error) or attempt == remote.retries:
                    raise
                wait = remote.backoff_s * 2 ** attempt
                log.warning("request for %s failed (%s); retrying in %.0f s", stage, error, wait)
                time.sleep(wait)
        remote.record(stage, group)
        yield from out


def _session(model: Any, kernel: Callable, group: list[tuple], remote: Remote) -> list:
    with remote.session(model) as session:
        out = [kernel(model, *chunk) for chunk in group]
        out.save()
    return session.backend.job_id if not remote.blocking else out


def _digest(group: list[tuple]) -> str:
    """Identifies a request by its prompts, so a changed call never collects a stale job."""
    h = hashlib.sha256()
    for x in (x for chunk in group for x in _inputs(chunk)):
        for key in sorted(x):
            h.update(x[key].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _submitted(model, kernel, chunks, remote: Remote, stage: str) -> Iterator[Any]:
    """Submit each request once, keeping its job id; collect the finished ones."""
    from nnsight.intervention.backends.remote import RemoteBackend

    path = Path(remote.jobs)
    jobs = json.loads(path.read_text()) if path.exists() else {}
    results, pending = [], []
    for i, group in enumerate(_requests(chunks, remote.max_prompts)):
        key = f"{stage}/{i}/{_digest(group)}"
        if key not in jobs:
            jobs[key] = _session(model, kernel, group, remote)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(jobs, indent=2))  # the id outlives this process
            remote.record(stage, group)
            pending.append(jobs[key])
            continue
        host = remote.backend if isinstance(remote.backend, str) else None
        poll = RemoteBackend(model.to_model_key(), host=host, blocking=False, job_id=jobs[key])
        done = poll()
        if done is None:
            pending.append(jobs[key])
        else:
            results.append(done["out"])
    if pending:
        raise RemotePending(stage, pending, path)
    for out in results:
        yield from out


class FreshProcessBackend(Backend):
    """An nnsight backend that runs each request like a server would, offline.

    The request is serialized exactly as for NDIF, then deserialized and run in a new
    Python process that loads the model from ``model_dir`` (``save_pretrained`` format)
    and cannot import sage_nn or any package in :data:`NOT_ON_SERVER`. Only the saved
    values come back. ``request_bytes`` and ``result_bytes`` record each request's sizes.
    """

    def __init__(self, model_dir: str | Path, timeout_s: float = 600):
        self.model_dir = Path(model_dir)
        self.timeout_s = timeout_s
        self.request_bytes: list[int] = []
        self.result_bytes: list[int] = []

    @classmethod
    def for_model(cls, model: Any, directory: str | Path | None = None) -> "FreshProcessBackend":
        """Save ``model`` (weights and tokenizer) for the server process to load."""
        directory = Path(directory or tempfile.mkdtemp(prefix="sage_nn_server_"))
        if not (directory / "config.json").exists():
            model._module.save_pretrained(directory)
            model.tokenizer.save_pretrained(directory)
        return cls(directory)

    def __call__(self, tracer: Any) -> None:
        from nnsight.ndif import pull_env
        from nnsight.schema.request import RequestModel
        from nnsight.tracing.tracer import save
        from nnsight.tracing.util import push

        pull_env()
        blob = RequestModel.serialize(tracer)
        self.request_bytes.append(len(blob))
        with tempfile.TemporaryDirectory(prefix="sage_nn_request_") as tmp:
            request, result = Path(tmp) / "request", Path(tmp) / "result"
            request.write_bytes(blob)
            proc = subprocess.run(
                [sys.executable, str(_SERVER_SCRIPT), str(self.model_dir), str(request),
                 str(result), ",".join(NOT_ON_SERVER)],
                capture_output=True, text=True, timeout=self.timeout_s, cwd=tmp)
            if proc.returncode != 0:
                raise RuntimeError(f"the request failed in the server process:\n{proc.stderr[-4000:]}")
            content = result.read_bytes()
        self.result_bytes.append(len(content))
        values = torch.load(io.BytesIO(content), map_location="cpu", weights_only=False)
        for value in values.values():  # as nnsight's RemoteBackend: saved, back in the frame
            save(value)
        push(tracer.info.frame, values)


def cast_shared(obj: Any, dtype: torch.dtype, memo: dict | None = None) -> Any:
    """``obj`` (nested dicts, lists and tuples of tensors, modules such as SAEs, and
    dataclasses such as sparse edits) with its floating tensors and module weights in
    ``dtype``, for transport. Each object is converted once, so what several parts of a
    request share (an SAE named by two jobs, the base of many edits) stays shared and
    travels once. Plain torch: a server casts back with it too."""
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, torch.nn.Module):
        out = copy.copy(obj)
        out._parameters = {k: None if v is None else torch.nn.Parameter(
            v.detach().to(dtype), requires_grad=False) for k, v in obj._parameters.items()}
    elif isinstance(obj, torch.Tensor):
        out = obj.to(dtype) if obj.is_floating_point() else obj
    elif isinstance(obj, dict):
        out = {k: cast_shared(v, dtype, memo) for k, v in obj.items()}
    elif isinstance(obj, (list, tuple)):
        out = type(obj)(cast_shared(v, dtype, memo) for v in obj)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = dataclasses.replace(obj, **{f.name: cast_shared(getattr(obj, f.name), dtype, memo)
                                          for f in dataclasses.fields(obj) if f.init})
    else:
        out = obj
    memo[id(obj)] = out
    return out

