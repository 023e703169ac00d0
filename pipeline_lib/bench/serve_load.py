"""Load benchmark of the speech server: C concurrent clients on loopback, per level x real time,
time to first audio, latency, errors; our server (`soprano-onnx serve`) against upstream's
(`soprano.server`, through pipeline_lib.bench.upstream_server), each in its own process, one at a time.

    python -m pipeline_lib.bench.serve_load --model artifacts/onnx/int8 --checkpoint artifacts/checkpoints/random-80m \
        --threads 2 --csv reports/serve.csv --plot reports/serve_xrt.png

A level is C clients in a closed loop: each posts a request (`POST /v1/audio/speech`; the texts of
TEXTS in turn, one or two sentences each), reads the streamed body and posts the next. A client
starts no new request once `max_requests` have been started or `level_s` has passed; requests in
flight then run to their end, for at most `drain_s` more, after which they are cut (counted in `cut`,
not as errors; their latencies so far enter the percentiles as lower bounds). Each level starts
on an idle server (`wait_idle`, at most `idle_timeout_s`): upstream's server finishes every request
it took, even one whose client has gone.

Random weights never emit [STOP]: every sentence runs to `max_new_tokens` tokens, the same for both
servers (ours: the request's `max_new_tokens`; upstream: its generate() held to it). So a complete
response holds exactly (max_new_tokens - 1) * samples_per_token samples per sentence (the decoder's
rule, see pipeline_lib.runtime.tts); one with any other length counts as an error (`incomplete`).

Per level: aggregate x real time (audio seconds received by all clients within the measurement
window, per second of it), p50 / p95 time to the first audio byte (WAV: the first byte after the
header) and total latency, errors by kind, requests completed. The window runs from the level's start
to the first request end at or after `level_s` (so that it ends on a request boundary: upstream
sends each WAV in one piece, and a window cut mid-request would miss the audio it was working on);
to the last end if every request ended before `level_s`; to the cut if none ended in between.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from pipeline_lib.errors import InputError, SopranoOnnxError

log = logging.getLogger(__name__)
NAN = float("nan")

SPEECH_PATH = "/v1/audio/speech"
OURS, UPSTREAM = "ours", "upstream"
SERVERS = (OURS, UPSTREAM)
CLIENT_LEVELS = (1, 2, 4, 8, 16)
# Request texts: one or two sentences each, every sentence at least 30 characters (the front end's
# merge threshold, upstream's too), so both servers split each text into the same sentences.
TEXTS = (
    "The morning train left the station exactly on time.",
    "Rain fell softly on the roof for most of the night. By morning the garden was full of puddles.",
    "She painted the old wooden fence a bright shade of blue, then sat down on the porch to watch the sky turn orange.",
    "A small boat drifted slowly toward the distant harbour.",
    "He opened the letter and read it twice before smiling. Then he folded it and put it in his pocket.",
    "The library stays open late on the first Friday of every month.",
    "Fresh bread from the corner bakery filled the street with warmth. People stopped to ask what smelled so good.",
    "Our guide pointed out three kinds of birds along the winding river.",
)

# The columns of reports/serve.csv, one row per server x level. Times in ms where the name says so.
COLUMNS = (
    "server",            # ours | upstream
    "backend",           # ours: the runtime backend (onnx | openvino); upstream: upstream
    "precision",         # fp32 | int8 (upstream: fp32, transformers)
    "threads",
    "clients",           # concurrent clients (closed loop)
    "max_new_tokens",    # fixed tokens per sentence (random weights never emit [STOP])
    "response_format",   # what the client asked for (upstream: always WAV)
    "max_batch",         # our server's --max-batch (upstream: none)
    "max_queue",         # our server's --max-queue (upstream: none)
    "level_s",           # the level's time bound (no new requests after it)
    "requests_sent",
    "requests_ok",       # complete responses (status 200, every expected sample)
    "errors",            # status != 200, incomplete audio, transport failures
    "errors_by_status",  # e.g. "429:3 incomplete:1" (empty: none)
    "cut",               # requests still in flight drain_s after level_s (not errors; latencies are lower bounds)
    "window_s",          # the measurement window: level start to the first request end after level_s (see above)
    "audio_s",           # audio seconds received within the window
    "xrt",               # audio_s / window_s: aggregate x real time
    "ttfa_p50_ms",       # time to first audio byte
    "ttfa_p95_ms",
    "latency_p50_ms",    # request start to the body's last byte
    "latency_p95_ms",
    "stall_p50_ms",      # playback stalls (stall_s) of the complete responses: ours streams; upstream's WAV
    "stall_p95_ms",      # comes in one piece (not streamed), so its rows leave them empty
    "settle_s",          # waited for the server to go idle before the level (upstream finishes cut requests)
    "load_avg",          # 1-minute load average when the level started
    "note",
)


@dataclass(frozen=True)
class AudioGeometry:
    """What the expected audio length depends on: the sample rate and the samples per token."""

    sample_rate: int
    samples_per_token: int

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> AudioGeometry:
        """Read from the decoder's ISTFT config in an export folder or a pipeline folder (decoder/)."""
        model_dir = Path(model_dir)
        found = sorted(model_dir.glob("*_istft_config.json")) + sorted(model_dir.glob("decoder/*_istft_config.json"))
        if not found:
            raise InputError(f"{model_dir}: no *_istft_config.json (here or in decoder/); pass an export folder "
                             "or a pipeline folder such as artifacts/onnx/int8")
        cfg = json.loads(found[0].read_text())
        try:
            return cls(int(cfg["sample_rate"]), int(cfg["samples_per_token"]))
        except KeyError as exc:
            raise InputError(f"{found[0]}: no {exc} entry; re-export the decoder") from exc


