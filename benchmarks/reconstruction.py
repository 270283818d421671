"""Residual-to-sublayer reconstruction on real SmolLM2, next to SAEs trained at the sublayer.

For each chosen layer L, trains (one stream, sae_lens trainer, same width/k/data) SAEs at
L.resid_pre, L.resid_mid, L+1.resid_pre (= L.resid_post), and directly at L.z (all heads),
L.attn_out and L.mlp_out. Then, on held-out text, measures the fraction of variance
unexplained (FVU) at z, attn_out and mlp_out by: input mode (live and frozen norm/pattern),
difference mode, and the direct sublayer SAE. Also counts the SAEs each approach needs for
every layer of the model. Writes benchmarks/results/reconstruction.json.

    python benchmarks/reconstruction.py [--layers 5] [--tokens 24576] [--d-sae 2048]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sage_nn.dictionaries.stream import activation_batches
from sage_nn.dictionaries.training import TrainConfig, train_saes
from sage_nn.dictionaries.corpus import chunk_tokens, load_texts
import torch  # noqa: E402

from sage_nn.model.loading import load_model
from sage_nn.dictionaries.reconstruction import ResidualReconstruction
from sage_nn.evaluation import metrics
from sage_nn.model.sites import Site, adapter


def token_fvu(recon, clean) -> float:
    """FVU over every token of ``[..., width]`` tensors."""
    width = clean.shape[-1]
    return metrics.fvu(clean.reshape(-1, width).float().numpy(),
                       recon.reshape(-1, width).float().numpy())


def sae_counts(ad) -> dict:
    L, H = ad.n_layers, ad.n_heads
    return {
        "input_mode_attention_sites (resid_pre per layer)": L,
        "input_mode_all_sites (resid_pre + resid_mid per layer)": 2 * L,
        "difference_mode (resid_pre + resid_mid per layer + final resid_post)": 2 * L + 1,
        "direct_sublayer (z per head + attn_out + mlp_out per layer)": L * (H + 2),
        "direct_sublayer (z all heads + attn_out + mlp_out per layer)": 3 * L,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[5])
    parser.add_argument("--tokens", type=int, default=24_576)
    parser.add_argument("--d-sae", type=int, default=2048)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-prompts", type=int, default=24)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" /
                        "reconstruction.json")
    args = parser.parse_args()

    torch.set_grad_enabled(True)
    model = load_model("smollm2-135m", device="cpu")
    ad = adapter(model)
    sites = []
    for L in args.layers:
        sites += [f"L{L}.resid_pre", f"L{L}.resid_mid", f"L{L + 1}.resid_pre",
                  f"L{L}.z", f"L{L}.attn_out", f"L{L}.mlp_out"]
    cfg = TrainConfig(architecture="topk", d_sae=args.d_sae, k=args.k, tokens=args.tokens,
                      batch_size=1024, context_size=64, lr=args.lr, seed=0)
    start = time.time()
    # a snapshot of the corpus, so training and the held-out split see the same text
    snapshot = args.out.parent / "corpus_snapshot.txt"
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    snapshot.write_text("\n\n".join(t.replace("\n\n", "\n") for t in load_texts("builtin")))
    saes, report = train_saes(model, sites, cfg, source=snapshot)
    train_s = time.time() - start
    print(report.to_string(float_format=lambda x: f"{x:.3f}"), flush=True)

    # held-out text: the same split train_saes held out (same seed and chunking)
    rng = torch.Generator().manual_seed(cfg.seed)
    chunks = chunk_tokens(model, load_texts(snapshot), cfg.context_size)
    snapshot.unlink()
    chunks = chunks[torch.randperm(len(chunks), generator=rng)]
    eval_chunks = chunks[: max(1, int(len(chunks) * cfg.eval_fraction))][: args.eval_prompts]
    prompts = {"input_ids": eval_chunks, "attention_mask": torch.ones_like(eval_chunks)}

    resid = [s for label, s in saes.items() if "resid" in label]
    results = {}
    modes = {"input_live": dict(mode="input"),
             "input_frozen_norm_pattern": dict(mode="input", freeze_norm=True, freeze_pattern=True),
             "difference": dict(mode="difference")}
    for L in args.layers:
        targets = [Site(L, "z", h) for h in range(ad.n_heads)] + [Site(L, "attn_out"),
                                                                  Site(L, "mlp_out")]
        row = {}
        for name, kw in modes.items():
            rec = ResidualReconstruction(resid, **kw).fit(model)
            wanted = [s for s in targets if kw["mode"] == "input" or s.kind != "z"]
            # one site kind per pass, so each is measured with everything else clean
            for kind in ("z", "attn_out", "mlp_out"):
                group = [s for s in wanted if s.kind == kind]
                if not group:
                    continue
                out = rec.run(prompts, group)
                clean = torch.cat([out.clean[s] for s in group], -1)
                recon = torch.cat([out.recon[s] for s in group], -1)
                keep = out.logits.new_ones(clean.shape[:2], dtype=torch.bool)
                keep[:, :cfg.skip_first] = False
                row.setdefault(kind, {})[name] = token_fvu(recon[keep], clean[keep])
        # direct sublayer SAEs on the clean activations of the same held-out tokens
        labels = [f"L{L}.z", f"L{L}.attn_out", f"L{L}.mlp_out"]
        parts = list(activation_batches(model, eval_chunks, labels, skip_first=cfg.skip_first))
        for kind in ("z", "attn_out", "mlp_out"):
            clean = torch.cat([p[f"L{L}.{kind}"] for p in parts])
            with torch.no_grad():
                recon = saes[f"L{L}.{kind}"](clean)
            row[kind]["direct_sublayer_sae"] = token_fvu(recon, clean)
        row["resid_sae_fvu"] = {k: float(report.loc[k, "fvu"]) for k in
                                (f"L{L}.resid_pre", f"L{L}.resid_mid", f"L{L + 1}.resid_pre")}
        results[f"L{L}"] = row
        print(f"L{L}", json.dumps(row, indent=1), flush=True)

    out = {
        "model": "smollm2-135m", "layers": args.layers,
        "sae": {"architecture": "topk", "d_sae": args.d_sae, "k": args.k,
                "training_tokens_per_sae": args.tokens, "corpus": "builtin (sage_nn/data)",
                "train_seconds_all_saes_one_pass": round(train_s, 1)},
        "eval": {"prompts": len(eval_chunks), "tokens_per_prompt": cfg.context_size - cfg.skip_first,
                 "note": "held-out chunks of the built-in corpus; FVU over tokens, z over all "
                         "heads concatenated"},
        "training_report": json.loads(report.to_json(orient="index")),
        "fvu": results,
        "saes_needed_for_all_layers": sae_counts(ad),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
