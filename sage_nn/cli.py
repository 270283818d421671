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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sage", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

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