def sentence_count(text: str) -> int:
    from pipeline_lib.text import prepare_prompts

    return len(prepare_prompts([text]))


def expected_samples(text: str, max_new_tokens: int, samples_per_token: int) -> int:
    """Samples of a complete response when every sentence runs to max_new_tokens tokens."""
    return sentence_count(text) * (max_new_tokens - 1) * samples_per_token


@dataclass(frozen=True)
class Target:
    """A running server to load and how to ask it."""

    name: str                       # ours | upstream
    base_url: str                   # http://127.0.0.1:PORT
    response_format: str = "pcm"    # ours: pcm | wav; upstream answers WAV whatever is asked
    stream: bool = True             # send stream_format=audio (ours)
    extensions: bool = True         # send max_new_tokens, temperature, sample_rate (ours)
    pid: int | None = None          # the server's process, when we started it (levels wait for it to idle)


@dataclass(frozen=True)
class LoadSettings:
    clients: tuple[int, ...] = CLIENT_LEVELS
    max_requests: int = 96          # per level
    level_s: float = 12.0           # per level: no new requests after this
    drain_s: float = 8.0            # per level: requests still running this long after level_s are cut
    max_new_tokens: int = 64
    warmup_requests: int = 2        # per server, one after another before the first level, not counted
    idle_timeout_s: float = 15.0    # per level: wait at most this long for the server to go idle before it
    request_timeout_s: float = 120.0
    texts: tuple[str, ...] = TEXTS

    def __post_init__(self) -> None:
        if not self.clients or any(int(c) < 1 for c in self.clients):
            raise InputError(f"clients must be counts >= 1, got {self.clients!r}")
        for name in ("max_requests", "max_new_tokens"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.max_new_tokens < 2:
            raise InputError("max_new_tokens must be >= 2: one token decodes to no audio")
        if not self.texts:
            raise InputError("texts is empty")


def request_body(target: Target, text: str, settings: LoadSettings, geometry: AudioGeometry) -> dict[str, Any]:
    """OpenAI's speech body; for our server the extension fields that fix the token count and rate."""
    body: dict[str, Any] = {"model": "soprano", "input": text, "voice": "soprano",
                            "response_format": target.response_format}
    if target.stream:
        body["stream_format"] = "audio"
    if target.extensions:
        body.update(max_new_tokens=settings.max_new_tokens, temperature=0.0, sample_rate=geometry.sample_rate)
    return body


class AudioBody:
    """Counts the audio samples of a streamed body: raw 16-bit PCM, or a WAV whose header (RIFF, then
    chunks up to `data`) is skipped; the data size field is not trusted (streamed WAVs leave it open)."""

    def __init__(self) -> None:
        self._head = b""
        self.header_done = False
        self.wav = False
        self.bytes_per_sample = 2
        self.audio_bytes = 0

    def feed(self, chunk: bytes) -> int:
        """Add body bytes; returns how many of them are audio."""
        if self.header_done:
            self.audio_bytes += len(chunk)
            return len(chunk)
        self._head += chunk
        if len(self._head) < 12:
            if not b"RIFF".startswith(self._head[:4]):  # too short to tell, but not a WAV
                return self._start_raw()
            return 0
        if self._head[:4] != b"RIFF" or self._head[8:12] != b"WAVE":
            return self._start_raw()
        pos = 12
        while pos + 8 <= len(self._head):
            cid, size = self._head[pos:pos + 4], struct.unpack("<I", self._head[pos + 4:pos + 8])[0]
            if cid == b"data":
                self.wav, self.header_done = True, True
                rest = len(self._head) - (pos + 8)
                self._head = b""
                self.audio_bytes += rest
                return rest
            if cid == b"fmt " and pos + 8 + 16 <= len(self._head):
                channels, bits = struct.unpack("<H", self._head[pos + 10:pos + 12])[0], struct.unpack(
                    "<H", self._head[pos + 22:pos + 24])[0]
                self.bytes_per_sample = max(1, channels * bits // 8)
            elif cid == b"fmt ":
                return 0  # fmt chunk incomplete: wait for more
            pos += 8 + size + (size & 1)
        return 0

    def _start_raw(self) -> int:
        self.header_done = True
        n, self._head = len(self._head), b""
        self.audio_bytes += n
        return n

    @property
    def samples(self) -> int:
        return self.audio_bytes // self.bytes_per_sample


@dataclass
class RequestResult:
    text_index: int
    expected: int                   # samples of a complete response
    started: float                  # perf_counter
    status: int | None = None
    error: str | None = None        # None: complete; "http_<status>", "incomplete", "timeout", "transport", "cut"
    first_audio_s: float | None = None
    total_s: float | None = None
    samples: int = 0
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (perf_counter, samples so far)

    @property
    def ok(self) -> bool:
        return self.error is None


async def one_request(client: Any, target: Target, text_index: int, settings: LoadSettings,
                      geometry: AudioGeometry, out: list[RequestResult]) -> RequestResult:
    """Post one request, stream its body, check its length; the result is in `out` from the start
    (a request cancelled at the level's end is marked `cut` there)."""
    import httpx

    text = settings.texts[text_index]
    res = RequestResult(text_index, expected_samples(text, settings.max_new_tokens, geometry.samples_per_token),
                        time.perf_counter())
    out.append(res)
    body = AudioBody()
    try:
        async with client.stream("POST", target.base_url + SPEECH_PATH,
                                 json=request_body(target, text, settings, geometry)) as resp:
            res.status = resp.status_code
            if resp.status_code != 200:
                await resp.aread()
                res.error = f"http_{resp.status_code}"
            else:
                async for chunk in resp.aiter_raw():
                    if body.feed(chunk) > 0:
                        now = time.perf_counter()
                        if res.first_audio_s is None:
                            res.first_audio_s = now - res.started
                        res.arrivals.append((now, body.samples))
                res.samples = body.samples
                if res.samples != res.expected:
                    res.error = "incomplete"
    except asyncio.CancelledError:
        res.error, res.samples = "cut", body.samples
        res.total_s = time.perf_counter() - res.started
        raise
    except httpx.TimeoutException:
        res.error = "timeout"
    except httpx.HTTPError as exc:
        res.error = "transport"
        log.warning("%s: request failed: %s", target.name, exc)
    res.total_s = time.perf_counter() - res.started
    return res


@dataclass
class LevelResult:
    clients: int
    started: float
    deadline: float
    requests: list[RequestResult]
    load_avg: float
    finished: float = NAN             # when the last request ended or was cut


async def run_level(target: Target, clients: int, settings: LoadSettings, geometry: AudioGeometry,
                    first_text: int = 0) -> LevelResult:
    """C clients in a closed loop until max_requests have started or level_s has passed, then the
    requests in flight finish (cut after drain_s more)."""
    import httpx

    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else NAN
    results: list[RequestResult] = []
    counter = itertools.count()
    started = time.perf_counter()
    deadline = started + settings.level_s
    timeout = httpx.Timeout(settings.request_timeout_s, connect=10.0)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def worker() -> None:
            while True:
                i = next(counter)
                if i >= settings.max_requests or time.perf_counter() >= deadline:
                    return
                await one_request(client, target, (first_text + i) % len(settings.texts), settings, geometry, results)

        tasks = [asyncio.create_task(worker()) for _ in range(clients)]
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline + settings.drain_s - time.perf_counter()))
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return LevelResult(clients, started, deadline, results, load_avg, time.perf_counter())


