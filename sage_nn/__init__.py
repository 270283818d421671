"""sage_nn: ground-truth evaluation of sparse autoencoders on real language models.

The public names load on first use (PEP 562): ``import sage_nn`` and the ``sage`` command's
help, task list and input checks do not wait for torch, transformers and sae_lens to import.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

#: Each public name and the module that defines it.
_HOME = {
    "DEFAULT_MODEL": "model.loading", "load_model": "model.loading",
    "tiny_random_model": "model.loading", "AttributionPatching": "discovery.attribution",
    "MSEDictionary": "dictionaries.supervised", "MeanDictionary": "dictionaries.supervised",
    "ResidualReconstruction": "dictionaries.reconstruction", "Run": "pipeline.runs",
    "open_run": "pipeline.runs", "open_suite": "pipeline.suite", "Suite": "pipeline.suite",
    "SparseAutoencoder": "dictionaries.saes",
    "load_sae": "dictionaries.saes", "Site": "model.sites", "adapter": "model.sites",
    "check_task": "tasks.datasets", "load_task": "tasks.datasets",
    "collect": "model.activations", "open_store": "model.activations",
    "discover": "discovery.stage",
}
#: Names that never run the model; every other one imports sae_lens first, as
#: ``import sage_nn`` used to: nnsight's ``.save`` patch breaks pydantic models imported
#: after a trace runs (sage_nn/dictionaries/saes.py), so sae_lens comes before anything
#: that traces.
_NO_TRACE = {"DEFAULT_MODEL", "Run", "open_run", "Site", "Suite", "load_task", "open_suite"}

__all__ = ["DEFAULT_MODEL", "AttributionPatching", "MSEDictionary", "MeanDictionary", "Run",
           "Site", "adapter", "check_task", "collect", "discover", "load_model", "load_task",
           "open_run", "open_suite", "open_store", "Suite", "tiny_random_model",
           "ResidualReconstruction",
           "SparseAutoencoder", "load_sae"]

if TYPE_CHECKING:  # what type checkers and IDEs see; nothing is imported at run time
    from .dictionaries.reconstruction import ResidualReconstruction
    from .dictionaries.saes import SparseAutoencoder, load_sae
    from .dictionaries.supervised import MeanDictionary, MSEDictionary
    from .discovery.attribution import AttributionPatching
    from .discovery.stage import discover
    from .model.activations import collect, open_store
    from .model.loading import DEFAULT_MODEL, load_model, tiny_random_model
    from .model.sites import Site, adapter
    from .pipeline.runs import Run, open_run
    from .pipeline.suite import Suite, open_suite
    from .tasks.datasets import check_task, load_task


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}"):
            return importlib.import_module(f".{name}", __name__)  # sage_nn.pipeline etc.
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _NO_TRACE:
        importlib.import_module(".dictionaries.saes", __name__)
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
