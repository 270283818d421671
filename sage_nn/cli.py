"""The ``sage`` command. Each subcommand is a thin layer over one Python function.

One module because the command is one argument parser: its subcommands share flags (one
per RunConfig field, generated) and one error and warning handling.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import sys
import textwrap
import types
import typing
from pathlib import Path

from .common.formats import TRAINABLE  # no torch: --help stays fast


def _model_and_remote(args):
    """The model, and the :class:`~sage_nn.remote.Remote` its passes run through
    (``--remote``; None runs them here). On NDIF or another host the weights stay there."""
    from .model.loading import load_model
    from .model.remote import Remote

    backend = args.remote if args.remote is not None else False
    model = load_model(args.model, device=args.device, dtype=args.dtype,
                       remote=backend not in (False, "local"))
    return model, (Remote(backend) if backend is not False else None)


def _collect(args) -> None:
    from .model.activations import collect

    prompts = [line.rstrip("\n") for line in open(args.prompts) if line.strip()]
    model, remote = _model_and_remote(args)
    ds = collect(model, prompts, args.sites, batch_size=args.batch_size, store=args.out,
                 positions=[-1] if args.last_token else None, remote=remote)
    print(ds)


def _task_check(args) -> None:
    import pandas as pd

    from .tasks.datasets import check_task, load_task, logit_diffs

    spec = load_task(args.task)  # a bad spec fails before the model loads
    model, remote = _model_and_remote(args)
    ds = spec.build(model, n=args.n, seed=args.seed, split=args.split)
    if remote is None:
        table = check_task(model, ds, batch_size=args.batch_size)
    else:  # check_task's table, from logit differences computed remotely
        ld = logit_diffs(model, ds, args.batch_size, remote=remote).to_pandas()
        table = pd.DataFrame({"n": len(ds), "accuracy": (ld > 0).mean(), "mean_ld": ld.mean(),
                              "std_ld": ld.std(), "effect": ld.mean() - ld["clean"].mean()})
        table.index.name = "condition"
    print(f"task {ds.name} on {args.model}, {args.split} split, {len(ds)} prompts"
          + (f" ({len(ds.dropped)} multi-token values dropped: "
             f"{', '.join(ds.dropped.value[:10])})" if len(ds.dropped) else ""))
    with pd.option_context("display.float_format", "{:.3f}".format):
        print(table.to_string())


def _discover(args) -> None:
    from .discovery.stage import DiscoveryConfig, discover
    from .tasks.datasets import load_task

    spec = load_task(args.task)
    model, remote = _model_and_remote(args)
    ds = spec.build(model, n=args.n, seed=args.seed, split=args.split)
    config = DiscoveryConfig(kinds=args.kinds, layers=args.layers, positions=args.positions,
                             attributes=args.attributes, batch_size=args.batch_size,
                             min_effect=args.min_effect, top_k=args.top_k,
                             coverage=args.coverage, target=args.target,
                             max_sites=args.max_sites, select_kinds=args.select_kinds,
                             validate=not args.no_validate,
                             exact_residuals=not args.no_exact_residuals,
                             changed_tokens=args.changed_tokens)
    found = discover(model, ds, config, out_dir=args.out, progress=True, remote=remote)
    for attribute, info in found.summary().items():
        print(f"{attribute}: total effect {info['total_effect']:+.3f}"
              + (" (small: read raw deltas)" if info["small_effect"] else "")
              + (f", recovered {info['recovered']:.2f} by the joint patch"
                 if "recovered" in info else "")
              + (f", spearman {info['spearman']:.2f} (estimated vs exact)"
                 if "spearman" in info else "")
              + (f" ({info['note']})" if info.get("note") else ""))
        print("  " + " ".join(info["cross_section"][:12])
              + (" ..." if len(info["cross_section"]) > 12 else ""))
    print(f"wrote {args.out}")


def _train_sae(args) -> None:
    from .dictionaries.training import TrainConfig, train_saes

    config = TrainConfig(architecture=args.architecture, d_sae=args.d_sae, k=args.k,
                         k_heads=args.k_heads, l1_coefficient=args.l1,
                         **({} if args.lr is None else {"lr": args.lr}), tokens=args.tokens, batch_size=args.batch_size,
                         context_size=args.context_size, seed=args.seed,
                         stop_at_convergence=not args.no_stop)
    from .model.loading import load_model

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    _, report = train_saes(model, args.sites, config, source=args.source, out_dir=args.out,
                           init=args.init)
    print(report.to_string(float_format=lambda x: f"{x:.3f}"))
    print(f"wrote {len(report)} SAE(s) to {args.out} (sae_lens format: SAE.load_from_disk)")


def _run_config(args):
    """The RunConfig of ``sage run``: the ``--config`` file (or the defaults), with every
    flag given on the command line overriding it (flags not given are None)."""
    from .pipeline.config import RunConfig

    overrides = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(RunConfig)}
    if args.config:
        return RunConfig.from_file(args.config, **overrides)
    return RunConfig(**{k: v for k, v in overrides.items() if v is not None})


def _run(args) -> None:
    from .pipeline.stages import run

    if args.dry_run:  # the requests a remote run would send: nothing sent, no weights here
        from .pipeline.plan import plan_run

        print("\n".join(plan_run(_run_config(args)).lines()))
        return
    config = _run_config(args)
    try:
        result = run(config)
    except Exception as err:  # sage_nn.remote (torch, nnsight) is imported once a run starts
        remote = sys.modules.get("sage_nn.model.remote")
        if remote is not None and isinstance(err, remote.RemoteRequestError):
            report = Path(config.run_dir) / "remote_error.txt"  # the server's whole report
            report.write_text(err.detail)
            print(f"sage {args.command}: error: {err}; the server's report is in {report}; "
                  "finished stages are kept: run the same command again to resume",
                  file=sys.stderr)
            sys.exit(1)
        if remote is None or not isinstance(err, remote.RemotePending):
            raise
        print(err)  # --no-wait: the jobs run on; finished stages are kept
        return
    from .report.tables import headline_table

    # what is kept out of claims and each SAE's flags were said as the run went (warnings)
    print(headline_table(result.results).to_string(float_format=lambda x: f"{x:.3f}"))
    print("stage seconds:", {k: round(v, 1) for k, v in result.timings.items()})
    print(f"report: {result.report / 'summary.md'}")


def _suite_config(args):
    """The RunConfig of ``sage suite``: ``sage run``'s, with a suite's defaults
    (:data:`~sage_nn.pipeline.suite.SUITE_DEFAULTS`) where neither a flag nor the
    ``--config`` file sets them."""
    import yaml

    from .pipeline.suite import SUITE_DEFAULTS

    in_file = set(yaml.safe_load(Path(args.config).read_text()) or {}) if args.config else set()
    for name, value in SUITE_DEFAULTS.items():
        if getattr(args, name) is None and name not in in_file:
            setattr(args, name, value)
    return _run_config(args)


def _suite(args) -> None:
    from .pipeline.suite import run_suite

    if args.task is not None:
        raise ValueError("sage suite takes --tasks (several task names or YAML paths), not "
                         "--task; fix: --tasks ioi capitals my_task.yaml")
    if args.dry_run:
        raise ValueError("sage suite has no --dry-run; fix: sage run --dry-run --task NAME "
                         "for each task's remote requests")
    args.run_dir = args.run_dir or "runs/suite"
    suite = run_suite(_suite_config(args), tasks=args.tasks, min_accuracy=args.min_accuracy,
                      corpus_tasks=args.corpus_tasks)
    for name, task in suite.record["tasks"].items():
        print(f"{name}: " + (f"gated out: {task['gate']}" if task["gate"] else
                             f"evaluated (accuracy {task['accuracy']:.2f})"))
    print("score per SAE (gap closed between floor 0 and ceiling 1; higher is better):")
    print(suite.aggregate[["score", "score_low", "score_high", "n_attributes", "l0"]]
          .sort_values("score", ascending=False).to_string(float_format=lambda x: f"{x:.3f}"))
    print(f"report: {suite.report_dir / 'summary.md'}")


# -- run options: one flag per RunConfig field, generated from the dataclass -------------

#: Flags whose name is not the field's (``--sae`` names one SAE spec; it repeats).
FLAG_NAMES = {"saes": "--sae"}
#: What a field means, for --help; a field without an entry still gets its flag.
FIELD_HELP = {
    "model": "the model: smollm2-135m, a local HuggingFace dir, a .gguf file or a hub id",
    "task": "a name in tasks/ (sage tasks lists them) or a YAML path",
    "saes": "train:topk | train:standard | train:topk@sites | train:topk:k=8,16,32 or "
            "train:topk:width=512,1024 (a sweep: one SAE each) | SAE directory (a folder of "
            "SAE sets: one SAE each) | "
            "RELEASE:SAE_ID | RELEASE:ID_GLOB (a sae_lens release, or one of "
            "$SAGE_NN_SAE_REGISTRY's YAML files; e.g. 'gpt2-small-res-jb:blocks.*' — "
            "discovery is then limited to what those SAEs serve) (repeatable, or several "
            "after one --sae)",
    "run_dir": "the run directory: stage files, manifest, report (a rerun resumes it)",
    "seed": "seed of the prompts, bootstrap and trained SAEs",
    "n_fit": "prompts to fit dictionaries (and discover) on",
    "n_eval": "held-out prompts every metric is measured on",
    "n_discovery": "of the fit prompts, those used for attribution patching",
    "attributes": "the task attributes to evaluate (default: all)",
    "discovery_kinds": "kinds the attribution grid scores, for the heatmaps (default: the "
                       "selectable kinds)",
    "select_kinds": "kinds a cross-section may hold (default: z; name resid_pre etc. to "
                    "allow the residual stream)",
    "target": "share of the effect the cross-section's joint patch must recover",
    "max_sites": "cap on sites per cross-section",
    "top_k": "instead: the top-k sites by attribution",
    "ks": "edit budgets (latents edited)",
    "n_boot": "bootstrap resamples for the 95%% intervals",
    "batch_size": "prompts per forward pass",
    "device": "cpu, cuda, ... (default: cuda when available)",
    "dtype": "float32 | float16 | bfloat16 (default: float32 on CPU)",
    "sae_width": "latents of the SAEs the run trains",
    "sae_steps": "training steps (x 1024 tokens) of the SAEs the run trains",
    "sae_corpus": "what trained SAEs read: task@positions | task | builtin | a text "
                  "file/dir | hf:NAME | a mix builtin+task",
    "sae_task_prompts": "prompts drawn for a task corpus",
    "corpus_tasks": "the tasks whose prompts a task part of --sae-corpus draws (default: "
                    "the run's task; a suite's: every task it recorded)",
    "reconstruction": "how residual SAEs reach sublayer sites: input | difference",
    "remote": "run the model on NDIF (--remote or --remote ndif), in nnsight's offline "
              "simulation of it (local), or on another host (a URL); the API key is "
              "nnsight's (NDIF_API_KEY)",
    "max_prompts_per_request": "cap a remote request's prompt rows (default: one per stage)",
    "remote_transport": "dtype activations and SAE weights travel in to and from the server: "
                        "float32 or bfloat16 (half the bytes)",
    "remote_blocking": "wait for remote jobs (--no-remote-blocking, or --no-wait: submit "
                       "and exit; run again to collect them)",
    "remote_placement": "where residual SAEs are encoded in a remote evaluation: auto (by the "
                        "bytes each way needs), server (their encoders uploaded) or here "
                        "(the residual rows they read downloaded)",
}


def _remote_value(text: str):
    """``--remote`` as RunConfig.remote: ndif -> True (NDIF), off -> False, else as given
    (``local`` or a host URL)."""
    low = text.strip().lower()
    if low in ("ndif", "true", "on"):
        return True
    if low in ("off", "false", "no", "none"):
        return False
    return text.strip()


def _add_remote(p, help: str | None = None) -> None:
    p.add_argument("--remote", nargs="?", const="ndif", default=None, type=_remote_value,
                   metavar="ndif|local|URL", help=help or FIELD_HELP["remote"])


def _yaml_value(text: str):
    import yaml
    return yaml.safe_load(text)


def _flag_kwargs(hint) -> dict:
    """argparse keywords for a field of type ``hint``: lists take several values, a bool
    gets --x/--no-x, a Literal its choices, anything else a YAML value."""
    members = [hint]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(members) == 1:
        (one,) = members
        if typing.get_origin(one) is list:
            (item,) = typing.get_args(one) or (str,)
            return {"nargs": "+", "type": item if item in (int, float, str) else _yaml_value}
        if one is bool:
            return {"action": argparse.BooleanOptionalAction}
        if one in (int, float, str):
            return {"type": one}
        if typing.get_origin(one) is typing.Literal:
            return {"choices": list(typing.get_args(one))}
    return {"type": _yaml_value}


def _field_help(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        default = field.default
    else:
        default = field.default_factory()
    text = FIELD_HELP.get(field.name, f"RunConfig.{field.name}")
    return text if default is None else f"{text} (default: {str(default).replace('%', '%%')})"


def _add_run_options(p) -> None:
    from .pipeline.config import RunConfig

    p.add_argument("--config", help="YAML file with any RunConfig fields (flags override it)")
    hints = typing.get_type_hints(RunConfig)
    for field in dataclasses.fields(RunConfig):
        flag = FLAG_NAMES.get(field.name, "--" + field.name.replace("_", "-"))
        help = _field_help(field)
        if field.name == "remote":
            _add_remote(p, help)
        elif field.name == "saes":
            p.add_argument(flag, dest="saes", action="extend", nargs="+", default=None,
                           metavar="SPEC", help=help)
        else:
            p.add_argument(flag, dest=field.name, default=None, help=help,
                           **_flag_kwargs(hints[field.name]))
    p.add_argument("--no-wait", dest="remote_blocking", action="store_const", const=False,
                   help="submit remote jobs and exit; run again to collect them")
    p.add_argument("--dry-run", action="store_true",
                   help="with --remote: print the requests each stage would send, with bytes "
                        "up and down and where each SAE is encoded; send nothing, load no "
                        "weights")
    p.set_defaults(func=_run)


# -- tasks and cache ---------------------------------------------------------------------

def _tasks(args) -> None:
    from .tasks.datasets import TASKS_DIR, available_tasks, load_task

    rows = [["task", "attributes", "positions", "templates"]]
    descriptions = {}
    for name in available_tasks():
        spec = load_task(name)
        rows.append([name, ", ".join(spec.attribute_names), ", ".join(spec.model.positions),
                     str(len(spec.model.templates))])
        descriptions[name] = " ".join(spec.model.description.split())
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if args.long and row[0] in descriptions:
            print(textwrap.fill(descriptions[row[0]], 88, initial_indent="    ",
                                subsequent_indent="    "))
    print(f"\n{len(rows) - 1} tasks in {TASKS_DIR} (format: docs/tasks.md); use one with "
          "--task NAME, or give a YAML path")


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


CACHE_PARTS = ("models", "saes")  # what sage_nn writes under the cache directory


def cache_entries(root: Path) -> list[tuple[str, int]]:
    """``(entry, bytes)`` per cached item: each converted model (``models/NAME``) and each
    set of trained SAEs (``saes/MODEL/NAME-TOKENS-SEED-CORPUS``)."""
    entries = []
    for part, depth in (("models", 1), ("saes", 2)):
        found = [root / part] if (root / part).exists() else []
        for _ in range(depth):
            found = sorted(c for d in found if d.is_dir() for c in d.iterdir())
        entries += [(p.relative_to(root).as_posix(), _size(p)) for p in found
                    if p.suffix != ".lock"]  # a training's lock file is not an entry
    return entries


def _cache(args) -> None:
    from .model.loading import cache_dir

    root = cache_dir()
    if args.clear:
        parts = CACHE_PARTS if args.clear == "all" else (args.clear,)
        for part in parts:
            path = root / part
            freed = _size(path) if path.exists() else 0
            shutil.rmtree(path, ignore_errors=True)
            print(f"cleared {path} ({_human(freed)})")
        return
    print(f"cache: {root} (set $SAGE_NN_CACHE to move it)")
    entries = cache_entries(root)
    for name, size in entries:
        print(f"  {name:<70} {_human(size):>10}")
    print(f"  {'total':<70} {_human(sum(s for _, s in entries)):>10}")
    print("clear with: sage cache --clear [models|saes|all]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sage", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="the whole evaluation: task, discovery, ground truth, "
                       "SAEs, metrics, report (resumable)")
    _add_run_options(p)
    p = sub.add_parser("suite", help="several tasks with the same SAEs: one run directory "
                       "per task under --run-dir, each SAE trained once, a gate per task, one "
                       "score per SAE (resumable)")
    _add_run_options(p)
    p.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                   help="task names in tasks/ or YAML paths (default: every task in tasks/)")
    p.add_argument("--min-accuracy", type=float, default=0.8,
                   help="a task whose held-out accuracy is below this is gated out")
    p.set_defaults(func=_suite, run_dir=None)
    p = sub.add_parser("quickstart", help="run everything on the embedded default: SmolLM2, "
                       "IOI, residual TopK SAEs trained on first use")
    _add_run_options(p)

    p = sub.add_parser("tasks", help="the tasks in tasks/ with their attributes and positions")
    p.add_argument("--long", action="store_true", help="with each task's description")
    p.set_defaults(func=_tasks)

    p = sub.add_parser("cache", help="show the cache (converted models, trained SAEs) and "
                       "its size per entry; --clear clears it")
    p.add_argument("--clear", nargs="?", const="all", choices=[*CACHE_PARTS, "all"],
                   default=None, help="clear models, saes, or all (the default)")
    p.set_defaults(func=_cache)

    p = sub.add_parser("collect", help="collect activations at sites into a zarr/netCDF store")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--sites", nargs="+", required=True, help="e.g. L3.resid_pre L5.z.h2")
    p.add_argument("--out", required=True, help="store path ending in .zarr or .nc")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--last-token", action="store_true", help="keep only each prompt's last token")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    _add_remote(p)
    p.set_defaults(func=_collect)

    p = sub.add_parser("task-check", help="does the model perform a task? accuracy and "
                       "clean/counterfactual logit differences")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", required=True, help="a name in tasks/ (e.g. ioi) or a YAML path")
    p.add_argument("--n", type=int, default=128, help="number of prompts")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    _add_remote(p)
    p.set_defaults(func=_task_check)

    p = sub.add_parser("discover", help="attribution patching per attribute: scores, "
                       "cross-sections, exact validation, plots")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", required=True, help="a name in tasks/ (e.g. ioi) or a YAML path")
    p.add_argument("--out", required=True, help="output directory (scores.nc, PNGs, ...)")
    p.add_argument("--n", type=int, default=32, help="number of prompts")
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", nargs="+", default=None, help="site kinds (default: all)")
    p.add_argument("--layers", nargs="+", type=int, default=None)
    p.add_argument("--positions", nargs="+", default=None, help="named positions (default: all)")
    p.add_argument("--attributes", nargs="+", default=None)
    p.add_argument("--select-kinds", nargs="+", default=None,
                   help="kinds a cross-section may hold (default: z)")
    p.add_argument("--target", type=float, default=0.6,
                   help="share of the effect the cross-section's joint patch must recover")
    p.add_argument("--max-sites", type=int, default=16, help="cap on sites per cross-section")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--top-k", type=int, default=None,
                       help="instead: cross-section = top-k sites by attribution")
    group.add_argument("--coverage", type=float, default=None,
                       help="instead: fewest top sites covering this share of |score|")
    p.add_argument("--min-effect", type=float, default=1.0,
                   help="flag attributes whose total effect is below this (logits)")
    p.add_argument("--no-validate", action="store_true", help="skip exact patching")
    p.add_argument("--no-exact-residuals", action="store_true",
                   help="estimate the residual stream at changed tokens by attribution too")
    p.add_argument("--changed-tokens", action="store_true",
                   help="let cross-sections hold the changed tokens' own residual stream")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    _add_remote(p)
    p.set_defaults(func=_discover)

    p = sub.add_parser("train-sae", help="train SAEs (residual, or sublayer references) on the "
                       "model's activations with sae_lens, several sites from one pass")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sites", nargs="+", required=True,
                   help="e.g. L3.resid_pre L3.resid_mid L3.mlp_out L3.z (all heads) or hook names")
    p.add_argument("--out", required=True, help="directory; one sae_lens SAE per site inside")
    p.add_argument("--source", default="builtin",
                   help="'builtin' (offline corpus), a .txt file or directory, or hf:DATASET")
    p.add_argument("--architecture", default="topk", choices=list(TRAINABLE),
                   help="k is the active latents of topk/batchtopk/matryoshka_batchtopk and "
                        "the target L0 of jumprelu")
    p.add_argument("--d-sae", type=int, default=2048)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--l1", type=float, default=5.0, help="L1 coefficient (standard SAEs)")
    p.add_argument("--lr", type=float, default=None,
                   help="Adam's rate at the residual's width (default 1e-3; a narrower site's "
                   "SAE steps lr * sqrt(d_model / its width))")
    p.add_argument("--k-heads", type=int, default=None,
                   help="k of TopK SAEs at a head's site (q/k/v/z; default: --k)")
    p.add_argument("--tokens", type=int, default=200_000,
                   help="training tokens per SAE at most (each stops at held-out convergence)")
    p.add_argument("--no-stop", action="store_true",
                   help="train every SAE on all of --tokens (convergence is still recorded)")
    p.add_argument("--init", default=None,
                   help="continue training the SAEs this directory holds (as train-sae wrote)")
    p.add_argument("--batch-size", type=int, default=1024, help="tokens per optimiser step")
    p.add_argument("--context-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.set_defaults(func=_train_sae)
    return parser


def _check_model(args) -> None:
    """A subcommand's --model, checked before anything loads (``sage run`` checks its whole
    config in :func:`sage_nn.pipeline.run`)."""
    from .pipeline.checks import model_problems
    from .pipeline.validate import InvalidRunError

    if args.command not in ("run", "quickstart", "suite") and getattr(args, "model", None):
        on_server = getattr(args, "remote", None) not in (None, False, "local")
        problems = model_problems(args.model, on_server=on_server)
        if problems:
            raise InvalidRunError(problems)


class _Lines(logging.Handler):
    """The command's log lines on stderr: on the ``sage_nn`` logger, sage_nn's (INFO and
    up, warnings marked); on the root logger, another library's errors only."""

    def __init__(self, prefix: str, ours: bool):
        super().__init__(logging.INFO if ours else logging.ERROR)
        self.prefix, self.ours = prefix, ours

    def emit(self, record: logging.LogRecord) -> None:
        if (record.name.split(".")[0] == "sage_nn") != self.ours:
            return  # sage_nn's records propagate to the root too: said once, above
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            kind = "warning" if record.levelno < logging.ERROR else "error"
            text = f"{self.prefix}: {kind}: " + (text if self.ours else f"{record.name}: {text}")
        print(text, file=sys.stderr, flush=True)


