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
    "DEFAULT_MODEL": "models", "load_model": "models", "tiny_random_model": "models",
    "AttributionPatching": "attribution", "MSEDictionary": "dictionaries",
    "MeanDictionary": "dictionaries", "ResidualReconstruction": "reconstruction",
    "Run": "runs", "open_run": "runs", "SparseAutoencoder": "saes", "load_sae": "saes",
    "Site": "sites", "adapter": "sites", "check_task": "tasks", "load_task": "tasks",
    "collect": "activations", "open_store": "activations", "discover": "discovery",
}
#: Names that never run the model; every other one imports sae_lens first, as
#: ``import sage_nn`` used to: nnsight's ``.save`` patch breaks pydantic models imported
#: after a trace runs (sage_nn/saes.py), so sae_lens comes before anything that traces.
_NO_TRACE = {"DEFAULT_MODEL", "Run", "open_run", "Site", "load_task"}

__all__ = ["DEFAULT_MODEL", "AttributionPatching", "MSEDictionary", "MeanDictionary", "Run",
           "Site", "adapter", "check_task", "collect", "discover", "load_model", "load_task",
           "open_run", "open_store", "tiny_random_model", "ResidualReconstruction",
           "SparseAutoencoder", "load_sae"]

if TYPE_CHECKING:  # what type checkers and IDEs see; nothing is imported at run time
    from .activations import collect, open_store
    from .attribution import AttributionPatching
    from .dictionaries import MeanDictionary, MSEDictionary
    from .discovery import discover
    from .models import DEFAULT_MODEL, load_model, tiny_random_model
    from .reconstruction import ResidualReconstruction
    from .runs import Run, open_run
    from .saes import SparseAutoencoder, load_sae
    from .sites import Site, adapter
    from .tasks import check_task, load_task


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}"):
            return importlib.import_module(f".{name}", __name__)  # sage_nn.pipeline etc.
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _NO_TRACE:
        importlib.import_module(".saes", __name__)
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
