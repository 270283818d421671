import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from sae_lens import SAE  # noqa: E402

from sage_nn.cli import main
from sage_nn.model.loading import TINY_WORDS, tiny_random_model
from sage_nn.dictionaries.corpus import BUILTIN_CORPUS, chunk_tokens, load_texts
from sage_nn.dictionaries.stream import activation_batches
from sage_nn.dictionaries.training import (
    TrainConfig,
    load_trained,
    train_saes,
    training_record,
)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = random.Random(0)
    docs = [" ".join(rng.choice(TINY_WORDS) for _ in range(40)) for _ in range(120)]
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n\n".join(docs))
    return path


SMALL = dict(d_sae=64, k=4, tokens=4096, batch_size=128, context_size=32, buffer_chunks=32, lr=1e-2)


def test_train_several_sites_from_one_stream(text_file, tmp_path):
    model = tiny_random_model("llama")
    sites = ["L0.resid_pre", "L1.resid_mid", "blocks.1.hook_mlp_out", "L1.z"]
    saes, report = train_saes(model, sites, TrainConfig(**SMALL), source=text_file,
                              out_dir=tmp_path)
    assert list(report.index) == ["L0.resid_pre", "L1.resid_mid", "L1.mlp_out", "L1.z"]
    assert set(report.columns) >= {"fvu", "l0", "dead", "dead_in_training"}
    assert (report.l0 <= 4 + 1e-6).all() and (report.l0 > 0).all()
    # trained SAEs beat the mean predictor on held-out text (the tiny model's mlp_out is
    # near zero at init scale, so it is only checked for being saved and loaded)
    assert (report.fvu[["L0.resid_pre", "L1.resid_mid", "L1.z"]] < 0.6).all(), report
    for label in report.index:
        ref = SAE.load_from_disk(tmp_path / label)  # sae_lens reads what we wrote
        assert ref.cfg.d_sae == 64
    loaded = load_trained(tmp_path, model)
    assert loaded["L1.z"].kind == "z" and loaded["L1.z"].heads == [0, 1, 2, 3]
    x = torch.randn(5, 32)
    torch.testing.assert_close(loaded["L0.resid_pre"](x), saes["L0.resid_pre"](x))


def test_standard_sae_and_determinism(text_file):
    model = tiny_random_model("gpt2")
    cfg = TrainConfig(architecture="standard", l1_coefficient=1.0, **SMALL)
    a, rep_a = train_saes(model, ["L1.resid_pre"], cfg, source=text_file)
    b, rep_b = train_saes(model, ["L1.resid_pre"], cfg, source=text_file)
    assert a["L1.resid_pre"].architecture == "standard"
    torch.testing.assert_close(a["L1.resid_pre"].W_dec, b["L1.resid_pre"].W_dec)
    assert rep_a.fvu.iloc[0] == rep_b.fvu.iloc[0]


def test_activation_batches_read_all_sites_in_one_pass(text_file):
    model = tiny_random_model("gemma2")
    chunks = chunk_tokens(model, load_texts(text_file), 16)
    batch = next(activation_batches(model, chunks[:4], ["L0.resid_pre", "L1.mlp_out", "L0.k"],
                                    batch_size=4, skip_first=1))
    assert batch["L0.resid_pre"].shape == (4 * 15, 32)
    assert batch["L0.k"].shape == (4 * 15, 2 * 8)  # 2 KV heads x d_head 8


def test_errors_name_the_fix(text_file, tmp_path):
    model = tiny_random_model("llama")
    with pytest.raises(ValueError, match="cannot train architecture 'abstopk'"):
        TrainConfig(architecture="abstopk")
    with pytest.raises(ValueError, match="weight_init=.zeros.: choose one of data, scaled"):
        TrainConfig(weight_init="zeros")
    with pytest.raises(FileNotFoundError, match="use 'builtin', a .txt file"):
        load_texts(tmp_path / "missing.txt")
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE is set"):
        load_texts("hf:some/dataset")
    short = tmp_path / "short.txt"
    short.write_text("the ball")
    with pytest.raises(ValueError, match="fewer than context_size"):
        train_saes(model, ["L0.resid_pre"], TrainConfig(**SMALL), source=short)
    with pytest.raises(ValueError, match="cannot map 'L0.embed'|unknown site kind"):
        train_saes(model, ["L0.embed"], TrainConfig(**SMALL), source=text_file)


