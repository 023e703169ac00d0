"""Issue 23's scenes over HTTP, by hand (docs/design.md, "Real-time fairness, measured"): a fresh
`soprano-onnx serve` process (pipeline_lib.bench.serve_process's, on a free port, 16 rows, pcm) and
one of two scenes against it.

The long-request scene (default). A listener streams "Hello there." (pcm, `max_new_tokens` 300,
about 19 s of audio) and reads it like a player playing from its first byte with `--player-buffer`
s (2) of buffer: it reads as the audio comes, but waits while more than that is ahead of playback,
so the server sees a client at real-time pace (`--eager`: read everything as soon as it comes; on
a quiet machine the listener is then done before the long request arrives). In the WITH run,
`--delay` s (2) later a second client posts ``("123456789 " * 410)[:4096]`` with `max_new_tokens`
64 and reads its response the same way (it takes at least its audio's length, about 390 s).
Runs ALONE and WITH alternate, `--rounds` times each (ALONE first). The listener's stall is what a
listener who starts playing at its first audio byte would hear (pipeline_lib.bench.serve_request's
`stall_s` / `longest_stall_s`); the issue's target is a total of 0.5 s at most, with the long request
completing. Also printed per run, from GET /metrics sampled every 0.5 s: the most rows in one step
(`soprano_scheduler_batch_rows`), the mean rows per step and the tokens per second while it ran.

    PYTHONPATH=. python scripts/serve_scene.py --model artifacts/onnx/int8 --threads 2 [--rounds 1]

The stuck reader (`--stuck`). A warm-up request ("Warm up.", 512 tokens) read in full, then a raw
socket posts the 4096-character text as pcm and reads nothing for `--stuck-s` s (60); every 10 s the
server's RSS (/proc/PID/status VmRSS) and `soprano_tokens_total`. The issue's bound: RSS +30 MB.

    PYTHONPATH=. python scripts/serve_scene.py --model artifacts/onnx/int8 --threads 2 --stuck

Random weights never emit [STOP], so every sentence runs to `max_new_tokens` (noise audio); a
response of any other length is reported as `incomplete`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline_lib.bench.serve_process import ours_spec, server_process, wait_idle
from pipeline_lib.bench.serve_request import (SPEECH_PATH, AudioGeometry, RequestResult, Target, longest_stall_s,
                                              one_request, sentence_count, stall_s)
from pipeline_lib.errors import SopranoOnnxError

LISTENER_TEXT, LISTENER_TOKENS = "Hello there.", 300
LONG_TEXT, LONG_TOKENS = ("123456789 " * 410)[:4096], 64
WARMUP_TEXT, WARMUP_TOKENS = "Warm up.", 512
MAX_BATCH, MAX_QUEUE = 16, 64  # the scheduler's default rows; room for the scene's two requests
METRICS_EVERY_S = 0.5


@dataclass(frozen=True)
class OneText:
    """serve_request's RequestSettings for one text."""

    texts: tuple[str, ...]
    max_new_tokens: int


