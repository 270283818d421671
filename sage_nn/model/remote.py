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

Every request is logged in ``Remote.requests`` (:class:`Request`: the kernel, rows, tokens,
the tensor bytes sent and received, seconds, and the serialized sizes where the backend
knows them), and where the read placed each SAE in ``Remote.placements``.

Backends for testing without a server: nnsight's own ``remote="local"`` (serialize, hide
local modules, deserialize, run in-process), :class:`SimulatedServer` (the same against a
separate server-side model, so the client may hold its model without weights) and
:class:`FreshProcessBackend`, which runs each request in a new Python process that cannot
import sage_nn or any non-server package. Both keep the server model's parameters frozen,
as NDIF's are, so a kernel that needs gradients must ask for them.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import linecache
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


#: Where a read encodes residual SAEs (:mod:`sage_nn.model.reads`): chosen by bytes, or forced.
PLACEMENTS = ("auto", "server", "here")


@dataclass
class Request:
    """One request sent: its kernel, the pipeline ``stage`` it served (when one was set),
    prompt rows and tokens, the tensor bytes up and down (what :func:`payload_bytes`
    counts: the planner's unit), seconds, and the serialized sizes where the backend
    reports them (``wire_up``/``wire_down``; the code shipped by value is in them)."""

    kernel: str
    rows: int
    tokens: int
    up: int = 0
    down: int = 0
    seconds: float = 0.0
    stage: str = ""
    wire_up: int | None = None
    wire_down: int | None = None
    #: a dry run's request: the chunks it would send (the plan lists what they hold)
    carried: Any = field(default=None, repr=False, compare=False)


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
    precision (the server computes in its own dtype either way). ``placement`` says where a
    read encodes residual SAEs (:mod:`sage_nn.model.reads`): ``"auto"`` (default: by the
    bytes each way needs), ``"server"`` or ``"here"``. ``stage`` labels the requests sent
    (the pipeline sets it per stage). ``dry_run=True`` sends nothing: each stage prepares
    its requests, logs them with the bytes they would carry (:class:`Request`; the results'
    from the kernel's shapes), and stops with :class:`Planned`.
    """

    backend: Any = False
    max_prompts: int | None = None
    retries: int = 3
    backoff_s: float = 5.0
    blocking: bool = True
    jobs: str | Path | None = None
    verbose: bool = False
    transport: str = "float32"
    placement: str = "auto"
    stage: str = ""
    dry_run: bool = False
    requests: list = field(default_factory=list, repr=False)  # Request per request sent
    placements: list = field(default_factory=list, repr=False)  # per read job: where, bytes

    def __post_init__(self):
        if self.transport not in ("float32", "bfloat16"):
            raise ValueError(f"transport {self.transport!r}: use 'float32' or 'bfloat16'")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement {self.placement!r}: use "
                             f"{', '.join(map(repr, PLACEMENTS))}")
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

    def record(self, kernel: str, group: list[tuple], up: int, out: Any = None,
               seconds: float = 0.0, wire: tuple = (None, None)) -> None:
        tokens = sum(x["input_ids"].numel() for chunk in group for x in _inputs(chunk))
        self.requests.append(Request(kernel, sum(map(_size, group)), tokens, up,
                                     payload_bytes(out), seconds, self.stage, *wire))


class Planned(Exception):
    """A dry run stopped where a stage would send its first request (now logged)."""

    def __init__(self, kernel: str):
        self.kernel = kernel
        super().__init__(f"{kernel}: planned, not sent (dry run)")


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


def request_groups(chunks: Iterable[tuple],
                   max_prompts: int | None) -> Iterator[list[tuple]]:
    """The chunks a stage sends, grouped into requests of at most ``max_prompts`` rows."""
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
               *, stage: str = "", shapes: Callable | None = None,
               shared: bool = False) -> Iterator[Any]:
    """Yield ``kernel(model, *chunk)`` for each chunk, in order.

    Locally each chunk runs as it is consumed. Remotely, chunks are grouped into requests of
    at most ``max_prompts`` prompts; each request is one nnsight session, retried on
    connection failures; a request's results are yielded once it returns. With
    ``shared``, the kernel also gets ``shared=``, a dict of the request's own (made on
    the server; one for the whole stage here): what its chunks compute once. A dry run
    (``Remote.dry_run``) logs each request with ``shapes(model, *chunk, seen)``, the bytes
    the kernel would return for a chunk (``seen``: a set per request), and raises
    :class:`Planned`.
    """
    remote, stage = as_remote(remote), stage or kernel.__name__
    if not remote.is_remote:
        state = {"shared": {}} if shared else {}
        for chunk in chunks:
            yield kernel(model, *chunk, **state)
        return
    if remote.dry_run:
        for group in request_groups(chunks, remote.max_prompts):
            seen: set = set()
            down = sum(shapes(model, *chunk, seen) for chunk in group) if shapes else 0
            remote.requests.append(Request(
                stage, sum(map(_size, group)),
                sum(x["input_ids"].numel() for chunk in group for x in _inputs(chunk)),
                payload_bytes(group), down, 0.0, remote.stage, carried=group))
        raise Planned(stage)
    register()
    if not remote.blocking:
        yield from _submitted(model, kernel, chunks, remote, stage, shared)
        return
    for group in request_groups(chunks, remote.max_prompts):
        up = payload_bytes(group)  # before it is sent: a server works on its own copy
        for attempt in range(remote.retries + 1):
            try:
                start = time.perf_counter()
                out = _session(model, kernel, group, remote, shared)
                break
            except Exception as error:  # noqa: BLE001 (re-raised unless transient)
                if not _is_transient(error) or attempt == remote.retries:
                    raise
                wait = remote.backoff_s * 2 ** attempt
                log.warning("request for %s failed (%s); retrying in %.0f s", stage, error, wait)
                time.sleep(wait)
        remote.record(stage, group, up, out, time.perf_counter() - start, _wire(remote.backend))
        yield from out


def _wire(backend: Any) -> tuple:
    """The last request's serialized sizes, where the backend records them."""
    sizes = getattr(backend, "request_bytes", None), getattr(backend, "result_bytes", None)
    return tuple(s[-1] if s else None for s in sizes)


