"""The ``sage`` command. Each subcommand is a thin layer over one Python function."""

from __future__ import annotations

import argparse
import sys


def _collect(args) -> None:
    from .activations import collect
    from .models import load_model

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    prompts = [line.rstrip("\n") for line in open(args.prompts) if line.strip()]
    ds = collect(model, prompts, args.sites, batch_size=args.batch_size, store=args.out,
                 positions=[-1] if args.last_token else None)
    print(ds)


def _task_check(args) -> None:
    import pandas as pd

    from .models import load_model
    from .tasks import check_task, load_task

    spec = load_task(args.task)  # a bad spec fails before the model loads
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    ds = spec.build(model, n=args.n, seed=args.seed, split=args.split)
    table = check_task(model, ds, batch_size=args.batch_size)
    print(f"task {ds.name} on {args.model}, {args.split} split, {len(ds)} prompts"
          + (f" ({len(ds.dropped)} multi-token values dropped: "
             f"{', '.join(ds.dropped.value[:10])})" if len(ds.dropped) else ""))
    with pd.option_context("display.float_format", "{:.3f}".format):
        print(table.to_string())


def _discover(args) -> None:
    from .discovery import DiscoveryConfig, discover
    from .models import load_model
    from .tasks import load_task

    spec = load_task(args.task)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    ds = spec.build(model, n=args.n, seed=args.seed, split=args.split)
    config = DiscoveryConfig(kinds=args.kinds, layers=args.layers, positions=args.positions,
                             attributes=args.attributes, batch_size=args.batch_size,
                             min_effect=args.min_effect, top_k=args.top_k,
                             coverage=args.coverage, target=args.target,
                             max_sites=args.max_sites, select_kinds=args.select_kinds,
                             validate=not args.no_validate,
                             exact_residuals=not args.no_exact_residuals,
                             changed_tokens=args.changed_tokens)
    found = discover(model, ds, config, out_dir=args.out, progress=True)
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
    from .training import TrainConfig, train_saes  # imports sae_lens before any trace

    config = TrainConfig(architecture=args.architecture, d_sae=args.d_sae, k=args.k,
                         l1_coefficient=args.l1, lr=args.lr, tokens=args.tokens,
                         batch_size=args.batch_size, context_size=args.context_size,
                         seed=args.seed)
    from .models import load_model

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    _, report = train_saes(model, args.sites, config, source=args.source, out_dir=args.out)
    print(report.to_string(float_format=lambda x: f"{x:.3f}"))
    print(f"wrote {len(report)} SAE(s) to {args.out} (sae_lens format: SAE.load_from_disk)")


def _run_config(args):
    from .pipeline import RunConfig

    overrides = {k: getattr(args, k, None) for k in ("model", "task", "run_dir", "seed",
                                                     "n_fit", "n_eval", "top_k", "device",
                                                     "dtype", "n_boot", "discovery_kinds",
                                                     "select_kinds", "target", "max_sites")}
    overrides["saes"] = args.sae or None
    if getattr(args, "remote", None):
        overrides["remote"] = True if args.remote == "ndif" else args.remote
        overrides["max_prompts_per_request"] = args.max_prompts_per_request
        overrides["remote_blocking"] = False if args.no_wait else None
    if args.config:
        return RunConfig.from_file(args.config, **overrides)
    return RunConfig(**{k: v for k, v in overrides.items() if v is not None})


def _run(args) -> None:
    import logging

    from .pipeline import run
    from .report import headline_table

    from .remote import RemotePending

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = run(_run_config(args))
    except RemotePending as pending:  # --no-wait: the jobs run on; finished stages are kept
        print(pending)
        return
    print(headline_table(result.results).to_string(float_format=lambda x: f"{x:.3f}"))
    print("stage seconds:", {k: round(v, 1) for k, v in result.timings.items()})
    print(f"report: {result.report / 'summary.md'}")


def _add_run_options(p) -> None:
    p.add_argument("--config", help="YAML file with any RunConfig fields (flags override it)")
    p.add_argument("--model", default=None)
    p.add_argument("--task", default=None)
    p.add_argument("--sae", action="append", help="train:topk | train:standard | SAE directory "
                   "| RELEASE:SAE_ID (repeatable)")
    p.add_argument("--run-dir", dest="run_dir", default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--n-fit", dest="n_fit", type=int, default=None)
    p.add_argument("--n-eval", dest="n_eval", type=int, default=None)
    p.add_argument("--discovery-kinds", dest="discovery_kinds", nargs="+", default=None,
                   help="kinds the attribution grid scores, for the heatmaps (default: the "
                   "selectable kinds, z)")
    p.add_argument("--select-kinds", dest="select_kinds", nargs="+", default=None,
                   help="kinds a cross-section may hold (default: z; name resid_pre etc. to "
                   "allow the residual stream)")
    p.add_argument("--target", type=float, default=None,
                   help="share of the effect the cross-section's joint patch must recover "
                   "(default 0.6)")
    p.add_argument("--max-sites", dest="max_sites", type=int, default=None,
                   help="cap on sites per cross-section (default 16)")
    p.add_argument("--top-k", dest="top_k", type=int, default=None,
                   help="instead: the top-k sites by attribution")
    p.add_argument("--n-boot", dest="n_boot", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--remote", default=None,
                   help="run the model on NDIF ('ndif'), in nnsight's offline simulation of it "
                        "('local'), or on another host (a URL); the API key is nnsight's "
                        "(NDIF_API_KEY)")
    p.add_argument("--max-prompts-per-request", dest="max_prompts_per_request", type=int,
                   default=None, help="cap a request's prompt rows (default: one per stage)")
    p.add_argument("--no-wait", dest="no_wait", action="store_true",
                   help="submit remote jobs and exit; run again to collect them")
    p.set_defaults(func=_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sage", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="the whole evaluation: task, discovery, ground truth, "
                       "SAEs, metrics, report (resumable)")
    _add_run_options(p)
    p = sub.add_parser("quickstart", help="run everything on the embedded default: SmolLM2, "
                       "IOI, residual TopK SAEs trained on first use")
    _add_run_options(p)

    p = sub.add_parser("collect", help="collect activations at sites into a zarr/netCDF store")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--sites", nargs="+", required=True, help="e.g. L3.resid_pre L5.z.h2")
    p.add_argument("--out", required=True, help="store path ending in .zarr or .nc")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--last-token", action="store_true", help="keep only each prompt's last token")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
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
    p.set_defaults(func=_discover)

    p = sub.add_parser("train-sae", help="train SAEs (residual, or sublayer references) on the "
                       "model's activations with sae_lens, several sites from one pass")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sites", nargs="+", required=True,
                   help="e.g. L3.resid_pre L3.resid_mid L3.mlp_out L3.z (all heads) or hook names")
    p.add_argument("--out", required=True, help="directory; one sae_lens SAE per site inside")
    p.add_argument("--source", default="builtin",
                   help="'builtin' (offline corpus), a .txt file or directory, or hf:DATASET")
    p.add_argument("--architecture", default="topk", choices=["topk", "standard"])
    p.add_argument("--d-sae", type=int, default=2048)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--l1", type=float, default=5.0, help="L1 coefficient (standard SAEs)")
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--tokens", type=int, default=200_000, help="training tokens per SAE")
    p.add_argument("--batch-size", type=int, default=1024, help="tokens per optimiser step")
    p.add_argument("--context-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.set_defaults(func=_train_sae)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"sage {args.command}: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
