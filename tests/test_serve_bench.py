"""The server load benchmark (pipeline_lib.bench.serve_load, stage serve_bench): the load generator
against our real server on loopback (tiny export), upstream's server harness on the tiny checkpoint,
the report's "Server under load" section from a sample CSV, and the stage's declaration in dvc.yaml."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline_lib.bench import serve_load as sl

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKENS = 16


def _wav_bytes(samples: np.ndarray, rate: int = 32000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("step", [1, 3, 7, 44, 45, 10_000])
def test_audio_body_counts_samples_of_pcm_and_wav_whatever_the_chunking(step):
    samples = (np.arange(1001) % 200 - 100).astype(np.int16)
    for data, is_wav in ((_wav_bytes(samples), True), (samples.astype("<i2").tobytes(), False)):
        body = sl.AudioBody()
        audio = [body.feed(data[i:i + step]) for i in range(0, len(data), step)]
        assert body.samples == len(samples) and body.wav == is_wav
        assert sum(audio) == 2 * len(samples)  # header bytes are never counted as audio


def test_texts_split_the_same_in_both_front_ends_and_the_rule_gives_the_length():
    """Every request text is one or two sentences, and upstream's front end splits it the same way, so
    the expected length (sentences x (tokens - 1) x samples per token) holds for both servers."""
    from soprano.tts import SopranoTTS

    lengths = set()
    for text in sl.TEXTS:
        n = sl.sentence_count(text)
        assert n in (1, 2), text
        assert len(SopranoTTS._preprocess_text(None, [text])) == n, text
        assert sl.expected_samples(text, TOKENS, 2048) == n * (TOKENS - 1) * 2048
        lengths.add(len(text))
    assert {1, 2} <= {sl.sentence_count(t) for t in sl.TEXTS} and max(lengths) > 2 * min(lengths)


def test_audio_geometry_is_read_from_the_export(tiny_export):
    g = sl.AudioGeometry.from_model_dir(tiny_export)
    cfg = json.loads(next(tiny_export.glob("*_istft_config.json")).read_text())
    assert (g.sample_rate, g.samples_per_token) == (cfg["sample_rate"], cfg["samples_per_token"])
    with pytest.raises(sl.InputError, match="istft_config"):
        sl.AudioGeometry.from_model_dir(tiny_export.parent)


def _check_rows(rows, clients, server):
    frame = sl.to_frame(rows)
    assert list(frame.columns) == list(sl.COLUMNS) and len(frame) == len(clients)
    for row, c in zip(rows, clients):
        assert row["server"] == server and row["clients"] == c and row["max_new_tokens"] == TOKENS
        assert row["errors"] == 0 and row["cut"] == 0 and row["errors_by_status"] == "", row
        assert row["requests_ok"] == row["requests_sent"] >= 1
        assert row["xrt"] > 0 and row["audio_s"] > 0 and row["window_s"] > 0
        assert 0 < row["ttfa_p50_ms"] <= row["ttfa_p95_ms"]
        assert row["ttfa_p50_ms"] <= row["latency_p50_ms"] and row["ttfa_p95_ms"] <= row["latency_p95_ms"]
        assert f"max_new_tokens fixed at {TOKENS}" in row["note"]
        if server == "ours":  # streamed: a listener's stalls are measured (seconds, not negative)
            assert 0 <= row["stall_p50_ms"] <= row["stall_p95_ms"] < row["latency_p95_ms"], row
        else:  # a WAV in one piece: no playback while it arrives
            assert math.isnan(row["stall_p50_ms"]) and math.isnan(row["stall_p95_ms"])
    return frame


def test_load_generator_against_our_server_on_loopback(tiny_export, tmp_path):
    """Our real server (its own process, `python -m pipeline_lib.cli serve`) at 1 and 2 clients: every
    response complete (length checked against the rule), sane figures in every column."""
    settings = sl.LoadSettings(clients=(1, 2), max_requests=3, level_s=60, drain_s=60, max_new_tokens=TOKENS)
    spec = sl.ours_spec(tiny_export, threads=1, max_batch=4, max_queue=8)
    rows, open_rows = sl.bench_server(spec, settings, sl.AudioGeometry.from_model_dir(tiny_export), tmp_path / "ours.log")
    assert open_rows == []
    frame = _check_rows(rows, [1, 2], "ours")
    assert set(frame["response_format"]) == {"pcm"} and set(frame["max_queue"]) == {8}
    assert list(frame["requests_sent"]) == [3, 3]


def test_incomplete_and_rejected_responses_count_as_errors():
    """Responses of the wrong length, error statuses and broken connections are errors by kind, never
    completed requests (a mock transport plays the server)."""
    import asyncio

    import httpx

    geometry = sl.AudioGeometry(32000, 2048)
    settings = sl.LoadSettings(clients=(1,), max_new_tokens=TOKENS)
    full = sl.expected_samples(sl.TEXTS[0], TOKENS, geometry.samples_per_token)
    answers = {"complete": (200, b"\0\0" * full), "short": (200, b"\0\0" * (full - 2048)),
               "wav": (200, _wav_bytes(np.zeros(full, np.int16))), "busy": (429, b'{"error": {}}')}

    def handler(request: httpx.Request) -> httpx.Response:
        kind = request.url.host.split(".")[0]
        if kind == "broken":
            raise httpx.ReadError("connection reset")
        status, body = answers[kind]

        async def chunks():  # streamed in pieces, as a server would
            for i in range(0, len(body), 5000):
                yield body[i:i + 5000]

        return httpx.Response(status, content=chunks())

    async def post(kind: str, out: list) -> sl.RequestResult:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await sl.one_request(client, sl.Target("ours", f"http://{kind}.test"), 0, settings, geometry, out)

    out: list = []
    for kind in ("complete", "short", "wav", "busy", "broken"):
        asyncio.run(post(kind, out))
    assert [r.error for r in out] == [None, "incomplete", None, "http_429", "transport"]
    assert out[0].first_audio_s <= out[0].total_s and out[3].first_audio_s is None
    level = sl.LevelResult(1, out[0].started, out[0].started + 60, out, 0.0)
    row = sl.summarize_level(level, geometry.sample_rate)
    assert (row["requests_sent"], row["requests_ok"], row["errors"]) == (5, 2, 3)
    assert row["errors_by_status"] == "429:1 incomplete:1 transport:1"


def test_window_ends_on_the_first_request_end_after_the_time_bound():
    """A non-streaming server's audio arrives at its request's end, so the window ends on one: the
    first end at or after level_s; the last end if all ended before; the cut if none ended after."""

    def req(start, total, samples, error=None):
        r = sl.RequestResult(0, samples, start, status=200, error=error, total_s=total, samples=samples)
        r.arrivals = [(start + total, samples)]
        return r

    reqs = [req(0, 5, 100), req(5, 6, 100), req(0, 13, 100), req(11, 9, 100)]
    level = sl.LevelResult(2, 0.0, 12.0, reqs, 0.0, finished=20.0)
    assert sl.window_end(level) == 13
    row = sl.summarize_level(level, 100)
    assert row["window_s"] == 13 and row["audio_s"] == 3 and row["xrt"] == 3 / 13
    assert sl.window_end(sl.LevelResult(2, 0.0, 12.0, reqs[:2], 0.0, finished=11.0)) == 11
    cut = [req(0, 5, 100), req(5, 13, 40, error="cut")]
    level = sl.LevelResult(1, 0.0, 12.0, cut, 0.0, finished=18.0)
    assert sl.window_end(level) == 18
    row = sl.summarize_level(level, 100)
    assert row["cut"] == 1 and row["errors"] == 0 and row["audio_s"] == 1.4
    assert row["latency_p95_ms"] > 12_000  # the cut request's time so far: a lower bound, kept


@pytest.mark.slow  # transformers and torch load in the server process: ~15-35 s
def test_upstream_harness_serves_a_wav_of_the_capped_length(tiny_checkpoint, tmp_path):
    """Upstream's soprano.server on the local tiny checkpoint (no hub), its generate() held to TOKENS:
    one WAV of (TOKENS - 1) x 2048 samples per sentence, and the load generator's rows for it."""
    import httpx

    spec = sl.upstream_spec(tiny_checkpoint, threads=2, max_new_tokens=TOKENS)
    text = sl.TEXTS[1]  # two sentences
    with sl.server_process(spec, tmp_path / "upstream.log") as target:
        r = httpx.post(target.base_url + sl.SPEECH_PATH, json={"input": text}, timeout=120)
        assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
        with wave.open(io.BytesIO(r.content)) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (32000, 1, 2)
            assert w.getnframes() == sl.expected_samples(text, TOKENS, 2048) == 2 * (TOKENS - 1) * 2048
        settings = sl.LoadSettings(clients=(1,), max_requests=1, level_s=60, drain_s=60, max_new_tokens=TOKENS,
                                   warmup_requests=0)
        rows = sl.run_levels(target, settings, sl.AudioGeometry(32000, 2048))
    assert rows[0]["requests_ok"] == 1 and rows[0]["errors"] == 0 and rows[0]["xrt"] > 0


