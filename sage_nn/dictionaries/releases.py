"""sae_lens releases named on the command line: ``RELEASE:SAE_ID`` or ``RELEASE:ID_GLOB``.

A release is an entry of sae_lens's registry (``pretrained_saes.yaml``: a HuggingFace repo
and, per SAE id, the folder holding it). ``$SAGE_NN_SAE_REGISTRY`` adds entries of your own:
one or more YAML files (separated by ``:``) in the same format, e.g.::

    my-release:
      repo_id: me/my-saes
      model: smollm2-135m
      conversion_func: null        # folders written by SAE.save_model (cfg.json + weights)
      saes:
        - {id: blocks.8.hook_resid_post, path: blocks.8.hook_resid_post}

They are added to sae_lens's own registry (:func:`register`), so ``SAE.from_pretrained``
loads them like any public release, from the HuggingFace cache when the hub is offline.

Everything here runs before any forward: :func:`expand` turns a glob into the release's ids,
and :func:`hook_names` reads each SAE's hook name from its config alone (no weights), so a
run knows which sites its SAEs serve before discovery starts.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["REGISTRY_ENV", "RegistryError", "registry", "registry_problems", "register",
           "is_release_spec", "split_spec", "expand", "hook_names", "cached_folder",
           "sae_config", "cfg_site"]

log = logging.getLogger("sage_nn")
REGISTRY_ENV = "SAGE_NN_SAE_REGISTRY"
GLOB_CHARS = "*?["


def _extra_files() -> list[Path]:
    return [Path(p).expanduser() for p in os.environ.get(REGISTRY_ENV, "").split(os.pathsep)
            if p.strip()]


def _read_yaml(path: Path) -> dict:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(path.read_text(), Loader=loader) or {}


class RegistryError(ValueError):
    """A ``$SAGE_NN_SAE_REGISTRY`` file that is missing, not YAML, or not a registry;
    ``problems`` holds one line per problem (file, line, what is wrong, the fix)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


_FORMAT = "format: a mapping of releases, as in sage_nn/releases.py or sae_lens's " \
          "pretrained_saes.yaml"


def registry_problems() -> list[str]:
    """Every problem of the ``$SAGE_NN_SAE_REGISTRY`` files, one line each naming the file
    and line ([] if none): read before any SAE, so a typo is not a traceback."""
    return [p for path in _extra_files() for p in _file_problems(path)]


def _file_problems(path: Path) -> list[str]:
    import yaml

    where = f"${REGISTRY_ENV} file {path}"
    try:
        text = path.read_text()
    except OSError as err:
        return [f"{where}: cannot be read ({err.strerror or err}); fix: correct the path in "
                f"${REGISTRY_ENV} (several files are separated by '{os.pathsep}')"]
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        line = f", line {mark.line + 1}" if mark is not None else ""
        what = " ".join(str(getattr(err, "problem", None) or err).split())
        context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
        if context and start is not None:  # where the unclosed bracket or quote began
            what = f"{context} at line {start.line + 1}: {what}"
        return [f"{where}{line}: not valid YAML ({what}); fix: correct that line ({_FORMAT})"]
    if root is None:
        return []
    if not isinstance(root, yaml.MappingNode):
        return [f"{where}, line {root.start_mark.line + 1}: not a mapping of releases; fix: "
                f"write 'RELEASE: {{repo_id: ..., saes: [...]}}' entries ({_FORMAT})"]
    problems = []
    for key, value in root.value:
        at = f"{where}, line {value.start_mark.line + 1}: release {key.value!r}"
        fields = dict((k.value, v) for k, v in value.value) \
            if isinstance(value, yaml.MappingNode) else None
        if fields is None:
            problems.append(f"{at} is not a mapping; fix: give it repo_id and saes ({_FORMAT})")
            continue
        if not isinstance(fields.get("repo_id"), yaml.ScalarNode) or \
                not fields["repo_id"].value:
            problems.append(f"{at} has no repo_id; fix: add 'repo_id: ORG/REPO' (the "
                            "HuggingFace repo holding its SAEs)")
        saes = fields.get("saes")
        if not isinstance(saes, yaml.SequenceNode):
            problems.append(f"{at} has no list of saes; fix: add 'saes: [{{id: ..., path: "
                            "...}}]'")
            continue
        for item in saes.value:
            ids = [k.value for k, _ in item.value] if isinstance(item, yaml.MappingNode) else []
            if "id" not in ids:
                problems.append(f"{where}, line {item.start_mark.line + 1}: an SAE of release "
                                f"{key.value!r} has no id; fix: write it as "
                                "'{id: SAE_ID, path: FOLDER}'")
    return problems


