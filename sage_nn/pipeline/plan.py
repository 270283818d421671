"""A remote run's requests before any is sent (``sage run ... --remote --dry-run``,
:func:`plan_run`): per stage, each request with its prompt rows and the bytes it would
send and receive, and where the evaluation would encode each SAE, from the model's config,
the tokenizer and the SAEs' shapes alone. Nothing needs weights here: the model is held on
the meta device and SAEs not at hand are built there from their configs (see
:func:`meta_sae`), so a 70B-class configuration plans as fast as a small one.

The requests whose inputs exist before the run starts (the task's logit differences,
attribution, the evaluation's read) are prepared by the stages' own code and stopped before
sending (``Remote(dry_run=True)``): their upload is the tensors the request would carry,
their download the kernels' result shapes, and the read's placement is chosen by the same
code as in a run. The requests that depend on an earlier one's results (the cross-sections'
search, the patched runs) are estimated from sizes, upper bounds, and marked so. Bytes are
tensor bytes; each request carries about :data:`CODE_BYTES` more (the kernels' code, which
ships by value, and framing; measured by ``benchmarks/remote.py``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import RunConfig, run_prompts, select_kinds_of

#: Bytes a request carries besides its tensors, up and down: the kernels' code (sage_nn
#: ships by value) and the framing of each object; measured on serialized requests by
#: benchmarks/remote.py (the largest seen, 251 kB up with 8 SAEs' edits, rounded up).
CODE_BYTES = (260_000, 20_000)


@dataclass
class PlannedRequest:
    """One request a run would send: its stage, kernel, prompt rows and tensor bytes up and
    down; ``estimated``: from sizes, as it depends on an earlier request's results."""

    stage: str
    kernel: str
    rows: int
    up: int
    down: int
    estimated: bool = False


