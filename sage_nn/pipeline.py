"""The end-to-end run: task -> discovery -> ground truth -> SAEs -> evaluation -> report.

Each stage writes its output into the run directory and records it in ``manifest.json``
with a SHA-256 of every file and a hash of the settings it depended on. A rerun skips a
stage whose record matches; a stage whose file is missing, corrupt or computed with other
settings is recomputed (and so is everything after it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

if TYPE_CHECKING:  # xarray loads where a stage reads or writes a Dataset (not for --help)
    import xarray as xr

log = logging.getLogger("sage_nn")
MANIFEST = "manifest.json"


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
    # How residual SAEs reach sublayer sites: "input" (recompute the site from the SAE's
    # reconstruction of the residual feeding it) or "difference" (attn_out/mlp_out as the
    # difference of the SAEs around the sublayer; select those kinds for it)
    reconstruction: str = "input"
    # Where the model runs: False (here), True (NDIF), "local" (nnsight's offline simulation
    # of NDIF) or a host URL; one request per stage, or per max_prompts_per_request rows.
    # remote_blocking=False submits and returns; rerun to collect (job ids in the run dir).
    remote: bool | str = False
    max_prompts_per_request: int | None = None
    remote_blocking: bool = True
    remote_transport: str = "float32"

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


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class RunDirectory:
    """A run directory with its manifest of finished stages."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.manifest_path = self.path / MANIFEST
        try:
            self.manifest = json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            self.manifest = {}
        except json.JSONDecodeError:
            log.warning("%s is corrupt: recomputing every stage", self.manifest_path)
            self.manifest = {}

    def done(self, stage: str, settings: str) -> bool:
        """Whether ``stage`` finished with these settings and its files are intact."""
        record = self.manifest.get(stage)
        if record is None or record["settings"] != settings:
            return False
        for name, digest in record["files"].items():
            path = self.path / name
            if not path.exists() or _sha256(path) != digest:
                log.warning("stage %s: %s is missing or corrupt; recomputing", stage, name)
                return False
        return True

    def record(self, stage: str, settings: str, files: list[str], seconds: float) -> None:
        self.manifest[stage] = {"settings": settings, "seconds": round(seconds, 2),
                                "files": {f: _sha256(self.path / f) for f in files}}
        write_atomic(self.manifest_path, json.dumps(self.manifest, indent=2))

    def forget_after(self, stage: str, order: list[str]) -> None:
        for later in order[order.index(stage) + 1:]:
            self.manifest.pop(later, None)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write to a temporary name in the same directory, flush it to disk, then rename:
    a crash or a full disk leaves the old file or none, never half a file."""
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_netcdf(ds: xr.Dataset, path: Path) -> None:
    """Write atomically, so an interrupted write never looks like a finished stage."""
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        ds.to_netcdf(tmp, engine="h5netcdf")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_dir(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(directory)`` into a side directory that replaces ``path`` once complete."""
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        write(partial)
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(partial, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def read_netcdf(path: Path) -> xr.Dataset:
    import xarray as xr

    with xr.open_dataset(path, engine="h5netcdf") as ds:
        return ds.load()


def json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


class Stage:
    """Run ``compute`` unless the run directory already holds its result."""

    def __init__(self, run: RunDirectory, order: list[str]):
        self.run, self.order = run, order
        self.timings: dict[str, float] = {}

    def __call__(self, name: str, settings: str, files: list[str],
                 compute: Callable[[], None], load: Callable[[], Any]) -> Any:
        if self.run.done(name, settings):
            log.info("stage %s: cached", name)
            self.timings[name] = 0.0
            return load()
        self.run.forget_after(name, self.order)
        start = time.perf_counter()
        compute()
        seconds = time.perf_counter() - start
        self.run.record(name, settings, files, seconds)
        self.timings[name] = seconds
        log.info("stage %s: %.1f s", name, seconds)
        return load()


# -- the run ----------------------------------------------------------------------------

STAGES = ["task", "discovery", "saes", "evaluation", "report"]


@dataclass
class RunResult:
    """What :func:`run` produced; every piece is also on disk under ``run_dir``."""

    run_dir: Path
    results: xr.Dataset
    cross_sections: dict[str, list[str]]
    timings: dict[str, float]
    report: Path


def residual_sites_for(pairs: list[tuple], parallel: bool, mode: str = "input") -> list[str]:
    """Residual SAE sites that serve every cross-section site: directly, as the residual
    that feeds a sublayer site (input mode), or as the two residuals around attn_out/mlp_out
    (difference mode)."""
    from .sites import ATTN_KINDS, RESID_KINDS

    needed = set()
    for site, _ in pairs:
        layer = site.layer
        if site.kind in RESID_KINDS:
            needed.add(f"L{layer}.{site.kind}")
        elif mode == "difference":
            needed |= ({f"L{layer}.resid_pre", f"L{layer}.resid_mid"} if site.kind == "attn_out"
                       else {f"L{layer}.resid_mid", f"L{layer}.resid_post"})
        elif site.kind in ATTN_KINDS or parallel:
            needed.add(f"L{layer}.resid_pre")
        else:
            needed.add(f"L{layer}.resid_mid")
    return sorted(needed, key=lambda s: (int(s[1:].split(".")[0]), s))


def _residual_key(layer: int, kind: str, n_layers: int) -> tuple[int, str]:
    """One name per residual tensor: ``L.resid_post`` is ``L+1.resid_pre`` below the top."""
    if kind == "resid_post" and layer + 1 < n_layers:
        return layer + 1, "resid_pre"
    return layer, kind


def served_sites(sites: list[str], n_layers: int, parallel: bool | None,
                 mode: str = "input") -> set[tuple[int, str]]:
    """The ``(layer, kind)`` cross-section sites residual SAEs at ``sites`` (hook names or
    sage names) serve: their own residual tensor (under both its names), and in input mode
    the components it feeds (q/k/v/z/attn_out from ``L.resid_pre``; mlp_out from
    ``L.resid_mid``, or ``L.resid_pre`` in parallel blocks; ``parallel=None``: either);
    in difference mode attn_out/mlp_out where both residuals around them have an SAE. The
    inverse of :func:`residual_sites_for`. SAEs at other kinds serve nothing here."""
    from .sites import ATTN_KINDS, RESID_KINDS, parse_site

    keys = set()
    for name in sites:
        layer, kind, _ = parse_site(name)
        if kind in RESID_KINDS:
            keys.add(_residual_key(layer, kind, n_layers))
    served = set()
    for layer, kind in keys:
        served.add((layer, kind))
        if kind == "resid_pre" and layer > 0:
            served.add((layer - 1, "resid_post"))
        if mode != "input" or layer >= n_layers:
            continue
        if kind == "resid_pre":
            served |= {(layer, k) for k in ATTN_KINDS}
            if parallel or parallel is None:
                served.add((layer, "mlp_out"))
        elif kind == "resid_mid" and not parallel:
            served.add((layer, "mlp_out"))
    if mode == "difference":
        top = (n_layers - 1, "resid_post")
        for layer in range(n_layers):
            if {(layer, "resid_pre"), (layer, "resid_mid")} <= keys:
                served.add((layer, "attn_out"))
            after = (layer + 1, "resid_pre") if layer + 1 < n_layers else top
            if {(layer, "resid_mid"), after} <= keys:
                served.add((layer, "mlp_out"))
    return served


def select_kinds_of(config: "RunConfig") -> list[str]:
    """The kinds a cross-section may hold (as :meth:`DiscoveryConfig.selectable_kinds`)."""
    if config.select_kinds:
        return list(config.select_kinds)
    if config.discovery_kinds and "z" not in config.discovery_kinds:
        return list(config.discovery_kinds)
    return ["z"]


class UnservableRunError(ValueError):
    """The run's SAEs serve no site a cross-section may hold."""


def discovery_restriction(config: "RunConfig", n_layers: int, parallel: bool | None,
                          spec_sites: dict[str, list[str]] | None = None
                          ) -> tuple[list[int], list[str]] | None:
    """``(layers, select_kinds)`` discovery is limited to when every ``--sae`` names SAEs
    already made (a release, a directory): the sites every one of them serves (each SAE is
    evaluated at every cross-section site). ``None`` when one is trained here (``train:``,
    placed wherever discovery finds the cross-sections) or its SAEs' sites are unknown.
    Raises :class:`UnservableRunError` (one line, with the fix) when nothing is served.

    ``spec_sites``: the sites of each spec when already read (else read from configs)."""
    from .releases import spec_sites as read_sites

    if any(str(s).startswith("train:") for s in config.saes):
        return None
    sites = {s: (spec_sites or {}).get(s) or read_sites(s) for s in config.saes}
    if any(v is None for v in sites.values()):
        return None
    wanted = select_kinds_of(config)
    served = None
    for found in sites.values():
        mine = served_sites(found, n_layers, parallel, config.reconstruction)
        served = mine if served is None else served & mine
    usable = sorted((layer, kind) for layer, kind in served or () if kind in wanted)
    if not usable:
        have = sorted({str(s) for found in sites.values() for s in found})
        feeds = {"mlp_out": "blocks.L.hook_resid_mid (hook_resid_pre in parallel blocks)"}
        need = "; ".join(dict.fromkeys(
            f"{k} at layer L needs " + (feeds.get(k) or "blocks.L.hook_resid_pre (= "
                                       "blocks.L-1.hook_resid_post)")
            for k in wanted if k not in ("resid_pre", "resid_mid", "resid_post")))
        hint = (" or --select-kinds resid_pre resid_post (cross-sections in the residual "
                "stream itself)," if any("resid" in h for h in have) else "")
        raise UnservableRunError(
            f"--sae {' '.join(config.saes)}: these SAEs (at {', '.join(have[:6])}"
            f"{', ...' if len(have) > 6 else ''}) serve no cross-section site of kinds "
            f"{wanted} in {config.reconstruction} mode (every --sae must serve every site)"
            f"{': ' + need if need else ''}; fix: add SAEs at those residual sites,{hint} "
            "or add --sae train:topk")
    kinds = [k for k in wanted if any(k == kind for _, kind in usable)]
    return sorted({layer for layer, kind in usable}), kinds


def run_prompts(model: Any, config: RunConfig) -> tuple[Any, Any, Any]:
    """The run's task prompts: ``(all, fit, held_out)``, built from the train split.

    Held-out prompts share the fit prompts' vocabulary: a supervised feature exists per
    attribute value, so the ceiling can only be measured on values it was fitted on. No
    prompt repeats, so no held-out prompt is also a fit prompt."""
    from .tasks import load_task

    full = load_task(config.task).build(model, n=config.n_fit + config.n_eval,
                                        seed=config.seed, split="train", unique=True)
    return (full, full.subset(np.arange(config.n_fit)),
            full.subset(np.arange(config.n_fit, len(full))))


TASK_CORPORA = ("task", "task@positions")  # every token / only the named positions


def sae_corpus(model: Any, config: RunConfig) -> list:
    """``config.sae_corpus`` as training sources: each ``task`` part becomes prompts of the
    run's task drawn at another seed, minus every prompt (and counterfactual) the run fits
    and evaluates on, so the SAEs never see the evaluation's prompts."""
    from .training import _sources, task_prompts

    parts = _sources(config.sae_corpus)
    if not set(parts) & set(TASK_CORPORA):
        return parts
    full = run_prompts(model, config)[0]
    used = [p for d in [full, *full.counterfactuals.values()] for p in d.prompts]
    return [task_prompts(model, config.task, n=config.sae_task_prompts, seed=config.seed,
                         exclude=used, named_positions=p == "task@positions")
            if p in TASK_CORPORA else p for p in parts]


def _trained_cache(arch: str, model: Any, config: RunConfig, options: dict | None = None):
    """``(name, TrainConfig, sources, cache directory)`` of the run's trained SAEs: the
    directory is keyed by width, k, tokens, seed and the corpus's content. ``options``
    (``{"width": 512, "k": 8}``, from ``train:topk:width=512:k=8``) override the run's
    ``sae_width`` and TrainConfig's ``k``; a k named in the spec is part of the name
    (``topk-1024-k8``), so each SAE of a sweep has its own name and cache entry."""
    from .models import cache_dir
    from .training import TrainConfig, corpus_hash

    options = options or {}
    width = int(options.get("width", config.sae_width))
    extra = {"k": int(options["k"])} if "k" in options else {}
    cfg = TrainConfig(architecture=arch, d_sae=width, seed=config.seed,
                      tokens=config.sae_steps * 1024, **extra)
    name = f"{arch}-{width}" + (f"-k{extra['k']}" if extra else "")
    source = sae_corpus(model, config)
    root = cache_dir() / "saes" / str(model.config._name_or_path).replace("/", "--") / \
        f"{name}-{cfg.tokens}-seed{cfg.seed}-{corpus_hash(source)}"
    return name, cfg, source, root


#: what ``train:ARCH:KEY=V1,V2`` may sweep
SWEEP_OPTIONS = ("width", "k")


def parse_train_spec(spec: str) -> tuple[str, bool, dict[str, list[int]]]:
    """``train:ARCH[:KEY=V1,V2,...]...[@sites]`` -> (architecture, at the cross-section
    sites, {key: [values]}); keys are :data:`SWEEP_OPTIONS`. Raises ValueError."""
    body = spec.split(":", 1)[1]
    at_sites = body.endswith("@sites")
    arch, *parts = body.removesuffix("@sites").split(":")
    options: dict[str, list[int]] = {}
    for part in parts:
        key, _, values = part.partition("=")
        if key not in SWEEP_OPTIONS or not values:
            raise ValueError(f"--sae {spec!r}: {part!r} is not KEY=V1,V2,... with KEY one of "
                             f"{', '.join(SWEEP_OPTIONS)} (e.g. train:topk:k=8,16,32)")
        try:
            options[key] = [int(v) for v in values.split(",")]
        except ValueError:
            raise ValueError(f"--sae {spec!r}: {key} values must be integers") from None
        if any(v <= 0 for v in options[key]):
            raise ValueError(f"--sae {spec!r}: {key} values must be positive")
    return arch, at_sites, options


def _sae_dir_site(path: Path) -> str | None:
    try:
        cfg = json.loads((path / "cfg.json").read_text())
    except (OSError, ValueError):
        return None
    return f"{cfg.get('hook_name')}|{cfg.get('hook_head_index')}"


def expand_sae_specs(specs: list[str]) -> list[str]:
    """Each ``--sae`` value as the SAEs it names, in order, without repeats.

    ``train:topk:k=8,16`` -> ``train:topk:k=8``, ``train:topk:k=16`` (several keys: every
    combination). A directory whose subdirectories are SAE sets (directories of SAE
    directories) -> each subdirectory. A directory of SAE directories at distinct sites
    stays one SAE set (one per site, as ``sage train-sae`` writes them); if two read the
    same site, each is its own SAE. Anything else is kept as it is."""
    import itertools

    out: list[str] = []
    for spec in specs:
        if spec.startswith("train:"):
            arch, at_sites, options = parse_train_spec(spec)
            keys = [k for k in SWEEP_OPTIONS if k in options]
            for values in itertools.product(*(options[k] for k in keys)):
                opts = "".join(f":{k}={v}" for k, v in zip(keys, values))
                out.append(f"train:{arch}{opts}" + ("@sites" if at_sites else ""))
            continue
        path = Path(spec).expanduser()
        if path.is_dir() and not (path / "cfg.json").exists():
            members = sorted(p.parent for p in path.glob("*/cfg.json"))
            sets = sorted(p for p in path.iterdir() if p.is_dir() and
                          not (p / "cfg.json").exists() and any(p.glob("*/cfg.json")))
            sites = [_sae_dir_site(m) for m in members]
            if sets and not members:
                out.extend(str(p) for p in sets)
                continue
            if len(set(sites)) < len(sites):
                out.extend(str(m) for m in members)
                continue
        out.append(spec)
    return list(dict.fromkeys(out))


def _at_sites(spec: str) -> bool:
    """``train:ARCH@sites``: SAEs trained at the cross-section sites themselves."""
    return spec.startswith("train:") and spec.endswith("@sites")


def trained_sites(spec: str, residual: list[str], pairs: list[tuple]) -> list[str]:
    """The sites an ``--sae`` spec needs SAEs at: one at each cross-section site itself
    (``train:topk@sites``: the sublayer-native comparison), else the residual sites the
    cross-sections need."""
    if _at_sites(spec):
        return list(dict.fromkeys(str(site) for site, _ in pairs))
    return residual


def _train_spec(spec: str) -> tuple[str, bool]:
    """``train:ARCH[:KEY=V...][@sites]`` -> (architecture, at the cross-section sites)."""
    arch, at_sites, _ = parse_train_spec(spec)
    return arch, at_sites


def _train_options(spec: str) -> dict:
    """The one value of each option of an expanded ``train:`` spec (``{"k": 8}``)."""
    options = parse_train_spec(spec)[2]
    if any(len(v) != 1 for v in options.values()):
        raise ValueError(f"--sae {spec!r} names a sweep: expand it (expand_sae_specs) first")
    return {k: v[0] for k, v in options.items()}


def _train_group(spec: str) -> tuple:
    """Trained SAEs of one architecture and options share one training (and cache)."""
    return (_train_spec(spec)[0], tuple(sorted(_train_options(spec).items())))


def resolve_saes(spec: str, model: Any, sites: list[str], config: RunConfig,
                 progress: bool = True) -> tuple[str, list]:
    """``(name, [SparseAutoencoder, ...])`` for one ``--sae`` value.

    ``train:topk`` / ``train:standard``: SAEs at ``sites`` trained here on
    ``config.sae_corpus`` (:func:`sae_corpus`), cached under ``$SAGE_NN_CACHE/saes`` by
    the corpus's content and reused (``train:topk@sites`` names the SAEs trained at the
    cross-section's own sites; they share the cache). A directory with
    ``cfg.json``: one sae_lens SAE. A directory of such directories: all of them.
    ``RELEASE:SAE_ID`` / ``RELEASE:ID_GLOB``: sae_lens pretrained SAEs (:func:`release_saes`;
    from the HF cache when offline).
    """
    from .saes import cache_lock, load_sae
    from .training import load_trained

    if spec.startswith("train:"):
        arch, at_sites = _train_spec(spec)
        name, cfg, source, root = _trained_cache(arch, model, config, _train_options(spec))
        with cache_lock(root):  # a second process needing these SAEs waits, then reads them
            have, broken = cached_saes(root, model)
            missing = [s for s in sites if s not in have]
            if set(broken) & set(sites):  # retrained with its first companions: same draws
                missing = list(sites)
            if missing:
                log.info("training %s SAEs at %s", arch, ", ".join(missing))
                have.update(_train_into_cache(root, model, missing, cfg, source, progress))
        return name + ("@sites" if at_sites else ""), [have[s] for s in sites]
    path = Path(spec)
    if (path / "cfg.json").exists():
        return path.name, [load_sae(path, model=model)]
    if path.is_dir():
        return path.name, list(load_trained(path, model).values())
    if ":" in spec:
        return release_saes(spec, model, sites)
    raise ValueError(f"--sae {spec!r}: not a directory with cfg.json, a directory of SAE "
                     "directories, 'train:topk'/'train:standard' (optionally '@sites'), or "
                     "'RELEASE:SAE_ID'")


def release_saes(spec: str, model: Any, sites: list[str]) -> tuple[str, list]:
    """``RELEASE:SAE_ID`` or ``RELEASE:ID_GLOB`` (:mod:`sage_nn.releases`): the release's
    SAEs loaded through sae_lens's ``SAE.from_pretrained`` (from the HF cache when the hub
    is offline). A glob loads only the SAEs whose residual tensor is one of ``sites`` (the
    residuals the cross-sections need), one per tensor; its name is the glob."""
    from .releases import expand, hook_names, is_glob, register, split_spec
    from .saes import load_sae, parse_site
    from .sites import adapter

    register()  # $SAGE_NN_SAE_REGISTRY's releases, for SAE.from_pretrained
    release, pattern = split_spec(spec)
    _, ids = expand(spec)
    if not is_glob(pattern):
        return pattern, [load_sae(release, ids[0], model=model)]
    n_layers = adapter(model).n_layers
    key = lambda name: _residual_key(*parse_site(name)[:2], n_layers)  # noqa: E731
    wanted, chosen = {key(s) for s in sites}, {}
    for sae_id, hook in hook_names(spec).items():
        try:
            site = key(hook)
        except (TypeError, ValueError):
            continue  # not a residual site of this model's grammar: serves no cross-section
        if site in wanted and site not in chosen:
            chosen[site] = sae_id
    log.info("%s: %d of %d SAEs serve the cross-sections: %s", spec, len(chosen), len(ids),
             ", ".join(chosen.values()))
    return pattern, [load_sae(release, chosen[s], model=model) for s in sorted(chosen)]


def release_ids(spec: str, members: list) -> list[str | None]:
    """The release ids of the SAEs :func:`release_saes` loaded for ``spec`` (by hook name)."""
    from .releases import hook_names

    by_hook: dict = {}
    for sae_id, hook in hook_names(spec).items():
        by_hook.setdefault(hook, sae_id)
    return [by_hook.get(m.hook_name) for m in members]


def cached_saes(root: Path, model: Any) -> tuple[dict, list[str]]:
    """The intact SAEs of a cache directory by site, and the sites of entries that were
    truncated, corrupt or unreadable: those are removed (and so trained again)."""
    from .saes import load_sae, sealed_problem

    have, broken = {}, []
    for directory in sorted(p.parent for p in root.glob("*/cfg.json")):
        problem = sealed_problem(directory)
        if problem is None:
            try:
                have[directory.name] = load_sae(directory, model=model, site=directory.name)
                continue
            except Exception as err:  # noqa: BLE001 (an unreadable entry is retrained)
                problem = f"{type(err).__name__}: {err}"
        log.warning("SAE cache entry %s is unusable (%s): training it again", directory, problem)
        shutil.rmtree(directory, ignore_errors=True)
        broken.append(directory.name)
    return have, broken


def _train_into_cache(root: Path, model: Any, sites: list[str], cfg, source,
                      progress: bool = True) -> dict:
    """Train in a side directory, seal each SAE (SHA-256 of its files) and move it into
    the cache by rename: a killed or failed training leaves nothing a reader takes for an
    SAE. Called with the cache's lock held, so side directories left by killed runs go."""
    from .saes import seal
    from .training import train_saes

    for stale in root.parent.glob(f".{root.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    partial = root.parent / f".{root.name}.partial-{os.getpid()}"
    try:
        trained, report = train_saes(model, sites, cfg, source=source, out_dir=partial,
                                     progress=progress)
        log.info("trained SAEs:\n%s", report.to_string())
        root.mkdir(parents=True, exist_ok=True)
        entries = sorted(partial.iterdir(), key=lambda p: not p.is_dir())  # SAEs, then records
        for entry in entries:
            if entry.is_dir():
                seal(entry)
                shutil.rmtree(root / entry.name, ignore_errors=True)
            os.replace(entry, root / entry.name)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return trained


def trained_record(root: Path, sites: list[str]) -> dict | None:
    """What the trainer recorded of the SAEs at ``sites`` of a cache directory: its config
    (``train_config.json``) with, per site, the steps each SAE trained and its FVU on the
    held-out part of its corpus (from each SAE's ``cfg.json``, where the trainer writes
    them; else ``report.csv``)."""
    record = root / "train_config.json"
    if not record.exists():
        return None
    training = json.loads(record.read_text())
    training.pop("held_out_fvu_curves", None)  # per step; too long for a report table
    report = root / "report.csv"
    table = {}
    if report.exists():
        import pandas as pd

        table = pd.read_csv(report, index_col="site").to_dict("index")
    steps, fvu = {}, {}
    for site in sites:
        meta = json.loads((root / site / "cfg.json").read_text()).get("metadata") or {}
        steps[site] = meta.get("sage_nn_train_steps", table.get(site, {}).get("steps"))
        fvu[site] = meta.get("sage_nn_held_out_fvu", table.get(site, {}).get("fvu"))
    return {**training, "steps_used": steps, "held_out_fvu": fvu}


def _sae_site(sae, spec: str = "train:") -> str:
    """An SAE's site as saes.json lists it: the hook name of an SAE the user named (a
    release or a directory: ``blocks.8.hook_resid_post`` stays so), else ``L8.resid_post``."""
    heads = sae.heads or []
    site = f"L{sae.layer}.{sae.kind}" + (f".h{heads[0]}" if len(heads) == 1 else "")
    hook = str(sae.hook_name or "")
    if not spec.startswith("train:") and hook.startswith("blocks.") and len(heads) != 1:
        from .sites import parse_site

        try:
            if parse_site(hook)[:2] == (sae.layer, sae.kind):
                return hook
        except ValueError:
            pass
    return site


def saes_for_all_layers(model: Any, members: list) -> int:
    """How many SAEs of this kind an evaluation at every layer would need: one per layer
    for each residual or sublayer kind among ``members``, times the heads for q/k/v/z."""
    from .sites import HEAD_KINDS, adapter

    ad = adapter(model)
    return sum(ad.n_layers * (ad.n_heads_of(kind) if kind in HEAD_KINDS else 1)
               for kind in {s.kind for s in members})


SHARED_EVALUATION = "shared"


def evaluation_file(name: str) -> str:
    """An SAE's cached results in the run directory: ``evaluation/<safe name>-<hash>.nc``
    (the hash keeps two names that read the same as file names apart)."""
    from .report import safe_name

    return f"evaluation/{safe_name(name)}-{hashlib.sha256(name.encode()).hexdigest()[:8]}.nc"


def sae_fingerprint(coder: Any) -> str:
    """A hash of what an SAE's evaluation depends on: its weights and settings (every
    member SAE), and how it is evaluated (at its own sites or through the reconstruction,
    and the reconstruction mode)."""
    import torch

    h = hashlib.sha256(f"{type(coder).__name__}|{getattr(coder, 'mode', '')}".encode())
    for sae in getattr(coder, "saes", [coder]):
        h.update(repr([getattr(sae, a, None) for a in (
            "architecture", "k", "layer", "kind", "heads", "hook_name", "normalize", "center",
            "apply_b_dec_to_input", "rescale_acts_by_decoder_norm")]).encode())
        for key, value in sorted(sae.state_dict().items()):
            h.update(key.encode())
            h.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def evaluation_part(results: xr.Dataset, sae: str | None) -> xr.Dataset:
    """What one cache file holds of an evaluation: an SAE and its floor (variables over
    ``dictionary``), or (``sae=None``) every other dictionary and every shared variable."""
    from .evaluation import RANDOM

    names = [str(d) for d in results.dictionary.values]
    if sae is not None:
        part = results.sel(dictionary=[sae, f"{RANDOM}:{sae}"])
        return part[[v for v in part.data_vars if "dictionary" in part[v].dims]]
    own = lambda d: d.startswith(f"{RANDOM}:") or f"{RANDOM}:{d}" in names  # noqa: E731
    return results.sel(dictionary=[d for d in names if not own(d)])


def merge_evaluation(shared: xr.Dataset, parts: list[xr.Dataset]) -> xr.Dataset:
    """The shared part (ceiling, shared variables, attributes) and each SAE's, in order."""
    import xarray as xr

    per_dictionary = [v for v in shared.data_vars if "dictionary" in shared[v].dims]
    names = lambda ds: ds.assign_coords(dictionary=np.array(  # noqa: E731 (no fixed width:
        [str(d) for d in ds.dictionary.values], dtype=object))  # a longer name is not cut)
    merged = xr.concat([names(shared[per_dictionary]), *map(names, parts)], "dictionary",
                       join="outer",
                       data_vars="all", coords="minimal", compat="override")
    for v in shared.data_vars:
        if v not in per_dictionary:
            merged[v] = shared[v]
    merged.attrs = dict(shared.attrs)
    return merged


#: A cross-section whose joint patch recovers less than this share of its target was not
#: found: its attribute is still scored, but kept out of claims.
WEAK_SHARE = 0.5


def with_discovery(results: xr.Dataset, summary_path: Path) -> xr.Dataset:
    """The cross-sections' discovery facts as attribute variables: ``recovered`` (joint
    exact share of the effect) and its ``target``, ``cap_hit``, ``small_effect``,
    ``weak_cross_section`` (``recovered`` below :data:`WEAK_SHARE` of the target),
    ``effect_layers`` (where attribution puts the effect, comma-separated) and ``same_as``
    (the other attributes with the same cross-section, comma-separated)."""
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    attributes = [str(a) for a in results.attribute.values]
    get = lambda a, key, default: summary.get(a, {}).get(key, default)  # noqa: E731
    recovered = [float(get(a, "recovered", np.nan)) for a in attributes]
    target = [float(get(a, "target", np.nan)) for a in attributes]
    return results.assign(
        recovered=("attribute", recovered), target=("attribute", target),
        cap_hit=("attribute", [bool(get(a, "cap_hit", False)) for a in attributes]),
        small_effect=("attribute", [bool(get(a, "small_effect", False)) for a in attributes]),
        weak_cross_section=("attribute", [bool(r < WEAK_SHARE * t)  # NaN: not known weak
                                          for r, t in zip(recovered, target)]),
        effect_layers=("attribute", [", ".join(map(str, get(a, "effect_layers", [])))
                                     for a in attributes]),
        same_as=("attribute", [", ".join(get(a, "same_as", [])) for a in attributes]))


def _restriction(config: RunConfig, model: Any) -> tuple[list[int], list[str]] | None:
    """:func:`discovery_restriction` for a loaded model (its layers, parallel blocks);
    nothing served is an :class:`~sage_nn.validate.InvalidRunError`, before any forward.
    Kinds asked for that no SAE serves are dropped with a warning saying what would."""
    from .sites import adapter
    from .validate import InvalidRunError

    ad = adapter(model)
    try:
        found = discovery_restriction(config, ad.n_layers, ad.parallel)
    except UnservableRunError as err:
        raise InvalidRunError([str(err)]) from None
    if found:
        log.info("discovery restricted to what the SAEs serve: layers %s, kinds %s", *found)
        note = dropped_kinds_note(config, found, ad.parallel)
        if note:
            log.warning("%s", note)
    return found


def serving_sae(kind: str, mode: str = "input", parallel: bool | None = False) -> str | None:
    """The residual SAE(s) that serve cross-section sites of ``kind`` at layer L, as hook
    names (:func:`served_sites` read backwards); None where no residual SAE does."""
    from .sites import ATTN_KINDS, RESID_KINDS

    if kind in RESID_KINDS:
        return f"blocks.L.hook_{kind}"
    if mode == "difference":
        return {"attn_out": "blocks.L.hook_resid_pre and blocks.L.hook_resid_mid",
                "mlp_out": "blocks.L.hook_resid_mid and blocks.L.hook_resid_post"}.get(kind)
    if kind in ATTN_KINDS or parallel:
        return "blocks.L.hook_resid_pre"
    return "blocks.L.hook_resid_mid" + (" (hook_resid_pre in parallel blocks)"
                                        if parallel is None else "")


def dropped_kinds_note(config: RunConfig, found: tuple[list[int], list[str]],
                       parallel: bool | None = False) -> str | None:
    """One line naming the kinds a cross-section was allowed to hold that no ``--sae``
    serves (so discovery leaves them out), and the SAEs that would serve them; None when
    every kind asked for is served."""
    layers, kinds = found
    wanted = select_kinds_of(config)
    dropped = [k for k in wanted if k not in kinds]
    if not dropped:
        return None
    flag = "--select-kinds" if config.select_kinds else "--discovery-kinds"
    layer = str(layers[0] if layers else 0)
    needs = []
    for kind in dropped:
        hooks = serving_sae(kind, config.reconstruction, parallel)
        needs.append(f"{kind} needs an SAE at {hooks} for each layer L it should cover (e.g. "
                     f"{hooks.replace('.L.', f'.{layer}.')})" if hooks else
                     f"{kind} is served by no residual SAE in {config.reconstruction} mode "
                     "(--reconstruction input serves it from blocks.L.hook_resid_pre)")
    return (f"{flag} {' '.join(wanted)}: no --sae serves {' or '.join(dropped)}, so "
            f"cross-sections hold only {' and '.join(kinds)} (layers {layers}); "
            f"{'; '.join(needs)}; fix: add --sae with such SAEs, or leave "
            f"{' '.join(dropped)} out of {flag}")


def run(config: RunConfig | None = None, *, progress: bool = True, model: Any = None,
        remote: Any = None) -> RunResult:
    """Build the task, discover cross-sections, get SAEs, evaluate, report; resumable.

    ``remote`` (a :class:`sage_nn.remote.Remote`) overrides the config's remote settings."""
    from .validate import check

    config = config or RunConfig()
    check(config, model=model)  # every input, before anything loads or runs (seconds)

    # the heavy imports after the check, so a refused run does not wait for them; they
    # import sae_lens (sage_nn.saes), as it must be, before the model is built or traced
    import pandas as pd

    from .discovery import DiscoveryConfig, discover
    from .evaluation import (EVALUATION_VERSION, CrossSection, DirectSAE, ReconstructedSAE,
                             evaluate_cross_section, pair_coords)
    from .models import load_model
    from .reconstruction import EagerAttention
    from .remote import Remote
    from .report import sae_cfg_dict, write_report
    from .sites import Site, adapter
    from .tasks import load_task, logit_diffs
    from .training import corpus_hash
    on_server = config.remote not in (False, "local")  # the model's weights are not here
    run_dir = RunDirectory(config.run_dir)
    stage = Stage(run_dir, STAGES)
    root = run_dir.path
    write_atomic(root / "config.yaml", yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))

    if remote is None and config.remote:
        remote = Remote(config.remote, max_prompts=config.max_prompts_per_request,
                        blocking=config.remote_blocking, transport=config.remote_transport,
                        jobs=None if config.remote_blocking else root / "remote_jobs.json")
    model = model or load_model(config.model, device=config.device, dtype=config.dtype,
                                remote=on_server)
    restriction = _restriction(config, model)  # what the named SAEs serve, before any forward
    spec = load_task(config.task)
    full, fit, held_out = run_prompts(model, config)
    attributes = config.attributes or fit.attribute_names

    def task_stage():
        ld = logit_diffs(model, held_out, config.batch_size, remote=remote).to_pandas()
        summary = {"task": spec.name, "n_fit": len(fit), "n_eval": len(held_out),
                   "accuracy": float((ld["clean"] > 0).mean()),
                   "mean_logit_diff": ld.mean().to_dict(), "prompts": full.prompts}
        write_atomic(root / "task.json", json.dumps(summary, indent=2, default=json_default))

    def task_load():
        stored = json.loads((root / "task.json").read_text())
        if stored["prompts"] != full.prompts:
            raise RuntimeError("the task built different prompts than the stored run: the "
                               "task spec or tokenizer changed; use a new run directory")
        return stored

    task_summary = stage("task", config.hash("model", "task", "seed", "n_fit", "n_eval"),
                         ["task.json"], task_stage, task_load)

    disc_dir = root / "discovery"
    disc_files = ["discovery/scores.nc", "discovery/cross_sections.csv", "discovery/summary.json"]

    def discovery_stage():
        prompts = fit.subset(np.arange(min(config.n_discovery, len(fit))))
        # the grid scores what a cross-section may hold unless asked for more (heatmaps of
        # every kind cost the residual stream's exact sweep, which selection does not use)
        # the grid scores every layer, so a report can say where an effect lies when the
        # layers the SAEs serve miss it; the cross-sections stay in the served layers
        layers, select = restriction or (None, config.select_kinds)
        grid = config.discovery_kinds or select or ["z"]
        settings = DiscoveryConfig(kinds=grid, attributes=attributes, select_layers=layers,
                                   select_kinds=select, target=config.target,
                                   max_sites=config.max_sites, top_k=config.top_k,
                                   batch_size=config.batch_size)
        write_dir(disc_dir, lambda out: discover(model, prompts, settings, out_dir=out,
                                                 progress=progress, remote=remote))

    def discovery_load():
        table = pd.read_csv(disc_dir / "cross_sections.csv")
        return {a: [(Site.parse(s), str(p)) for s, p in zip(t.site, t.position)]
                for a, t in table.groupby("attribute", sort=False)}

    pairs_by_attr = stage("discovery", config.hash("model", "task", "seed", "n_fit", "n_eval",
                                                   "n_discovery", "attributes",
                                                   "discovery_kinds", "select_kinds",
                                                   "target", "max_sites", "top_k")
                          + (f",{restriction}" if restriction else ""),
                          disc_files, discovery_stage, discovery_load)
    all_pairs = [p for pairs in pairs_by_attr.values() for p in pairs]
    needed = residual_sites_for(all_pairs, adapter(model).parallel, config.reconstruction)

    saes: dict[str, Any] = {}
    sae_specs = expand_sae_specs(config.saes)  # a sweep or a folder: each of its SAEs

    def resolve_all() -> dict:  # trains what the SAE cache lacks, loads the rest
        # one activation stream trains every SAE an architecture (and width, k) needs
        union: dict[tuple, list[str]] = {}
        for spec_ in sae_specs:
            if spec_.startswith("train:"):
                union.setdefault(_train_group(spec_), []).extend(
                    trained_sites(spec_, needed, all_pairs))
        for (arch, options), sites in union.items():
            resolve_saes(f"train:{arch}" + "".join(f":{k}={v}" for k, v in options), model,
                         list(dict.fromkeys(sites)), config, progress)
        listing = {}
        for spec_ in sae_specs:
            at_sites = _at_sites(spec_)
            name, members = resolve_saes(spec_, model, trained_sites(spec_, needed, all_pairs),
                                         config, progress)
            if name in saes:
                raise ValueError(f"two --sae values are both named {name!r} (the second is "
                                 f"{spec_!r}); rename one SAE directory")
            saes[name] = (DirectSAE(members) if at_sites
                          else ReconstructedSAE(members, batch_size=config.batch_size,
                                                mode=config.reconstruction))
            training = None
            if spec_.startswith("train:"):  # what the trainer recorded next to the SAEs
                root_ = _trained_cache(_train_spec(spec_)[0], model, config,
                                       _train_options(spec_))[3]
                training = trained_record(root_, trained_sites(spec_, needed, all_pairs))
            listing[name] = {"spec": spec_, "sites": [_sae_site(s, spec_) for s in members],
                             "approach": "at the cross-section sites" if at_sites else
                             "residual, through the reconstruction",
                             "n_saes": len(members),
                             "n_saes_all_layers": saes_for_all_layers(model, members),
                             "sae_cfg_dict": sae_cfg_dict(
                                 members, model_name=str(model.config._name_or_path),
                                 training=training)}
            if ":" in spec_ and not spec_.startswith("train:") and not Path(spec_).exists():
                listing[name]["sae_lens_ids"] = release_ids(spec_, members)
        return listing

    def saes_stage():
        write_atomic(root / "saes.json", json.dumps(resolve_all(), indent=2))

    def saes_load():
        if not saes:  # the stage was cached: resolving only reads the SAEs it trained
            resolve_all()

    sae_settings = config.hash("model", "saes", "sae_width", "sae_steps", "sae_corpus",
                               "sae_task_prompts", "seed", "reconstruction")
    sae_settings = f"{sae_settings},{corpus_hash(sae_corpus(model, config))},{','.join(needed)}"
    stage("saes", sae_settings, ["saes.json"], saes_stage, saes_load)

    # The evaluation is cached per SAE: evaluation/shared.nc holds the supervised ceiling
    # and what every SAE shares (clean, mean, counterfactual runs: edit baseline, ground
    # truth); evaluation/<SAE>.nc each SAE and its floor, keyed by the SAE's weights and the
    # settings it was scored under (evaluation/index.json). A rerun with another list of
    # SAEs scores only the SAEs it has no file for (all of them in one batched evaluation),
    # and evaluation.nc merges the run's SAEs in their order: a removed SAE is left out.
    eval_settings = config.hash("model", "task", "seed", "n_fit", "n_eval", "n_discovery",
                                "attributes", "discovery_kinds", "select_kinds", "target",
                                "max_sites", "top_k", "ks", "n_boot", "remote_transport")
    eval_settings += f",v{EVALUATION_VERSION}," + hashlib.sha256(json.dumps(
        {a: [f"{s}@{p}" for s, p in pairs] for a, pairs in pairs_by_attr.items()},
        sort_keys=True).encode()).hexdigest()[:16]
    sae_keys = {name: f"{eval_settings},{sae_fingerprint(coder)}" for name, coder in saes.items()}
    eval_files = {SHARED_EVALUATION: f"evaluation/{SHARED_EVALUATION}.nc",
                  **{name: evaluation_file(name) for name in saes}}

    def evaluation_stage():
        (root / "evaluation").mkdir(exist_ok=True)
        index_path = root / "evaluation" / "index.json"
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError):
            index = {}

        def fresh(name: str, key: str) -> bool:
            record, path = index.get(eval_files[name]), root / eval_files[name]
            return bool(record) and record["key"] == key and path.exists() and \
                _sha256(path) == record["sha256"]

        shared_missing = not fresh(SHARED_EVALUATION, eval_settings)
        missing = [name for name in saes if not fresh(name, sae_keys[name])]
        log.info("evaluation: %s%d of %d SAEs to score", "ceiling and " if shared_missing
                 else "", len(missing), len(saes))
        if shared_missing or missing:
            # the frozen pattern is read; the caller's model comes back as it was given
            with EagerAttention(model, any(p[0].kind in ("z", "attn_out") for p in all_pairs)):
                results = evaluate_cross_section(
                    model, fit, held_out, [CrossSection(a, pairs)
                                           for a, pairs in pairs_by_attr.items()],
                    {name: saes[name] for name in missing}, ks=config.ks, n_boot=config.n_boot,
                    seed=config.seed, batch_size=config.batch_size, remote=remote,
                    ceiling=shared_missing)
            scored = {SHARED_EVALUATION: (eval_settings, None)} if shared_missing else {}
            scored.update({name: (sae_keys[name], name) for name in missing})
            for name, (key, sae) in scored.items():
                write_netcdf(evaluation_part(results, sae), root / eval_files[name])
                index[eval_files[name]] = {"sae": sae, "key": key,
                                           "sha256": _sha256(root / eval_files[name])}
                write_atomic(index_path, json.dumps(index, indent=2))
        merged = merge_evaluation(read_netcdf(root / eval_files[SHARED_EVALUATION]),
                                  [read_netcdf(root / eval_files[name]) for name in saes])
        write_netcdf(with_discovery(merged, disc_dir / "summary.json"), root / "evaluation.nc")

    # other SAEs (another corpus, width, ...) are other results
    results = stage("evaluation", eval_settings + "," + sae_settings,
                    ["evaluation.nc", *eval_files.values()], evaluation_stage,
                    lambda: pair_coords(read_netcdf(root / "evaluation.nc")))

    report_dir = root / "report"

    def report_stage():
        listing = json.loads((root / "saes.json").read_text())
        write_dir(report_dir, lambda out: write_report(
            results, out, discovery_dir=disc_dir, sae_info=listing,
            config={**dataclasses.asdict(config), "task_summary": {
                k: v for k, v in task_summary.items() if k != "prompts"}},
            timings=stage.timings))

    stage("report", run_dir.manifest["evaluation"]["files"]["evaluation.nc"],
          ["report/summary.md"], report_stage, lambda: None)
    return RunResult(root, results, {a: [f"{s}@{p}" for s, p in pairs]
                                     for a, pairs in pairs_by_attr.items()},
                     stage.timings, report_dir)
