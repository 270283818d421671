"""The suite on SmolLM2: every shipped task, ``train:topk``, a suite's default settings.

Phases (``--phases``, in this order, each appended to benchmarks/results/suite.json):

- ``cold``: :func:`sage_nn.pipeline.suite.run_suite` into a fresh suite directory with a fresh
  SAE cache (the converted model is reused: converting the GGUF is not part of a suite);
- ``add``: the suite again, adding the SAE set it trained given as a directory (an already
  trained set, so the rerun only scores it);
- ``separate``: the same tasks as six separate ``sage run --task T --sae train:topk``
  processes (each trains its own SAEs on the built-in text and its own task's prompts, to the
  suite's step cap), one after another with their own fresh cache: the time a suite saves;
- ``sweep``: the suite again, adding an L0 sweep of trained residual SAEs
  (``train:topk:k=8,16,64``, next to the k=32 set ``train:topk`` trained cold).

Records the wall time of each, the suite's parts (model load, task checks, discovery, the
shared training, evaluation and reports), each task's stage seconds, the tasks gated out and
why, the score per SAE, the training steps and convergence of the suite's SAEs, and the load
average (the machine is shared).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from sage_nn.pipeline.suite import run_suite, suite_config, suite_tasks

PHASES = ("cold", "add", "separate", "sweep")
SWEEP = "train:topk:k=8,16,64"


def fresh_cache(cache: Path) -> None:
    """An empty SAGE_NN_CACHE whose models/ is the usual one (no conversion timed)."""
    from sage_nn.model.loading import cache_dir

    models = cache_dir() / "models"
    cache.mkdir(parents=True)
    if models.exists():
        (cache / "models").symlink_to(models.resolve())


def trained(cache: Path) -> dict:
    """Per trained SAE set in ``cache``: per site its steps, convergence and held-out FVU
    (the set's report.csv)."""
    import pandas as pd

    return {report.parent.name: pd.read_csv(report, index_col="site")[
        ["steps", "converged", "fvu", "l0", "dead", "corpus_passes"]].to_dict(orient="index")
        for report in sorted(cache.glob("saes/*/*/report.csv"))}


def phase(config, suite_dir: Path) -> dict:
    load = os.getloadavg()
    start = time.perf_counter()
    suite = run_suite(config, suite_dir=suite_dir, progress=False)
    wall = time.perf_counter() - start
    stages = {name: {stage: record["seconds"] for stage, record in json.loads(
        (suite_dir / name / "manifest.json").read_text()).items()}
        for name in suite.record["tasks"] if (suite_dir / name / "manifest.json").exists()}
    return {"saes": config.saes, "wall_s": round(wall, 1),
            "parts_s": {k: round(v, 1) for k, v in suite.timings.items()},
            "task_stages_s": stages,
            "tasks": {name: {"accuracy": t["accuracy"], "gate": t["gate"]}
                      for name, t in suite.record["tasks"].items()},
            "score": json.loads(suite.aggregate.to_json(orient="index")),
            "agreement": json.loads(suite.agreement.to_json(orient="index")),
            "load_average_start": [round(x, 2) for x in load],
            "load_average_end": [round(x, 2) for x in os.getloadavg()]}


def separate(root: Path, cache: Path, config) -> dict:
    """Each task as its own ``sage run`` process, timed end to end: its SAEs trained on the
    built-in text and its own prompts (a run's default, its task's prompts alone, is too
    small a corpus for antonyms and capitals), to the suite's step cap."""
    fresh_cache(cache)
    env = {**os.environ, "SAGE_NN_CACHE": str(cache.resolve())}
    runs, load = {}, os.getloadavg()
    for name, task in suite_tasks().items():
        begin = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "sage_nn.cli", "run", "--task", task,
                               "--sae", "train:topk", "--run-dir", str(root / name),
                               "--sae-corpus", config.sae_corpus,
                               "--sae-steps", str(config.sae_steps)],
                              env=env, capture_output=True, text=True)
        runs[name] = {"wall_s": round(time.perf_counter() - begin, 1), "rc": done.returncode}
        if done.returncode:  # a task a run refuses (as the suite gates it) still costs this
            runs[name]["error"] = done.stderr.strip().splitlines()[-1][:400]
        print(name, runs[name], flush=True)
    return {"runs": runs, "total_s": round(sum(r["wall_s"] for r in runs.values()), 1),
            "trained": trained(cache), "load_average_start": [round(x, 2) for x in load],
            "load_average_end": [round(x, 2) for x in os.getloadavg()]}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default="runs/suite-bench",
                        help="the suite, its caches and the separate runs go under it")
    parser.add_argument("--out", default="benchmarks/results/suite.json")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    args = parser.parse_args()
    root = Path(args.root)
    suite_dir, cache = root / "suite", root / "cache"
    if "cold" in args.phases and root.exists():
        sys.exit(f"benchmarks/suite.py: error: {root} exists; fix: remove it (a cold suite "
                 "starts from nothing) or leave out the cold phase")
    out = {} if "cold" in args.phases else json.loads(Path(args.out).read_text())
    config = suite_config(saes=["train:topk"], run_dir=str(suite_dir))
    out.update({"model": config.model, "cpus": os.cpu_count(),
                "settings": {k: getattr(config, k) for k in ("sae_corpus", "sae_steps")},
                "threads": {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}})

    def save(key: str, value: dict) -> None:
        out[key] = value
        Path(args.out).write_text(json.dumps(out, indent=2))
        print(key, json.dumps(value, indent=2)[:3000], flush=True)

    if "cold" in args.phases:
        fresh_cache(cache)
    os.environ["SAGE_NN_CACHE"] = str(cache.resolve())
    if "cold" in args.phases:
        save("cold", {**phase(config, suite_dir), "trained": trained(cache)})
    given = root / "saes" / "topk-given"
    if "add" in args.phases:
        set_dir = next(p for p in (cache / "saes").glob("*/topk-1024-*") if p.is_dir())
        shutil.copytree(set_dir, given, dirs_exist_ok=True)
        config = suite_config(saes=["train:topk", str(given)], run_dir=str(suite_dir))
        save("add_trained_set", {"sae": str(given), **phase(config, suite_dir)})
    if "separate" in args.phases:
        runs = separate(root / "separate", root / "separate-cache", config)
        cold = out["cold"]["wall_s"]
        save("separate_runs", {**runs, "suite_cold_s": cold,
                               "time_saved_share": round(1 - cold / runs["total_s"], 3)})
    if "sweep" in args.phases:
        saes = ["train:topk"] + ([str(given)] if given.exists() else []) + [SWEEP]
        config = suite_config(saes=saes, run_dir=str(suite_dir))
        save("l0_sweep", {**phase(config, suite_dir), "trained": trained(cache)})


if __name__ == "__main__":
    main()
