"""The servers a request goes to: NDIF's (:class:`NDIFBackend`, nnsight's client, measured)
and an in-process server that holds a real one's rules (:class:`SimulatedServer`).

The judge is the real server (``scripts/ndif/local_ndif.py``, tests/test_ndif.py);
:class:`SimulatedServer` is the fast check the other tests use: it refuses what a server on
another Python version could not run, any write to the model it serves, and any weight
read as an attribute inside a trace.
"""

from __future__ import annotations

import io
import json
import linecache
from typing import Any

import cloudpickle
import torch
from nnsight.intervention import serialization
from nnsight.intervention.backends.remote import RemoteBackend
from nnsight.intervention.envoy import Envoy
from nnsight.schema.request import RequestModel
from nnsight.tracing.backend import Backend

#: The largest request body NDIF's API takes (ndif 0.1.2 parses a request with starlette's
#: multipart parser, whose parts are capped at 1 MiB: a larger body gets HTTP 400).
MAX_REQUEST_BYTES = 1 << 20

_ENVOY_GETATTR = Envoy.__getattr__  # restored after each request SimulatedServer runs


class RequestTooLargeError(ValueError):
    """A request over the server's body limit (:data:`MAX_REQUEST_BYTES`), refused here."""


class _Envelope(RequestModel):
    """nnsight's request envelope with NDIF's ``trusted`` field (nnsight 0.8.1 has none)."""

    trusted: bool


class NDIFBackend(RemoteBackend):
    """nnsight's client for NDIF, measured: ``request_bytes``/``result_bytes`` hold each
    request's and result's size as they crossed the wire (after compression). With
    ``trusted`` set, the request's envelope carries it: a server whose auth is off honours
    it (``False`` runs the request sandboxed); NDIF itself decides by the API key."""

    def __init__(self, *args, trusted: bool | None = None,
                 max_request_bytes: int | None = MAX_REQUEST_BYTES, stage: str = "", **kwargs):
        from nnsight.intervention.backends.display import StatusDisplay

        super().__init__(*args, **kwargs)
        self.trusted, self.max_request_bytes, self.stage = trusted, max_request_bytes, stage
        # the status spinner only when asked for (verbose): sage_nn says one line a stage
        self.display = StatusDisplay(enabled=self.verbose, verbose=self.verbose)
        self.request_bytes: list[int] = []
        self.result_bytes: list[int] = []

    def _serialize(self, tracer):
        blob = super()._serialize(tracer)
        self.request_bytes.append(len(blob))
        if self.max_request_bytes is not None and len(blob) > self.max_request_bytes:
            raise RequestTooLargeError(
                f"{self.stage or 'a'} request of {len(blob) / 1e6:.2f} MB is over the server's "
                f"limit of {self.max_request_bytes / 1e6:.2f} MB (NDIF's API refuses larger "
                "bodies); nothing was sent: fix: send fewer prompts a request "
                "(--max-prompts-per-request, or a smaller --batch-size), or encode residual "
                "SAEs here (--remote-placement here)")
        return blob

    def finalize(self, content: bytes):
        self.result_bytes.append(len(content))
        return super().finalize(content)

    def _post(self, request, blob):
        if self.trusted is not None:
            request = _Envelope(**request.model_dump(), trusted=self.trusted)
        return super()._post(request, blob)


class ShippedByValueError(TypeError):
    """Something in a request that a server could not run from any Python: a function
    without source (shipped as bytecode, tied to the client's Python version) or a class
    shipped by value (a dataclass's generated methods are bytecode)."""


class _StrictPickler(serialization.CustomCloudPickler):
    """nnsight's request pickler, refusing what would travel as bytecode or as a class."""

    def reducer_override(self, obj):
        if isinstance(obj, type) and not cloudpickle.cloudpickle._should_pickle_by_reference(obj):
            raise ShippedByValueError(
                f"the request ships class {obj.__module__}.{obj.__qualname__} by value (its "
                "methods would run on the server); send plain data and plain functions")
        return super().reducer_override(obj)

    def _dynamic_function_reduce(self, func):
        reduced = super()._dynamic_function_reduce(func)
        if reduced[0] is not serialization._load_function:
            raise ShippedByValueError(
                f"the request ships {func.__module__}.{func.__qualname__} as bytecode (it has no "
                "source, e.g. a dataclass's generated method): a server on another Python "
                "version cannot run it")
        return reduced


