"""Faults mid-run lose nothing finished: an exception, SIGINT or SIGKILL in a stage, a full
disk, a corrupt stage file or SAE cache entry, a remote request failing on its last retry.
After each, the resumed run recomputes only what had not finished and gives the numbers of
an uninterrupted run. Two processes share one SAE cache; untrusted files never unpickle."""

import dataclasses
import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import xarray as xr

from sage_nn import open_run
from sage_nn.pipeline.rundir import STAGES, RunDirectory
from sage_nn.pipeline.resolve import cached_saes
from sage_nn.pipeline.stages import run
from sage_nn.model.remote import Remote
from sage_nn.dictionaries.saes import load_sae, sealed_problem
from test_pipeline import _setup
from test_pipeline import config as pipeline_config


def config(root, name):
    """test_pipeline's tiny run, smaller still: a fault test runs it about twenty times."""
    return dataclasses.replace(pipeline_config(root, name), n_fit=16, n_eval=8, ks=[1, 2],
                               n_boot=20)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAGE_NN_CACHE", str(root / "cache"))
        root, model = _setup(root)
        reference = run(config(root, "reference"), model=model, progress=False)
        yield root, model, reference


def resume(root, model, name, reference, finished):
    """Run ``name`` again: the ``finished`` stages are read back, the others computed, and
    the results are the uninterrupted run's."""
    again = run(config(root, name), model=model, progress=False)
    for stage in STAGES:
        assert (again.timings[stage] == 0) == (stage in finished), (stage, again.timings)
    xr.testing.assert_identical(again.results, reference.results)
    assert not list(again.run_dir.rglob(".*partial*")), "a side file was left behind"
    return again


def sae_cache(root) -> Path:
    (cache,) = [p for p in (Path(os.environ["SAGE_NN_CACHE"]) / "saes").glob("*/topk-64-*")
                if p.is_dir()]
    return cache


# -- an exception in each stage ------------------------------------------------------------

