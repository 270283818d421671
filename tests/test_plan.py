"""A remote run's plan (``sage run --remote --dry-run``, :func:`plan_run`): the requests and
their bytes before any is sent, with no weights here, checked against a run that sent them."""

import json

import pytest
import torch
from conftest import write_tiny_run_files

from sage_nn import tiny_random_model
from sage_nn.cli import main
from sage_nn.evaluation.coders import ReconstructedSAE
from sage_nn.model.loading import smollm2_dir
from sage_nn.model.remote import Remote
from sage_nn.model.sites import Site
from sage_nn.pipeline.config import RunConfig
from sage_nn.model.remote import CODE_ALLOWANCE
from sage_nn.pipeline.plan import meta_model, meta_sae, plan_run
from sage_nn.pipeline.stages import run
from sage_nn.pipeline.validate import InvalidRunError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama saved as a HuggingFace directory, the tiny IOI task and a corpus."""
    root = tmp_path_factory.mktemp("plan")
    model = tiny_random_model("llama", seed=0)
    write_tiny_run_files(root, model)
    return root, model


def config(root, name, **kw):
    return RunConfig(**{"model": str(root / "model"), "task": str(root / "tiny.yaml"),
                        "run_dir": str(root / name), "saes": ["train:topk"], "n_fit": 24,
                        "n_eval": 16, "n_discovery": 16, "max_sites": 3, "n_boot": 20,
                        "sae_width": 64, "sae_steps": 4, "ks": [1, 2], "batch_size": 16,
                        "sae_corpus": str(root / "corpus.txt"), "remote": "local", **kw})


@pytest.mark.parametrize("top_k", [None, 2])  # cross-sections grown, or top-k validated
def test_a_plan_counts_the_bytes_the_run_then_sends(tiny, tmp_path, monkeypatch, top_k):
    """Planned before the run (cross-sections assumed) and after its discovery (its own),
    on the model held without weights: the task, attribution and read requests carry the
    bytes the run's did, each SAE placed as the run placed it; the requests that depend on
    an earlier one's results are upper bounds."""
    monkeypatch.setenv("SAGE_NN_CACHE", str(tmp_path / "cache"))
    root, model = tiny
    name = f"run{top_k}"
    before = plan_run(config(root, name, top_k=top_k))
    assert before.requests_per_stage() == {"task": 1, "discovery": 2 if top_k is None else 4,
                                           "evaluation": 2}
    assert any("cross-sections assumed" in n for n in before.notes)
    remote = Remote("local")
    run(config(root, name, top_k=top_k), model=model, progress=False, remote=remote)
    sent = [r for r in remote.requests if r.stage != "saes"]
    after = plan_run(config(root, name, top_k=top_k))
    assert [(r.stage, r.kernel) for r in sent] == [(r.stage, r.kernel) for r in after.requests]
    for planned, actual in zip(after.requests, sent):
        if planned.estimated:
            assert planned.up >= actual.up and planned.down >= actual.down, (planned, actual)
        else:
            assert (planned.up, planned.down) == (actual.up, actual.down), (planned, actual)
    strip = lambda ps: [{k: v for k, v in p.items() if k != "width"} for p in ps]  # noqa: E731
    assert strip(after.placements) == strip(remote.placements) != []
    # the plan said what it was going to send before anything was sent
    assert before.totals(code=False)[0] >= after.totals(code=False)[0] > 0