def _quiet_output(prefix: str) -> None:
    """The command's output is its own lines: sage_nn's log lines, and another library's
    log records only when they are errors (matplotlib's "generated new fontManager" and
    transformers' notices are not the run's). Warnings: :func:`sage_nn.notes.cli_warnings`."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when it is imported
    for name, ours in (("sage_nn", True), ("", False)):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if isinstance(h, _Lines)]:
            logger.removeHandler(old)  # main() called again in one process
        logger.addHandler(_Lines(prefix, ours))
        if ours:
            logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> None:
    import errno

    from .common.notes import cli_warnings
    from .pipeline.validate import InvalidRunError

    args = build_parser().parse_args(argv)
    _quiet_output(f"sage {args.command}")
    try:
        with cli_warnings(f"sage {args.command}"):  # each of sage_nn's once, plain words
            _check_model(args)
            args.func(args)
    except InvalidRunError as err:  # one line per problem, each with its fix
        for problem in err.problems:
            print(f"sage {args.command}: error: {problem}", file=sys.stderr)
        sys.exit(2)
    except (ValueError, FileNotFoundError) as err:  # a RegistryError has several lines
        for problem in getattr(err, "problems", None) or [err]:
            print(f"sage {args.command}: error: {problem}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        print(f"sage {args.command}: error: no space left on device ({err}); fix: free space "
              "and run the same command again: finished stages are kept", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