def test_cli_train_sae(text_file, tmp_path, capsys):
    model = tiny_random_model("qwen2")
    model._module.save_pretrained(tmp_path / "model")
    model.tokenizer.save_pretrained(tmp_path / "model")
    main(["train-sae", "--model", str(tmp_path / "model"), "--sites", "L1.resid_pre",
          "--out", str(tmp_path / "saes"), "--source", str(text_file), "--d-sae", "64",
          "--k", "4", "--tokens", "2048", "--batch-size", "256", "--context-size", "32"])
    out = capsys.readouterr().out
    assert "L1.resid_pre" in out and "fvu" in out
    assert SAE.load_from_disk(tmp_path / "saes" / "L1.resid_pre").cfg.d_in == 32
    # --init continues them: 8 more steps of 256 tokens
    main(["train-sae", "--model", str(tmp_path / "model"), "--sites", "L1.resid_pre",
          "--out", str(tmp_path / "more"), "--source", str(text_file), "--d-sae", "64",
          "--k", "4", "--tokens", "2048", "--batch-size", "256", "--context-size", "32",
          "--init", str(tmp_path / "saes")])
    assert training_record(tmp_path / "more" / "L1.resid_pre")["steps"] == 16


def test_builtin_corpus_is_small_and_readable():
    texts = load_texts("builtin")
    assert BUILTIN_CORPUS.stat().st_size < 400_000
    assert len(texts) >= 32 and sum(len(t) for t in texts) > 15_000


@pytest.mark.slow
def test_smollm2_short_training_on_builtin_corpus(tmp_path):
    from sage_nn.model.loading import load_model

    model = load_model()
    cfg = TrainConfig(d_sae=512, k=16, tokens=4096, batch_size=512, context_size=64,
                      buffer_chunks=48, model_batch_size=16)
    saes, report = train_saes(model, ["L3.resid_pre", "L3.resid_mid"], cfg, out_dir=tmp_path)
    assert (report.fvu < 1.0).all(), report  # beats the mean predictor on held-out text
    assert SAE.load_from_disk(tmp_path / "L3.resid_mid").cfg.metadata.hook_name == \
        "blocks.3.hook_resid_mid"


def test_sequences_of_any_length_batch_like_one_at_a_time():
    from sage_nn.dictionaries.corpus import Tokens

    model = tiny_random_model("llama")
    units = [torch.tensor([5, 6, 7, 8, 9]), torch.tensor([3, 4, 5, 6, 7, 8, 9, 10, 11]),
             torch.tensor([12, 13, 14])]
    together = list(activation_batches(model, units, ["L1.resid_post"], batch_tokens=64))
    assert len(together) == 1  # 3 x 9 padded tokens fit in one trace
    alone = [next(activation_batches(model, [u], ["L1.resid_post"]))["L1.resid_post"]
             for u in units]
    # right padding changes nothing; the first token of each is skipped
    torch.testing.assert_close(together[0]["L1.resid_post"], torch.cat(alone))
    assert len(torch.cat(alone)) == 4 + 8 + 2
    split = list(activation_batches(model, units, ["L1.resid_post"], batch_tokens=18))
    assert [len(b["L1.resid_post"]) for b in split] == [4 + 8, 2]
    # Tokens keeps only the chosen positions (position 0 too, if asked for)
    chosen = [Tokens(units[0], (0, 4)), units[1], Tokens(units[2], (2,))]
    got = next(activation_batches(model, chosen, ["L1.resid_post"], batch_tokens=64))
    expected = [next(activation_batches(model, [u], ["L1.resid_post"], skip_first=0))
                ["L1.resid_post"] for u in units]
    torch.testing.assert_close(got["L1.resid_post"], torch.cat(
        [expected[0][[0, 4]], expected[1][1:], expected[2][[2]]]))


