"""Requests and bytes per stage of the quickstart pipeline in remote mode, offline.

Every model-running stage of the quickstart (SmolLM2, IOI; task check, discovery with
validation, evaluation of residual TopK SAEs of width 1024 at both attributes' cross-sections)
runs through :class:`sage_nn.model.remote.FreshProcessBackend`: each request is serialized as for
NDIF and executed in a fresh process that cannot import sage_nn, so the request and result
sizes are those a server would receive and send back. Next to the result bytes: what a
full-activation download would take instead, i.e. every site of the model (all layers; the
residual stream, sublayer outputs and per-head q/k/v/z) at every token of every row the
stage runs, in float32. The SAEs are random (their weights do not change the sizes).

Then, by simulation, how the evaluation's bytes scale with the model's width and the number
of SAEs: random llama models of d_model 576, 2048, 4096 and 8192 (2 layers, 64-wide heads),
the tiny IOI task of the tests (16 fit and 16 held-out prompts), one head's ``z`` reached by
random residual TopK SAEs of width ``2 * d_model``, 1 and 4 SAEs, in float32 and bfloat16
transport; and, from those slopes, what a 70B-class model (d_model 8192) would need.
And, on the quickstart run with its trained SAEs, the patch request of a residual
cross-section: sparse edits (the latent directions the edits use once, k coefficients a
row, as evaluation sends them) against every edit sent as a dense value. Writes
``benchmarks/results/remote.json``.

    python benchmarks/remote.py [--skip-smollm2] [--widths 576,2048,4096,8192 | ""]
                                [--edit-run runs/quickstart | ""]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from collections import defaultdict
from pathlib import Path

from sage_nn.pipeline.runs import NotARunError, finished_stages


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, and the inputs they name checked: run before the heavy imports below
    and the ~15 minutes of measurements, so a missing quickstart run is said at once."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "remote.json"))
    parser.add_argument("--n-boot", type=int, default=100)
    parser.add_argument("--skip-smollm2", action="store_true",
                        help="keep the stored SmolLM2 stages, only rerun the width scaling")
    parser.add_argument("--widths", default="576,2048,4096,8192",
                        help='d_model values of the width scaling ("": keep the stored one)')
    parser.add_argument("--edit-run", default="runs/quickstart",
                        help='a finished quickstart run for the edit transport ("": keep the '
                             'stored one)')
    args = parser.parse_args(argv)
    if args.edit_run:  # the edit transport reads the run's config, prompts and SAEs
        try:
            finished_stages(args.edit_run, ("task", "discovery", "saes"))
        except NotARunError as err:
            parser.exit(2, f"benchmarks/remote.py: error: --edit-run {args.edit_run}: {err}; "
                           "fix: run `sage quickstart` first (it writes runs/quickstart), or "
                           "pass --edit-run '' to skip the edit transport (the stored result "
                           "is kept)\n")
    return args


if __name__ == "__main__":
    ARGS = parse_args()

import numpy as np  # noqa: E402 (after the input check)
import torch  # noqa: E402

from sage_nn import load_model  # noqa: E402
from sage_nn.discovery.stage import DiscoveryConfig, discover
from sage_nn.evaluation.coders import CrossSection, ReconstructedSAE
from sage_nn.evaluation.scoring import evaluate_cross_section
from sage_nn.model.loading import smollm2_dir
from sage_nn.pipeline.config import RunConfig, run_prompts
from sage_nn.dictionaries.serving import residual_sites_for
from sage_nn.model.remote import FreshProcessBackend, Remote
from sage_nn.dictionaries.saes import SparseAutoencoder
from sage_nn.model.sites import Site, adapter
from sage_nn.tasks.datasets import logit_diffs


def random_topk_sae(site: str, d: int, width: int, seed: int) -> SparseAutoencoder:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, width, generator=g) / d ** 0.5
    s = Site.parse(site)
    return SparseAutoencoder(W, torch.zeros(width), W.T.clone(), torch.zeros(d),
                             architecture="topk", k=32, layer=s.layer, kind=s.kind)


def main(args: argparse.Namespace) -> None:
    warnings.simplefilter("ignore")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stored = json.loads(out.read_text()) if out.exists() else {}
    report = stored if args.skip_smollm2 and stored else smollm2(args)
    report["width_scaling"] = stored.get("width_scaling")
    out.write_text(json.dumps(report, indent=2))  # kept if the scaling below fails
    if args.widths:
        report["width_scaling"] = width_scaling([int(w) for w in args.widths.split(",")])
        out.write_text(json.dumps(report, indent=2))
        print(json.dumps(report["width_scaling"], indent=2))
    report["edit_transport"] = stored.get("edit_transport")
    if args.edit_run:
        report["edit_transport"] = edit_transport(args.edit_run)
        out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


def smollm2(args) -> dict:

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
    evaluation = lambda: evaluate_cross_section(  # noqa: E731
        model, fit, held_out, [CrossSection(a, ps) for a, ps in pairs.items()], saes,
        ks=config.ks, n_boot=args.n_boot, remote=remote)
    stage("evaluation", evaluation)
    remote.transport = "bfloat16"  # the same evaluation, half-precision transport
    stage("evaluation, bfloat16", evaluation)

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
    print(f"{'stage':20} {'requests':>8} {'upload MB':>10} {'download MB':>12} "
          f"{'full MB':>10} {'full/down':>10}")
    for r in rows:
        print(f"{r['stage']:20} {r['requests']:8d} {r['upload_bytes'] / 1e6:10.2f} "
              f"{r['download_bytes'] / 1e6:12.3f} {r['full_activation_bytes'] / 1e6:10.1f} "
              f"{r['full_over_download']:10.0f}")
    return report


MAX_SAE_BYTES = 2.5e9  # SAE weights per request the 24 GiB benchmark machine can pickle


def _random_llama(d: int, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    from sage_nn.model.loading import wrap

    heads = d // 64
    config = LlamaConfig(hidden_size=d, num_attention_heads=heads,
                         num_key_value_heads=3 if heads % 3 == 0 else max(1, heads // 4),
                         intermediate_size=d, num_hidden_layers=2, vocab_size=len(tok))
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).eval()
    hf.config._name_or_path = f"random-llama-d{d}"
    hf.set_attn_implementation("eager")
    return wrap(hf, tok)


def _tiny_ioi(model):
    import sys
    import tempfile

    from sage_nn.tasks.datasets import load_task

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from conftest import TINY_TASK  # the tests' tiny IOI, in the tiny tokenizer's words

    spec = Path(tempfile.mkdtemp()) / "tiny.yaml"
    spec.write_text(TINY_TASK)
    full = load_task(spec).build(model, n=32, seed=0, split="train")
    return full.subset(np.arange(16)), full.subset(np.arange(16, 32))


def edit_transport(run_dir: str, pair: str = "L24.resid_pre@END") -> dict:
    """The patch request of a residual cross-section (``pair`` for every attribute) on the
    quickstart run's prompts with its trained residual SAEs: sparse edits (as evaluation
    sends them) against every edit sent dense (one ``[prompt, d_model]`` value per k and
    method), bfloat16 transport."""
    import sage_nn.evaluation as evaluation
    from sage_nn.model.patching import LatentEdit
    from sage_nn.pipeline.resolve import resolve_saes

    sparse_edits = evaluation._edits

    def dense_edits(*args):
        return {k: e.dense() if isinstance(e, LatentEdit) else e
                for k, e in sparse_edits(*args).items()}

    config = RunConfig.from_file(Path(run_dir) / "config.yaml")
    model = load_model(config.model)
    _, fit, held_out = run_prompts(model, config)
    site, position = pair.split("@")
    sections = [CrossSection(a, [(Site.parse(site), position)])
                for a in config.attributes or fit.attribute_names]
    spec = next(s for s in config.saes if not s.endswith("@sites"))
    name, members = resolve_saes(spec, model, [site], config)
    saes = {name: ReconstructedSAE(members, batch_size=config.batch_size)}
    server, row = FreshProcessBackend(smollm2_dir()), {"pair": pair, "sae": name}
    results = {}
    for kind, edits in (("sparse", sparse_edits), ("dense", dense_edits)):
        evaluation._edits = edits
        remote = Remote(server, transport="bfloat16")
        first = len(server.request_bytes)
        results[kind] = evaluate_cross_section(model, fit, held_out, sections, saes,
                                               ks=config.ks, n_boot=10, remote=remote)
        assert [r[0] for r in remote.requests] == ["read", "patch"]
        row[f"patch_upload_bytes_{kind}"] = server.request_bytes[first + 1]
    evaluation._edits = sparse_edits
    edit = [results[kind].edit.values for kind in ("sparse", "dense")]
    row["edit_max_abs_difference"] = float(np.nanmax(np.abs(edit[0] - edit[1])))
    row["dense_over_sparse"] = row["patch_upload_bytes_dense"] / row["patch_upload_bytes_sparse"]
    print(row, flush=True)
    return {"setup": f"SmolLM2 (d_model 576), the quickstart's fit and held-out prompts, "
                     f"every attribute at {pair}, its trained residual SAE, the supervised "
                     f"ceiling and the floor; ks {config.ks}; bfloat16 transport; dense = "
                     f"every edit sent as [prompt, d_model] values", **row}


def width_scaling(widths: list[int], n_saes=(1, 4), sae_ratio: int = 2) -> dict:
    """Evaluation requests' bytes against d_model and the number of SAEs (see the module
    docstring), and the 70B-class estimate from the fitted slopes."""
    import tempfile

    from sage_nn.model.loading import tiny_tokenizer

    tok, rows = tiny_tokenizer(), []
    for d in widths:
        model = _random_llama(d, tok)
        fit, test = _tiny_ioi(model)
        section = CrossSection("io", [(Site(1, "z", 0), "END")])
        with tempfile.TemporaryDirectory() as tmp:
            server = FreshProcessBackend.for_model(model, tmp)
            for n in n_saes:
                if n * 2 * d * sae_ratio * d * 4 > MAX_SAE_BYTES:
                    continue  # more than this machine holds twice (here and the server)
                saes = {f"sae{i}": ReconstructedSAE([random_topk_sae("L1.resid_pre", d,
                                                                     sae_ratio * d, i)])
                        for i in range(n)}
                for transport in ("float32", "bfloat16"):
                    server.request_bytes.clear(), server.result_bytes.clear()
                    remote = Remote(server, transport=transport)
                    evaluate_cross_section(model, fit, test, section, saes, ks=[1, 2, 4, 8],
                                           n_boot=10, remote=remote)
                    rows.append({"d_model": d, "n_saes": n, "sae_width": sae_ratio * d,
                                 "transport": transport,
                                 "requests": [r[0] for r in remote.requests],
                                 "upload_bytes": list(server.request_bytes),
                                 "download_bytes": list(server.result_bytes)})
                    print(rows[-1], flush=True)
        del model
    return {"setup": f"random llama, 2 layers, intermediate = d_model; tiny IOI, 16 fit + 16 "
                     f"held-out prompts; cross-section L1.z.h0@END; random TopK SAEs (k=32) "
                     f"of width {sae_ratio} x d_model at L1.resid_pre; ks 1,2,4,8",
            "rows": rows, "estimate_70b": estimate_70b(rows)}


def estimate_70b(rows: list[dict]) -> dict:
    """Least-squares slopes of upload and download (bfloat16) in d_model and SAE
    parameters, applied to a 70B-class model: d_model 8192, a 16-site cross-section of
    heads fed by 8 residual SAEs of width 65536 (8x)."""
    bf = [r for r in rows if r["transport"] == "bfloat16"]
    X = np.array([[1.0, r["d_model"], r["n_saes"] * r["d_model"] * r["sae_width"]] for r in bf])
    out = {}
    for key in ("upload_bytes", "download_bytes"):
        y = np.array([sum(r[key]) for r in bf], dtype=float)
        coef = np.linalg.lstsq(X, y, rcond=None)[0]
        out[f"{key}_fit"] = {"constant": coef[0], "per_d_model": coef[1],
                             "per_sae_parameter": coef[2]}
        out[key.replace("_bytes", "_bytes_70b_one_site")] = float(
            coef @ [1.0, 8192, 8 * 8192 * 65536])
    out["note"] = ("one cross-section site's variants on 16 held-out prompts, 8 feeding SAEs "
                   "(2 x d x width parameters each, bf16); upload is dominated by the SAE "
                   "weights the read request carries, download by the reads; more prompts "
                   "scale the activation terms, not the SAE term")
    return out


if __name__ == "__main__":
    main(ARGS)
