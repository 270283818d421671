"""TopK, BatchTopK, Matryoshka-BatchTopK and JumpReLU SAEs at the IOI heads of SmolLM2, at
matched width and L0 (issue 29's comparison, second part).

One ``sage run`` on IOI (the quickstart's head cross-sections) with one trained dictionary per
architecture at the cross-sections' own sites (``train:ARCH@sites``), every one of width
``--width`` and target L0 ``--k``: TopK by construction (sage_nn's batched trainer, stopping
at convergence), BatchTopK and Matryoshka-BatchTopK by their batch's mean and the threshold
sae_lens estimates for inference, JumpReLU by sae_lens's quadratic target-L0 penalty (all three
through sae_lens's trainer, for all ``--steps``). Writes per dictionary its headline metrics per
attribute (with bootstrap 95% intervals), its L0 and FVU on the evaluation prompts at the sites,
what its trainer recorded (steps, held-out FVU per site) and the stage times to
``benchmarks/results/architectures.json``.

    python benchmarks/architectures.py [--steps 600] [--width 1024] [--k 32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from comparison import k_option, measure, write  # noqa: E402  (benchmarks/ is on sys.path when run)

ARCHITECTURES = ("topk", "batchtopk", "matryoshka_batchtopk", "jumprelu")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "architectures"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "architectures.json"))
    args = ap.parse_args(argv)

    from sage_nn.pipeline.config import RunConfig

    k = k_option(args.k)
    config = RunConfig(task="ioi", run_dir=args.run_dir, sae_width=args.width,
                       sae_steps=args.steps, saes=[f"train:{a}{k}@sites" for a in ARCHITECTURES])
    listing, record = measure(config)
    training = {}
    for name, info in listing.items():
        trained = info["sae_cfg_dict"].get("training") or {}
        training[name] = {key: trained.get(key) for key in (
            "architecture", "k", "steps_used", "held_out_fvu", "held_out_dead", "converged")}
    write({"config": {"task": "ioi", "steps": args.steps, "width": args.width, "k": args.k},
           **record, "training": training}, args.out)


if __name__ == "__main__":
    main()