@functools.lru_cache(maxsize=1)
def _sae_lens_yaml() -> dict:
    """sae_lens's pretrained_saes.yaml, read as YAML (importing sae_lens takes longer)."""
    spec = importlib.util.find_spec("sae_lens")
    return _read_yaml(Path(spec.submodule_search_locations[0]) / "pretrained_saes.yaml")


def _extras() -> dict:
    problems = registry_problems()
    if problems:
        raise RegistryError(problems)
    out = {}
    for path in _extra_files():
        out.update(_read_yaml(path))
    return out


def registry() -> dict[str, dict]:
    """Every known release as raw registry entries: sae_lens's, then ``$SAGE_NN_SAE_REGISTRY``'s."""
    return {**_sae_lens_yaml(), **_extras()}


def register() -> None:
    """Add the ``$SAGE_NN_SAE_REGISTRY`` releases to sae_lens's registry (the dict its
    cached ``get_pretrained_saes_directory()`` returns), so ``SAE.from_pretrained`` finds them."""
    extras = _extras()
    if not extras:
        return
    from sae_lens.loading.pretrained_saes_directory import (
        PretrainedSAELookup,
        get_pretrained_saes_directory,
    )

    directory = get_pretrained_saes_directory()
    for release, value in extras.items():
        saes = value.get("saes") or []
        ids = [str(s["id"]) for s in saes]
        directory[release] = PretrainedSAELookup(
            release=release, repo_id=value["repo_id"], model=value.get("model", ""),
            conversion_func=value.get("conversion_func"),
            saes_map={str(s["id"]): str(s.get("path", s["id"])) for s in saes},
            expected_var_explained={i: s.get("variance_explained", 1.0)
                                    for i, s in zip(ids, saes)},
            expected_l0={i: s.get("l0", 0.0) for i, s in zip(ids, saes)},
            neuronpedia_id={i: s.get("neuronpedia") for i, s in zip(ids, saes)},
            norm_scaling_factor={i: s["norm_scaling_factor"] for i, s in zip(ids, saes)
                                 if "norm_scaling_factor" in s},
            config_overrides=value.get("config_overrides"))


def is_release_spec(spec: str) -> bool:
    """``RELEASE:SAE_ID`` (or a glob of ids), not a path or a ``train:`` spec."""
    spec = str(spec)
    return (":" in spec and not spec.startswith(("train:", ".", "/", "~"))
            and not Path(spec).expanduser().exists())


def split_spec(spec: str) -> tuple[str, str]:
    release, pattern = str(spec).split(":", 1)
    return release, pattern


def is_glob(pattern: str) -> bool:
    return any(c in pattern for c in GLOB_CHARS)


def expand(spec: str) -> tuple[str, list[str]]:
    """``(release, [sae ids])`` of ``RELEASE:ID`` or ``RELEASE:ID_GLOB`` (fnmatch over the
    release's ids, in the registry's order). Raises ``ValueError`` with the fix when the
    release is unknown or nothing matches."""
    release, pattern = split_spec(spec)
    reg = registry()
    if release not in reg:
        if "/" in release and not is_glob(pattern):  # a HuggingFace repo, as sae_lens allows
            return release, [pattern]
        close = [r for r in reg if release.lower() in r.lower()][:3]
        raise ValueError(
            f"--sae {spec!r}: unknown sae_lens release {release!r}; fix: use a release of "
            "sae_lens's pretrained_saes.yaml" + (f" (e.g. {', '.join(close)})" if close else "")
            + f", add your own in a YAML file named by ${REGISTRY_ENV}, or give an SAE directory")
    ids = [str(s["id"]) for s in reg[release].get("saes") or []]
    matched = [i for i in ids if fnmatch.fnmatchcase(i, pattern)] if is_glob(pattern) else \
        [i for i in ids if i == pattern]
    if not matched:
        what = "has no SAE id matching" if is_glob(pattern) else "has no SAE"
        raise ValueError(f"--sae {spec!r}: release {release!r} {what} {pattern!r}; fix: use "
                         f"one of {', '.join(ids[:4])}{', ...' if len(ids) > 4 else ''} "
                         "(globs such as '*resid_post*' match several)")
    return release, matched


def release_folder(release: str, sae_id: str) -> tuple[str, str, str | None]:
    """``(repo_id, folder, conversion_func)`` of one SAE of a release."""
    entry = registry().get(release)
    if entry is None:
        return release, sae_id, None
    paths = {str(s["id"]): str(s.get("path", s["id"])) for s in entry.get("saes") or []}
    return entry["repo_id"], paths[sae_id], entry.get("conversion_func")


