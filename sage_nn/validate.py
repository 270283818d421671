"""Check everything a run needs before the first forward, and report every problem at once.

A run that fails after seven minutes of discovery because an SAE path is misspelt wastes
the seven minutes; :func:`validate` reads only configs, file names and the tokenizer, so it
answers in seconds::

    problems = validate(RunConfig(task="ioi", saes=["/no/such/sae"]))
    # ["--sae '/no/such/sae': no such directory; fix: give a directory ..."]
    check(config)   # raises InvalidRunError listing them all

Each problem is one line that names what is wrong and how to fix it. :func:`run` and the
``sage`` command call :func:`check` before they load the model.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from .formats import (SAE_ARCHITECTURES, TRAINABLE, gguf_problem, model_weights_problem,
                      sae_weights_problem)

__all__ = ["InvalidRunError", "check", "validate", "model_problems", "sae_problems",
           "task_problems"]

_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


class InvalidRunError(ValueError):
    """A run that cannot work; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(f"{len(problems)} problem{'s' if len(problems) > 1 else ''} "
                         "before the run started:\n  " + "\n  ".join(problems))


def check(config: Any, model: Any = None) -> None:
    """Raise :class:`InvalidRunError` listing every problem :func:`validate` finds."""
    problems = validate(config, model=model)
    if problems:
        raise InvalidRunError(problems)


def validate(config: Any, model: Any = None) -> list[str]:
    """Every problem of a :class:`~sage_nn.pipeline.RunConfig`, one line each ([] if none).

    ``model``: the loaded model a run is given (then ``config.model`` is only its label and
    the task is counted with its tokenizer). Nothing runs the model.
    """
    problems = field_problems(config)
    config_of_model = None
    if model is None:
        found, config_of_model = _model_config(config.model, on_server=_on_server(config))
        problems += found
    else:
        config_of_model = model.config
    specs = config.saes if isinstance(config.saes, list) else []
    try:
        from .pipeline import expand_sae_specs
        specs = expand_sae_specs(specs)  # a sweep or a folder: each of its SAEs
    except (ValueError, TypeError, AttributeError):
        pass  # sae_problems names what is wrong with the spec
    registry = _registry_problems(specs)
    problems += registry  # read once, before the release specs that name its releases
    for spec in specs:
        if not (registry and _is_release(spec)):
            problems += sae_problems(spec, config, config_of_model)
    if not registry and not any(p.startswith(("--sae", "saes")) for p in problems):
        problems += served_problems(config, config_of_model)
    problems += corpus_problems(config)
    problems += run_dir_problems(config.run_dir)
    tokenizer = None  # the task is counted only with valid sizes and a tokenizer at hand
    if not any(p.startswith(("n_fit", "n_eval", "seed", "sae_", "saes")) for p in problems):
        tokenizer = getattr(model, "tokenizer", None) if model is not None else \
            _tokenizer(config.model)
    problems += task_problems(config, tokenizer)
    return problems


def _on_server(config: Any) -> bool:
    """NDIF or another host: the model's weights are not here."""
    remote = config.remote
    return remote is True or (isinstance(remote, str) and remote.startswith(("http://",
                                                                             "https://")))