def sample_serve_rows() -> list[dict]:
    """Two servers x levels 1, 2, 8 with distinct numbers."""
    rows = []
    for server, backend, precision in (("ours", "onnx", "int8"), ("upstream", "upstream", "fp32")):
        for c, xrt, ttfa50, ttfa95 in ((1, 7.5, 90.0, 110.0), (2, 12.25, 95.0, 150.0), (8, 30.0, 160.0, 400.0)):
            if server == "upstream":
                xrt, ttfa50, ttfa95 = xrt / 10.0 + 0.5, ttfa50 * 20, ttfa95 * 40
            row = {k: math.nan for k in sl.COLUMNS}
            row.update(server=server, backend=backend, precision=precision, threads=2, clients=c, max_new_tokens=64,
                       response_format="pcm" if server == "ours" else "wav", level_s=15.0, requests_sent=10 + c,
                       requests_ok=10 + c, errors=0, errors_by_status="", cut=0, window_s=15.0, audio_s=15.0 * xrt,
                       xrt=xrt, ttfa_p50_ms=ttfa50, ttfa_p95_ms=ttfa95, latency_p50_ms=ttfa50 + 900,
                       latency_p95_ms=ttfa95 + 1000, load_avg=1.5, note="max_new_tokens fixed at 64 per sentence")
            if server == "ours":
                row.update(max_batch=8, max_queue=64)
            rows.append(row)
    return rows


