"""The suite's cold time on SmolLM2: every shipped task, ``train:topk``, default settings.

Runs :func:`sage_nn.pipeline.suite.run_suite` into a fresh suite directory with a fresh SAE
cache (the converted model is reused: converting the GGUF is not part of a suite), then
(``--add``) reruns it adding the SAE set it trained, given as a directory: an already
trained set, so the rerun only scores it. Records the wall time of each, the suite's parts
(model load, task checks, discovery, the shared training, evaluation and reports), each
task's stage seconds, the tasks gated out and why, the score per SAE, and the load average
(the machine is shared). Writes benchmarks/results/suite.json after each phase.
"""

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from sage_nn.pipeline.config import RunConfig
from sage_nn.pipeline.suite import SUITE_CORPUS, run_suite


def phase(config: RunConfig, suite_dir: Path) -> dict:
    load = os.getloadavg()
    start = time.perf_counter()
    suite = run_suite(config, suite_dir=suite_dir, progress=False)
    wall = time.perf_counter() - start
    stages = {name: {stage: record["seconds"] for stage, record in json.loads(
        (suite_dir / name / "manifest.json").read_text()).items()}
        for name in suite.record["tasks"] if (suite_dir / name / "manifest.json").exists()}
    return {"wall_s": round(wall, 1), "parts_s": {k: round(v, 1) for k, v in
                                                  suite.timings.items()},
            "task_stages_s": stages,
            "tasks": {name: {"accuracy": t["accuracy"], "gate": t["gate"]}
                      for name, t in suite.record["tasks"].items()},
            "score": json.loads(suite.aggregate.to_json(orient="index")),
            "agreement": json.loads(suite.agreement.to_json(orient="index")),
            "load_average_start": [round(x, 2) for x in load],
            "load_average_end": [round(x, 2) for x in os.getloadavg()]}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--suite-dir", default="runs/suite-bench")
    parser.add_argument("--cache", default="runs/suite-bench-cache",
                        help="a fresh SAGE_NN_CACHE (its models/ linked to the usual one)")
    parser.add_argument("--out", default="benchmarks/results/suite.json")
    parser.add_argument("--add", action="store_true",
                        help="then rerun adding the trained SAE set as a directory")
    parser.add_argument("--add-only", action="store_true",
                        help="only that rerun, on the suite and results a cold run left")
    args = parser.parse_args()
    suite_dir, cache = Path(args.suite_dir), Path(args.cache)
    if args.add_only:
        os.environ["SAGE_NN_CACHE"] = str(cache.resolve())
        config = RunConfig(saes=["train:topk"], sae_corpus=SUITE_CORPUS, run_dir=str(suite_dir))
        add(config, suite_dir, cache, json.loads(Path(args.out).read_text()), args.out)
        return
    if suite_dir.exists() or cache.exists():
        sys.exit(f"benchmarks/suite.py: error: {suite_dir} or {cache} exists; fix: remove "
                 "them (a cold suite starts from nothing)")
    from sage_nn.model.loading import cache_dir

    models = cache_dir() / "models"
    cache.mkdir(parents=True)
    if models.exists():
        (cache / "models").symlink_to(models.resolve())
    os.environ["SAGE_NN_CACHE"] = str(cache.resolve())
    config = RunConfig(saes=["train:topk"], sae_corpus=SUITE_CORPUS, run_dir=str(suite_dir))
    out = {"model": config.model, "saes": config.saes, "sae_corpus": config.sae_corpus,
           "threads": {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
           "cpus": os.cpu_count(), "cold": phase(config, suite_dir)}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out["cold"], indent=2))
    if args.add:
        add(config, suite_dir, cache, out, args.out)


def add(config: RunConfig, suite_dir: Path, cache: Path, out: dict, path: str) -> None:
    """Rerun the suite adding the SAE set it trained, given as a directory."""
    trained = next(p for p in (cache / "saes").glob("*/topk-*") if p.is_dir())  # not a .lock
    given = suite_dir.parent / "suite-bench-saes" / "topk-given"
    shutil.copytree(trained, given, dirs_exist_ok=True)
    out["add_trained_set"] = {"sae": str(given), **phase(
        RunConfig(**{**config.__dict__, "saes": ["train:topk", str(given)]}), suite_dir)}
    Path(path).write_text(json.dumps(out, indent=2))
    print(json.dumps(out["add_trained_set"], indent=2))


if __name__ == "__main__":
    main()
