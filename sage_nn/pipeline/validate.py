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

import os
from pathlib import Path
from typing import Any

from ..dictionaries.releases import hub_offline
from .checks import (
    TokenizerOnly,
    first_line,
    is_int,
    is_release,
    model_config,
    registry_problems,
    sae_problems,
    tokenizer_of,
)

__all__ = ["InvalidRunError", "check", "validate", "task_problems"]


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


def validate(config: Any, model: Any = None, task: bool = True) -> list[str]:
    """Every problem of a :class:`~sage_nn.pipeline.RunConfig`, one line each ([] if none).

    ``model``: the loaded model a run is given (then ``config.model`` is only its label and
    the task is counted with its tokenizer). Nothing runs the model. ``task=False`` leaves
    the task out (a suite checks each of its tasks on its own: :func:`task_problems`).
    """
    problems = field_problems(config)
    config_of_model = None
    if model is None:
        found, config_of_model = model_config(config.model, on_server=_on_server(config))
        problems += found
    else:
        config_of_model = model.config
    specs = config.saes if isinstance(config.saes, list) else []
    try:
        from .specs import expand_sae_specs
        specs = expand_sae_specs(specs)  # a sweep or a folder: each of its SAEs
    except (ValueError, TypeError, AttributeError):
        pass  # sae_problems names what is wrong with the spec
    registry = registry_problems(specs)
    problems += registry  # read once, before the release specs that name its releases
    for spec in specs:
        if not (registry and is_release(spec)):
            problems += sae_problems(spec, config, config_of_model)
    if not registry and not any(p.startswith(("--sae", "saes")) for p in problems):
        problems += served_problems(config, config_of_model)
    problems += corpus_problems(config)
    problems += run_dir_problems(config.run_dir)
    tokenizer = None  # the task is counted only with valid sizes and a tokenizer at hand
    if not any(p.startswith(("n_fit", "n_eval", "seed", "sae_", "saes")) for p in problems):
        tokenizer = getattr(model, "tokenizer", None) if model is not None else \
            tokenizer_of(config.model)
    return problems + (task_problems(config, tokenizer) if task else [])


def _on_server(config: Any) -> bool:
    """NDIF or another host: the model's weights are not here."""
    remote = config.remote
    return remote is True or (isinstance(remote, str) and remote.startswith(("http://",
                                                                             "https://")))


# -- the config's own fields -------------------------------------------------------------


def field_problems(config: Any) -> list[str]:
    """Types and ranges of the RunConfig fields (nothing read from disk)."""
    from ..model.sites import KINDS

    problems = []

    def positive(name: str, fix: str) -> None:
        value = getattr(config, name)
        if not is_int(value) or value < 1:
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
    if not is_int(config.seed):
        problems.append(f"seed={config.seed!r}: must be an integer; fix: e.g. seed=0")
    # n_discovery > n_fit is fine: discovery takes min(n_discovery, n_fit) fit prompts
    ks = config.ks
    if not isinstance(ks, (list, tuple)) or not ks or \
            not all(is_int(k) and k >= 1 for k in ks):
        problems.append(f"ks={ks!r}: must be a non-empty list of positive integers; fix: "
                        "e.g. ks=[1, 2, 4, 8]")
    target = config.target
    if isinstance(target, bool) or not isinstance(target, (int, float)) or \
            not 0 < target <= 1:
        problems.append(f"target={target!r}: must be a share of the effect in (0, 1]; fix: "
                        "e.g. target=0.6")
    if config.top_k is not None and (not is_int(config.top_k) or config.top_k < 1):
        problems.append(f"top_k={config.top_k!r}: must be a positive integer or None; fix: "
                        "e.g. top_k=8, or leave it out to grow cross-sections to the target")
    if config.reconstruction not in ("input", "difference"):
        problems.append(f"reconstruction={config.reconstruction!r}: unknown mode; fix: "
                        "'input' or 'difference'")
    if config.remote_transport not in ("float32", "bfloat16"):
        problems.append(f"remote_transport={config.remote_transport!r}: unknown dtype; fix: "
                        "'float32' or 'bfloat16'")
    if config.remote_placement not in ("auto", "server", "here"):
        problems.append(f"remote_placement={config.remote_placement!r}: unknown; fix: 'auto' "
                        "(by bytes), 'server' or 'here'")
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
    if is_int(config.sae_width) and 1 <= config.sae_width < 32 and any(
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
    if mp is not None and (not is_int(mp) or mp < 1):
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


# -- SAEs --------------------------------------------------------------------------------


def served_problems(config: Any, model_config: Any = None) -> list[str]:
    """The ``--sae`` values that name SAEs already made (not ``train:``) must serve some
    site a cross-section may hold (:func:`sage_nn.pipeline.discovery_restriction`), read
    from the SAEs' configs: else discovery would search for sites no SAE can be scored at."""
    from .specs import UnservableRunError, discovery_restriction

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
            if hub_offline():
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
    for task in config.corpus_tasks or []:
        from ..tasks.datasets import load_task

        try:
            load_task(task)
        except (FileNotFoundError, TypeError, ValueError) as err:
            problems.append(f"corpus_tasks: {first_line(err)}; fix: give task names or the "
                            "paths of task YAMLs")
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
    from ..tasks.datasets import TaskBuildError, load_task
    from ..tasks.spec import TaskSpecError

    try:
        spec = load_task(config.task)
    except TaskSpecError as err:
        return [f"{err.file}: field {loc}: {what}; fix: {fix}" for loc, what, fix in err.problems]
    except (FileNotFoundError, TypeError) as err:
        return [f"task={config.task!r}: {first_line(err)}; fix: give a task name or the path "
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

    from .resolve import TASK_CORPORA, sae_corpus

    parts = [p.strip() for p in str(config.sae_corpus).split("+")]
    task_parts = [p for p in parts if p in TASK_CORPORA]
    if not task_parts or not any(str(s).startswith("train:") for s in config.saes):
        return []
    from ..dictionaries.corpus import Prompts, corpus_units
    from ..dictionaries.stream import count_tokens
    from ..dictionaries.training import TrainConfig
    with warnings.catch_warnings():  # the run warns about dropped values itself
        warnings.simplefilter("ignore")
        holder = TokenizerOnly(tokenizer)
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
        prompts = [s for s in sources if isinstance(s, Prompts)]
        units = corpus_units(holder, prompts, train)
    n_prompts = sum(len(p.texts) for p in prompts)
    # what the trainer keeps after holding out eval_fraction of the units
    tokens = int(count_tokens(units, train.skip_first) * (1 - train.eval_fraction))
    only_task = len(task_parts) == len(parts)
    if tokens < train.batch_size and only_task:
        return [f"sae_corpus {config.sae_corpus!r} holds {n_prompts} prompts, about {tokens} "
                f"training tokens, less than one training batch ({train.batch_size} tokens) "
                f"once {used} are left out; fix: sae_corpus='builtin' (or "
                f"'builtin+{task_parts[0]}'), or smaller n_fit/n_eval"]
    return []


