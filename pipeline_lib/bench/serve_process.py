"""The servers of the load benchmark, each in its own process: how to start ours (`soprano-onnx
serve`) and upstream's (pipeline_lib.bench.upstream_server), waiting until one is ready, stopping it,
and waiting until one is idle between levels (`wait_idle`).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pipeline_lib.bench.serve_request import OURS, UPSTREAM, Target
from pipeline_lib.errors import SopranoOnnxError

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env(threads: int) -> dict[str, str]:
    """A server process's environment: OpenMP / BLAS pools sized like its engine, hub offline."""
    from pipeline_lib.bench.sweep import job_env

    return job_env(threads)


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server in its own process."""

    name: str
    argv: tuple[str, ...]
    port: int
    ready_path: str                  # 200 here: loaded and warmed up
    threads: int
    backend: str
    precision: str
    response_format: str
    max_batch: int | None = None
    max_queue: int | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def target(self, pid: int | None = None) -> Target:
        ours = self.name == OURS
        return Target(self.name, self.base_url, self.response_format if ours else "wav", stream=ours, extensions=ours,
                      pid=pid)


def ours_spec(model_dir: Path, threads: int, backend: str = "onnx", precision: str | None = None,
              response_format: str = "pcm", max_batch: int = 8, max_queue: int = 64,
              port: int | None = None) -> ServerSpec:
    port = port or free_port()
    argv = (sys.executable, "-m", "pipeline_lib.cli", "serve", "--model", str(model_dir), "--backend", backend,
            "--threads", str(threads), "--port", str(port), "--max-batch", str(max_batch), "--max-queue", str(max_queue),
            "--log-level", "warning")  # no access log line per request
    precision = precision or ("int8" if "int8" in str(model_dir).lower() else "fp32")
    return ServerSpec(OURS, argv, port, "/health", threads, backend, precision, response_format, max_batch, max_queue)


def upstream_spec(checkpoint: Path, threads: int, max_new_tokens: int, port: int | None = None) -> ServerSpec:
    port = port or free_port()
    argv = (sys.executable, "-m", "pipeline_lib.bench.upstream_server", "--checkpoint", str(checkpoint),
            "--threads", str(threads), "--port", str(port), "--max-new-tokens", str(max_new_tokens))
    # Upstream has no health route; FastAPI's schema route answers once the module (model included) is loaded.
    return ServerSpec(UPSTREAM, argv, port, "/openapi.json", threads, "upstream", "fp32", "wav")


def _log_tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


@contextlib.contextmanager
def server_process(spec: ServerSpec, log_path: Path, startup_timeout_s: float = 180.0) -> Iterator[Target]:
    """Start the server, wait until its ready route answers 200, yield its Target; stop it after
    (SIGTERM, then SIGKILL). Its output goes to log_path."""
    import httpx

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(list(spec.argv), env=server_env(spec.threads), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        start = time.perf_counter()
        while True:
            if proc.poll() is not None:
                raise SopranoOnnxError(f"{spec.name} server exited with {proc.returncode} before it was ready "
                                       f"({' '.join(spec.argv)}):\n{_log_tail(log_path)}")
            try:
                if httpx.get(spec.base_url + spec.ready_path, timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - start > startup_timeout_s:
                raise SopranoOnnxError(f"{spec.name} server not ready at {spec.base_url}{spec.ready_path} after "
                                       f"{startup_timeout_s:.0f} s:\n{_log_tail(log_path)}")
            time.sleep(0.25)
        log.info("%s server ready in %.1f s (%s)", spec.name, time.perf_counter() - start, spec.base_url)
        yield spec.target(proc.pid)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


IDLE_CPU_PERCENT = 15.0  # of one core: a server below this is doing no synthesis


def wait_idle(pid: int, timeout_s: float, interval_s: float = 0.5) -> float:
    """Wait until the process (and its threads) uses under IDLE_CPU_PERCENT of a core for two
    intervals in a row; the seconds waited. A server that finishes requests whose clients have gone
    (upstream's: its handler blocks its event loop, so it cannot notice) would otherwise carry that
    work into the next level."""
    import psutil

    start = time.perf_counter()
    try:
        proc = psutil.Process(pid)
        proc.cpu_percent(None)
        quiet = 0
        while quiet < 2 and time.perf_counter() - start < timeout_s:
            time.sleep(interval_s)
            quiet = quiet + 1 if proc.cpu_percent(None) < IDLE_CPU_PERCENT else 0
        if quiet < 2:
            log.warning("server process %d still busy after %.0f s; starting the next level anyway", pid, timeout_s)
    except psutil.NoSuchProcess:
        pass
    return time.perf_counter() - start