def test_train_on_task_prompts_mixed_with_text(text_file, tmp_path):
    from conftest import TINY_TASK
    from sage_nn.tasks.datasets import load_task
    from sage_nn.dictionaries.corpus import TASK_SEED_OFFSET, Prompts, corpus_hash, task_prompts

    model = tiny_random_model("llama")
    (tmp_path / "tiny.yaml").write_text(TINY_TASK)
    task = str(tmp_path / "tiny.yaml")
    full = task_prompts(model, task, n=64, seed=0)
    assert full.name == "task:tiny-ioi" and len(set(full.texts)) == len(full.texts)
    named = task_prompts(model, task, n=64, seed=0, named_positions=True)
    assert named.texts == full.texts and named.name == "task:tiny-ioi@positions"
    ds = load_task(task).build(model, n=64, seed=TASK_SEED_OFFSET, split="train")
    i = ds.prompts.index(named.texts[0])  # IO, S2 and END (last) of that prompt
    assert named.positions[0] == tuple(sorted({int(ds.positions[p][i]) for p in ds.positions}))
    assert corpus_hash(named) != corpus_hash(full)
    held = full.texts[:5]
    rest = task_prompts(model, task, n=64, seed=0, exclude=held)
    assert not set(held) & set(rest.texts) and len(rest.texts) == len(full.texts) - 5
    # content-keyed: other prompts, another hash; the same prompts, the same hash
    assert corpus_hash(rest) != corpus_hash(full) == corpus_hash(Prompts(full.texts))
    assert corpus_hash(f"{text_file}+builtin") == corpus_hash([str(text_file), "builtin"])
    cfg = TrainConfig(**{**SMALL, "tokens": 2048})
    saes, report = train_saes(model, ["L1.resid_pre"], cfg, source=[str(text_file), rest],
                              out_dir=tmp_path / "saes")
    record = json.loads((tmp_path / "saes" / "train_config.json").read_text())
    assert record["corpus"] == f"{text_file}+task:tiny-ioi[{len(rest.texts)}]"
    assert record["corpus_hash"] == corpus_hash([str(text_file), rest])
    assert SAE.load_from_disk(tmp_path / "saes" / "L1.resid_pre").cfg.metadata.dataset_path \
        == record["corpus"]
    # a task source by name draws cfg.task_prompts prompts at another seed than the run's
    _, by_name = train_saes(model, ["L1.resid_pre"], TrainConfig(**{**SMALL, "tokens": 1024,
                                                                     "task_prompts": 200}),
                            source=f"task:{task}")
    assert report.fvu.iloc[0] < 1.0 and by_name.fvu.iloc[0] < 1.0, (report, by_name)


