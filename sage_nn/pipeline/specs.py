"""The ``--sae`` values: parsing ``train:ARCH[:KEY=V,...][@sites]`` and expanding sweeps and
folders into one SAE each, and what the named SAEs serve, which limits discovery."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ..dictionaries.serving import TRANSCODER_PREFIX, served_sites, serving_sae
from .config import RunConfig, select_kinds_of

if TYPE_CHECKING:  # xarray loads where a stage reads or writes a Dataset (not for --help)
    pass
log = logging.getLogger("sage_nn")


class UnservableRunError(ValueError):
    """The run's SAEs serve no site a cross-section may hold."""


def discovery_restriction(config: "RunConfig", n_layers: int, parallel: bool | None,
                          spec_sites: dict[str, list[str]] | None = None
                          ) -> tuple[list[int], list[str]] | None:
    """``(layers, select_kinds)`` discovery is limited to: the sites every ``--sae`` that
    names SAEs already made (a release, a directory) or trains transcoders (they serve
    mlp_out) serves (each SAE is evaluated at every cross-section site). SAEs a run
    trains (``train:``) are trained wherever the cross-sections are, so they restrict
    nothing: beside given SAEs they are trained where those serve. ``None`` when only
    such SAEs are named, or a given SAE's sites are unknown; SAEs at heads restrict
    nothing either (they serve single heads, which layers and kinds cannot say).
    Raises :class:`UnservableRunError` (one line, with the fix) when nothing is served.

    ``spec_sites``: the sites of each spec when already read (else read from configs)."""
    from ..dictionaries.releases import spec_sites as read_sites
    from ..model.sites import HEAD_KINDS, parse_site

    made = [s for s in config.saes if not str(s).startswith("train:")]
    trained = [s for s in config.saes if str(s).startswith("train:")]
    if not made and not any(trains_transcoders(s) for s in trained):
        return None  # SAEs trained wherever discovery finds the cross-sections
    # a trained transcoder serves the mlp_out of every layer (it is trained where needed)
    every_mlp = [f"transcoder:L{layer}.mlp_out" for layer in range(n_layers)]
    sites = {s: every_mlp for s in trained if trains_transcoders(s)}
    sites.update({s: (spec_sites or {}).get(s) or read_sites(s) for s in made})
    if any(v is None for v in sites.values()):
        return None
    # SAEs at heads serve single heads, which layers and kinds cannot say: applied where
    # they are, they restrict nothing (a cross-section head without one is refused later)
    sites = {s: found for s, found in sites.items()
             if not all(not str(n).startswith(TRANSCODER_PREFIX)
                        and parse_site(n)[1] in HEAD_KINDS for n in found)}
    if not sites:
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
        given = [s for s in config.saes if s in sites]
        raise UnservableRunError(
            f"--sae {' '.join(given)}: these SAEs (at {', '.join(have[:6])}"
            f"{', ...' if len(have) > 6 else ''}) serve no cross-section site of kinds "
            f"{wanted} in {config.reconstruction} mode (every --sae must serve every site)"
            f"{': ' + need if need else ''}; fix: add SAEs at those residual sites,{hint} "
            + ("or evaluate them in a run of their own" if trained else
               "or add --sae train:topk"))
    kinds = [k for k in wanted if any(k == kind for _, kind in usable)]
    return sorted({layer for layer, kind in usable}), kinds


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
    meta = cfg.get("metadata") or {}  # sae_lens 6 keeps the hook there
    if meta.get("sage_nn_site"):  # one head of a layer's z: the site names the head
        return str(meta["sage_nn_site"])
    hook = cfg.get("hook_name") or meta.get("hook_name")
    return f"{hook}|{cfg.get('hook_head_index', meta.get('hook_head_index'))}"


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


def at_sites(spec: str) -> bool:
    """``train:ARCH@sites``: SAEs trained at the cross-section sites themselves."""
    return spec.startswith("train:") and spec.endswith("@sites")


def trains_transcoders(spec: str) -> bool:
    """``train:transcoder`` / ``train:skip_transcoder``: transcoders of the MLPs."""
    from ..common.formats import TRAINED_TRANSCODERS

    return str(spec).startswith("train:") and parse_train_spec(spec)[0] in TRAINED_TRANSCODERS


def trained_sites(spec: str, residual: list[str], pairs: list[tuple]) -> list[str]:
    """The sites an ``--sae`` spec needs SAEs at: one at each cross-section site itself
    (``train:topk@sites``: the sublayer-native comparison), a transcoder at each
    cross-section ``mlp_out`` (``train:transcoder``), else the residual sites the
    cross-sections need."""
    if trains_transcoders(spec):
        return list(dict.fromkeys(str(site) for site, _ in pairs if site.kind == "mlp_out"))
    if at_sites(spec):
        return list(dict.fromkeys(str(site) for site, _ in pairs))
    return residual


def train_spec(spec: str) -> tuple[str, bool]:
    """``train:ARCH[:KEY=V...][@sites]`` -> (architecture, at the cross-section sites)."""
    arch, at_sites, _ = parse_train_spec(spec)
    return arch, at_sites


def train_options(spec: str) -> dict:
    """The one value of each option of an expanded ``train:`` spec (``{"k": 8}``)."""
    options = parse_train_spec(spec)[2]
    if any(len(v) != 1 for v in options.values()):
        raise ValueError(f"--sae {spec!r} names a sweep: expand it (expand_sae_specs) first")
    return {k: v[0] for k, v in options.items()}


def train_group(spec: str) -> tuple:
    """Trained SAEs of one architecture and options share one training (and cache)."""
    return (train_spec(spec)[0], tuple(sorted(train_options(spec).items())))


def _serves_as_transcoder(spec: str) -> bool:
    from ..dictionaries.releases import spec_sites
    from ..dictionaries.serving import TRANSCODER_PREFIX

    if str(spec).startswith("train:"):
        return trains_transcoders(spec)
    found = spec_sites(spec) or []
    return bool(found) and all(str(s).startswith(TRANSCODER_PREFIX) for s in found)


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
    transcoders = [s for s in config.saes if _serves_as_transcoder(s)]
    if transcoders:  # every --sae serves every site: transcoders hold it to their mlp_out
        return (f"{flag} {' '.join(wanted)}: --sae {' '.join(transcoders)} (transcoders) "
                f"serve only the mlp_out they write, so cross-sections hold only "
                f"{' and '.join(kinds)} (layers {layers}); fix: leave {' '.join(dropped)} out "
                f"of {flag}, or compare {' '.join(dropped)} in a run without transcoders")
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