def test_report_section_renders_the_table_and_the_ratios(tmp_path):
    from pipeline_lib.bench import COLUMNS as BENCH_COLUMNS
    from pipeline_lib.report import SERVE_PNG, Environment, build_report, serve_lines

    rows = sample_serve_rows()
    rows[1]["errors"], rows[1]["errors_by_status"] = 2, "429:1 incomplete:1"
    rows[4]["load_avg"] = 4.25  # upstream at 2 clients, on a busy machine
    csv = tmp_path / "serve.csv"
    sl.to_frame(rows).to_csv(csv, index=False, float_format="%.6g")
    bench = {c: math.nan for c in BENCH_COLUMNS}
    bench.update(config="onnx-int8-t2", backend="onnx", precision="int8", threads=2, max_new_tokens=64, num_tokens=64,
                 xrt=9.0, rtf=1 / 9.0, audio_s=4.0, wall_s=4 / 9.0, first_chunk_ms=80.0, note="fixed",
                 prefill_s=0.01, decode_s=0.3, lm_s=0.31, decoder_s=0.1, istft_s=0.01, other_s=0.02)
    bench_csv = tmp_path / "bench.csv"
    pd.DataFrame([bench], columns=list(BENCH_COLUMNS)).to_csv(bench_csv, index=False)
    (tmp_path / "bench.json").write_text("{}")
    (tmp_path / "source.json").write_text(json.dumps({"name": "tiny", "random_weights": True}))
    env = Environment(cpu="Test CPU", logical_cpus=2, physical_cores=1, python="3.x", libraries={}, date="today")
    out = tmp_path / "out"
    report = build_report(bench_csv, tmp_path / "bench.json", [], tmp_path / "source.json", out, env=env,
                          serve_csv=csv).read_text()
    section = report[report.index("## Server under load"):report.index("## Plots")]
    assert section == "\n".join(serve_lines(pd.read_csv(csv).to_dict("records"), [bench])) + "\n"
    assert "Random weights produce noise" in section and "max_new_tokens is fixed at 64" in section
    lines = {line.split(" | ")[0].lstrip("| "): line for line in section.splitlines() if line.startswith("| ")}
    # ours 8 over ours 1: 30 / 7.5 = 4 (>= 3 met); ours 8 over upstream 8: 30 / 3.5 = 8.571 (>= 10 not met)
    assert "| 30 | 7.5 | 4 | >= 3 | met |" in lines["x real time, ours at 8 clients over ours at 1"]
    assert "| 30 | 3.5 | 8.571 | >= 10 | not met |" in lines["x real time, ours at 8 clients over upstream at 8"]
    ttfa = next(v for k, v in lines.items() if k.startswith("TTFA at 1 client"))
    assert "| 90 | 80 | 1.125 | <= 1.2 | met |" in ttfa and "onnx-int8-t2" in ttfa  # 90 / 80
    assert "| 400 | 110 | 3.636 | <= 4 | met |" in lines["TTFA p95, ours at 8 clients over 1 client (ms)"]
    errors = next(v for k, v in lines.items() if k.startswith("errors, ours"))
    assert "| 2 | - | - | = 0 | not met |" in errors and "max_queue 64" in errors
    assert "429:1 incomplete:1" in section and f"]({SERVE_PNG})" in section
    assert "Other work competed for the cores in 1 of 6 levels" in section and "up to 4.25" in section
    # Without serve.csv there is no section.
    assert "## Server under load" not in build_report(bench_csv, tmp_path / "bench.json", [], tmp_path / "source.json",
                                                      out, env=env).read_text()


