"""A run's options (:class:`RunConfig`) and the prompts they give."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

if TYPE_CHECKING:  # xarray loads where a stage reads or writes a Dataset (not for --help)
    pass
log = logging.getLogger("sage_nn")


@dataclass
class RunConfig:
    """Every option of a run; ``RunConfig.from_file("run.yaml")`` reads the same fields."""

    model: str = "smollm2-135m"
    task: str = "ioi"
    # residual SAEs reaching the cross-sections through the reconstruction, and SAEs trained
    # at the cross-section sites themselves (same corpus and width), for comparison
    saes: list[str] = field(default_factory=lambda: ["train:topk", "train:topk@sites"])
    run_dir: str = "runs/quickstart"
    seed: int = 0
    n_fit: int = 96          # prompts to fit dictionaries (and discover) on
    n_eval: int = 96         # held-out prompts every metric is measured on (48 left the SAE
                             # and floor edit intervals overlapping at k <= 8 on SmolLM2 IOI)
    n_discovery: int = 32    # of the fit prompts, used for attribution patching
    attributes: list[str] | None = None
    discovery_kinds: list[str] | None = None  # the attribution grid; default: select_kinds
    # A cross-section is grown by its joint exact patch until it recovers `target` of the
    # attribute's effect, with at most `max_sites` sites of `select_kinds` (default: per-head
    # z; the residual stream only when named). `top_k` selects the top sites by attribution.
    select_kinds: list[str] | None = None
    target: float = 0.6
    max_sites: int = 16
    top_k: int | None = None
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    n_boot: int = 1000
    # seeds of each SAE's controls (its floor and its random SAE); their values are the
    # mean over seeds, and each bootstrap draw takes one seed
    control_seeds: int = 3
    batch_size: int = 32
    device: str | None = None
    dtype: str | None = None
    sae_width: int = 1024    # for SAEs trained by the run
    sae_steps: int = 300     # x 1024 training tokens
    # What SAEs are trained on: "task@positions" (prompts of the run's task, other draws
    # than the fit and eval prompts, at the task's named positions, where cross-sections
    # lie), "task" (every token of those prompts), "builtin" (the story corpus), a text
    # file/dir, "hf:NAME", or a mix ("builtin+task"). SAEs trained on the stories fall below
    # the random floor on IOI (tests/test_calibration.py), so the task is the default.
    sae_corpus: str = "task@positions"
    sae_task_prompts: int = 2048  # prompts drawn for a task corpus
    # The tasks whose prompts a "task" part of sae_corpus draws (each minus its own fit and
    # eval prompts at this seed and size); default: the run's task. A suite names all its
    # tasks, so one set of SAEs is trained for every task and is nobody's task-specific SAE.
    corpus_tasks: list[str] | None = None
    # How residual SAEs reach sublayer sites: "input" (recompute the site from the SAE's
    # reconstruction of the residual feeding it) or "difference" (attn_out/mlp_out as the
    # difference of the SAEs around the sublayer; select those kinds for it)
    reconstruction: str = "input"
    # Where the model runs: False (here), True (NDIF), "local" (nnsight's offline simulation
    # of NDIF) or a host URL; one request per stage, or per max_prompts_per_request rows.
    # remote_blocking=False submits and returns; rerun to collect (job ids in the run dir).
    # remote_placement: where residual SAEs are encoded ("auto": by bytes, "server", "here")
    remote: bool | str = False
    max_prompts_per_request: int | None = None
    remote_blocking: bool = True
    remote_transport: str = "float32"
    remote_placement: str = "auto"

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> "RunConfig":
        data = yaml.safe_load(Path(path).read_text()) or {}
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"config {path}: unknown option(s) {unknown}; known: "
                             f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        return cls(**{**data, **{k: v for k, v in overrides.items() if v is not None}})

    def hash(self, *names: str) -> str:
        values = {n: getattr(self, n) for n in names}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def select_kinds_of(config: "RunConfig") -> list[str]:
    """The kinds a cross-section may hold (as :meth:`DiscoveryConfig.selectable_kinds`)."""
    if config.select_kinds:
        return list(config.select_kinds)
    if config.discovery_kinds and "z" not in config.discovery_kinds:
        return list(config.discovery_kinds)
    return ["z"]


def run_prompts(model: Any, config: RunConfig) -> tuple[Any, Any, Any]:
    """The run's task prompts: ``(all, fit, held_out)``, built from the train split.

    Held-out prompts share the fit prompts' vocabulary: a supervised feature exists per
    attribute value, so the ceiling can only be measured on values it was fitted on. No
    prompt repeats, so no held-out prompt is also a fit prompt."""
    from ..tasks.datasets import load_task

    full = load_task(config.task).build(model, n=config.n_fit + config.n_eval,
                                        seed=config.seed, split="train", unique=True)
    return (full, full.subset(np.arange(config.n_fit)),
            full.subset(np.arange(config.n_fit, len(full))))