@dataclass
class Plan:
    """What :func:`plan_run` found: the requests, the evaluation read's placement per SAE
    (as :attr:`sage_nn.model.remote.Remote.placements`), and the assumptions made."""

    model: str
    transport: str
    requests: list[PlannedRequest]
    placements: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def totals(self, stage: str | None = None, code: bool = True) -> tuple[int, int]:
        """Bytes up and down of ``stage``'s requests (all with ``None``), with each
        request's :data:`CODE_BYTES` unless ``code=False``."""
        chosen = [r for r in self.requests if stage in (None, r.stage)]
        extra = len(chosen) if code else 0
        return (sum(r.up for r in chosen) + extra * CODE_BYTES[0],
                sum(r.down for r in chosen) + extra * CODE_BYTES[1])

    def requests_per_stage(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.requests:
            out[r.stage] = out.get(r.stage, 0) + 1
        return out

    def to_dict(self) -> dict:
        up, down = self.totals()
        return {"model": self.model, "transport": self.transport,
                "requests": [asdict(r) for r in self.requests], "placements": self.placements,
                "requests_per_stage": self.requests_per_stage(), "total_up_bytes": up,
                "total_down_bytes": down, "code_bytes_per_request": list(CODE_BYTES),
                "notes": self.notes}

    def lines(self) -> list[str]:
        """The plan as a reader reads it: one line per request and per stage, the total,
        where each SAE would be encoded, and the assumptions."""
        mb = lambda n: f"{n / 1e6:10.2f}"  # noqa: E731
        out = [f"dry run: {self.model}, transport {self.transport}; nothing was sent",
               f"{'stage':<12}{'request':<14}{'rows':>7}{'up MB':>11}{'down MB':>11}"]
        for r in self.requests:
            out.append(f"{r.stage:<12}{r.kernel + ('*' if r.estimated else ''):<14}"
                       f"{r.rows:>7}{mb(r.up)}{mb(r.down)}")
        for stage, n in self.requests_per_stage().items():
            up, down = self.totals(stage)
            out.append(f"{stage}: {n} request{'s' * (n > 1)}, {up / 1e6:.2f} MB up, "
                       f"{down / 1e6:.2f} MB down")
        up, down = self.totals()
        out.append(f"total: {len(self.requests)} requests, {up / 1e6:.2f} MB up, "
                   f"{down / 1e6:.2f} MB down ({up / 1e9 + down / 1e9:.3f} GB; with "
                   f"{CODE_BYTES[0] / 1e6:.2f} + {CODE_BYTES[1] / 1e6:.2f} MB of code and "
                   "framing a request)")
        if self.placements:
            out.append("where the evaluation's read encodes each SAE (the bytes of encoding "
                       "on the server, or here, where the residual rows a layer's SAEs read "
                       "are downloaded once for all of them):")
            by_layer: dict[tuple, dict] = {}  # an SAE's jobs at one layer, together
            for p in self.placements:
                key = (p["sae"], p["layer"])
                if key in by_layer:
                    by_layer[key]["server_bytes"] += p["server_bytes"]
                else:
                    by_layer[key] = dict(p)
            for p in by_layer.values():
                out.append(f"  {p['sae']} L{p['layer']} (width {p['width']}): "
                           f"{p['placement']}; server {p['server_bytes'] / 1e6:.2f} MB, "
                           f"here {p['here_bytes'] / 1e6:.2f} MB (shared by "
                           f"{p['saes_sharing_here']} SAE{'s' * (p['saes_sharing_here'] > 1)})")
        if any(r.estimated for r in self.requests):
            out.append("* estimated from sizes (it depends on an earlier request's results): "
                       "an upper bound")
        out += [f"note: {n}" for n in self.notes]
        return out


def plan_run(config: RunConfig, *, model: Any = None, cross_sections: dict | None = None,
             saes: dict | None = None) -> Plan:
    """The requests ``config``'s run would send, without sending any (:class:`Plan`).

    ``model``: the model (any, e.g. a configuration built on the meta device; default:
    ``config.model`` loaded without weights). ``cross_sections``: ``{attribute: [(site,
    position), ...]}`` (default: the run directory's discovery, else an assumed upper
    bound, said in the notes). ``saes``: ``{name: coder or SAEs}`` (default: the run's
    ``--sae`` values, as SAEs of their configs' shapes on the meta device).
    """
    from ..discovery.stage import discover
    from ..evaluation.coders import CrossSection
    from ..evaluation.scoring import evaluate_cross_section
    from ..model.remote import Planned, Remote
    from ..model.sites import Site
    from ..tasks.datasets import logit_diffs
    from .stages import discovery_settings, served_restriction
    from .validate import InvalidRunError, validate

    if not config.remote:
        raise InvalidRunError([("--dry-run plans the requests of a remote run; fix: add "
                                "--remote (ndif, local or a host URL)")])
    # what a run would refuse, refused before planning it (SAEs given: not the run's own,
    # nor its training corpus)
    problems = [p for p in validate(config, model=model)
                if saes is None or not p.startswith(("--sae", "saes", "sae_corpus"))]
    if problems:
        raise InvalidRunError(problems)
    model = model if model is not None else meta_model(config.model)
    notes: list[str] = []
    remote = Remote(config.remote, dry_run=True, max_prompts=config.max_prompts_per_request,
                    transport=config.remote_transport, placement=config.remote_placement)
    _, fit, held_out = run_prompts(model, config)
    attributes = config.attributes or fit.attribute_names
    planned: list[PlannedRequest] = []

    def stage(name: str, compute) -> None:
        remote.stage, first = name, len(remote.requests)
        try:
            compute()
        except Planned:
            pass
        planned.extend(PlannedRequest(name, r.kernel, r.rows, r.up, r.down)
                       for r in remote.requests[first:])

    stage("task", lambda: logit_diffs(model, held_out, config.batch_size, remote=remote))
    restriction = served_restriction(config, model)
    settings = discovery_settings(config, attributes, restriction)
    prompts = fit.subset(np.arange(min(config.n_discovery, len(fit))))
    stage("discovery", lambda: discover(model, prompts, settings, remote=remote))
    scored = planned[-1]  # the search patches the same prompts and their counterfactuals
    if config.top_k is None:
        planned.append(PlannedRequest("discovery", "grow", scored.rows, scored.up,
                                      4 * 8 * len(attributes) * (config.max_sites + 1),
                                      estimated=True))
    else:
        planned += _validation_requests(model, prompts, attributes, restriction, config)
    pairs = cross_sections or stored_cross_sections(config)
    if pairs is None:
        pairs = assumed_cross_sections(config, model, held_out, attributes, restriction)
        notes.append("cross-sections assumed (discovery has not run): each attribute "
                     f"{len(next(iter(pairs.values())))} sites of kind "
                     f"{next(iter(pairs.values()))[0][0].kind} at the last token, each in "
                     "its own layer (the most the read can need)")
    pairs = {a: [(Site.parse(s), str(p)) for s, p in ps] for a, ps in pairs.items()}
    coders = saes if saes is not None else planned_saes(config, model, pairs, notes)
    sections = [CrossSection(a, ps) for a, ps in pairs.items()]
    stage("evaluation", lambda: evaluate_cross_section(
        model, fit, held_out, sections, coders, ks=config.ks, n_boot=config.n_boot,
        seed=config.seed, batch_size=config.batch_size, remote=remote))
    planned += _later_evaluation_requests(model, held_out, sections, coders, config)
    notes.append("the patched runs' greedy and F1 edits are planned dense (an upper bound: "
                 "each is sent as sparse moves where that is fewer bytes)")
    name = str(getattr(model.config, "_name_or_path", "") or config.model)
    return Plan(name, config.remote_transport, planned, list(remote.placements), notes)


def meta_model(name: str) -> Any:
    """``name`` as a remote run holds it: on the meta device, no weights read."""
    from ..model.loading import load_model

    return load_model(name, remote=True)


def stored_cross_sections(config: RunConfig) -> dict | None:
    """The run directory's discovered cross-sections, when discovery has run there."""
    path = Path(config.run_dir) / "discovery" / "cross_sections.csv"
    if not path.exists():
        return None
    import pandas as pd

    table = pd.read_csv(path)
    return {str(a): list(zip(t.site, t.position)) for a, t in table.groupby("attribute",
                                                                          sort=False)}


def assumed_cross_sections(config: RunConfig, model: Any, data: Any, attributes: list[str],
                           restriction) -> dict:
    """An upper bound for a plan before discovery: each attribute ``top_k`` (else
    ``max_sites``) sites of the first selectable kind at the last token, one per layer
    (top layers of those the SAEs serve), every attribute the same."""
    from ..model.sites import HEAD_KINDS, Site, adapter

    ad = adapter(model)
    layers, kinds = restriction or (list(range(ad.n_layers)), select_kinds_of(config))
    kind = kinds[0]
    n = min(config.top_k or config.max_sites, len(layers))
    last = max(sorted(data.positions), key=lambda p: int(np.sum(data.positions[p])))
    sites = [Site(layer, kind, 0 if kind in HEAD_KINDS else None) for layer in layers[-n:]]
    return {a: [(s, last) for s in sites] for a in attributes}


def meta_sae(d_in: int, d_sae: int, site: Any, architecture: str = "topk",
             k: int | None = 32) -> Any:
    """An SAE of these shapes on the meta device (no memory): what a plan needs of it."""
    import torch

    from ..dictionaries.saes import SparseAutoencoder

    with torch.device("meta"):
        extra = {"threshold": torch.empty(d_sae)} if architecture == "jumprelu" else {}
        if architecture == "gated":
            extra = {"b_gate": torch.empty(d_sae), "r_mag": torch.empty(d_sae),
                     "b_mag": torch.empty(d_sae)}
        return SparseAutoencoder(torch.empty(d_in, d_sae), torch.empty(d_sae),
                                 torch.empty(d_sae, d_in), torch.empty(d_in),
                                 architecture=architecture,
                                 k=k if architecture == "topk" else None, layer=site.layer,
                                 # as sae_lens trains TopK SAEs (and sage_nn with it): the
                                 # encoder then carries the decoder's row norms
                                 rescale_acts_by_decoder_norm=architecture == "topk",
                                 kind=site.kind, heads=[site.head] if site.head is not None
                                 else None, **extra)


def planned_saes(config: RunConfig, model: Any, pairs: dict, notes: list[str]) -> dict:
    """The run's ``--sae`` values as coders of SAEs on the meta device, of the shapes their
    configs give (a trained one: the run's width; a release not in the HF cache: assumed
    to be the run's ``sae_width``, said in ``notes``)."""
    from ..dictionaries.serving import residual_sites_for
    from ..evaluation.coders import DirectSAE, ReconstructedSAE
    from ..model.sites import HEAD_KINDS, Site, adapter
    from .specs import (
        at_sites,
        expand_sae_specs,
        train_options,
        train_spec,
        trained_sites,
    )

    ad = adapter(model)
    every = [p for ps in pairs.values() for p in ps]
    needed = residual_sites_for(every, ad.parallel, config.reconstruction)
    coders = {}
    for spec in expand_sae_specs(config.saes):
        if spec.startswith("train:"):
            arch = train_spec(spec)[0]
            options = train_options(spec)
            width = int(options.get("width", config.sae_width))
            members = [meta_sae(ad.width(s.kind), width, s, arch, int(options.get("k", 32)))
                       for s in map(Site.parse, trained_sites(spec, needed, every))]
            name = f"{arch}-{width}" + (f"-k{options['k']}" if "k" in options else "") + \
                ("@sites" if at_sites(spec) else "")
        else:
            members, name = _configured_saes(spec, config, notes), Path(spec).name or spec
        for sae in members:
            if sae.kind in HEAD_KINDS and sae.heads is None:
                sae.heads = list(range(ad.n_heads_of(sae.kind)))
        coders[name] = DirectSAE(members) if at_sites(spec) else ReconstructedSAE(
            members, batch_size=config.batch_size, mode=config.reconstruction)
    return coders


def _configured_saes(spec: str, config: RunConfig, notes: list[str]) -> list:
    """A directory's (or a cached release's) SAEs at their configs' shapes."""
    from ..dictionaries.releases import cached_folder, expand, release_folder
    from ..model.sites import Site, parse_site

    path = Path(spec).expanduser()
    if path.is_dir():
        folders = [path] if (path / "cfg.json").exists() else sorted(
            p.parent for p in path.glob("*/cfg.json"))
    else:
        release, ids = expand(spec)
        folders = []
        for i in ids:
            repo, folder, _ = release_folder(release, i)
            local = cached_folder(repo, folder)
            if local is None or not (local / "cfg.json").exists():
                raise ValueError(f"--sae {spec!r} ({i}): its config is not in the HF cache, "
                                 "so its width is unknown here; fix: download it where the "
                                 "hub is reachable, or plan with saes= of its shapes")
            folders.append(local)
    out = []
    for folder in folders:
        cfg = json.loads((folder / "cfg.json").read_text())
        hook = (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name")
        layer, kind, heads = parse_site(hook)
        site = Site(layer, kind, heads[0] if heads else None)
        out.append(meta_sae(int(cfg["d_in"]), int(cfg["d_sae"]), site,
                            cfg.get("architecture", "standard"), cfg.get("k")))
    return out


def _later_evaluation_requests(model, data, sections, coders, config) -> list:
    """The evaluation's requests after its read, from sizes: the patched runs of every
    variant (per attribute: mean and counterfactual; per dictionary, the ceiling, each SAE
    and its floor: sufficiency, necessity and, where it has directions, greedy and F1
    edits at each k), and the second forward of sublayer sites without directions
    (mlp_out, difference mode), where there are any."""
    import torch

    from ..model.activations import batches, encode
    from ..model.sites import adapter

    ad = adapter(model)
    size, n = getattr(torch, config.remote_transport).itemsize, len(data)
    inputs, n_batches = 0, 0  # tokens, mask, positions (int64), answer and distractor ids
    for idx in batches(n, config.batch_size):
        n_batches += 1
        batch = encode(model, [data.prompts[i] for i in idx])
        inputs += 3 * batch.inputs["input_ids"].numel() * 8 + 2 * len(idx) * 8
    edits, variants, values, nonlinear = 2 * len(config.ks), 0, 0, []
    for cs in sections:
        count = 2 + (2 + edits)  # mean, counterfactual; the ceiling
        for coder in coders.values():
            missing = [(s, p) for s, p in cs.pairs if _without_directions(coder, s)]
            count += 2 * (2 + (0 if missing else edits))  # the SAE and its floor
            nonlinear += missing
        variants += count  # each patches every pair: a value and a row and column index,
        # and in each batch at most one channel index (int64) a channel
        values += count * sum(n * (ad.width(s.kind) * size + 16) + n_batches * ad.width(
            s.kind) * 8 for s, _ in cs.pairs)
    out = [PlannedRequest("evaluation", "patch", n, inputs + values, n * (1 + variants) * 16,
                          estimated=True)]
    if nonlinear:  # held-out and counterfactual prompts, clean and scratch rows
        saes = sum(int(p.numel()) * 4 for c in coders.values()
                   for sae in getattr(c, "saes", []) for p in sae.parameters())
        rows = 2 * n * len({p for _, p in nonlinear})
        down = rows * (ad.config.vocab_size + 2 * len({s for s, _ in nonlinear}) * ad.d_model)
        out.append(PlannedRequest("evaluation", "reconstruct", rows, 2 * inputs + saes,
                                  4 * down, estimated=True))
    return out


def _validation_requests(model, data, attributes, restriction, config) -> list:
    """The top-k selections' exact patching, from sizes (:func:`~sage_nn.discovery.
    selection.validate_all`, three requests): the counterfactual values at every selected
    site, every site and all of them patched, the counterfactual prompts' logit
    differences; each site as wide as the widest selectable kind."""
    import torch

    from ..model.activations import batches, encode
    from ..model.sites import adapter

    ad = adapter(model)
    size, n, A, K = getattr(torch, config.remote_transport).itemsize, len(data), \
        len(attributes), config.top_k
    width = max(ad.width(k) for k in (restriction[1] if restriction else
                                      select_kinds_of(config)))
    inputs, n_batches = 0, 0  # tokens, mask, positions (int64), answer and distractor ids
    for idx in batches(n, config.batch_size):
        n_batches += 1
        batch = encode(model, [data.prompts[i] for i in idx])
        inputs += 3 * batch.inputs["input_ids"].numel() * 8 + 2 * len(idx) * 8
    cf_inputs = 2 * A * inputs  # counterfactuals may tokenize longer: twice, to be safe
    pair = n * (width * size + 16) + n_batches * width * 8  # one patch of one site
    return [PlannedRequest("discovery", "read", A * n, cf_inputs,  # all sites, every set
                           A * n * A * K * width * size, estimated=True),
            PlannedRequest("discovery", "patch", n, inputs + A * 2 * K * pair,
                           n * (1 + A * (K + 1)) * 16, estimated=True),
            PlannedRequest("discovery", "patch", A * n, cf_inputs, A * n * 16, estimated=True)]


def _without_directions(coder: Any, site: Any) -> bool:
    """Whether a coder reaches ``site`` without per-latent directions (no edits there)."""
    mode = getattr(coder, "mode", None)
    return mode is not None and site.kind not in ("resid_pre", "resid_mid", "resid_post") and (
        mode == "difference" or site.kind == "mlp_out")
