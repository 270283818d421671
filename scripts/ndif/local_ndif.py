#!/usr/bin/env python3
"""Your own NDIF: the real server from the ``ndif`` package, on this machine, in one command.

    python scripts/ndif/local_ndif.py setup     # once: a Python 3.12 environment with ndif
    python scripts/ndif/local_ndif.py up        # redis, an S3 store, Ray + controller, the API
    python scripts/ndif/local_ndif.py status    # what runs, and the URL to give `sage run --remote`
    python scripts/ndif/local_ndif.py down

Runs under any Python 3; the server itself runs in its own environment (``ndif`` 0.1.2 needs
Python >= 3.12), at ``$SAGE_NN_NDIF_HOME/venv`` (default ``~/.cache/sage_nn/ndif``), where
its logs and process ids live too. ``up`` prints the API's URL; ``sage run --remote URL
--model PATH_OR_NAME`` sends every stage there. A model is deployed by its first request
(a local path works as the model when the server shares the host).

What is not NDIF's own code, and why (the rest is the ``ndif`` package as released):

- Services are started here rather than with ``ndif start``: the S3 store NDIF expects
  (rustfs) does not install from a package index, so ``moto_server`` serves its bucket; and
  on a machine without a GPU, Ray's head is started with a *logical* GPU and a
  ``cuda_memory_bytes`` resource, because the controller places models only on nodes that
  report GPUs and sizes them by CUDA memory (``resources.py`` reports 0 without CUDA).
- ``sage_ndif_shims.py`` (loaded in every process of the environment by a ``.pth`` file):
  two shims between ndif 0.1.2, nnsight 0.8.1 and transformers 5.25; its docstring says why.
- ``sage_ndif_cpu.py``, only without CUDA: the model actor with its four CUDA methods done on
  the CPU (``NDIF_MODEL_IMPORT_PATH``), and ``NDIF_DEFAULT_DTYPE=float32``.

Auth is off (no Postgres): a request runs trusted, in the model's process, unless its
envelope says ``"trusted": false``; then it runs sandboxed, in a fresh runner process that
holds a meta copy of the model (``sage_nn.model.remote.Remote(URL, trusted=False)``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: The server's environment (every version pinned in constraints.txt beside this file).
PACKAGES = ["torch==2.13.0", "ndif[api,ray]==0.1.2", "nnsight==0.8.1", "transformers==5.25.0",
            "moto[server]==5.2.6"]
PORTS = {"redis": 6390, "s3": 9010, "api": 8011, "ray": 6385, "ray_client": 10011,
         "dashboard": 8275, "object_manager": 8086, "metrics": 8090}


def home() -> Path:
    default = Path(os.environ.get("SAGE_NN_CACHE") or Path.home() / ".cache" / "sage_nn")
    return Path(os.environ.get("SAGE_NN_NDIF_HOME") or default / "ndif")


def venv_bin(name: str) -> str:
    return str(home() / "venv" / "bin" / name)


def url() -> str:
    return f"http://127.0.0.1:{PORTS['api']}"


def env() -> dict:
    """The environment every service runs with."""
    state = home()
    out = {**os.environ,
           "NDIF_HOME": str(state),
           "NDIF_REDIS_URL": f"redis://127.0.0.1:{PORTS['redis']}",
           "NDIF_OBJECT_STORE_URL": f"http://127.0.0.1:{PORTS['s3']}",
           "NDIF_API_URL": url(), "NDIF_API_PORT": str(PORTS["api"]),
           "NDIF_RAY_ADDRESS": f"ray://127.0.0.1:{PORTS['ray_client']}",
           "NDIF_RAY_HEAD_PORT": str(PORTS["ray"]),
           # one warm sandbox runner (each holds a meta model, ~0.5 GB), not NDIF's seven
           "NDIF_SANDBOX_POOL_SIZE": "1",
           "NDIF_CONTROLLER_SYNC_INTERVAL_S": "2",
           "GRPC_ENABLE_FORK_SUPPORT": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "PATH": f"{home() / 'venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    out.pop("PYTHONPATH", None)
    out.pop("VIRTUAL_ENV", None)
    # NDIF's sandbox-capable model actor: a trusted request runs in its process, any other
    # in a runner holding a meta copy of the model (on a CPU: the same, its CUDA calls
    # done on the CPU, in float32)
    out["NDIF_MODEL_IMPORT_PATH"] = "ndif.services.ray.sandbox.model.SandboxModelActor"
    if not has_cuda():
        out.update(NDIF_MODEL_IMPORT_PATH="sage_ndif_cpu.CPUSandboxModelActor",
                   NDIF_DEFAULT_DTYPE="float32")
    return out


def has_cuda() -> bool:
    probe = subprocess.run([venv_bin("python"), "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True)
    return probe.stdout.strip() == "True"


def python312() -> str:
    for candidate in (os.environ.get("SAGE_NN_NDIF_PYTHON"), shutil.which("python3.12"),
                      *sorted(Path.home().glob(".pyenv/versions/3.12*/bin/python3.12"))):
        if candidate and Path(candidate).exists():
            return str(candidate)
    sys.exit("no Python 3.12 found (ndif needs >= 3.12): install one, or set "
             "SAGE_NN_NDIF_PYTHON to its path")


def setup(args) -> None:
    if not shutil.which("redis-server"):  # NDIF's queue; Debian's package
        installed = subprocess.run(["apt-get", "install", "-y", "-q", "redis-server"],
                                   capture_output=True, text=True)
        if installed.returncode or not shutil.which("redis-server"):
            sys.exit("redis-server is not installed and `apt-get install redis-server` failed "
                     f"({installed.stderr.strip()[-300:]}): install Redis, then run setup again")
    venv = home() / "venv"
    if not (venv / "bin" / "python").exists():
        subprocess.run([python312(), "-m", "venv", str(venv)], check=True)
    pip = [venv_bin("python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           "-c", str(HERE / "constraints.txt")]  # what the conformance tier last passed with
    subprocess.run([*pip, *PACKAGES], check=True)
    site = subprocess.run([venv_bin("python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # every process of the environment: this folder importable, the shims installed
    (Path(site) / "sage_ndif_shims.pth").write_text(
        f"{HERE}\nimport sage_ndif_shims; sage_ndif_shims.install()\n")
    print(f"NDIF environment ready: {venv}")


# -- services -----------------------------------------------------------------------------

def _spawn(name: str, command: list[str], environment: dict) -> None:
    state = home()
    (state / "logs").mkdir(parents=True, exist_ok=True)
    log = open(state / "logs" / f"{name}.log", "ab")
    proc = subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, cwd=state)
    (state / "pids").mkdir(exist_ok=True)
    (state / "pids" / name).write_text(str(proc.pid))


def _wait(what: str, ready, timeout: float, log: str | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            return
        time.sleep(0.5)
    tail = ""
    if log and (home() / "logs" / f"{log}.log").exists():
        tail = "\n" + (home() / "logs" / f"{log}.log").read_text()[-3000:]
    down(None)
    sys.exit(f"{what} did not come up in {timeout:.0f} s{tail}")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _api_ready() -> bool:
    try:
        with urllib.request.urlopen(f"{url()}/status", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def _controller_ready(environment: dict) -> bool:
    probe = subprocess.run(
        [venv_bin("python"), "-c",
         "import ray; ray.init(address='auto', namespace='NDIF', logging_level='error');"
         "c = ray.get_actor('Controller', namespace='NDIF');"
         "ray.get(c.__ray_ready__.remote(), timeout=60); print('ok')"],
        env={**environment, "RAY_ADDRESS": f"127.0.0.1:{PORTS['ray']}"},
        capture_output=True, text=True)
    return probe.stdout.strip().endswith("ok")


def up(args) -> None:
    if not Path(venv_bin("python")).exists():
        sys.exit(f"no NDIF environment at {home() / 'venv'}: run `{sys.argv[0]} setup` first")
    if _api_ready():
        print(f"NDIF already up: {url()}")
        return
    environment = env()
    start = time.time()
    _spawn("redis", ["redis-server", "--port", str(PORTS["redis"]), "--save", "",
                     "--appendonly", "no", "--daemonize", "no"], environment)
    _spawn("s3", [venv_bin("moto_server"), "-H", "127.0.0.1", "-p", str(PORTS["s3"])],
           environment)
    _wait("redis", lambda: _port_open(PORTS["redis"]), 30, "redis")
    _wait("the S3 store", lambda: _port_open(PORTS["s3"]), 60, "s3")
    cpu = not has_cuda()
    if cpu:  # a logical GPU with half the memory, so that the controller places models here
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        resources = {"head": 10, "cpu_memory_bytes": memory, "cuda_memory_bytes": memory // 2}
    else:  # what NDIF's own start script reports: the GPUs' memory
        resources = json.loads(subprocess.run(
            [venv_bin("python"), "-m", "ndif.services.ray.resources", "--head"],
            capture_output=True, text=True, env=environment, check=True).stdout)
    ray = [venv_bin("ray"), "start", "--head", f"--port={PORTS['ray']}",
           f"--ray-client-server-port={PORTS['ray_client']}",
           f"--object-manager-port={PORTS['object_manager']}",
           f"--metrics-export-port={PORTS['metrics']}", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={PORTS['dashboard']}",
           "--min-worker-port=20000", "--max-worker-port=20999",
           f"--resources={json.dumps(resources)}", f"--temp-dir={home() / 'ray'}",
           "--num-cpus=8", *(["--num-gpus=1"] if cpu else [])]
    started = subprocess.run(ray, env=environment, capture_output=True, text=True)
    if started.returncode:
        down(None)
        sys.exit(f"ray did not start:\n{started.stdout[-2000:]}{started.stderr[-2000:]}")
    _spawn("controller", [venv_bin("python"), "-m",
                          "ndif.services.ray.deployments.controller.controller"],
           {**environment, "RAY_ADDRESS": f"127.0.0.1:{PORTS['ray']}"})
    _wait("the controller", lambda: _controller_ready(environment), 120, "controller")
    _spawn("api", [venv_bin("gunicorn"), "--config", "python:ndif.services.api.gunicorn_conf",
                   "ndif.services.api.app:app"], environment)
    _wait("the API", _api_ready, 120, "api")
    print(f"NDIF up in {time.time() - start:.0f} s ({'CPU' if cpu else 'GPU'}): {url()}")


def down(args) -> None:
    state = home()
    for name in ("api", "controller", "s3", "redis"):
        pid_file = state / "pids" / name
        if pid_file.exists():
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGTERM)
            except (ProcessLookupError, ValueError, PermissionError):
                pass
            pid_file.unlink()
    if Path(venv_bin("ray")).exists():
        subprocess.run([venv_bin("ray"), "stop", "--force"], capture_output=True,
                       env={**os.environ, "RAY_ADDRESS": f"127.0.0.1:{PORTS['ray']}"})
    if args is not None:
        print("NDIF down")


def status(args) -> None:
    print(json.dumps({"url": url(), "api": _api_ready(), "home": str(home()),
                      "redis": _port_open(PORTS["redis"]), "s3": _port_open(PORTS["s3"]),
                      "ray": _port_open(PORTS["ray"])}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, func in (("setup", setup), ("up", up), ("down", down), ("status", status)):
        commands.add_parser(name).set_defaults(func=func)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