# -- the config's own fields -------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def field_problems(config: Any) -> list[str]:
    """Types and ranges of the RunConfig fields (nothing read from disk)."""
    from .sites import KINDS

    problems = []

    def positive(name: str, fix: str) -> None:
        value = getattr(config, name)
        if not _is_int(value) or value < 1:
            problems.append(f"{name}={value!r}: must be a positive integer; fix: {fix}")

    positive("n_fit", "e.g. n_fit=96 (prompts to fit dictionaries on)")
    positive("n_eval", "e.g. n_eval=96 (held-out prompts)")
    positive("n_discovery", "e.g. n_discovery=32 (at most n_fit)")
    positive("max_sites", "give the most sites a cross-section may hold, e.g. max_sites=16")
    positive("n_boot", "e.g. n_boot=1000 bootstrap resamples")
    positive("batch_size", "e.g. batch_size=32")
    positive("sae_width", "e.g. sae_width=1024")
    positive("sae_steps", "e.g. sae_steps=300 (x 1024 training tokens)")
    positive("sae_task_prompts", "e.g. sae_task_prompts=2048")
    if not _is_int(config.seed):
        problems.append(f"seed={config.seed!r}: must be an integer; fix: e.g. seed=0")
    # n_discovery > n_fit is fine: discovery takes min(n_discovery, n_fit) fit prompts
    ks = config.ks
    if not isinstance(ks, (list, tuple)) or not ks or \
            not all(_is_int(k) and k >= 1 for k in ks):
        problems.append(f"ks={ks!r}: must be a non-empty list of positive integers; fix: "
                        "e.g. ks=[1, 2, 4, 8]")
    target = config.target
    if isinstance(target, bool) or not isinstance(target, (int, float)) or \
            not 0 < target <= 1:
        problems.append(f"target={target!r}: must be a share of the effect in (0, 1]; fix: "
                        "e.g. target=0.6")
    if config.top_k is not None and (not _is_int(config.top_k) or config.top_k < 1):
        problems.append(f"top_k={config.top_k!r}: must be a positive integer or None; fix: "
                        "e.g. top_k=8, or leave it out to grow cross-sections to the target")
    if config.reconstruction not in ("input", "difference"):
        problems.append(f"reconstruction={config.reconstruction!r}: unknown mode; fix: "
                        "'input' or 'difference'")
    if config.remote_transport not in ("float32", "bfloat16"):
        problems.append(f"remote_transport={config.remote_transport!r}: unknown dtype; fix: "
                        "'float32' or 'bfloat16'")
    for name in ("discovery_kinds", "select_kinds"):
        kinds = getattr(config, name)
        bad = [k for k in kinds or [] if k not in KINDS]
        if kinds is not None and (not isinstance(kinds, (list, tuple)) or bad):
            problems.append(f"{name}={kinds!r}: unknown kind(s) {bad}; fix: use "
                            f"{', '.join(KINDS)}")
    if config.attributes is not None and (not isinstance(config.attributes, (list, tuple))
                                          or not config.attributes):
        problems.append(f"attributes={config.attributes!r}: must be a non-empty list of "
                        "attribute names; fix: e.g. attributes=['io'], or leave it out for all")
    if not isinstance(config.saes, list) or not config.saes or \
            not all(isinstance(s, str) for s in config.saes):
        problems.append(f"saes={config.saes!r}: must be a non-empty list of --sae specs; fix: "
                        "e.g. saes=['train:topk']")
    if config.dtype not in (None, "float32", "float16", "bfloat16"):
        problems.append(f"dtype={config.dtype!r}: unknown; fix: float32, float16 or bfloat16")
    problems += _device_problems(config.device)
    problems += _remote_problems(config)
    if _is_int(config.sae_width) and 1 <= config.sae_width < 32 and any(
            str(s).startswith("train:topk") for s in config.saes or []):
        problems.append(f"sae_width={config.sae_width}: a TopK SAE keeps k=32 latents, so it "
                        "needs at least 32; fix: sae_width >= 32")
    return problems


def _device_problems(device: Any) -> list[str]:
    if device is None:
        return []
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        return [f"device={device!r}: not a torch device; fix: 'cpu', 'cuda', 'cuda:1' or 'mps'"]
    if parsed.type == "cuda" and not torch.cuda.is_available():
        return [f"device={device!r}: no CUDA GPU is visible here; fix: device='cpu' or leave "
                "it out"]
    return []


def _remote_problems(config: Any) -> list[str]:
    remote, problems = config.remote, []
    if not (isinstance(remote, bool) or remote == "local" or
            (isinstance(remote, str) and remote.startswith(("http://", "https://")))):
        problems.append(f"remote={remote!r}: unknown; fix: False (here), True (NDIF), "
                        "'local' (nnsight's simulation) or a host URL (https://...)")
    mp = config.max_prompts_per_request
    if mp is not None and (not _is_int(mp) or mp < 1):
        problems.append(f"max_prompts_per_request={mp!r}: must be a positive integer or None; "
                        "fix: e.g. 64")
    if not config.remote_blocking and not _on_server(config):
        problems.append("remote_blocking=False submits jobs to an NDIF server; fix: set "
                        "remote=True or a host URL, or keep remote_blocking=True")
    trained = [s for s in config.saes or [] if str(s).startswith("train:")]
    if _on_server(config) and trained:
        problems.append(f"--sae {trained[0]}: SAEs are trained on activations read here, and "
                        "a remote run's model has no weights here; fix: give trained SAEs "
                        "(a directory or RELEASE:SAE_ID)")
    return problems