def test_batched_trainer_matches_sae_lens_trainer(text_file):
    """The batched trainer (all SAEs of one shape as stacked tensors, one Adam step) does
    sae_lens's TopK training math: same init, same stream, the same weights to float
    tolerance, auxiliary loss on dead latents included (dead window: 8 of 32 steps)."""
    model = tiny_random_model("llama")
    sites = ["L0.resid_pre", "L1.resid_mid", "L1.z.h2", "L1.z.h3"]
    out = {}
    for trainer in ("sae_lens", "batched"):
        out[trainer] = train_saes(model, sites, TrainConfig(**SMALL, trainer=trainer),
                                  source=text_file)
    (old, old_rep), (new, new_rep) = out["sae_lens"], out["batched"]
    assert (old_rep.dead_in_training > 0).any()  # the auxiliary loss was exercised
    for site in sites:
        torch.testing.assert_close(new[site].W_dec, old[site].W_dec, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(new[site].b_enc, old[site].b_enc, atol=1e-4, rtol=1e-3)
    assert (abs(new_rep.fvu - old_rep.fvu) < 1e-3).all(), (old_rep, new_rep)
    assert (new_rep.steps == old_rep.steps).all() and (new_rep.steps == 4096 // 128).all()


def test_stop_at_convergence_records_steps_curves_and_verdict(text_file, tmp_path):
    model = tiny_random_model("llama")
    sites = ["L0.resid_pre", "L1.z.h1"]
    cap = TrainConfig(**{**SMALL, "tokens": 128 * 200, "check_every": 10,
                         "converge_window": 40, "min_steps": 40})
    full = TrainConfig(**{**vars(cap), "stop_at_convergence": False, "converge_tol": 0.05})
    loose = TrainConfig(**{**vars(cap), "converge_tol": 0.05})
    _, rep_full = train_saes(model, sites, full, source=text_file)
    saes, rep = train_saes(model, sites, loose, source=text_file, out_dir=tmp_path)
    assert (rep_full.steps == 200).all() and rep_full.converged.all()
    # a loose tolerance stops each SAE early, at a check, after min_steps
    assert ((rep.steps >= 40) & (rep.steps < 200) & (rep.steps % 10 == 0)).all(), rep
    assert rep.converged.all()
    record = json.loads((tmp_path / "train_config.json").read_text())
    for site in sites:
        assert record["steps_used"][site] == rep.steps[site]
        curve = record["held_out_curves"][site]
        # [step, held-out FVU, dead share] from step 0 (the untrained SAE) every 10 steps
        assert [c[0] for c in curve] == list(range(0, rep.steps[site] + 1, 10))
        assert curve[-1][1] < curve[0][1] and all(0 <= c[2] <= 1 for c in curve)
        cfg = json.loads((tmp_path / site / "cfg.json").read_text())
        assert cfg["metadata"]["sage_nn_train_steps"] == rep.steps[site]
        assert cfg["metadata"]["sage_nn_converged_at_step"] == rep.steps[site]
        trained = training_record(tmp_path / site)
        assert trained["converged"] is True and trained["curve"] == curve
        assert "held-out FVU improved by less than 0.05 over the last 40 steps" in \
            trained["criterion"]
        assert SAE.load_from_disk(tmp_path / site).cfg.d_sae == 64
    # stopping early still trains (a loose tolerance costs FVU: it is for the test only)
    assert (rep.fvu < 0.6).all(), rep
    # tolerance 0 stops only when the held-out FVU stopped improving at all: here never,
    # and the checks themselves change nothing
    _, rep_zero = train_saes(model, sites, TrainConfig(**{**vars(cap), "converge_tol": 0.0}),
                             source=text_file)
    assert (rep_zero.steps == 200).all() and (rep_zero.fvu == rep_full.fvu).all()
    assert not rep_zero.converged.any()
    with pytest.raises(ValueError, match="trainer 'fast'"):
        TrainConfig(trainer="fast")


def test_batched_trainer_is_deterministic_and_continues_saved_saes(text_file, tmp_path):
    """Same seed, same weights; a saved SAE given as ``init`` trains on from where it
    was: its steps and curve go on, and it is not retrained from scratch."""
    model = tiny_random_model("llama")
    sites = ["L0.resid_pre", "L1.z.h1"]
    cfg = TrainConfig(**{**SMALL, "tokens": 128 * 40, "converge_tol": 0.0, "min_steps": 10,
                         "converge_window": 10})
    a, rep_a = train_saes(model, sites, cfg, source=text_file, out_dir=tmp_path / "a")
    b, rep_b = train_saes(model, sites, cfg, source=text_file)
    for site in sites:
        torch.testing.assert_close(a[site].W_dec, b[site].W_dec, rtol=0, atol=0)
    assert (rep_a.fvu == rep_b.fvu).all()
    more, rep_more = train_saes(model, sites, cfg, source=text_file, init=tmp_path / "a",
                                out_dir=tmp_path / "more")
    assert (rep_more.steps == 80).all()
    for site in sites:
        record = training_record(tmp_path / "more" / site)
        steps = [c[0] for c in record["curve"]]
        assert steps == sorted(set(steps)) and steps[-1] == 80 and 40 in steps
        assert record["continued_from"] == str(tmp_path / "a" / site)
        assert not torch.equal(more[site].W_dec, a[site].W_dec)
    assert (rep_more.fvu < rep_a.fvu).all(), (rep_a, rep_more)
    with pytest.raises(ValueError, match="continue with the config it was trained with"):
        train_saes(model, sites, TrainConfig(**{**vars(cfg), "d_sae": 32}),
                   source=text_file, init=tmp_path / "a")


def test_activations_stop_after_the_last_site_unchanged():
    """activation_batches stops the forward after its last site (no logits): the values
    are those of a full forward."""
    model = tiny_random_model("llama")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    got = next(activation_batches(model, ids, ["L0.resid_post", "L1.resid_pre"],
                                  skip_first=0))
    with torch.no_grad():
        hidden = model._module(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(got["L0.resid_post"], hidden[1][0])
    torch.testing.assert_close(got["L1.resid_pre"], hidden[1][0])


@pytest.mark.parametrize("arch,saved", [("batchtopk", "jumprelu"),
                                        ("matryoshka_batchtopk", "jumprelu"),
                                        ("jumprelu", "jumprelu"), ("gated", "gated")])
def test_other_architectures_train_through_sae_lens(text_file, tmp_path, arch, saved):
    """BatchTopK, Matryoshka-BatchTopK, JumpReLU (quadratic loss around the target L0 k)
    and gated SAEs train with sae_lens's trainer from the same stream, are saved the sae_lens
    way (BatchTopK as the JumpReLU SAE sae_lens makes of it) and load back unchanged."""
    from sage_nn.pipeline.checks import sae_problems

    model = tiny_random_model("llama")
    cfg = TrainConfig(architecture=arch, **SMALL)
    saes, report = train_saes(model, ["L0.resid_pre", "L1.resid_mid"], cfg,
                              source=text_file, out_dir=tmp_path, progress=False)
    assert {s.architecture for s in saes.values()} == {saved}
    assert (report.fvu < 0.6).all() and (report.l0 > 0).all(), report
    assert SAE.load_from_disk(tmp_path / "L0.resid_pre").cfg.architecture() == saved
    x = torch.randn(5, 32)
    loaded = load_trained(tmp_path, model)
    torch.testing.assert_close(loaded["L1.resid_mid"](x), saes["L1.resid_mid"](x))
    assert training_record(tmp_path / "L0.resid_pre")["steps"] == cfg.max_steps
    assert sae_problems(f"train:{arch}:k=8") == []


def test_trainable_architectures_are_one_list():
    from sage_nn.common.formats import TRAINABLE
    from sage_nn.dictionaries.training import TRAINING_CLASSES
    from sage_nn.dictionaries.transcoding import TRANSCODERS

    assert set(TRAINABLE) == set(TRAINING_CLASSES) | set(TRANSCODERS)
    with pytest.raises(ValueError, match="cannot train architecture 'abstopk'"):
        TrainConfig(architecture="abstopk")


@pytest.mark.parametrize("arch", ["transcoder", "skip_transcoder"])
def test_transcoders_of_mlps_train_and_load_the_sae_lens_way(text_file, tmp_path, arch):
    """A JumpReLU (skip) transcoder per MLP, from its normalised input to its output: saved
    as sae_lens's class with both hooks, better than the mean on held-out text, loaded back
    unchanged; a site that is not an MLP's output is refused."""
    model = tiny_random_model("llama")
    cfg = TrainConfig(architecture=arch, **{**SMALL, "tokens": 16384, "lr": 3e-3})
    saes, report = train_saes(model, ["L1.mlp_out"], cfg, source=text_file, out_dir=tmp_path,
                              progress=False)
    ref = SAE.load_from_disk(tmp_path / "L1.mlp_out")
    assert type(ref).__name__ == {"transcoder": "JumpReLUTranscoder",
                                  "skip_transcoder": "JumpReLUSkipTranscoder"}[arch]
    assert (ref.cfg.metadata.hook_name, ref.cfg.metadata.hook_name_out) == \
        ("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out")
    assert float(report.loc["L1.mlp_out", "fvu"]) < 0.5, report
    assert 2 <= float(report.l0.iloc[0]) <= 8, report  # near the target L0 k = 4
    loaded = load_trained(tmp_path, model)["L1.mlp_out"]
    assert (loaded.input_kind, loaded.input_form, loaded.kind) == \
        ("resid_mid", "normalized", "mlp_out")
    x = torch.randn(5, 32)
    torch.testing.assert_close(loaded(x), saes["L1.mlp_out"](x))
    assert training_record(tmp_path / "L1.mlp_out")["steps"] == cfg.max_steps
    with pytest.raises(ValueError, match="trained for an MLP's output"):
        train_saes(model, ["L1.z"], cfg, source=text_file)


def test_the_data_start_reconstructs_from_the_first_step(text_file):
    """After one step, the default start (decoder rows from the first batch, encoder scaled
    to fit it) has a far lower held-out FVU (0.36 here) than sae_lens's rows of norm 0.1
    (0.98), which reconstruct about a hundredth of the input."""
    model = tiny_random_model("llama")
    first = {}
    for start in ("data", "sae_lens"):
        cfg = TrainConfig(**{**SMALL, "tokens": 128}, weight_init=start)
        _, report = train_saes(model, ["L1.resid_pre"], cfg, source=text_file, progress=False)
        first[start] = report.fvu.iloc[0]
    assert first["data"] < 0.5 * first["sae_lens"], first


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka_batchtopk", "jumprelu"])
def test_thresholded_saes_start_at_their_target_l0(text_file, arch):
    """BatchTopK's inference threshold (a moving average from 0) and JumpReLU's (sae_lens's
    0.01) start far below the data's scale: after a step, many more latents fire than the k
    they train for. The data start puts them at k active latents per token from the start."""
    model = tiny_random_model("llama")
    l0 = {}
    for start in ("data", "sae_lens"):
        cfg = TrainConfig(architecture=arch, **{**SMALL, "tokens": 128, "lr": 1e-4},
                          weight_init=start)
        _, report = train_saes(model, ["L1.resid_pre"], cfg, source=text_file, progress=False)
        l0[start] = report.l0.iloc[0]
    k = SMALL["k"]
    assert k / 2 <= l0["data"] <= 1.5 * k and l0["sae_lens"] > 3 * k, l0
