"""Generate the built-in offline training corpus: text SmolLM2 writes itself, at a fixed seed.

Run once (about 10 minutes on 2 idle CPU cores); it writes ``sage_nn/data/smollm2_corpus.jsonl.gz``,
one JSON object per line: ``{"topic": ..., "text": ...}``. The text is the model's own output,
so nothing is copied from elsewhere, and training SAEs needs no network. Batches are
generated in a fixed order from one seed, so any run's first batches are the same text; the
shipped file holds 160 documents (22k tokens, 33 KB), generated in 3.7 minutes on 2 idle
cores with `--docs 320` (the topic list caps it at 160 documents).

    python scripts/make_corpus.py [--docs 96] [--tokens 160] [--seed 0]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sage_nn.model.loading import load_model

OUT = Path(__file__).resolve().parents[1] / "sage_nn" / "data" / "smollm2_corpus.jsonl.gz"

TOPICS = (
    "a trip to the market", "how rain forms", "a lost dog finding its way home", "the history of bread",
    "learning to ride a bicycle", "why the sky is blue", "a birthday party", "how computers store numbers",
    "a day at the beach", "the life of a honeybee", "a friendship between two children", "how to plant a tree",
    "a storm at sea", "the planets of the solar system", "a visit to grandmother", "how volcanoes erupt",
    "a football match", "the invention of the printing press", "cooking a family dinner", "how plants make food",
    "a mystery in a small town", "the water cycle", "a teacher and her students", "how trains work",
    "a dragon who could not fly", "the first day of school", "why we sleep", "a letter to a friend",
    "a robot learning to paint", "how the heart pumps blood", "a walk in the mountains", "the seasons of the year",
    "a shop owner and a customer", "how bridges stay up", "a cat and a mouse", "the history of the Olympic games",
    "a scientist in a laboratory", "how to write a good essay", "a journey on a ship", "the moon and the tides",
)
STYLES = (
    "Write a short story about {}.",
    "Explain {} in simple words.",
    "Write a few paragraphs about {}.",
    "Describe {} as if you were talking to a child.",
)


def _write(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=9) as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=96)
    parser.add_argument("--tokens", type=int, default=160, help="new tokens per document")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    model = load_model("smollm2-135m", device="cpu")
    hf, tok = model._module, model.tokenizer
    requests = [(t, s.format(t)) for s in STYLES for t in TOPICS][: args.docs]
    torch.manual_seed(args.seed)
    records, start, n_tokens = [], time.time(), 0
    for b in range(0, len(requests), args.batch_size):
        chunk = requests[b: b + args.batch_size]
        chats = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                         add_generation_prompt=True) for _, q in chunk]
        enc = tok(chats, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = hf.generate(**enc, max_new_tokens=args.tokens, do_sample=True, temperature=0.8,
                              top_p=0.95, pad_token_id=tok.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        for (topic, _), ids in zip(chunk, new):
            text = tok.decode(ids, skip_special_tokens=True).strip()
            n_tokens += len(tok(text)["input_ids"])
            records.append({"topic": topic, "text": text})
        print(f"{len(records)}/{len(requests)} docs, {n_tokens} tokens, "
              f"{time.time() - start:.0f} s", flush=True)
        _write(args.out, records)  # after every batch, so an interrupted run still leaves text
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB, {n_tokens} tokens)")


if __name__ == "__main__":
    main()