def window_end(level: LevelResult) -> float:
    """The measurement window's end (see the module docstring)."""
    ends = sorted(r.started + r.total_s for r in level.requests if r.total_s is not None and r.error != "cut")
    after = [e for e in ends if e >= level.deadline]
    if after:
        return after[0]
    if any(r.error == "cut" for r in level.requests):
        return level.finished if not math.isnan(level.finished) else level.deadline
    return ends[-1] if ends else level.deadline


def _pct_ms(values: Sequence[float], q: float) -> float:
    return 1e3 * float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else NAN


def stall_s(arrivals: Sequence[tuple[float, int]], sample_rate: int) -> float:
    """Seconds a listener playing the body from its first audio byte on (pausing whenever it runs
    out) would have waited for audio: the underruns of a streamed response."""
    waited, play_end, prev = 0.0, None, 0
    for t, n in arrivals:
        if play_end is None:
            play_end = t
        elif t > play_end:
            waited += t - play_end
            play_end = t
        play_end += (n - prev) / sample_rate
        prev = n
    return waited


def summarize_level(level: LevelResult, sample_rate: int) -> dict[str, Any]:
    """The level's figures (a subset of COLUMNS: the load and its outcome)."""
    reqs = level.requests
    end = window_end(level)
    window = end - level.started
    received = 0
    for r in reqs:  # samples received by the window's end
        before = [n for t, n in r.arrivals if t <= end]
        received += before[-1] if before else 0
    counted = [r for r in reqs if r.ok or r.error == "cut"]  # cut: latencies so far, lower bounds
    ttfa = [r.first_audio_s if r.first_audio_s is not None else r.total_s for r in counted]
    errors = Counter(r.error for r in reqs if r.error not in (None, "cut"))
    return {
        "clients": level.clients,
        "requests_sent": len(reqs),
        "requests_ok": sum(r.ok for r in reqs),
        "errors": sum(errors.values()),
        "errors_by_status": " ".join(f"{k.removeprefix('http_')}:{v}" for k, v in sorted(errors.items())),
        "cut": sum(r.error == "cut" for r in reqs),
        "window_s": window,
        "audio_s": received / sample_rate,
        "xrt": received / sample_rate / window if window > 0 else NAN,
        "ttfa_p50_ms": _pct_ms(ttfa, 50),
        "ttfa_p95_ms": _pct_ms(ttfa, 95),
        "latency_p50_ms": _pct_ms([r.total_s for r in counted], 50),
        "latency_p95_ms": _pct_ms([r.total_s for r in counted], 95),
        "load_avg": level.load_avg,
        # Playback underruns of the complete responses (stalled_share: for the log only).
        "stall_p50_ms": _pct_ms([stall_s(r.arrivals, sample_rate) for r in reqs if r.ok], 50),
        "stall_p95_ms": _pct_ms([stall_s(r.arrivals, sample_rate) for r in reqs if r.ok], 95),
        "stalled_share": (sum(stall_s(r.arrivals, sample_rate) > 0 for r in reqs if r.ok) / max(1, sum(r.ok for r in reqs))),
    }