def test_headline_metrics_and_plot(tmp_path):
    rows = sample_serve_rows()
    m = sl.headline(rows)
    assert m["xrt"]["ours"] == {"1": 7.5, "2": 12.25, "8": 30.0} and m["max_new_tokens"] == 64
    assert m["ours_8_over_1_xrt"] == 4.0 and m["ours_over_upstream_8_xrt"] == round(30 / 3.5, 4)
    assert m["ours_ttfa_p95_8_over_1"] == round(400 / 110, 4)
    json.dumps(m)  # plain JSON
    png = sl.plot_serve(rows, tmp_path / "serve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dvc_stage_declares_its_params_deps_and_outs():
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    st = stages["serve_bench"]
    argv = st["cmd"].split()
    assert argv[:2] == ["python", "stages/serve_bench.py"]
    assert argv[2:] == ["artifacts/checkpoints/${checkpoint.name}", "${serve_bench.model}", "reports/serve.csv",
                        "reports/serve_open.csv", "reports/serve_xrt.png", "metrics/serve.json"]
    deps = st["deps"]
    for d in ("stages/serve_bench.py", "pipeline_lib/server", "pipeline_lib/runtime", "pipeline_lib/bench",
              "artifacts/checkpoints/${checkpoint.name}", "${serve_bench.model}"):
        assert d in deps, d
    assert sorted(st["params"]) == ["serve_bench"]  # its own threads: a thread sweep does not rerun it
    assert [next(iter(o)) for o in st["outs"]] == ["reports/serve.csv", "reports/serve_open.csv", "reports/serve_xrt.png"]
    assert [next(iter(m)) for m in st["metrics"]] == ["metrics/serve.json"]
    report = stages["report"]
    assert "reports/serve.csv" in report["deps"] and "--serve reports/serve.csv" in report["cmd"]
    # The model is an ONNX Runtime artifact the convert stage builds.
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    model = params["serve_bench"]["model"]
    backend, precision = Path(model).parts[1:]
    assert model.startswith("artifacts/onnx/") and params["serve_bench"]["backend"] == backend == "onnx"
    assert backend in params["convert"]["backends"] and precision in params["convert"]["precisions"]


def test_dvc_deps_cover_the_code_the_stage_runs():
    """Every pipeline_lib module the stage script, the server command and upstream's harness import is
    under one of the stage's deps."""
    deps = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]["serve_bench"]["deps"]
    probe = (
        "import runpy, sys, json\n"
        "runpy.run_path('stages/serve_bench.py', run_name='probe')\n"
        "import pipeline_lib.bench.upstream_server, pipeline_lib.server.app, pipeline_lib.server.command\n"
        "import pipeline_lib.runtime.tts\n"
        "from pipeline_lib.cli import build_parser\n"
        "build_parser()\n"
        "print(json.dumps(sorted({m.__file__ for n, m in sys.modules.items() if n.startswith('pipeline_lib') "
        "and getattr(m, '__file__', None)})))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    files = [Path(f).resolve().relative_to(REPO_ROOT).as_posix() for f in json.loads(out.stdout.splitlines()[-1])]
    missing = [f for f in files if f != "pipeline_lib/__init__.py"
               and not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)]
    assert not missing, f"serve_bench deps miss {missing}"


