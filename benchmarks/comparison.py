"""Residual SAEs through the reconstruction, SAEs at the sites and transcoders, side by side
at the MLP-output cross-sections of SmolLM2 IOI (issue 29's comparison, first part).

One ``sage run`` with ``--select-kinds z mlp_out`` and three trained dictionaries of one
width: ``train:topk`` (residual TopK SAEs, reaching mlp_out through the reconstruction:
no directions there, so no edits), ``train:topk@sites`` (TopK SAEs at the mlp_out sites) and
``train:skip_transcoder`` (JumpReLU skip transcoders of those MLPs, target L0 ``k``). The
transcoders serve only mlp_out, so the cross-sections hold mlp_out alone. Writes each
dictionary's headline metrics per attribute (with bootstrap 95% intervals), its L0 at the
sites, and the stage times to ``benchmarks/results/comparison.json``.

    python benchmarks/comparison.py [--steps 300] [--width 1024] [--k 32] [--max-sites 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np


def summary(results, name: str, attribute: str) -> dict:
    """Headline metrics of one dictionary for one attribute (means over its pairs)."""
    row = results.sel(dictionary=name, attribute=attribute)
    out = {}
    for var in ("sufficiency", "necessity", "fvu", "l0", "edit", "edit_f1"):
        if var not in results:
            continue
        value = row[var]
        for dim in ("pair", "k"):
            if dim in value.dims:
                value = value.max("k") if dim == "k" else value.mean(dim, skipna=True)
        out[var] = None if not np.isfinite(float(value)) else round(float(value), 4)
        ci = f"{var}_ci"
        if ci in results:
            bounds = row[ci]
            for dim in ("pair", "k"):
                if dim in bounds.dims:
                    bounds = bounds.max("k") if dim == "k" else bounds.mean(dim, skipna=True)
            out[ci] = [None if not np.isfinite(b) else round(float(b), 4)
                       for b in np.asarray(bounds.values).ravel()[:2]]
    return out


def k_option(k: int) -> str:
    """``:k=K`` for a train spec, or nothing at 32 (TrainConfig's, and the cache's names)."""
    return "" if k == 32 else f":k={k}"


def measure(config, keep=lambda name: True) -> tuple[dict, dict]:
    """Run ``config`` timed; return its ``saes.json`` listing and the record both benchmarks
    write: seconds, stage seconds, cross-sections and, per attribute, the headline metrics of
    every dictionary ``keep`` accepts."""
    from sage_nn.pipeline.stages import run

    t0 = time.perf_counter()
    result = run(config, progress=False)
    seconds = time.perf_counter() - t0
    res = result.results
    names = [str(n) for n in res.dictionary.values if keep(str(n))]
    return (json.loads((result.run_dir / "saes.json").read_text()),
            {"seconds": round(seconds, 1), "stage_seconds": result.timings,
             "cross_sections": result.cross_sections,
             "metrics": {str(a): {n: summary(res, n, a) for n in names}
                         for a in res.attribute.values}})


def write(out: dict, path: str) -> None:
    Path(path).write_text(json.dumps(out, indent=2, default=str))
    print(json.dumps(out, indent=2, default=str))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--max-sites", type=int, default=8)
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "comparison"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "comparison.json"))
    args = ap.parse_args(argv)

    from sage_nn.pipeline.config import RunConfig

    k = k_option(args.k)
    config = RunConfig(task="ioi", run_dir=args.run_dir, sae_width=args.width,
                       sae_steps=args.steps, max_sites=args.max_sites,
                       select_kinds=["z", "mlp_out"],
                       saes=[f"train:topk{k}", f"train:topk{k}@sites",
                             f"train:skip_transcoder{k}"])
    listing, record = measure(config, keep=lambda n: not n.startswith("random:"))
    write({"config": {"steps": args.steps, "width": args.width, "k": args.k,
                      "max_sites": args.max_sites, "select_kinds": ["z", "mlp_out"]},
           **record, "kinds": {n: listing[n]["approach"]
                               for n in next(iter(record["metrics"].values())) if n in listing}},
          args.out)


if __name__ == "__main__":
    main()