async def warm_up(target: Target, settings: LoadSettings, geometry: AudioGeometry) -> None:
    """`warmup_requests` requests one after another (first-call costs stay out of the levels); an
    error here stops the benchmark: the server does not work."""
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(settings.request_timeout_s)) as client:
        for i in range(settings.warmup_requests):
            res = await one_request(client, target, i % len(settings.texts), settings, geometry, [])
            if not res.ok:
                raise SopranoOnnxError(
                    f"{target.name} server at {target.base_url}: warm-up request failed ({res.error}, status "
                    f"{res.status}, {res.samples} of {res.expected} samples); see its log")


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


def run_levels(target: Target, settings: LoadSettings, geometry: AudioGeometry) -> list[dict[str, Any]]:
    """Warm up, then every level of settings.clients in order, each on an idle server (wait_idle,
    when the target has a pid); one summary per level."""

    async def main() -> list[dict[str, Any]]:
        await warm_up(target, settings, geometry)
        rows, first = [], settings.warmup_requests
        for c in settings.clients:
            waited = 0.0
            if target.pid is not None:
                waited = await asyncio.to_thread(wait_idle, target.pid, settings.idle_timeout_s)
                if waited > 2.0:
                    log.info("%s: waited %.1f s for the server to finish earlier work", target.name, waited)
            level = await run_level(target, int(c), settings, geometry, first_text=first)
            first += len(level.requests)
            row = summarize_level(level, geometry.sample_rate)
            row["settle_s"] = waited
            log.info("%s, %d clients: %d ok, %d errors, %d cut; x%.2f real time, TTFA p50 %.0f / p95 %.0f ms, "
                     "latency p95 %.0f ms; playback stalls p50 %.0f / p95 %.0f ms (%.0f%% of responses)", target.name, c,
                     row["requests_ok"], row["errors"], row["cut"], row["xrt"], row["ttfa_p50_ms"], row["ttfa_p95_ms"],
                     row["latency_p95_ms"], row["stall_p50_ms"], row["stall_p95_ms"], 100 * row["stalled_share"])
            rows.append(row)
        return rows

    return asyncio.run(main())


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