def test_stall_is_the_time_a_listener_waits_for_audio():
    # 0.1 s of audio at t=0, more at 0.5 s (0.4 s late), then 0.2 s more at 0.55 s (in time), 0.1 s at 0.9 s (0.1 late)
    arrivals = [(0.0, 100), (0.5, 200), (0.55, 400), (0.9, 500)]
    assert sl.stall_s(arrivals, 1000) == pytest.approx(0.4 + 0.1)
    assert sl.stall_s([(0.0, 1000), (0.5, 2000)], 1000) == 0.0 and sl.stall_s([], 1000) == 0.0



def test_a_paced_reader_reads_at_playback_pace_and_never_runs_dry():
    """`player_buffer_s`: a server that sends all at once is read as a player would: the last piece
    about (audio - buffer) after the first, never more than the buffer (plus one piece) ahead of
    playback, and with no stall; read eagerly, the same body takes no time."""
    import asyncio

    import httpx

    geometry = sl.AudioGeometry(1000, 10)  # 1 s of audio: 1000 samples; a 100-sample piece is 0.1 s
    settings = sl.LoadSettings(clients=(1,), max_new_tokens=101, texts=(sl.TEXTS[0],))
    body = b"\0\0" * sl.expected_samples(sl.TEXTS[0], 101, 10)
    assert len(body) == 2000

    def handler(request: httpx.Request) -> httpx.Response:
        async def chunks():
            for i in range(0, len(body), 200):
                yield body[i:i + 200]

        return httpx.Response(200, content=chunks())

    async def post(buffer_s):
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await sl.one_request(client, sl.Target("ours", "http://x.test"), 0, settings, geometry, [],
                                        player_buffer_s=buffer_s)

    paced, eager = asyncio.run(post(0.25)), asyncio.run(post(None))
    assert paced.ok and eager.ok and len(paced.arrivals) == 10
    t0 = paced.arrivals[0][0]
    assert 0.6 <= paced.arrivals[-1][0] - t0 <= 2.0, paced.arrivals  # upper: sleep overshoot on a busy machine
    for t, n in paced.arrivals:  # audio read by t, against audio played by t
        assert n / 1000 - (t - t0) <= 0.25 + 0.1 + 0.05, (t - t0, n)
    assert sl.stall_s(paced.arrivals, 1000) == 0.0
    assert eager.arrivals[-1][0] - eager.arrivals[0][0] < 0.6  # no pacing: well under the paced 0.6 s and more