def test_a_70b_class_configuration_plans_without_weights_its_bytes_not_growing_with_width(tmp_path):
    """d_model 8192, 80 layers, 64 heads (8 KV heads), built from its config on the meta
    device: 8 residual SAEs of width 65536 feeding five layers' heads, the quickstart's
    prompt counts. Their encoders would be 2.1 GB each; encoded here, the evaluation's
    bytes do not grow with the SAEs' width."""
    from transformers import AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())  # the quickstart's IOI prompts
    LlamaConfig(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, intermediate_size=28672,
                vocab_size=len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    model = meta_model(str(tmp_path / "model"))
    assert {p.device.type for p in model._module.parameters()} == {"meta"}
    layers = [20, 23, 24, 28, 29]
    pairs = {"io": [(f"L{layer}.z.h{h}", "END") for layer in layers[1:] for h in (0, 7)],
             "s": [(f"L{layer}.z.h1", "END") for layer in layers[:3]]}
    totals = {}
    for width in (16384, 65536, 262144):
        saes = {f"sae{i}": ReconstructedSAE([meta_sae(8192, width, Site(layer, "resid_pre"))
                                             for layer in layers]) for i in range(8)}
        plan = plan_run(RunConfig(model=str(tmp_path / "model"), remote=True,
                                  run_dir=str(tmp_path / "run")),
                        model=model, cross_sections=pairs, saes=saes)
        counts = plan.requests_per_stage()
        # the patched runs' values (about 80 MB) go as many requests under NDIF's 1 MiB
        assert counts["task"] == 1 and counts["discovery"] == 2 and counts["evaluation"] > 50
        assert max(r.up for r in plan.requests) <= (1 << 20) - CODE_ALLOWANCE
        assert {p["placement"] for p in plan.placements} == {"here"}
        assert {p["saes_sharing_here"] for p in plan.placements} == {8}
        totals[width] = sum(plan.totals(code=False))  # tensors: the code is per request
    assert totals[65536] < 1.5e9  # 8 SAEs, each with 3 floor and 3 random-SAE seeds
    assert totals[262144] == totals[16384]  # the SAEs' width is not in the bytes
    assert not (tmp_path / "run").exists()  # planned, not run
    lines = plan.lines()
    assert lines[0].startswith("dry run: ") and "nothing was sent" in lines[0]
    assert any(line.startswith("  sae7 L29 (width 262144): here; server ") for line in lines)


def test_sage_run_dry_run_prints_the_plan_and_sends_nothing(tiny, tmp_path, capsys):
    root, _ = tiny
    args = ["run", "--model", str(root / "model"), "--task", str(root / "tiny.yaml"),
            "--sae", "train:topk", "--run-dir", str(tmp_path / "run"), "--n-fit", "24",
            "--n-eval", "16", "--sae-width", "64", "--sae-corpus", str(root / "corpus.txt"),
            "--dry-run"]
    main(args + ["--remote", "local", "--remote-transport", "bfloat16"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("transport bfloat16; nothing was sent")
    assert [line.split(":")[0] for line in out if line.endswith("(the sum of its rows)")] == [
        "task", "discovery", "evaluation"]
    assert not (tmp_path / "run").exists()
    with pytest.raises(InvalidRunError, match="--dry-run plans the requests of a remote run"):
        plan_run(config(root, "x", remote=False))
    assert torch.is_grad_enabled()
    json.dumps(plan_run(config(root, "x")).to_dict())  # what --dry-run would write is JSON


@pytest.fixture(scope="module")
def config_only(tmp_path_factory):
    """A 70B-class model as a directory of its config and tokenizer, no weights, and a
    small real SAE (sae_lens format) at its layer 40's residual stream."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from transformers import AutoTokenizer, LlamaConfig

    root = tmp_path_factory.mktemp("config_only")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    LlamaConfig(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, intermediate_size=28672,
                vocab_size=len(tokenizer)).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    TopKSAE(TopKSAEConfig(d_in=8192, d_sae=64, k=8, metadata=SAEMetadata(
        hook_name="blocks.40.hook_resid_pre"))).save_model(root / "sae40")
    return root


def test_a_dry_run_plans_from_a_model_directory_without_weights(config_only, capsys):
    """README: the dry run works from a config. A directory of a 70B config and its
    tokenizer (no weights: they are on the server) plans; without a tokenizer, one line
    says what is missing and the fix, before anything loads."""
    root = config_only
    main(["run", "--model", str(root / "model"), "--remote", "--dry-run", "--sae",
          str(root / "sae40"), "--run-dir", str(root / "run")])
    out = capsys.readouterr().out
    assert out.startswith(f"dry run: {root / 'model'}") and "sites: L40.z.h0" in out
    assert not (root / "run").exists()
    (root / "bare").mkdir()
    (root / "bare" / "config.json").write_text((root / "model" / "config.json").read_text())
    with pytest.raises(SystemExit):
        main(["run", "--model", str(root / "bare"), "--remote", "--dry-run", "--sae",
              str(root / "sae40"), "--run-dir", str(root / "run")])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "holds no tokenizer" in err[0] and "fix: save" in err[0], err


def test_plan_run_takes_site_names_and_bare_saes_and_its_rows_add_up(config_only):
    """``meta_sae`` takes a site's name; ``saes=`` takes a bare SAE (evaluated as a run
    evaluates it: through the reconstruction) and plans cross-sections where it serves
    (layer 40's heads, not the top layers); each request lists its sites and its tensors
    by what they are, whose bytes are the request's; rows, with their code, sum to each
    stage's total, and stages to the run's."""
    root = config_only
    model = meta_model(str(root / "model"))
    cfg = RunConfig(model=str(root / "model"), remote=True, run_dir=str(root / "run"))
    bare = plan_run(cfg, model=model, saes={"mine": meta_sae(8192, 65536, "L40.resid_pre")})
    wrapped = plan_run(cfg, model=model, saes={"mine": ReconstructedSAE(
        [meta_sae(8192, 65536, Site.parse("blocks.40.hook_resid_pre"))])})
    assert bare.to_dict() == wrapped.to_dict()
    read = next(r for r in bare.requests if r.kernel == "read")
    assert read.sites == ["L40.z.h0"] and read.tokens > 0
    for r in bare.requests:
        if not r.estimated:
            assert sum(r.tensors.values()) == r.up, r
    assert {k for r in bare.requests for k in r.tensors} >= {"prompt tokens", "indices"}
    for stage in bare.requests_per_stage():
        rows = [r for r in bare.requests if r.stage == stage]
        assert bare.totals(stage) == (sum(r.total_up for r in rows),
                                      sum(r.total_down for r in rows))
    assert bare.totals() == tuple(map(sum, zip(*(bare.totals(s)
                                                 for s in bare.requests_per_stage()))))
    lines = bare.lines()
    assert any(line.startswith("    sites: L40.z.h0") for line in lines)
    assert any(line.startswith("    carries: prompt tokens") for line in lines)
    with pytest.raises(InvalidRunError, match="serve no cross-section site"):
        plan_run(RunConfig(model=str(root / "model"), remote=True, select_kinds=["mlp_out"],
                           run_dir=str(root / "run")),
                 model=model, saes={"mine": meta_sae(8192, 64, "L40.resid_pre")})