# -- the model ---------------------------------------------------------------------------

def model_problems(name: str, on_server: bool = False) -> list[str]:
    """Whether ``name`` (embedded default, .gguf file, local directory or hub id) can load,
    and its architecture is supported, without loading any weights."""
    return _model_config(name, on_server)[0]


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else is meant as a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _model_config(name: Any, on_server: bool = False) -> tuple[list[str], Any]:
    """``(problems, transformers config or None)`` of a model name."""
    from .models import EMBEDDED, cache_dir

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
        problem = model_weights_problem(path)
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
                f"{_first_line(err)}); fix: rewrite it with save_pretrained"], None
    return _supported(config, name)


def _supported(config: Any, name: str) -> tuple[list[str], Any]:
    from .models import _check_supported
    from .sites import UnsupportedArchitectureError

    try:
        _check_supported(config, name)
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
    if _offline():
        return [f"model {name!r}: a hub id, but the hub is disabled (HF_HUB_OFFLINE=1) and "
                "the HF cache does not hold it; fix: download it where the hub is reachable, "
                "or give a local directory"], None
    try:
        return _supported(AutoConfig.from_pretrained(name), name)
    except Exception as err:  # noqa: BLE001 (the raw OSError, as one line)
        return [f"model {name!r}: cannot read its config from the hub ({type(err).__name__}: "
                f"{_first_line(err)}); fix: check the id and the network, or give a local "
                "directory"], None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]


def _tokenizer(name: str) -> Any:
    """The model's tokenizer when it is on disk already (else None: the task is counted
    when the run builds it)."""
    from .models import EMBEDDED, cache_dir

    path = cache_dir() / "models" / name if name in EMBEDDED else Path(str(name)).expanduser()
    if not (path / "config.json").is_file():
        return None
    try:
        from transformers import AutoTokenizer

        from .models import _configure

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        _configure(tokenizer)
        return tokenizer
    except Exception:  # noqa: BLE001 (the run's own loading reports it)
        return None


# -- SAEs --------------------------------------------------------------------------------

def sae_problems(spec: str, config: Any = None, model_config: Any = None) -> list[str]:
    """Whether one ``--sae`` value can be resolved: ``train:ARCH[@sites]``, an SAE
    directory (its cfg.json readable, its width fitting the model), a directory of them,
    or a sae_lens ``RELEASE:SAE_ID`` (in sae_lens's registry; cached when offline)."""
    if spec.startswith("train:"):
        from .pipeline import parse_train_spec
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
            "'train:topk'/'train:standard' (optionally '@sites'), or 'RELEASE:SAE_ID'"]