def payload_bytes(obj: Any, itemsize: int | None = None, seen: set | None = None) -> int:
    """The tensor bytes of ``obj`` (nested dicts, lists, tuples, dataclasses, modules'
    parameters): what a request or result carries besides code and framing. A tensor
    counts its whole storage (pickling a view sends it), each storage once; a tensor on
    the meta device counts its shape, so a plan can use weights that are not here.
    ``itemsize`` counts floating tensors at that size (a transport dtype)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        size = itemsize if itemsize and obj.is_floating_point() else obj.element_size()
        if obj.device.type == "meta":
            return obj.numel() * size
        storage = obj.untyped_storage()
        key = ("storage", storage.data_ptr(), obj.device)
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes() // obj.element_size() * size
    if isinstance(obj, torch.nn.Module):
        return sum(payload_bytes(v, itemsize, seen)
                   for v in (*obj._parameters.values(), *obj._buffers.values()))
    if isinstance(obj, dict):
        return sum(payload_bytes(v, itemsize, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v, itemsize, seen) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(payload_bytes(getattr(obj, f.name), itemsize, seen)
                   for f in dataclasses.fields(obj))
    return 0


def _session(model: Any, kernel: Callable, group: list[tuple], remote: Remote,
             shared: bool = False) -> list:
    with remote.session(model) as session:
        state = {"shared": {}} if shared else {}  # made where the request runs
        out = [kernel(model, *chunk, **state) for chunk in group]
        out.save()
    return session.backend.job_id if not remote.blocking else out


def _digest(group: list[tuple]) -> str:
    """Identifies a request by its prompts, so a changed call never collects a stale job."""
    h = hashlib.sha256()
    for x in (x for chunk in group for x in _inputs(chunk)):
        for key in sorted(x):
            h.update(x[key].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _submitted(model, kernel, chunks, remote: Remote, stage: str,
               shared: bool = False) -> Iterator[Any]:
    """Submit each request once, keeping its job id; collect the finished ones."""
    from nnsight.intervention.backends.remote import RemoteBackend

    path = Path(remote.jobs)
    jobs = json.loads(path.read_text()) if path.exists() else {}
    results, pending = [], []
    for i, group in enumerate(request_groups(chunks, remote.max_prompts)):
        key = f"{stage}/{i}/{_digest(group)}"
        if key not in jobs:
            up = payload_bytes(group)
            jobs[key] = _session(model, kernel, group, remote, shared)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(jobs, indent=2))  # the id outlives this process
            remote.record(stage, group, up)
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
        _deliver(tracer, content)


class SimulatedServer(Backend):
    """nnsight's local simulation of NDIF, served by another model: each request is
    serialized as for NDIF, deserialized with the user's modules hidden (nnsight's
    ``LocalSimulationBackend`` does both) against ``model``, the server's own (its
    parameters frozen, as NDIF's are), and run in this process; only the saved values come
    back. So the client's model may be held on the meta device, as a remote model is.
    ``request_bytes`` and ``result_bytes`` record each request's sizes."""

    def __init__(self, model: Any):
        from nnsight.intervention.backends.local import LocalSimulationBackend

        model._module.requires_grad_(False)
        self.model, self.local = model, LocalSimulationBackend(model)
        self.request_bytes: list[int] = []
        self.result_bytes: list[int] = []

    def __call__(self, tracer: Any) -> None:
        from nnsight.ndif import pull_env
        from nnsight.schema.request import RequestModel
        from nnsight.tracing import tracer as tracing

        pull_env()
        blob = RequestModel.serialize(tracer)
        self.request_bytes.append(len(blob))
        # deserializing registers the shipped sources in linecache under their files' names;
        # a server is another process, so here they must not outlive the request
        sources = dict(linecache.cache)
        hidden = self.local._hide_local_modules()  # as on a server without sage_nn
        try:
            restored = RequestModel.deserialize(blob, self.model._remoteable_persistent_objects())
        finally:
            self.local._restore(hidden)
        pushed, push = [], tracing.push
        tracing.push = lambda frame, values: (pushed.append(dict(values)), push(frame, values))
        try:  # in the caller's own trace scope: its outermost block pushes only saved values
            restored.execute(restored.info.code)
        finally:
            tracing.push = push
            linecache.cache.clear()
            linecache.cache.update(sources)
        buffer = io.BytesIO()  # through bytes, as on the wire: nothing shared with the server
        torch.save(pushed[-1] if pushed else {}, buffer)
        self.result_bytes.append(buffer.tell())
        _deliver(tracer, buffer.getvalue())


def _deliver(tracer: Any, content: bytes) -> None:
    """A server's saved values into the caller's frame, as nnsight's RemoteBackend does."""
    from nnsight.tracing.tracer import save
    from nnsight.tracing.util import push

    values = torch.load(io.BytesIO(content), map_location="cpu", weights_only=False)
    for value in values.values():
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

