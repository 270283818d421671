"""Benchmarks that read a run directory check it before their minutes of work: without
a finished quickstart run they stop at once with one line saying what to do, and write
or create nothing."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def bench(script, *argv):
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *argv],
                          capture_output=True, text=True, timeout=120)
    return done, time.perf_counter() - start


@pytest.mark.parametrize("script, flag", [("remote.py", "--edit-run"),
                                          ("evaluation.py", "--run-dir")])
def test_a_benchmark_without_its_run_directory_stops_at_once(script, flag, tmp_path):
    missing = tmp_path / "runs" / "quickstart"
    out = tmp_path / "out.json"
    extra = ["--out", str(out)] if script == "remote.py" else []
    done, seconds = bench(script, flag, str(missing), *extra)
    print(f"{script} stopped in {seconds:.1f} s: {done.stderr}")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"benchmarks/{script}: error: {flag} {missing}: {missing} is not a directory: give "
        "the run_dir of a finished run (sage run --run-dir DIR); fix: run `sage quickstart` "
        "first (it writes runs/quickstart), or " + (
            "pass --edit-run '' to skip the edit transport (the stored result is kept)"
            if script == "remote.py" else "give another run's --run-dir")]
    assert not missing.exists() and not out.exists()
    assert seconds < 30  # not after ~15 minutes of measurements

    missing.mkdir(parents=True)  # a run stopped after its task stage
    (missing / "manifest.json").write_text(json.dumps({"task": {"settings": "x",
                                                                "seconds": 1, "files": {}}}))
    done, _ = bench(script, flag, str(missing), *extra)
    assert done.returncode == 2 and "stage(s) discovery, saes did not finish (done: task)" \
        in done.stderr, done.stderr
    assert sorted(p.name for p in missing.iterdir()) == ["manifest.json"]
