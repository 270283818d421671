"""Where a stage's forward passes run: here, on NDIF (or a lab's own NDIF at a URL), or in a
simulation of NDIF that holds its rules.

Every stage that runs the model is split in three: *prepare* here (tokenize, build patch
indices), a *kernel* that runs the traces (plain torch: the only code that touches the
model), and *assemble* here (xarray, scikit-learn). :func:`run_kernel` runs the kernel over
the prepared chunks of prompts. Locally it calls it chunk by chunk; remotely all chunks go
in one nnsight session, so one request (or one per ``max_prompts`` prompts), and only what
the kernel returns comes back::

    with model.session(backend=NDIFBackend(...)):      # one request
        out = [kernel(model, arch, *chunk) for chunk in chunks]
        nnsight.save(out)

What a request carries runs on any NDIF server, trusted or sandboxed, from any client
Python (docs/ndif.md): the kernels and what they call travel as source (``sage_nn``
registers itself, so a pip or editable install works) and import only torch, numpy and
nnsight; their arguments are plain data (the architecture's facts as ``arch``, worked out
here; sites as ``(layer, kind, head)``; SAEs as their plain form), never an object of a
sage_nn class; nothing is written to the server's model. The NDIF API key is nnsight's
(``NDIF_API_KEY`` or nnsight's config); sage_nn never stores it.

Every request is logged in ``Remote.requests`` (:class:`Request`: the kernel, rows, tokens,
the tensor bytes sent and received, seconds, and the bytes that crossed the wire where the
backend knows them: :class:`NDIFBackend` does), and where the read placed each SAE in
``Remote.placements``.

Backends for testing without a server: nnsight's own ``remote="local"`` (serialize, hide
local modules, deserialize, run in-process) and :class:`SimulatedServer` (the same against
a separate server-side model, so the client may hold its model without weights, refusing
what a real server could not run and any write to its model). The judge is the real
server, ``scripts/ndif/local_ndif.py`` (tests/test_ndif.py).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from nnsight.tracing.backend import Backend

from .servers import MAX_REQUEST_BYTES, NDIFBackend, RequestTooLargeError
from .sites import spec

log = logging.getLogger(__name__)


#: Room left in a request for its code (serialized and compressed: tens of kB measured)
CODE_ALLOWANCE = 128 << 10

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
    from the kernel's shapes), and stops with :class:`Planned`. ``trusted=False`` asks a
    server whose auth is off (a lab's own NDIF) to run each request sandboxed, as NDIF runs
    a key without the ``trusted`` tag; ``None`` leaves it to the server.
    ``max_request_bytes``: the largest request body the server takes (NDIF's API refuses
    bodies over 1 MiB): a stage's passes are split into requests under it
    (:attr:`payload_budget`), a request still larger is refused here before it is sent,
    naming the fix, and an SAE whose encoder alone is larger is encoded here.
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
    trusted: bool | None = None
    max_request_bytes: int | None = MAX_REQUEST_BYTES
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
    def payload_budget(self) -> int | None:
        """The tensor bytes a request may carry: the body limit less room for the code (a
        request's code compresses to tens of kB); none for nnsight's local simulation."""
        if not self.is_remote or self.backend == "local" or not self.max_request_bytes:
            return None
        return self.max_request_bytes - CODE_ALLOWANCE

    @property
    def transport_dtype(self) -> torch.dtype | None:
        """The dtype activations travel in (``None`` here: nothing travels)."""
        return getattr(torch, self.transport) if self.is_remote else None

    def session(self, model: Any) -> Any:
        return model.session(backend=self.backend_for(model))

    def backend_for(self, model: Any, job_id: str | None = None) -> Backend:
        """The nnsight backend one request goes through: for NDIF (``True``) or a host URL,
        an :class:`NDIFBackend`, which records the bytes on the wire."""
        if isinstance(self.backend, Backend):
            return self.backend
        if self.backend == "local":
            from nnsight.intervention.backends.local import LocalSimulationBackend

            return LocalSimulationBackend(model, verbose=self.verbose)
        return NDIFBackend(model.to_model_key(),
                           host=self.backend if isinstance(self.backend, str) else None,
                           blocking=self.blocking, job_id=job_id, verbose=self.verbose,
                           trusted=self.trusted, max_request_bytes=self.max_request_bytes,
                           stage=self.stage)

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


class RemoteRequestError(RuntimeError):
    """A request the server ran and failed: which stage and request, and the server's own
    error (its last line here, the whole report in ``detail``)."""

    def __init__(self, stage: str, kernel: str, number: int, rows: int, error: BaseException):
        self.detail = str(error)
        lines = [line.strip() for line in self.detail.strip().splitlines() if line.strip()]
        self.cause = lines[-1] if lines else type(error).__name__
        super().__init__(f"{stage}: request {number} ({kernel}, {rows} prompts) failed on the "
                         f"server: {self.cause}")


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


def request_groups(chunks: Iterable[tuple], max_prompts: int | None,
                   max_bytes: int | None = None) -> Iterator[list[tuple]]:
    """The chunks a stage sends, grouped into requests of at most ``max_prompts`` rows and
    ``max_bytes`` of tensors (:func:`payload_bytes`, what the chunks share counted once); a
    chunk over either goes alone."""
    group, n, size, seen = [], 0, 0, set()
    for chunk in chunks:
        extra = payload_bytes(chunk, seen=seen) if max_bytes is not None else 0
        if group and ((max_prompts is not None and n + _size(chunk) > max_prompts)
                      or (max_bytes is not None and size + extra > max_bytes)):
            yield group
            group, n, seen = [], 0, set()
            size = 0
            extra = payload_bytes(chunk, seen=seen) if max_bytes is not None else 0
        group.append(chunk)
        n += _size(chunk)
        size += extra
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
    """Yield ``kernel(model, arch, *chunk)`` for each chunk, in order; ``arch`` is the
    model's architecture as plain data (:func:`~sage_nn.model.sites.spec`), worked out
    here: a request carries it, and nothing is derived or kept on a server's model.

    Locally each chunk runs as it is consumed. Remotely, chunks are grouped into requests of
    at most ``max_prompts`` prompts; each request is one nnsight session, retried on
    connection failures; a request's results are yielded once it returns. With
    ``shared``, the kernel also gets ``shared=``, a dict of the request's own (made on
    the server; one for the whole stage here): what its chunks compute once. A dry run
    (``Remote.dry_run``) logs each request with ``shapes(model, arch, *chunk, seen)``, the bytes
    the kernel would return for a chunk (``seen``: a set per request), and raises
    :class:`Planned`.
    """
    remote, stage = as_remote(remote), stage or kernel.__name__
    arch = spec(model)
    if not remote.is_remote:
        state = {"shared": {}} if shared else {}
        for chunk in chunks:
            yield kernel(model, arch, *chunk, **state)
        return
    if remote.dry_run:
        for group in request_groups(chunks, remote.max_prompts, remote.payload_budget):
            seen: set = set()
            down = sum(shapes(model, arch, *chunk, seen) for chunk in group) if shapes else 0
            remote.requests.append(Request(
                stage, sum(map(_size, group)),
                sum(x["input_ids"].numel() for chunk in group for x in _inputs(chunk)),
                payload_bytes(group), down, 0.0, remote.stage))
        raise Planned(stage)
    register()
    if not remote.blocking:
        yield from _submitted(model, arch, kernel, chunks, remote, stage, shared)
        return
    for number, group in enumerate(request_groups(chunks, remote.max_prompts,
                                                   remote.payload_budget), 1):
        up = payload_bytes(group)  # before it is sent: a server works on its own copy
        for attempt in range(remote.retries + 1):
            try:
                start = time.perf_counter()
                out, wire = _session(model, arch, kernel, group, remote, shared)
                break
            except RequestTooLargeError:
                raise
            except Exception as error:  # noqa: BLE001 (re-raised unless transient)
                if not _is_transient(error) and _ran_on_server(error):
                    raise RemoteRequestError(remote.stage or stage, kernel.__name__, number,
                                             sum(map(_size, group)), error) from error
                if not _is_transient(error) or attempt == remote.retries:
                    raise
                wait = remote.backoff_s * 2 ** attempt
                log.warning("request for %s failed (%s); retrying in %.0f s", stage, error, wait)
                time.sleep(wait)
        remote.record(stage, group, up, out, time.perf_counter() - start, wire)
        yield from out


def _ran_on_server(error: BaseException) -> bool:
    """Whether the server ran the request and reported it failed (nnsight's RemoteError
    carrying the server's traceback), not a failure to reach it."""
    from nnsight.intervention.backends.remote import RemoteError

    return isinstance(error, RemoteError) and "Failed to send request" not in str(error)


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


def _session(model: Any, arch: dict, kernel: Callable, group: list[tuple], remote: Remote,
             shared: bool = False) -> tuple[Any, tuple]:
    """One request: the kernel's results (or, not blocking, the job id) and the request's
    and result's serialized sizes where the backend knows them."""
    backend = remote.backend_for(model)
    with model.session(backend=backend):
        state = {"shared": {}} if shared else {}  # made where the request runs
        out = [kernel(model, arch, *chunk, **state) for chunk in group]
        out.save()
    return (backend.job_id if not remote.blocking else out), _wire(backend)


def _digest(group: list[tuple]) -> str:
    """Identifies a request by its prompts, so a changed call never collects a stale job."""
    h = hashlib.sha256()
    for x in (x for chunk in group for x in _inputs(chunk)):
        for key in sorted(x):
            h.update(x[key].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _submitted(model, arch, kernel, chunks, remote: Remote, stage: str,
               shared: bool = False) -> Iterator[Any]:
    """Submit each request once, keeping its job id; collect the finished ones."""
    path = Path(remote.jobs)
    jobs = json.loads(path.read_text()) if path.exists() else {}
    results, pending = [], []
    for i, group in enumerate(request_groups(chunks, remote.max_prompts,
                                             remote.payload_budget)):
        key = f"{stage}/{i}/{_digest(group)}"
        if key not in jobs:
            up = payload_bytes(group)
            jobs[key], _ = _session(model, arch, kernel, group, remote, shared)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(jobs, indent=2))  # the id outlives this process
            remote.record(stage, group, up)
            pending.append(jobs[key])
            continue
        done = remote.backend_for(model, job_id=jobs[key])()
        if done is None:
            pending.append(jobs[key])
        else:
            results.append(done["out"])
    if pending:
        raise RemotePending(stage, pending, path)
    for out in results:
        yield from out


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