def _raising_after(module, name):
    """``module.name`` that does its work, then raises (a crash right after the writes)."""
    real = getattr(module, name)

    def crash(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt(f"interrupted in {name}")

    return crash


@pytest.mark.parametrize("stage", STAGES)
def test_an_interrupt_in_each_stage_keeps_the_stages_before_it(setup, stage, monkeypatch,
                                                               tmp_path):
    import sage_nn.dictionaries.training
    import sage_nn.discovery.stage
    import sage_nn.evaluation.scoring
    import sage_nn.report
    import sage_nn.tasks.datasets

    root, model, reference = setup
    # the modules the stages take these names from, when the stage runs
    where = {"task": (sage_nn.tasks.datasets, "logit_diffs"),
             "discovery": (sage_nn.discovery.stage, "discover"),
             "saes": (sage_nn.dictionaries.training, "evaluate"),  # written, not yet moved
             "evaluation": (sage_nn.evaluation.scoring, "evaluate_cross_section"),
             "report": (sage_nn.report, "write_report")}[stage]
    if stage == "saes":  # a cache of its own, so the SAEs are trained here
        monkeypatch.setenv("SAGE_NN_CACHE", str(tmp_path / "cache"))
    name = f"interrupted-{stage}"
    with monkeypatch.context() as mp:
        mp.setattr(*where, _raising_after(*where))
        with pytest.raises(KeyboardInterrupt):
            run(config(root, name), model=model, progress=False)
    before = STAGES[:STAGES.index(stage)]
    assert list(RunDirectory(root / name).manifest) == before
    # nothing of the unfinished stage is where a finished one's files go
    unfinished = {"task": "task.json", "discovery": "discovery", "saes": "saes.json",
                  "evaluation": "evaluation.nc", "report": "report"}[stage]
    assert not (root / name / unfinished).exists()
    if stage == "saes":
        assert not any((tmp_path / "cache").rglob("cfg.json"))
    resume(root, model, name, reference, finished=before)


# -- SIGINT and SIGKILL of a real process -----------------------------------------------------

PAUSED_RUN = """
import json, sys, time
from pathlib import Path
import importlib
from sage_nn import tiny_random_model
from sage_nn.pipeline import RunConfig, run

cfg, module, name, marker = json.loads(sys.argv[1]), *sys.argv[2:5]

def paused(*args, **kwargs):  # the stage has begun (and, in training, written its SAEs)
    Path(marker).write_text(name)
    time.sleep(600)

if name != "-":
    setattr(importlib.import_module(module), name, paused)
trained = importlib.import_module("sage_nn.dictionaries.training")
train = trained.train_saes
def counted(*args, **kwargs):
    out = train(*args, **kwargs)
    print("trained", flush=True)
    time.sleep(2)  # hold the cache's lock a while: the other process must wait for it
    return out
trained.train_saes = counted
result = run(RunConfig(**cfg), model=tiny_random_model("llama", seed=0), progress=False)
print("timings", json.dumps(result.timings), flush=True)
"""


def start(root, name, module="-", function="-", cache=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SAGE_NN_CACHE": str(cache),
           "PYTHONPATH": str(Path(__file__).parent.parent)}
    cfg = json.dumps(dataclasses.asdict(config(root, name)))
    return subprocess.Popen([sys.executable, "-c", PAUSED_RUN, cfg, module, function,
                             str(root / f"{name}.marker")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "the run never reached the stage"
        time.sleep(0.2)


@pytest.mark.parametrize("sig,stage,module,function", [
    (signal.SIGKILL, "saes", "sage_nn.dictionaries.training", "evaluate"),
    (signal.SIGINT, "evaluation", "sage_nn.evaluation.scoring", "evaluate_cross_section")])
def test_a_killed_process_resumes_from_its_last_finished_stage(setup, sig, stage, module,
                                                               function, tmp_path, monkeypatch):
    root, model, reference = setup
    cache = tmp_path / "cache" if stage == "saes" else Path(os.environ["SAGE_NN_CACHE"])
    name = f"{sig.name}-{stage}"
    proc = start(root, name, module, function, cache)
    wait_for(root / f"{name}.marker", proc)
    start_kill = time.perf_counter()
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    print(f"{sig.name} in {stage}: exited {proc.returncode} "
          f"after {time.perf_counter() - start_kill:.1f} s")
    assert proc.returncode != 0
    before = STAGES[:STAGES.index(stage)]
    assert list(RunDirectory(root / name).manifest) == before
    if stage == "saes":  # the killed training left a side directory, never a cache entry
        assert not list(cache.rglob("cfg.json")) or \
            all(".partial-" in str(p) for p in cache.rglob("cfg.json"))
    monkeypatch.setenv("SAGE_NN_CACHE", str(cache))
    resume(root, model, name, reference, finished=before)
    assert not list(cache.rglob(".*partial-*")), "the stale side directory was not removed"


def test_two_processes_share_one_sae_cache(setup, tmp_path):
    """Both need the same SAEs at once: one trains them under the cache's lock, the other
    waits and reads them whole; both give the reference numbers."""
    root, _, reference = setup
    procs = [start(root, f"together-{i}", cache=tmp_path / "cache") for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert sum(out.count("trained") for out, _ in outs) == 1, [o for o, _ in outs]
    for i in range(2):
        xr.testing.assert_identical(open_run(root / f"together-{i}").results, reference.results)


# -- a full disk ---------------------------------------------------------------------------

def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def full_disk_at(name):
    """``Dataset.to_netcdf`` on a disk that fills up when the file ``name`` is written."""
    real = xr.Dataset.to_netcdf

    def to_netcdf(self, path=None, *args, **kwargs):
        if name in str(path):
            no_space()
        return real(self, path, *args, **kwargs)

    return to_netcdf


def test_a_full_disk_while_writing_a_stage_or_the_sae_cache(setup, monkeypatch, tmp_path):
    root, model, reference = setup
    with monkeypatch.context() as mp:  # the evaluation's netCDF write
        mp.setattr(xr.Dataset, "to_netcdf", full_disk_at("evaluation.nc"))
        with pytest.raises(OSError, match="No space left"):
            run(config(root, "full-disk"), model=model, progress=False)
    assert list(RunDirectory(root / "full-disk").manifest) == ["task", "discovery", "saes"]
    assert not (root / "full-disk" / "evaluation.nc").exists()
    resume(root, model, "full-disk", reference, finished=["task", "discovery", "saes"])

    import sae_lens.saes.sae

    monkeypatch.setenv("SAGE_NN_CACHE", str(tmp_path / "cache"))
    with monkeypatch.context() as mp:  # the trained SAE's weights
        mp.setattr(sae_lens.saes.sae, "save_file", no_space)
        with pytest.raises(OSError, match="No space left"):
            run(config(root, "full-disk-cache"), model=model, progress=False)
    assert not list((tmp_path / "cache").rglob("*.safetensors"))
    assert not list((tmp_path / "cache").rglob(".*partial-*"))
    resume(root, model, "full-disk-cache", reference, finished=["task", "discovery"])


# -- corrupt files -----------------------------------------------------------------------

def flip_byte(path: Path, at: int = -20) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupt_stage_file_or_sae_cache_entry_is_recomputed(setup, monkeypatch, tmp_path,
                                                                caplog):
    root, model, reference = setup
    shutil.copytree(os.environ["SAGE_NN_CACHE"], tmp_path / "cache")
    monkeypatch.setenv("SAGE_NN_CACHE", str(tmp_path / "cache"))
    run(config(root, "corrupt"), model=model, progress=False)
    flip_byte(root / "corrupt" / "discovery" / "cross_sections.csv")
    resume(root, model, "corrupt", reference, finished=["task"])

    entry = next(p.parent for p in sae_cache(root).glob("*/cfg.json"))
    original = load_sae(entry, model=model, site=entry.name)
    weights = entry / "sae_weights.safetensors"
    for corrupt in ("truncated", "flipped"):  # half the file; same size, other bytes
        if corrupt == "truncated":
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        else:
            flip_byte(weights)
        assert "truncated or corrupt" in sealed_problem(entry)
        caplog.clear()
        with caplog.at_level("WARNING", logger="sage_nn"):
            resume(root, model, "corrupt", reference, finished=STAGES)  # stages stay done
        assert "is unusable" in caplog.text  # ... and the SAE was trained again, the same
        assert sealed_problem(entry) is None
        again = load_sae(entry, model=model, site=entry.name)
        assert torch.equal(again.W_enc, original.W_enc) and \
            torch.equal(again.W_dec, original.W_dec)


# -- a remote request failing on its last retry ------------------------------------------

def test_a_remote_request_failing_on_its_last_retry(setup, monkeypatch):
    """nnsight's offline simulation of NDIF behind a connection that drops after the task's
    one request: discovery's request fails, and fails again on each retry."""
    import sage_nn.model.remote

    root, model, reference = setup
    real, calls = sage_nn.model.remote._session, []

    def drops_after_one(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise ConnectionError("connection reset by peer")
        return real(*args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(sage_nn.model.remote, "_session", drops_after_one)
        with pytest.raises(ConnectionError):
            run(config(root, "remote"), model=model, progress=False,
                remote=Remote("local", retries=2, backoff_s=0))
    assert len(calls) == 1 + 3  # the task's request, then discovery's, tried three times
    assert list(RunDirectory(root / "remote").manifest) == ["task"]
    resume(root, model, "remote", reference, finished=["task"])


# -- untrusted files never unpickle ------------------------------------------------------

class Payload:
    """Unpickling this creates ``marker``: the proof that something unpickled it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_loading_an_sae_or_a_run_directory_never_unpickles(setup, tmp_path, monkeypatch):
    from sage_nn.pipeline.checks import sae_problems

    root, model, reference = setup
    marker = tmp_path / "unpickled"
    bomb = pickle.dumps(Payload(marker))
    shutil.copytree(os.environ["SAGE_NN_CACHE"], tmp_path / "cache")
    monkeypatch.setenv("SAGE_NN_CACHE", str(tmp_path / "cache"))
    entry = next(p.parent for p in sae_cache(root).glob("*/cfg.json"))

    # an SAE directory whose weights are a pickle, as .safetensors or as .pt
    evil = tmp_path / "evil_sae"
    shutil.copytree(entry, evil)
    (evil / "sae_weights.safetensors").write_bytes(bomb)
    with pytest.raises(Exception):
        load_sae(evil, model=model, site=entry.name)
    (evil / "sae_weights.safetensors").unlink()
    (evil / "sae_weights.pt").write_bytes(bomb)
    (problem,) = sae_problems(str(evil))
    assert "no sae_weights.safetensors" in problem
    with pytest.raises(Exception):
        load_sae(evil, model=model, site=entry.name)

    # a run directory and an SAE cache entry with a pickle in place of their files
    run(config(root, "untrusted"), model=model, progress=False)
    (root / "untrusted" / "evaluation.nc").write_bytes(bomb)
    resume(root, model, "untrusted", reference, finished=["task", "discovery", "saes"])
    (entry / "sae_weights.safetensors").write_bytes(bomb)
    have, broken = cached_saes(entry.parent, model)
    assert broken == [entry.name] and not entry.exists()
    assert not marker.exists()