def _metric(text: str, name: str) -> float:
    """The sum of a sample's values over its labels in a Prometheus text page (0.0: absent), read by
    prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == name)


async def _watch_metrics(client: Any, target: Target, seen: dict[str, float]) -> None:
    """Sample /metrics until cancelled: the most rows in a step, and the first and last counters."""
    while True:
        page = (await client.get(target.base_url + "/metrics")).text
        seen["max_rows"] = max(seen.get("max_rows", 0.0), _metric(page, "soprano_scheduler_batch_rows"))
        now = dict(t=time.perf_counter(), tokens=_metric(page, "soprano_tokens_total"),
                   steps=_metric(page, "soprano_scheduler_step_rows_count"),
                   rows=_metric(page, "soprano_scheduler_step_rows_sum"))
        for k, v in now.items():
            seen.setdefault("first_" + k, v)
            seen["last_" + k] = v
        await asyncio.sleep(METRICS_EVERY_S)


def _request_line(name: str, r: RequestResult, sample_rate: int) -> dict[str, Any]:
    line: dict[str, Any] = dict(request=name, status=r.status, error=r.error, audio_s=round(r.samples / sample_rate, 2),
                                wall_s=round(r.total_s or 0.0, 2),
                                first_audio_s=None if r.first_audio_s is None else round(r.first_audio_s, 3))
    if name == "listener":
        line.update(stall_s=round(stall_s(r.arrivals, sample_rate), 3),
                    longest_stall_s=round(longest_stall_s(r.arrivals, sample_rate), 3))
    return line


async def _scene(target: Target, geometry: AudioGeometry, with_long: bool, delay_s: float,
                 long_chars: int, buffer_s: float | None) -> list[dict[str, Any]]:
    import httpx

    timeout = httpx.Timeout(connect=10.0, read=120.0, write=30.0, pool=10.0)
    seen: dict[str, float] = {}
    async with httpx.AsyncClient(timeout=timeout) as client:
        watcher = asyncio.create_task(_watch_metrics(client, target, seen))
        out: list[RequestResult] = []
        tasks = [asyncio.create_task(one_request(client, target, 0, OneText((LISTENER_TEXT,), LISTENER_TOKENS),
                                                 geometry, out, buffer_s))]
        if with_long:
            await asyncio.sleep(delay_s)
            tasks.append(asyncio.create_task(one_request(client, target, 0, OneText((LONG_TEXT[:long_chars],),
                                                                                     LONG_TOKENS), geometry, out,
                                                         buffer_s)))
        results = await asyncio.gather(*tasks)
        watcher.cancel()
        try:
            await watcher
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # noqa: BLE001 - the metrics are a side line: keep the requests' results
            seen["error"] = f"{type(exc).__name__}: {exc}"
    lines = [_request_line(name, r, geometry.sample_rate) for name, r in zip(("listener", "long"), results)]
    span = seen.get("last_t", 0.0) - seen.get("first_t", 0.0)
    steps = seen.get("last_steps", 0.0) - seen.get("first_steps", 0.0)
    lines.append(dict(server="metrics", error=seen.get("error"), max_rows=seen.get("max_rows"),
                      mean_rows_per_step=round((seen.get("last_rows", 0.0) - seen.get("first_rows", 0.0)) / steps, 2)
                      if steps else None,
                      tokens_per_s=round((seen.get("last_tokens", 0.0) - seen.get("first_tokens", 0.0)) / span, 1)
                      if span else None))
    return lines


def run_scene(target: Target, geometry: AudioGeometry, rounds: int, delay_s: float, long_chars: int,
              buffer_s: float | None) -> None:
    print(f"# the long text: {long_chars} characters, {sentence_count(LONG_TEXT[:long_chars])} sentences, "
          f"{LONG_TOKENS} tokens each", flush=True)
    for rnd in range(1, rounds + 1):
        for with_long in (False, True):
            wait_idle(target.pid, timeout_s=60.0) if target.pid else None
            for line in asyncio.run(_scene(target, geometry, with_long, delay_s, long_chars, buffer_s)):
                print(json.dumps(dict(round=rnd, scene="with" if with_long else "alone", **line)), flush=True)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise SopranoOnnxError(f"no VmRSS in /proc/{pid}/status")


def run_stuck(target: Target, geometry: AudioGeometry, stuck_s: float, long_chars: int) -> None:
    import httpx

    assert target.pid is not None
    warm = asyncio.run(_warm_up(target, geometry))
    print(json.dumps(dict(warm_up=_request_line("warm-up", warm, geometry.sample_rate))), flush=True)
    wait_idle(target.pid, timeout_s=60.0)

    def tokens() -> float:
        return _metric(httpx.get(target.base_url + "/metrics", timeout=10.0).text, "soprano_tokens_total")

    print(json.dumps(dict(t_s="before", rss_mib=round(_rss_mib(target.pid), 1), tokens=tokens())), flush=True)
    body = json.dumps(dict(model="soprano", input=LONG_TEXT[:long_chars], voice="soprano", response_format="pcm",
                           stream_format="audio", max_new_tokens=LONG_TOKENS, temperature=0.0,
                           sample_rate=geometry.sample_rate)).encode()
    host, port = target.base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))  # default buffers; it never reads
    try:
        sock.sendall(f"POST {SPEECH_PATH} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        start = time.perf_counter()
        for k in range(int(stuck_s // 10) + 1):
            time.sleep(max(0.0, start + 10 * k - time.perf_counter()))
            print(json.dumps(dict(t_s=10 * k, rss_mib=round(_rss_mib(target.pid), 1), tokens=tokens())), flush=True)
    finally:
        sock.close()


async def _warm_up(target: Target, geometry: AudioGeometry) -> RequestResult:
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as client:
        return await one_request(client, target, 0, OneText((WARMUP_TEXT,), WARMUP_TOKENS), geometry, [])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path("artifacts/onnx/int8"),
                   help="pipeline folder (lm/ and decoder/) or export folder (default: artifacts/onnx/int8)")
    p.add_argument("--threads", type=int, default=2, help="the server's intra-op threads (default: 2)")
    p.add_argument("--rounds", type=int, default=1, help="ALONE / WITH pairs (default: 1)")
    p.add_argument("--delay", type=float, default=2.0, help="seconds from the listener to the long request (2)")
    p.add_argument("--long-chars", type=int, default=4096,
                   help="characters of the long text to send (default: 4096, all of it)")
    p.add_argument("--player-buffer", type=float, default=2.0,
                   help="seconds of audio the scene's clients read ahead of playback at most (default: 2)")
    p.add_argument("--eager", action="store_true", help="the scene's clients read as fast as the audio comes")
    p.add_argument("--stuck", action="store_true", help="run the stuck reader instead of the long-request scene")
    p.add_argument("--stuck-s", type=float, default=60.0, help="seconds the stuck reader reads nothing (60)")
    p.add_argument("--log", type=Path, default=None, help="the server's output (default: a temporary file)")
    a = p.parse_args(argv)
    if not a.model.is_dir():
        print(f"error: --model {a.model}: no such folder; pass a pipeline folder such as artifacts/onnx/int8 "
              "(after `dvc repro`) or an export folder", file=sys.stderr)
        return 2
    if a.rounds < 1 or a.threads < 1 or not 1 <= a.long_chars <= len(LONG_TEXT) or a.stuck_s < 0 or a.delay < 0 \
            or a.player_buffer <= 0:
        print(f"error: --rounds and --threads must be >= 1, --long-chars 1..{len(LONG_TEXT)}, --delay and "
              "--stuck-s >= 0, --player-buffer > 0", file=sys.stderr)
        return 2
    try:
        geometry = AudioGeometry.from_model_dir(a.model)
        spec = ours_spec(a.model, a.threads, "onnx", response_format="pcm", max_batch=MAX_BATCH, max_queue=MAX_QUEUE)
        with tempfile.TemporaryDirectory() as tmp:
            log_path = a.log or Path(tmp) / "serve.log"
            print(f"# {' '.join(spec.argv)}\n# server log: {log_path}", flush=True)
            with server_process(spec, log_path) as target:
                if a.stuck:
                    run_stuck(target, geometry, a.stuck_s, a.long_chars)
                else:
                    run_scene(target, geometry, a.rounds, a.delay, a.long_chars, None if a.eager else a.player_buffer)
    except SopranoOnnxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (OSError, ImportError) as exc:  # httpx's transport errors are OSError-like; see below
        print(f"error: the server went away or could not be reached ({type(exc).__name__}: {exc}); "
              "see its log (--log)", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - httpx.HTTPError and the like: a message, not a traceback
        if type(exc).__module__.split(".")[0] != "httpx":
            raise
        print(f"error: the server went away or could not be reached ({type(exc).__name__}: {exc}); "
              "see its log (--log)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
