import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

ARCHITECTURES = ["gpt2", "gpt_neox", "llama", "qwen2", "gemma2"]

# An IOI-like task over the words of the tiny models' tokenizer (sage_nn.model.loading.TINY_WORDS).
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


def write_tiny_run_files(root, model) -> None:
    """``model`` saved as a HuggingFace directory (``root/model``), :data:`TINY_TASK` as
    ``root/tiny.yaml`` and a text corpus of the tiny tokenizer's words (``root/corpus.txt``):
    what a ``sage`` command on a tiny model reads from disk."""
    import numpy as np

    from sage_nn.model.loading import TINY_WORDS

    model._module.save_pretrained(root / "model")
    model.tokenizer.save_pretrained(root / "model")
    (root / "tiny.yaml").write_text(TINY_TASK)
    rng = np.random.default_rng(0)
    (root / "corpus.txt").write_text("\n\n".join(" ".join(rng.choice(TINY_WORDS, 80))
                                                  for _ in range(60)))


def tiny_task_dataset(directory, n: int):
    """The tiny llama (seed 4) and ``n`` train prompts of :data:`TINY_TASK`, whose spec is
    written to ``directory/tiny.yaml``."""
    from sage_nn import tiny_random_model
    from sage_nn.tasks.datasets import load_task

    path = directory / "tiny.yaml"
    path.write_text(TINY_TASK)
    model = tiny_random_model("llama", seed=4)
    return model, load_task(path).build(model, n=n, seed=0, split="train")



def trained_tiny_model(directory, steps: int = 200, seed: int = 4):
    """The tiny llama trained for a few seconds to do :data:`TINY_TASK` (it learns to
    predict IO: accuracy 1, io's counterfactual moves LD by about 8 logits), so interventions
    on it move its predictions as on a real model; and its spec's path."""
    import numpy as np
    import torch

    from sage_nn.tasks.datasets import load_task

    model, _ = tiny_task_dataset(directory, n=8)
    train = load_task(directory / "tiny.yaml").build(model, n=512, seed=1, split="train")
    hf, tokenizer = model._module, model.tokenizer
    enc = tokenizer(list(train.prompts), return_tensors="pt", padding=True)
    answers = torch.as_tensor(np.asarray(train.answer_ids))
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(hf.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(answers), (64,))
        logits = hf(input_ids=enc["input_ids"][idx],
                    attention_mask=enc["attention_mask"][idx]).logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits, answers[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    hf.eval()
    hf.requires_grad_(False)
    return model, directory / "tiny.yaml"


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded default model (converted from its GGUF once per cache)."""
    from sage_nn import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def quickstart(smollm2, tmp_path_factory):
    """``sage quickstart`` (its RunConfig: SmolLM2, IOI, residual TopK SAEs and SAEs at the
    heads) run once per session in a run directory of its own. Its SAEs come from the SAE
    cache (``$SAGE_NN_CACHE``, keyed by the corpus's content, the trainer and the
    settings), trained there on first use as the quickstart trains them; every stage
    after is computed here. The calibration and the notebooks read it."""
    from sage_nn.pipeline.config import RunConfig
    from sage_nn.pipeline.stages import run

    run_dir = tmp_path_factory.mktemp("quickstart") / "run"
    return run(RunConfig(run_dir=str(run_dir)), model=smollm2, progress=False)


@pytest.fixture(scope="session")
def tiny_models():
    from sage_nn import tiny_random_model

    return {arch: tiny_random_model(arch) for arch in ARCHITECTURES}
