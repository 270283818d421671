"""What NDIF's own server code (``ndif`` 0.1.2) needs to run here: on a CPU, with the newest
nnsight (0.8.1) and transformers (5.25) on the package index. Nothing else is changed.

Every Python process of the server's environment imports this module at start-up (a ``.pth``
file that ``local_ndif.py setup`` writes into the environment): the API, the Ray controller,
the model actors and the sandbox runners, which start with an allowlisted environment and
so could not be reached through variables. It patches nothing until the module it patches
is imported, so an unrelated process pays one finder on ``sys.meta_path``.

The shims, each with the reason it exists:

1. ``nnsight.modeling.transformers``: nnsight 0.8.1 reads the pipeline class of a task from
   ``transformers.pipelines.check_task(task)[1]["impl"]`` to know which preprocessors (the
   tokenizer) a model loads. transformers 5.25 gives an import-path string there, not the
   class, so a model built on the meta device (the controller sizing it, every sandbox
   runner) gets no tokenizer. The shim resolves the string.
2. ``nnsight.modeling.mixins.remotable``: ndif 0.1.2's controller passes
   ``trust_remote_code=`` to ``Remotable.describe_checkpoint`` and ``Remotable.max_tp_size``;
   nnsight 0.8.1 takes no such argument. The shim accepts it and, where it is true, forwards
   it to the config read.

The third shim, model actors on a CPU, is its own module (``sage_ndif_cpu.py``): only the
controller imports it, and only where no CUDA device exists.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys


def _resolve_impl(impl):
    """A pipeline class from transformers' ``"package.module.Class"`` string (shim 1)."""
    if isinstance(impl, str):
        module, _, name = impl.rpartition(".")
        return getattr(importlib.import_module(module), name)
    return impl


def _patch_transformers_model(module) -> None:
    cls = module.TransformersModel
    preprocessors = module._PREPROCESSORS

    def _loaded_preprocessors(self) -> set:
        from transformers.pipelines import check_task

        flags = {"tokenizer": "_load_tokenizer", "image_processor": "_load_image_processor",
                 "feature_extractor": "_load_feature_extractor", "processor": "_load_processor"}
        try:
            impl = _resolve_impl(check_task(self.task)[1]["impl"])
        except Exception:  # noqa: BLE001 - as nnsight: an unknown task sources them all
            return set(preprocessors)
        return {attr for attr, flag in flags.items() if getattr(impl, flag, False)}

    cls._loaded_preprocessors = _loaded_preprocessors


def _patch_remotable(module) -> None:
    cls = module.Remotable
    describe, max_tp = cls.describe_checkpoint.__func__, cls.max_tp_size.__func__

    def describe_checkpoint(klass, model_key, dtype, trust_remote_code=False):
        return describe(klass, model_key, dtype)

    def max_tp_size(klass, model_key, trust_remote_code=False):
        return max_tp(klass, model_key)

    cls.describe_checkpoint = classmethod(describe_checkpoint)
    cls.max_tp_size = classmethod(max_tp_size)


PATCHES = {
    "nnsight.modeling.transformers": _patch_transformers_model,
    "nnsight.modeling.mixins.remotable": _patch_remotable,
}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Applies a patch right after its module has run, whoever imports it first."""

    def find_spec(self, name, path=None, target=None):
        if name not in PATCHES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            PATCHES[name](module)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Called by the environment's ``.pth`` file in every process."""
    if not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        for name in PATCHES:
            if name in sys.modules:  # imported before this ran (not through the .pth)
                PATCHES[name](sys.modules[name])
        sys.meta_path.insert(0, _AfterImport())