def note(spec: ServerSpec, settings: LoadSettings) -> str:
    base = (f"max_new_tokens fixed at {settings.max_new_tokens} per sentence (random weights never emit [STOP]); "
            f"{len(settings.texts)} texts of 1-2 sentences in turn")
    if spec.name == UPSTREAM:
        return (base + "; upstream soprano.server on the same checkpoint (transformers, CPU), its generate() held "
                "to max_new_tokens; WAV, not streamed")
    return base + f"; {spec.response_format}, stream_format=audio"


def bench_server(spec: ServerSpec, settings: LoadSettings, geometry: AudioGeometry, log_path: Path) -> list[dict[str, Any]]:
    """Start one server, load it at every level, stop it: one row (COLUMNS) per level."""
    with server_process(spec, log_path) as target:
        levels = run_levels(target, settings, geometry)
    rows = []
    for lv in levels:
        row: dict[str, Any] = {c: NAN for c in COLUMNS}
        row.update(server=spec.name, backend=spec.backend, precision=spec.precision, threads=spec.threads,
                   max_new_tokens=settings.max_new_tokens, response_format=spec.target().response_format,
                   max_batch=spec.max_batch if spec.max_batch is not None else NAN,
                   max_queue=spec.max_queue if spec.max_queue is not None else NAN,
                   level_s=settings.level_s, note=note(spec, settings), **lv)
        if spec.name != OURS:  # a WAV in one piece: no playback while it arrives
            row.update(stall_p50_ms=NAN, stall_p95_ms=NAN)
        rows.append(row)
    return rows


def to_frame(rows: Sequence[dict[str, Any]]):
    import pandas as pd

    return pd.DataFrame([{c: r.get(c, NAN) for c in COLUMNS} for r in rows], columns=list(COLUMNS))


def headline(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The DVC metrics: per server and level x real time, p95 TTFA and errors, and the ratios of
    ours at 8 clients over ours at 1 and over upstream at 8 (where measured)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float):
            return None if math.isnan(v) else round(v, 4)
        return v.item() if isinstance(v, np.generic) else v

    out: dict[str, Any] = {"max_new_tokens": clean(rows[0]["max_new_tokens"]) if rows else None,
                           "threads": clean(rows[0]["threads"]) if rows else None}
    for key in ("xrt", "ttfa_p95_ms", "latency_p95_ms", "errors", "requests_ok"):
        out[key] = {s: {str(int(r["clients"])): clean(r[key]) for r in rows if r["server"] == s}
                    for s in dict.fromkeys(r["server"] for r in rows)}
    xrt = out["xrt"]
    ours, up = xrt.get(OURS, {}), xrt.get(UPSTREAM, {})

    def ratio(a: Any, b: Any) -> Any:
        return round(a / b, 4) if a is not None and b else None

    out["ours_8_over_1_xrt"] = ratio(ours.get("8"), ours.get("1"))
    out["ours_over_upstream_8_xrt"] = ratio(ours.get("8"), up.get("8"))
    p95 = out["ttfa_p95_ms"].get(OURS, {})
    out["ours_ttfa_p95_8_over_1"] = ratio(p95.get("8"), p95.get("1"))
    return out


SERVER_NAMES = {OURS: "soprano-onnx serve", UPSTREAM: "upstream soprano.server"}