def _sae_dir_problems(spec: str, path: Path, model_config: Any) -> list[str]:
    """The SAE's cfg.json is JSON, names a supported architecture, and fits the model; its
    weights file's header parses, fits the file's size, and holds the tensors the cfg
    implies (names and shapes: a damaged file is found here, not after discovery)."""
    where = f"--sae {spec!r}" + ("" if Path(spec).expanduser() == path else f" ({path.name})")
    try:
        cfg = json.loads((path / "cfg.json").read_text())
    except (OSError, ValueError) as err:
        return [f"{where}: cfg.json is not readable JSON ({_first_line(err)}); fix: rewrite "
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
    from .sites import parse_site

    arch = cfg.get("architecture", "standard")
    if arch not in SAE_ARCHITECTURES:
        return [f"{where}: architecture {arch!r} is not supported; fix: use one of "
                f"{', '.join(SAE_ARCHITECTURES)}"]
    d_in = cfg.get("d_in")
    hook = (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name")
    if model_config is None or not hook or not _is_int(d_in):
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


def _is_release(spec: Any) -> bool:
    from .releases import is_release_spec

    return isinstance(spec, str) and is_release_spec(spec)


def _registry_problems(specs: list) -> list[str]:
    """``$SAGE_NN_SAE_REGISTRY``'s files, when a release spec makes the run read them."""
    from .releases import registry_problems

    return registry_problems() if any(_is_release(s) for s in specs) else []


def _release_problems(spec: str) -> list[str]:
    """A ``RELEASE:SAE_ID`` or ``RELEASE:ID_GLOB`` of sae_lens's registry (or of
    ``$SAGE_NN_SAE_REGISTRY``): the ids exist, and each is in the HF cache when offline."""
    from .releases import _folder, cached_folder, expand

    try:
        release, ids = expand(spec)
    except ValueError as err:
        return [str(err)]
    folders = {i: _folder(release, i) for i in ids}
    cached = {i: cached_folder(repo, folder) for i, (repo, folder, _) in folders.items()}
    missing = [f"{repo}/{folder}" for i, (repo, folder, _) in folders.items() if cached[i] is None]
    if missing and _offline():
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


def served_problems(config: Any, model_config: Any = None) -> list[str]:
    """When every ``--sae`` names SAEs already made (no ``train:``), they must serve some
    site a cross-section may hold (:func:`sage_nn.pipeline.discovery_restriction`), read
    from the SAEs' configs: else discovery would search for sites no SAE can be scored at."""
    from .pipeline import UnservableRunError, discovery_restriction

    n_layers = None
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        n_layers = n_layers or getattr(model_config, name, None)
    try:  # parallel blocks are known once the model loads; the run checks again then
        discovery_restriction(config, n_layers or 10 ** 6, None)
    except UnservableRunError as err:
        return [str(err)]
    except Exception:  # noqa: BLE001 (an unreadable SAE is reported by sae_problems)
        return []
    return []


# -- the SAE corpus, the run directory -------------------------------------------------

def corpus_problems(config: Any) -> list[str]:
    """Every part of ``sae_corpus`` names a source that exists (a task part is counted by
    :func:`task_problems`)."""
    if not any(str(s).startswith("train:") for s in config.saes or []):
        return []  # no SAE is trained: the corpus is not read
    if not isinstance(config.sae_corpus, str) or not config.sae_corpus.strip():
        return [f"sae_corpus={config.sae_corpus!r}: give a corpus; fix: 'task@positions', "
                "'task', 'builtin', a text file or directory, 'hf:NAME', or a mix ('a+b')"]
    problems = []
    for part in (p.strip() for p in config.sae_corpus.split("+")):
        if part in ("task", "task@positions", "builtin") or part.startswith("task:"):
            continue
        if part.startswith("hf:"):
            if _offline():
                problems.append(f"sae_corpus part {part!r}: a HuggingFace dataset, but the hub "
                                "is disabled (HF_HUB_OFFLINE=1); fix: use 'builtin', "
                                "'task@positions' or a local text file")
            continue
        path = Path(part).expanduser()
        if not path.exists():
            problems.append(f"sae_corpus part {part!r}: no such file or directory; fix: "
                            "'task@positions', 'task', 'builtin', a .txt file or directory, "
                            "or 'hf:NAME'")
        elif path.is_dir() and not any(path.rglob("*.txt")):
            problems.append(f"sae_corpus part {part!r}: the directory holds no .txt files; "
                            "fix: add text files or give another source")
    return problems


def run_dir_problems(run_dir: Any) -> list[str]:
    """The run directory can be created and written to."""
    if not isinstance(run_dir, (str, os.PathLike)) or not str(run_dir):
        return [f"run_dir={run_dir!r}: give a directory; fix: e.g. run_dir='runs/quickstart'"]
    path = Path(run_dir).expanduser()
    if path.exists() and not path.is_dir():
        return [f"run_dir {str(run_dir)!r} is a file, not a directory; fix: give another "
                "run_dir"]
    existing = path
    while not existing.exists():  # the nearest folder that exists must let us create it
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        return [f"run_dir {str(run_dir)!r}: {existing} is not writable; fix: give a run_dir "
                "you can write to"]
    return []


# -- the task ----------------------------------------------------------------------------

def task_problems(config: Any, tokenizer: Any = None) -> list[str]:
    """The task loads, the attributes exist, and (with a tokenizer) the task makes enough
    distinct prompts for ``n_fit + n_eval`` and for a task SAE corpus."""
    from .tasks import TaskBuildError, TaskSpecError, load_task

    try:
        spec = load_task(config.task)
    except TaskSpecError as err:
        return [f"{err.file}: field {loc}: {what}; fix: {fix}" for loc, what, fix in err.problems]
    except (FileNotFoundError, TypeError) as err:
        return [f"task={config.task!r}: {_first_line(err)}; fix: give a task name or the path "
                "of a task YAML"]
    problems = [f"attribute {a!r} is not an attribute of task {spec.name}; fix: use one of "
                f"{', '.join(spec.attribute_names)}"
                for a in config.attributes or [] if a not in spec.attribute_names]
    if tokenizer is None:
        return problems
    try:
        return problems + _size_problems(spec, config, tokenizer)
    except TaskBuildError as err:
        return problems + [f"{err}"]


def _size_problems(spec: Any, config: Any, tokenizer: Any) -> list[str]:
    """Distinct prompts for fit + eval; prompts and tokens left for a task SAE corpus."""
    import warnings

    need = config.n_fit + config.n_eval
    with warnings.catch_warnings():  # the run warns about dropped values itself
        warnings.simplefilter("ignore")
        have = spec.count_prompts(tokenizer, "train", cap=need)
    if have < need:
        return [f"task {spec.name} makes {have} distinct train prompts, fewer than n_fit + "
                f"n_eval = {config.n_fit} + {config.n_eval} = {need}, so fit and eval would "
                f"repeat prompts; fix: n_fit + n_eval <= {have} (e.g. n_fit={have - have // 2}, "
                f"n_eval={have // 2}), or add vocabulary values or templates"]
    return _corpus_size_problems(spec, config, tokenizer)


def _corpus_size_problems(spec: Any, config: Any, tokenizer: Any) -> list[str]:
    import warnings

    from .pipeline import TASK_CORPORA, sae_corpus

    parts = [p.strip() for p in str(config.sae_corpus).split("+")]
    task_parts = [p for p in parts if p in TASK_CORPORA]
    if not task_parts or not any(str(s).startswith("train:") for s in config.saes):
        return []
    from .training import TrainConfig, _n_tokens, corpus_units  # sae_lens: only when needed
    with warnings.catch_warnings():  # the run warns about dropped values itself
        warnings.simplefilter("ignore")
        holder = _TokenizerOnly(tokenizer)
        train = TrainConfig(d_sae=max(config.sae_width, 32))
        used = (f"the {config.n_fit} + {config.n_eval} fit and eval prompts and their "
                "counterfactuals")
        try:
            sources = sae_corpus(holder, config)
        except ValueError as err:  # every prompt drawn was a fit or eval prompt
            if "no prompts" not in str(err):
                raise
            return [f"sae_corpus {config.sae_corpus!r} is empty: every distinct prompt of "
                    f"task {spec.name} is among {used}; fix: sae_corpus='builtin' (or "
                    f"'builtin+{task_parts[0]}'), or smaller n_fit/n_eval"]
        prompts = [s for s in sources if hasattr(s, "texts")]
        units = corpus_units(holder, prompts, train)
    n_prompts = sum(len(p.texts) for p in prompts)
    # what the trainer keeps after holding out eval_fraction of the units
    tokens = int(_n_tokens(units, train.skip_first) * (1 - train.eval_fraction))
    only_task = len(task_parts) == len(parts)
    if tokens < train.batch_size and only_task:
        return [f"sae_corpus {config.sae_corpus!r} holds {n_prompts} prompts, about {tokens} "
                f"training tokens, less than one training batch ({train.batch_size} tokens) "
                f"once {used} are left out; fix: sae_corpus='builtin' (or "
                f"'builtin+{task_parts[0]}'), or smaller n_fit/n_eval"]
    return []


class _TokenizerOnly:
    """Stands in for a model where only its tokenizer is read (building prompts)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

