import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

ARCHITECTURES = ["gpt2", "gpt_neox", "llama", "qwen2", "gemma2"]


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded default model (converted from its GGUF once per cache)."""
    from sage_nn import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_models():
    from sage_nn import tiny_random_model

    return {arch: tiny_random_model(arch) for arch in ARCHITECTURES}