def cached_folder(repo_id: str, folder: str) -> Path | None:
    """The folder of a HuggingFace repo in the local HF cache (any snapshot), or None."""
    from huggingface_hub.constants import HF_HUB_CACHE

    snapshots = Path(HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return next((snap / folder for snap in sorted(snapshots.glob("*"))
                 if (snap / folder).exists()), None)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")


def sae_config(release: str, sae_id: str) -> dict[str, Any]:
    """The config of an SAE of a release, without its weights: the cached cfg.json of a
    sae_lens-format folder, else sae_lens's own config reader (which downloads only the
    config, or reads it from the HF cache when offline)."""
    repo_id, folder, conversion = release_folder(release, sae_id)
    if conversion in (None, "sae_lens"):
        local = cached_folder(repo_id, folder)
        if local is not None and (local / "cfg.json").exists():
            return json.loads((local / "cfg.json").read_text())
    register()
    from sae_lens.loading.pretrained_sae_loaders import (
        load_sae_config_from_huggingface,
    )

    return load_sae_config_from_huggingface(release, sae_id)


def _hook(cfg: dict, key: str = "hook_name") -> str | None:
    return (cfg.get("metadata") or {}).get(key) or cfg.get(key) or \
        (cfg.get("hook_point") if key == "hook_name" else None)


def hook_name(release: str, sae_id: str) -> str | None:
    """The hook name an SAE of a release reads, from its config alone (no weights)."""
    return _hook(sae_config(release, sae_id))


def cfg_site(cfg: dict) -> str | None:
    """What an SAE config says it serves, for :func:`~sage_nn.dictionaries.serving.served_sites`:
    the hook it reads, or for a transcoder ``transcoder:L.mlp_out`` (the site it writes;
    None where its hooks are not those of an MLP)."""
    from ..common.formats import SAE_ARCHITECTURES
    from .serving import TRANSCODER_PREFIX, transcoder_sites

    hook = _hook(cfg)
    spec = SAE_ARCHITECTURES.get(cfg.get("architecture", "standard"))
    if spec is None or not spec.transcoder or hook is None:
        return hook
    try:
        where = transcoder_sites(hook, _hook(cfg, "hook_name_out"))
    except ValueError:
        return None
    return f"{TRANSCODER_PREFIX}L{where['layer']}.{where['kind']}"


def hook_names(spec: str) -> dict[str, str | None]:
    """``{sae_id: hook name}`` of every SAE a ``RELEASE:ID[_GLOB]`` spec names."""
    release, ids = expand(spec)
    out = {}
    for i in ids:
        try:
            out[i] = hook_name(release, i)
        except Exception as err:
            hint = ("the hub is disabled (HF_HUB_OFFLINE=1) and the HF cache lacks its config"
                    if hub_offline() else "check that huggingface.co is reachable")
            raise RuntimeError(f"--sae {spec!r}: cannot read the config of SAE {i!r} of "
                               f"release {release!r} ({type(err).__name__}: {err}); {hint}, "
                               "or give the SAEs' local directory") from err
    return out


def _dir_hook(directory: Path) -> str | None:
    try:
        cfg = json.loads((directory / "cfg.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg_site(cfg) if isinstance(cfg, dict) else None


def _member_site(directory: Path) -> str | None:
    """A member of a directory of SAEs: a transcoder by what its config says it writes, an
    SAE by its folder's name (where ``sage train-sae`` loads it)."""
    from .serving import TRANSCODER_PREFIX

    site = _dir_hook(directory)
    return site if site and site.startswith(TRANSCODER_PREFIX) else directory.name


def spec_sites(spec: str) -> list[str] | None:
    """The sites (hook names or sage site names; ``transcoder:L.mlp_out`` for a transcoder,
    :func:`cfg_site`) of the SAEs an ``--sae`` spec names, read from their configs alone; ``None`` for ``train:`` specs (trained wherever needed) and for
    specs whose SAEs say nothing about their site."""
    spec = str(spec)
    if spec.startswith("train:"):
        return None
    path = Path(spec).expanduser()
    if (path / "cfg.json").exists():
        found = [_dir_hook(path)]
    elif path.is_dir():  # SAEs trained by sage train-sae are loaded at their folder's name
        found = [_member_site(d) for d in sorted(p.parent for p in path.glob("*/cfg.json"))]
    elif is_release_spec(spec):
        try:
            release, ids = expand(spec)
            found = [cfg_site(sae_config(release, i)) for i in ids]
        except Exception as err:  # noqa: BLE001 (unknown sites: nothing is restricted)
            log.warning("--sae %s: cannot read its SAEs' hook names (%s: %s); discovery is "
                        "not limited to what they serve", spec, type(err).__name__, err)
            return None
    else:
        return None
    return None if not found or any(h is None for h in found) else found