def plot_serve(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Two panels against concurrent clients, one line per server: aggregate x real time, p95 TTFA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for server, style in ((OURS, "o-"), (UPSTREAM, "s--")):
        rs = sorted((r for r in rows if r["server"] == server), key=lambda r: int(r["clients"]))
        if not rs:
            continue
        c = [int(r["clients"]) for r in rs]
        ax1.plot(c, [float(r["xrt"]) for r in rs], style, label=SERVER_NAMES[server])
        ax2.plot(c, [float(r["ttfa_p95_ms"]) / 1e3 for r in rs], style, label=SERVER_NAMES[server])
    tokens = sorted({int(r["max_new_tokens"]) for r in rows})
    for ax, title, ylabel in ((ax1, "Aggregate x real time (higher is better)", "audio s received / wall s"),
                              (ax2, "p95 time to first audio byte (lower is better)", "seconds")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({int(r["clients"]) for r in rows}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax2.set_yscale("log")
    fig.suptitle(f"Server under load ({', '.join(map(str, tokens))} tokens per sentence, fixed; random weights)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def run_benchmark(specs: Sequence[ServerSpec], settings: LoadSettings, geometry: AudioGeometry,
                  log_dir: Path, server_settings: dict[str, LoadSettings] | None = None) -> list[dict[str, Any]]:
    """Each server in turn (one process at a time), every level; rows in order. `server_settings`
    overrides the settings per server name (upstream's shorter levels)."""
    rows: list[dict[str, Any]] = []
    for spec in specs:
        s = (server_settings or {}).get(spec.name, settings)
        rows += bench_server(spec, s, geometry, Path(log_dir) / f"serve_{spec.name}.log")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    import dataclasses
    import tempfile

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True,
                   help="our server's model folder (export folder or e.g. artifacts/onnx/int8); also gives the "
                        "sample rate and samples per token")
    p.add_argument("--checkpoint", type=Path, help="checkpoint directory for upstream's server")
    p.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    p.add_argument("--backend", default="onnx", choices=("onnx", "openvino"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clients", type=int, nargs="+", default=list(CLIENT_LEVELS))
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=64)
    p.add_argument("--max-requests", dest="max_requests", type=int, default=96)
    p.add_argument("--level-s", dest="level_s", type=float, default=12.0)
    p.add_argument("--drain-s", dest="drain_s", type=float, default=8.0)
    p.add_argument("--idle-timeout-s", dest="idle_timeout_s", type=float, default=15.0)
    p.add_argument("--upstream-level-s", dest="upstream_level_s", type=float, default=None)
    p.add_argument("--upstream-drain-s", dest="upstream_drain_s", type=float, default=None)
    p.add_argument("--warmup-requests", dest="warmup_requests", type=int, default=2)
    p.add_argument("--response-format", dest="response_format", default="pcm", choices=("pcm", "wav"))
    p.add_argument("--max-batch", dest="max_batch", type=int, default=8)
    p.add_argument("--max-queue", dest="max_queue", type=int, default=64)
    p.add_argument("--csv", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None, help="headline metrics")
    p.add_argument("--log-dir", dest="log_dir", type=Path, default=None, help="server logs (default: a temp folder)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    settings = LoadSettings(clients=tuple(a.clients), max_requests=a.max_requests, level_s=a.level_s,
                            drain_s=a.drain_s, max_new_tokens=a.max_new_tokens, warmup_requests=a.warmup_requests,
                            idle_timeout_s=a.idle_timeout_s)
    upstream = dataclasses.replace(settings, level_s=a.upstream_level_s or settings.level_s,
                                   drain_s=a.upstream_drain_s if a.upstream_drain_s is not None else settings.drain_s)
    specs = []
    if OURS in a.servers:
        specs.append(ours_spec(a.model, a.threads, a.backend, response_format=a.response_format,
                               max_batch=a.max_batch, max_queue=a.max_queue))
    if UPSTREAM in a.servers:
        if a.checkpoint is None:
            p.error("--servers upstream needs --checkpoint")
        specs.append(upstream_spec(a.checkpoint, a.threads, a.max_new_tokens))
    geometry = AudioGeometry.from_model_dir(a.model)
    try:
        with tempfile.TemporaryDirectory(prefix="soprano-serve-") as tmp:
            rows = run_benchmark(specs, settings, geometry, a.log_dir or Path(tmp), {UPSTREAM: upstream})
    except SopranoOnnxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    frame = to_frame(rows)
    print(frame[["server", "clients", "requests_ok", "errors", "cut", "xrt", "ttfa_p50_ms", "ttfa_p95_ms",
                 "latency_p50_ms", "latency_p95_ms"]].to_string(index=False))
    if a.csv:
        frame.to_csv(a.csv, index=False, float_format="%.6g")
    if a.plot:
        plot_serve(rows, a.plot)
    if a.json:
        from pipeline_lib.fsutil import write_json

        write_json(a.json, headline(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