class WeightReadError(RuntimeError):
    """A request read a parameter or buffer as an attribute inside its trace; in NDIF's
    sandbox (a copy of the model on the meta device) it would get a tensor without values."""


def _weights_refused(envoy: Any, name: str) -> Any:
    """``Envoy.__getattr__`` as a sandbox sees it: a module's tensors have no values there."""
    value = _ENVOY_GETATTR(envoy, name)
    if isinstance(value, torch.Tensor):
        raise WeightReadError(
            f"the request reads {type(envoy._module).__name__}.{name} inside its trace: in "
            "NDIF's sandbox the model is on the meta device; call the module on a tensor "
            "instead (its forward runs where the weights are)")
    return value


def _state(model: Any) -> tuple:
    """What a request must leave as it found it: every module's attribute names and the
    config's values."""
    hf = model._module
    return ({name: set(vars(m)) for name, m in hf.named_modules()},
            json.dumps(hf.config.to_dict(), sort_keys=True, default=str))


class SimulatedServer(Backend):
    """A server in this process, holding the rules a real NDIF server holds (the judge is
    the real server, ``scripts/ndif/local_ndif.py``; this is the fast check for tests).

    Each request is serialized as for NDIF, with a pickler that refuses anything a server
    on another Python version could not run (:class:`ShippedByValueError`); deserialized
    with the user's modules hidden (nnsight's ``LocalSimulationBackend`` does that) against
    ``model``, the server's own (its parameters frozen, as NDIF's are); run; and only the
    saved values come back, through bytes. A request that leaves an attribute on the
    server's model, or changes its config, raises, and so does one that reads a parameter
    or buffer as an attribute inside its trace (:class:`WeightReadError`: NDIF's sandbox
    holds a meta copy of the model). The sandbox's other differences (no backward pass, a
    forward that runs elsewhere) are the real server's to judge (tests/test_ndif.py). So
    the client may hold its model on the meta device, as a remote model is. ``request_bytes`` and ``result_bytes`` record
    each request's sizes."""

    def __init__(self, model: Any):
        from nnsight.intervention.backends.local import LocalSimulationBackend

        model._module.requires_grad_(False)
        self.model, self.local = model, LocalSimulationBackend(model)
        self.request_bytes: list[int] = []
        self.result_bytes: list[int] = []

    def __call__(self, tracer: Any) -> None:
        from nnsight.ndif import pull_env
        from nnsight.tracing import tracer as tracing

        pull_env()
        pickler, serialization.CustomCloudPickler = serialization.CustomCloudPickler, _StrictPickler
        try:
            blob = RequestModel.serialize(tracer)
        finally:
            serialization.CustomCloudPickler = pickler
        self.request_bytes.append(len(blob))
        # deserializing registers the shipped sources in linecache under their files' names;
        # a server is another process, so here they must not outlive the request
        sources = dict(linecache.cache)
        hidden = self.local._hide_local_modules()  # as on a server without sage_nn
        try:
            restored = RequestModel.deserialize(blob, self.model._remoteable_persistent_objects())
        finally:
            self.local._restore(hidden)
        before = _state(self.model)
        pushed, push = [], tracing.push
        tracing.push = lambda frame, values: (pushed.append(dict(values)), push(frame, values))
        Envoy.__getattr__ = _weights_refused
        try:  # in the caller's own trace scope: its outermost block pushes only saved values
            restored.execute(restored.info.code)
        finally:
            tracing.push = push
            Envoy.__getattr__ = _ENVOY_GETATTR
            linecache.cache.clear()
            linecache.cache.update(sources)
        after = _state(self.model)
        if after != before:
            added = sorted(f"{m or 'model'}.{a}" for m, names in after[0].items()
                           for a in names - before[0].get(m, set()))
            raise RuntimeError("the request wrote to the server's model (shared by every user): "
                               + (", ".join(added) if added else "its config changed"))
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
