"""Requests and bytes per stage of the quickstart pipeline in remote mode, offline.

Every model-running stage of the quickstart (SmolLM2, IOI; task check, discovery with
validation, evaluation of residual TopK SAEs of width 1024 at both attributes' cross-sections)
runs through :class:`sage_nn.remote.FreshProcessBackend`: each request is serialized as for
NDIF and executed in a fresh process that cannot import sage_nn, so the request and result
sizes are those a server would receive and send back. Next to the result bytes: what a
full-activation download would take instead, i.e. every site of the model (all layers; the
residual stream, sublayer outputs and per-head q/k/v/z) at every token of every row the
stage runs, in float32. The SAEs are random (their weights do not change the sizes).
Writes ``benchmarks/results/remote.json``.

    python benchmarks/remote.py
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from sage_nn import load_model
from sage_nn.discovery import DiscoveryConfig, discover
from sage_nn.evaluation import CrossSection, ReconstructedSAE, evaluate_cross_section
from sage_nn.models import smollm2_dir
from sage_nn.pipeline import RunConfig, residual_sites_for, run_prompts
from sage_nn.remote import FreshProcessBackend, Remote
from sage_nn.saes import SparseAutoencoder
from sage_nn.sites import Site, adapter
from sage_nn.tasks import logit_diffs


def random_topk_sae(site: str, d: int, width: int, seed: int) -> SparseAutoencoder:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, width, generator=g) / d ** 0.5
    s = Site.parse(site)
    return SparseAutoencoder(W, torch.zeros(width), W.T.clone(), torch.zeros(d),
                             architecture="topk", k=32, layer=s.layer, kind=s.kind)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "remote.json"))
    parser.add_argument("--n-boot", type=int, default=100)
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    config = RunConfig()  # the quickstart's settings
    model = load_model(config.model)
    ad = adapter(model)
    per_token = 4 * sum(ad.width(s.kind) for s in ad.all_sites())  # every site, float32
    server = FreshProcessBackend(smollm2_dir())
    remote = Remote(server)
    _, fit, held_out = run_prompts(model, config)
    attributes = config.attributes or fit.attribute_names
    spans = {}

    def stage(name, fn):
        first, start = len(remote.requests), time.perf_counter()
        out = fn()
        spans[name] = (first, len(remote.requests), time.perf_counter() - start)
        return out

    stage("task", lambda: logit_diffs(model, held_out, config.batch_size, remote=remote))
    settings = DiscoveryConfig(kinds=config.discovery_kinds, attributes=attributes,
                               top_k=config.top_k, batch_size=config.batch_size)
    found = stage("discovery", lambda: discover(
        model, fit.subset(np.arange(config.n_discovery)), settings, remote=remote))
    pairs = {a: [(Site.parse(s), str(p)) for s, p in zip(t["site"], t["position"])]
             for a, t in found.cross_sections.items()}
    needed = residual_sites_for([p for ps in pairs.values() for p in ps], ad.parallel)
    saes = {"topk-1024": ReconstructedSAE(
        [random_topk_sae(s, ad.d_model, config.sae_width, i) for i, s in enumerate(needed)])}
    model._module.set_attn_implementation("eager")
    stage("evaluation", lambda: [
        evaluate_cross_section(model, fit, held_out, CrossSection(a, ps), saes, ks=config.ks,
                               n_boot=args.n_boot, remote=remote)
        for a, ps in pairs.items()])

    rows = []
    for name, (first, last, seconds) in spans.items():
        sent = remote.requests[first:last]
        by_kernel = defaultdict(int)
        for kernel, _, _ in sent:
            by_kernel[kernel] += 1
        result = sum(server.result_bytes[first:last])
        full = per_token * sum(tokens for _, _, tokens in sent)
        rows.append({"stage": name, "requests": len(sent), "requests_by_kernel": dict(by_kernel),
                     "rows": sum(r for _, r, _ in sent),
                     "upload_bytes": sum(server.request_bytes[first:last]),
                     "download_bytes": result, "full_activation_bytes": full,
                     "full_over_download": full / result, "seconds": seconds})
    report = {"benchmark": "remote", "model": config.model, "task": config.task,
              "settings": {"n_fit": config.n_fit, "n_eval": config.n_eval,
                           "n_discovery": config.n_discovery, "top_k": config.top_k,
                           "ks": config.ks, "sae_width": config.sae_width,
                           "batch_size": config.batch_size},
              "cross_sections": {a: [f"{s}@{p}" for s, p in ps] for a, ps in pairs.items()},
              "full_activation_bytes_per_token": per_token,
              "backend": "FreshProcessBackend (fresh process per request, sage_nn unimportable)",
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
              "stages": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"{'stage':12} {'requests':>8} {'upload MB':>10} {'download MB':>12} "
          f"{'full MB':>10} {'full/down':>10}")
    for r in rows:
        print(f"{r['stage']:12} {r['requests']:8d} {r['upload_bytes'] / 1e6:10.2f} "
              f"{r['download_bytes'] / 1e6:12.3f} {r['full_activation_bytes'] / 1e6:10.1f} "
              f"{r['full_over_download']:10.0f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
