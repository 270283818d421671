import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

ARCHITECTURES = ["gpt2", "gpt_neox", "llama", "qwen2", "gemma2"]

# An IOI-like task over the words of the tiny models' tokenizer (sage_nn.models.TINY_WORDS).
TINY_TASK = """
name: tiny-ioi
vocab:
  names: [Mary, John, Alice, Bob, Tom, Anna]
  places: [store, park, school]
slots: {IO: names, S: names, place: places}
distinct: [[IO, S]]
templates:
  - id: went
    text: "when {IO} and {S} went to the {place} , {S} gave a ball to"
  - id: then
    text: "then {IO} and {S} went to the {place} , {S} said it to"
attributes:
  io: {slot: IO}
  s: {slot: S}
answer: " {IO}"
distractor: " {S}"
positions:
  IO: {slot: IO}
  S2: {slot: S, occurrence: 2}
  END: last
split:
  test_templates: [then]
"""


def tiny_task_dataset(directory, n: int):
    """The tiny llama (seed 4) and ``n`` train prompts of :data:`TINY_TASK`, whose spec is
    written to ``directory/tiny.yaml``."""
    from sage_nn import tiny_random_model
    from sage_nn.tasks import load_task

    path = directory / "tiny.yaml"
    path.write_text(TINY_TASK)
    model = tiny_random_model("llama", seed=4)
    return model, load_task(path).build(model, n=n, seed=0, split="train")



@pytest.fixture(scope="session")
def smollm2():
    """The real embedded default model (converted from its GGUF once per cache)."""
    from sage_nn import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_models():
    from sage_nn import tiny_random_model

    return {arch: tiny_random_model(arch) for arch in ARCHITECTURES}
