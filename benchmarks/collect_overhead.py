"""Overhead of `collect` over a plain HuggingFace forward of the same batch.

Collects resid_post at all 30 layers of SmolLM2 for a fixed batch of 32 prompts, against
`model(**inputs)` on the same batch, alternating in one process; writes the median ratio
to benchmarks/results/collect_overhead.json. Target: ratio <= 1.15 on CPU.
"""

import json
import platform
import statistics
import time
from pathlib import Path

import torch

from sage_nn import collect, load_model
from sage_nn.model.activations import encode

NAMES = ["Mary", "John", "Alice", "Bob", "Tom", "Anna", "James", "Sarah"]
PLACES = ["store", "park", "school", "beach"]


def prompts(n=32):
    out = []
    for i in range(n):
        a, b = NAMES[i % 8], NAMES[(i + 3) % 8]
        out.append(f"When {a} and {b} went to the {PLACES[i % 4]}, {b} gave a drink to")
    return out


def main(repeats: int = 7, device: str | None = None) -> dict:
    model = load_model(device=device)
    batch = prompts()
    sites = [f"L{layer}.resid_post" for layer in range(30)]
    inputs = encode(model, batch, next(model._module.parameters()).device).inputs
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def plain():
        with torch.no_grad():
            model._module(**inputs)

    def collected():
        collect(model, batch, sites, batch_size=len(batch), progress=False)

    plain(), collected()  # warm-up
    t_plain, t_collect = [], []
    for _ in range(repeats):
        for fn, times in ((plain, t_plain), (collected, t_collect)):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
    ratios = [c / p for c, p in zip(t_collect, t_plain)]
    n_tokens = int(inputs["attention_mask"].sum())
    result = {
        "benchmark": "collect_overhead",
        "model": "smollm2-135m",
        "batch": {"prompts": len(batch), "padded_tokens": int(inputs["input_ids"].numel()),
                  "real_tokens": n_tokens},
        "sites": "resid_post at 30 layers, every token",
        "repeats": repeats,
        "device": str(next(model._module.parameters()).device),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "plain_forward_s_median": statistics.median(t_plain),
        "collect_s_median": statistics.median(t_collect),
        "ratio_median": statistics.median(ratios),
        "ratios": ratios,
        "collect_tokens_per_s": n_tokens / statistics.median(t_collect),
        "target": "ratio <= 1.15",
    }
    out = Path(__file__).parent / "results" / "collect_overhead.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
