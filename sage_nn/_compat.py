"""The module paths of sage_nn before it had a folder a stage keep working: ``import
sage_nn.training`` or ``from sage_nn.remote import Remote`` gets the module that now holds
that code (:data:`MOVED`), the same module object under both names."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

#: old module -> where it lives now (old modules that became packages keep their name)
MOVED = {
    "activations": "model.activations", "architectures": "model.architectures",
    "sites": "model.sites", "models": "model.loading", "remote": "model.remote",
    "interventions": "model.patching", "reads": "model.reads", "task_spec": "tasks.spec",
    "attribution": "discovery.attribution", "growth": "discovery.growth",
    "saes": "dictionaries.saes", "floor": "dictionaries.floor",
    "releases": "dictionaries.releases", "training": "dictionaries.training",
    "reconstruction": "dictionaries.reconstruction", "metrics": "evaluation.metrics",
    "validity": "evaluation.validity", "validate": "pipeline.validate",
    "runs": "pipeline.runs", "notes": "common.notes", "formats": "common.formats",
}


class _Loader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)  # the module itself, not a copy

    def exec_module(self, module):
        pass


class MovedModules(importlib.abc.MetaPathFinder):
    """Finds ``sage_nn.<old>`` as the module :data:`MOVED` names."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package != __package__ or name not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _Loader(f"{package}.{MOVED[name]}"))


if not any(isinstance(f, MovedModules) for f in sys.meta_path):
    sys.meta_path.append(MovedModules())
