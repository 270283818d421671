"""Requests, wire bytes and seconds per stage against the real NDIF server, and where SAEs run.

Every model-running stage of the quickstart (SmolLM2, IOI; task check, discovery with
validation, evaluation of residual TopK SAEs of width 1024 at every attribute's
cross-section, in float32 and bfloat16 transport) is sent to the real server
(``scripts/ndif/local_ndif.py up``: the ``ndif`` package's API, queue, Ray controller and
model actor, Python 3.12; this client is this Python), trusted (in the model's process)
and sandboxed (a runner holding a meta copy of the model, where no backward pass runs, so
discovery patches every candidate exactly: its settings are smaller, see ``--sandbox-*``).
Per stage: requests, the bytes that crossed the wire each way (zstd, as nnsight sends
them), the server's seconds, and next to them what a full-activation download would take
(every site at every token of every row, float32). The evaluation's numbers are compared
with the same evaluation run here. The SAEs are random (their weights do not change the
sizes).

Then where the SAEs run (:func:`placement_scaling`): one evaluation's bytes for d_model
576, 2048, 4096 and 8192 x SAE width 4096 to 262144 x 1 and 8 SAEs, with the SAEs
encoded on the server (their encoders uploaded), here (the residual rows they read
downloaded) and where the planner chooses, from :func:`sage_nn.pipeline.plan.plan_run` on
shapes alone (meta device); wherever the SAEs fit this machine, the same evaluation sent to
a weightless client's :class:`~sage_nn.model.remote.SimulatedServer`, the plan checked
against the measured bytes. And the 70B-class plan (:func:`plan_70b`).
And, on the quickstart run with its trained SAEs, the patch request of a residual
cross-section sent to the real server: sparse edits (the latent directions the edits use
once, k coefficients a row, as evaluation sends them) against every edit sent as a dense
value. Writes ``benchmarks/results/remote.json``.

    python scripts/ndif/local_ndif.py up
    python benchmarks/remote.py [--server URL] [--skip-smollm2] [--widths 576,2048,4096,8192 | ""]
                                [--sae-widths 4096,16384,65536,262144] [--skip-plan]
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
    parser.add_argument("--server", default="http://127.0.0.1:8011",
                        help="the NDIF server (default: scripts/ndif/local_ndif.py's)")
    parser.add_argument("--sandbox-discovery-prompts", type=int, default=8,
                        help="discovery prompts in the sandbox, where every candidate is "
                             "patched exactly")
    parser.add_argument("--sandbox-kinds", nargs="+", default=["z"],
                        help="discovery kinds in the sandbox (the cross-sections' kinds)")
    parser.add_argument("--n-boot", type=int, default=100)
    parser.add_argument("--skip-smollm2", action="store_true",
                        help="keep the stored SmolLM2 stages, only rerun the width scaling")
    parser.add_argument("--widths", default="576,2048,4096,8192",
                        help='d_model values of the placement scaling ("": keep the stored '
                             'one)')
    parser.add_argument("--sae-widths", default="4096,16384,65536,262144",
                        help="SAE widths of the placement scaling")
    parser.add_argument("--skip-plan", action="store_true",
                        help="keep the stored 70B-class plan")
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
from sage_nn.model.remote import Remote
from sage_nn.model.servers import RequestTooLargeError
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
    report.pop("width_scaling", None)  # the server-only scaling this replaced
    report["placement_scaling"] = stored.get("placement_scaling")
    out.write_text(json.dumps(report, indent=2))  # kept if the scaling below fails
    if args.widths:
        report["placement_scaling"] = placement_scaling(
            [int(w) for w in args.widths.split(",")],
            [int(w) for w in args.sae_widths.split(",")])
        out.write_text(json.dumps(report, indent=2))
    report["plan_70b"] = stored.get("plan_70b")
    if not args.skip_plan:
        report["plan_70b"] = plan_70b()
        out.write_text(json.dumps(report, indent=2))
        print("\n".join(report["plan_70b"]["plan_lines"]))
    report["edit_transport"] = stored.get("edit_transport")
    if args.edit_run:
        report["edit_transport"] = edit_transport(args.edit_run, args.server)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


def smollm2(args) -> dict:
    config = RunConfig()  # the quickstart's settings
    here = load_model(config.model)
    model = load_model(str(smollm2_dir()), remote=True)  # the server loads it from its path
    ad = adapter(model)
    per_token = 4 * sum(ad.width(s.kind) for s in ad.all_sites())  # every site, float32
    _, fit, held_out = run_prompts(here, config)
    attributes = config.attributes or fit.attribute_names
    report = {"benchmark": "remote", "model": config.model, "task": config.task,
              "server": f"ndif 0.1.2 at {args.server} (scripts/ndif/local_ndif.py, CPU, "
                        "float32), nnsight 0.8.1", "client": f"Python {platform.python_version()}",
              "settings": {"n_fit": config.n_fit, "n_eval": config.n_eval,
                           "n_discovery": config.n_discovery, "top_k": config.top_k,
                           "ks": config.ks, "sae_width": config.sae_width,
                           "batch_size": config.batch_size, "discovery_kinds": "all",
                           "sandbox": {"n_discovery": args.sandbox_discovery_prompts,
                                       "discovery_kinds": args.sandbox_kinds}},
              "full_activation_bytes_per_token": per_token,
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads"}
    pairs, local = None, {}
    for mode, trusted in (("trusted", True), ("sandboxed", False)):
        remote, spans = Remote(args.server, trusted=trusted), {}

        def stage(name, fn):
            remote.stage = name
            first, start = len(remote.requests), time.perf_counter()
            out = fn()
            spans[name] = (first, len(remote.requests), time.perf_counter() - start)
            return out

        stage("task", lambda: logit_diffs(model, held_out, config.batch_size, remote=remote))
        kinds, n = (config.discovery_kinds, config.n_discovery) if trusted else \
            (args.sandbox_kinds, args.sandbox_discovery_prompts)
        settings = DiscoveryConfig(kinds=kinds, attributes=attributes, top_k=config.top_k,
                                   batch_size=config.batch_size)
        found = stage("discovery", lambda: discover(model, fit.subset(np.arange(n)), settings,
                                                    remote=remote))
        if pairs is None:  # both modes evaluate the trusted run's cross-sections
            pairs = {a: [(Site.parse(s), str(p)) for s, p in zip(t["site"], t["position"])]
                     for a, t in found.cross_sections.items()}
            report["cross_sections"] = {a: [f"{s}@{p}" for s, p in ps]
                                        for a, ps in pairs.items()}
        needed = residual_sites_for([p for ps in pairs.values() for p in ps], ad.parallel)
        members = [random_topk_sae(s, ad.d_model, config.sae_width, i)
                   for i, s in enumerate(needed)]
        sections = [CrossSection(a, ps) for a, ps in pairs.items()]

        def evaluation(on, through):
            return evaluate_cross_section(on, fit, held_out, sections,
                                          {"topk-1024": ReconstructedSAE(members)},
                                          ks=config.ks, n_boot=args.n_boot, remote=through)

        if not local:
            local["float32"] = evaluation(here, None)
        results = {"float32": stage("evaluation", lambda: evaluation(model, remote))}
        remote.transport = "bfloat16"  # the same evaluation, half-precision transport
        results["bfloat16"] = stage("evaluation, bfloat16", lambda: evaluation(model, remote))
        rows = []
        for name, (first, last, seconds) in spans.items():
            sent = remote.requests[first:last]
            by_kernel = defaultdict(int)
            for r in sent:
                by_kernel[r.kernel] += 1
            down = sum(r.wire_down for r in sent)
            full = per_token * sum(r.tokens for r in sent)
            rows.append({"stage": name, "requests": len(sent),
                         "requests_by_kernel": dict(by_kernel), "rows": sum(r.rows for r in sent),
                         "wire_up_bytes": sum(r.wire_up for r in sent), "wire_down_bytes": down,
                         "tensor_up_bytes": sum(r.up for r in sent),
                         "tensor_down_bytes": sum(r.down for r in sent),
                         "full_activation_bytes": full, "full_over_download": full / down,
                         "server_seconds": sum(r.seconds for r in sent), "seconds": seconds})
        agreement = {}
        for transport, res in results.items():
            diff = {m: float(np.nanmax(np.abs(res[m].values - local["float32"][m].values)))
                    for m in ("sufficiency", "necessity", "edit", "fvu")}
            agreement[transport] = diff
        report[mode] = {"stages": rows, "max_abs_difference_from_local": agreement,
                        "discovery_method": found.scores.attrs.get("method", "")}
        print(f"{mode}: {'stage':20} {'requests':>8} {'up kB':>8} {'down kB':>8} {'s':>6}")
        for r in rows:
            print(f"{mode}: {r['stage']:20} {r['requests']:8d} {r['wire_up_bytes'] / 1e3:8.1f} "
                  f"{r['wire_down_bytes'] / 1e3:8.1f} {r['seconds']:6.1f}")
        print(f"{mode}: max |difference| from local: {agreement}", flush=True)
    return report


MAX_MEASURED_SAE_BYTES = 1.0e9  # SAE weights (float32) a measured evaluation may hold here
MAX_MEASURED_D_MODEL = 2048  # larger random models take minutes a patched run on 2 cores


def _llama_config(d: int, vocab: int, n_layers: int = 2):
    from transformers import LlamaConfig

    heads = d // 64
    return LlamaConfig(hidden_size=d, num_attention_heads=heads,
                       num_key_value_heads=3 if heads % 3 == 0 else max(1, heads // 4),
                       intermediate_size=d, num_hidden_layers=n_layers, vocab_size=vocab)


def _random_llama(d: int, tok):
    from transformers import LlamaForCausalLM

    from sage_nn.model.loading import wrap

    torch.manual_seed(0)
    hf = LlamaForCausalLM(_llama_config(d, len(tok))).eval()
    hf.config._name_or_path = f"random-llama-d{d}"
    hf.set_attn_implementation("eager")
    return wrap(hf, tok)


def _tiny_spec() -> Path:
    """The tests' tiny IOI task (in the tiny tokenizer's words), written to a temp file."""
    import sys
    import tempfile

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from conftest import TINY_TASK

    spec = Path(tempfile.mkdtemp()) / "tiny.yaml"
    spec.write_text(TINY_TASK)
    return spec


def edit_transport(run_dir: str, server_url: str, pair: str = "L24.resid_pre@END") -> dict:
    """The patch request of a residual cross-section (``pair`` for every attribute) on the
    quickstart run's prompts with its trained residual SAEs: sparse edits (as evaluation
    sends them) against every edit sent dense (one ``[prompt, d_model]`` value per k and
    method), bfloat16 transport."""
    from sage_nn.evaluation import scoring as evaluation  # where the edits are made
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
    remote_model = load_model(str(smollm2_dir()), remote=True)
    row = {"pair": pair, "sae": name}
    results = {}
    for kind, edits in (("sparse", sparse_edits), ("dense", dense_edits)):
        evaluation._edits = edits
        remote = Remote(server_url, transport="bfloat16", trusted=True)
        try:
            results[kind] = evaluate_cross_section(remote_model, fit, held_out, sections, saes,
                                                   ks=config.ks, n_boot=10, remote=remote)
            assert [r.kernel for r in remote.requests] == ["read", "patch"]
            row[f"patch_wire_up_bytes_{kind}"] = remote.requests[1].wire_up
        except RequestTooLargeError as refused:  # the server would refuse it: said, not sent
            row[f"patch_refused_{kind}"] = str(refused)
    evaluation._edits = sparse_edits
    if len(results) == 2:
        edit = [results[kind].edit.values for kind in ("sparse", "dense")]
        row["edit_max_abs_difference"] = float(np.nanmax(np.abs(edit[0] - edit[1])))
        row["dense_over_sparse"] = (row["patch_wire_up_bytes_dense"]
                                    / row["patch_wire_up_bytes_sparse"])
    print(row, flush=True)
    return {"setup": f"SmolLM2 (d_model 576), the quickstart's fit and held-out prompts, "
                     f"every attribute at {pair}, its trained residual SAE, the supervised "
                     f"ceiling and the floor; ks {config.ks}; bfloat16 transport, to the real "
                     f"server (trusted); dense = every edit sent as [prompt, d_model] values",
            **row}


def placement_scaling(d_models: list[int], widths: list[int], n_saes=(1, 8)) -> dict:
    """Bytes of one evaluation (its read and patch requests) against d_model, SAE width and
    the number of SAEs, with the SAEs encoded on the server, here, and where the planner
    chooses (``auto``): planned on shapes alone (the model from its config on the meta
    device, SAEs on the meta device), and, where the SAEs fit this machine, measured on a
    random model with weights served by :class:`SimulatedServer` to a weightless client,
    the read's planned bytes checked equal to the measured ones and the patch's estimate
    at least the measured."""
    import tempfile

    from sage_nn.model.loading import tiny_tokenizer
    from sage_nn.pipeline.plan import meta_model, meta_sae, plan_run

    tok, rows, checks = tiny_tokenizer(), [], []
    spec = _tiny_spec()
    section = {"io": [("L1.z.h0", "END")]}
    for d in d_models:
        with tempfile.TemporaryDirectory() as tmp:
            _llama_config(d, len(tok)).save_pretrained(tmp)
            tok.save_pretrained(tmp)
            client = meta_model(tmp)
            server = _random_llama(d, tok) if d <= MAX_MEASURED_D_MODEL else None
            for width in widths:
                for n in n_saes:
                    planned = {}
                    for placement in ("server", "here", "auto"):
                        config = RunConfig(model=tmp, task=str(spec), remote=True, n_fit=16,
                                           n_eval=16, n_discovery=16, ks=[1, 2, 4, 8],
                                           n_boot=10, batch_size=16, run_dir=f"{tmp}/run",
                                           remote_placement=placement)
                        saes = {f"sae{i}": ReconstructedSAE([meta_sae(
                            d, width, Site(1, "resid_pre"), "topk", 32)]) for i in range(n)}
                        plan = plan_run(config, model=client, cross_sections=section,
                                        saes=saes)
                        reqs = [r for r in plan.requests if r.stage == "evaluation"]
                        planned[placement] = (plan, reqs)
                        up, down = plan.totals("evaluation", code=False)
                        rows.append({"d_model": d, "sae_width": width, "n_saes": n,
                                     "placement": placement,
                                     "chosen": sorted({p["placement"] for p in plan.placements}),
                                     "upload_bytes": up, "download_bytes": down,
                                     "bytes": up + down, "read": [reqs[0].up, reqs[0].down],
                                     "patch_estimate": [reqs[1].up, reqs[1].down]})
                        print({k: v for k, v in rows[-1].items()}, flush=True)
                    if server is not None and n * d * width * 8 <= MAX_MEASURED_SAE_BYTES:
                        checks += _measured(client, server, config, section, d, width, n,
                                            planned)
            del server
    chosen = [r for r in rows if r["placement"] == "auto"]
    growth = {}
    for d in d_models:
        for n in n_saes:
            at = {r["sae_width"]: r["bytes"] for r in chosen
                  if r["d_model"] == d and r["n_saes"] == n}
            if 16384 in at and max(at) > 16384:
                growth[f"d{d}_n{n}"] = at[max(at)] / at[16384]
    return {"setup": "random llama (2 layers, heads of 64, intermediate = d_model), the tests' "
                     "tiny IOI (16 fit + 16 held-out prompts), cross-section L1.z.h0@END, "
                     "TopK SAEs (k=32) at L1.resid_pre, ks 1,2,4,8, float32 transport; "
                     "bytes are tensor bytes of the evaluation's read and patch requests "
                     "(the patch an upper-bound estimate), without the code each request "
                     "carries",
            "rows": rows, "measured": checks,
            "chosen_bytes_at_largest_width_over_16384": growth}


def _measured(client, server_model, config, section, d, width, n, planned) -> list[dict]:
    """The planned evaluation sent: random SAEs of the planned shapes, each placement."""
    from sage_nn.model.servers import SimulatedServer

    _, fit, held_out = run_prompts(client, config)
    saes = {f"sae{i}": ReconstructedSAE([random_topk_sae("L1.resid_pre", d, width, i)])
            for i in range(n)}
    sections = [CrossSection(a, [(Site.parse(s), p) for s, p in ps])
                for a, ps in section.items()]
    server, out = SimulatedServer(server_model), []
    for placement in ("server", "here", "auto"):
        remote = Remote(server, placement=placement)
        start = time.perf_counter()
        evaluate_cross_section(client, fit, held_out, sections, saes, ks=config.ks,
                               n_boot=config.n_boot, seed=config.seed,
                               batch_size=config.batch_size, remote=remote)
        read, patch = remote.requests
        _, (p_read, p_patch) = planned[placement]
        out.append({"d_model": d, "sae_width": width, "n_saes": n, "placement": placement,
                    "chosen": sorted({p["placement"] for p in remote.placements}),
                    "read": [read.up, read.down], "read_planned": [p_read.up, p_read.down],
                    "read_exact": (read.up, read.down) == (p_read.up, p_read.down),
                    "patch": [patch.up, patch.down],
                    "patch_estimate": [p_patch.up, p_patch.down],
                    "patch_bounded": patch.up <= p_patch.up and patch.down <= p_patch.down,
                    "code_and_framing_bytes": [max(r.wire_up - r.up for r in remote.requests),
                                               max(r.wire_down - r.down
                                                   for r in remote.requests)],
                    "seconds": time.perf_counter() - start})
        print(out[-1], flush=True)
    return out


def plan_70b() -> dict:
    """The 70B-class plan: d_model 8192, 80 layers, 64 heads (8 KV heads), built from its
    config on the meta device; the quickstart's settings and prompts (SmolLM2's tokenizer)
    and cross-sections (five layers of heads, from this file's SmolLM2 run); 8 residual
    TopK SAEs of width 65536 at each of those layers' resid_pre; float32 and bfloat16."""
    import tempfile

    from transformers import AutoTokenizer

    from sage_nn.pipeline.plan import meta_model, meta_sae, plan_run

    stored = json.loads((Path(__file__).parent / "results" / "remote.json").read_text())
    pairs = {a: [tuple(x.split("@")) for x in v] for a, v in stored["cross_sections"].items()}
    layers = sorted({Site.parse(s).layer for ps in pairs.values() for s, _ in ps})
    out = {"setup": plan_70b.__doc__.split("\n\n")[0].replace("\n    ", " "),
           "layers": layers}
    with tempfile.TemporaryDirectory() as tmp:
        tok = AutoTokenizer.from_pretrained(smollm2_dir())
        config = _llama_config(8192, len(tok), 80)
        config.num_attention_heads, config.num_key_value_heads = 64, 8
        config.intermediate_size = 28672
        config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        model = meta_model(tmp)
        for transport in ("float32", "bfloat16"):
            for width in (16384, 65536, 262144):
                start = time.perf_counter()
                saes = {f"sae{i}": ReconstructedSAE([meta_sae(8192, width,
                                                              Site(layer, "resid_pre"))
                                                     for layer in layers]) for i in range(8)}
                plan = plan_run(RunConfig(model=tmp, remote=True, run_dir=f"{tmp}/run",
                                          remote_transport=transport), model=model,
                                cross_sections=pairs, saes=saes)
                up, down = plan.totals()
                row = {"sae_width": width, "total_bytes": up + down, "upload_bytes": up,
                       "download_bytes": down,
                       "requests_per_stage": plan.requests_per_stage(),
                       "placements": sorted({p["placement"] for p in plan.placements}),
                       "plan_seconds": time.perf_counter() - start}
                out[f"{transport}_width_{width}"] = row
                print(transport, row, flush=True)
                if (transport, width) == ("float32", 65536):
                    out["plan_lines"] = plan.lines()
    return out


if __name__ == "__main__":
    main(ARGS)
