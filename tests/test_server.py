"""The OpenAI-compatible speech server (pipeline_lib.server) over real HTTP: uvicorn on a free
loopback port in a background thread, the official `openai` client for the speech API as OpenAI
users call it, httpx for the rest. One tiny SopranoTTS serves the module. Random weights never emit
[STOP], so every request fixes a small max_new_tokens."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import random
import socket
import struct
import threading
import time
import wave
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
sf = pytest.importorskip("soundfile")
av = pytest.importorskip("av")
uvicorn = pytest.importorskip("uvicorn")

from pipeline_lib.server.app import create_app  # noqa: E402
from pipeline_lib.server.settings import Settings  # noqa: E402
from pipeline_lib.audio.encode import FORMATS, PCM_DEFAULT_RATE, open_stream, to_pcm16  # noqa: E402
from pipeline_lib.server.metrics import ServerMetrics  # noqa: E402

TOKENS = 24
TEXT = "Hello there, how are you?"
RATE = 32000  # the model's (checked against tts.sample_rate below)


@pytest.fixture(scope="module")
def tts(tiny_export: Path) -> Any:
    from pipeline_lib.runtime.tts import SopranoTTS

    t = SopranoTTS.from_dir(tiny_export, num_threads=2)
    assert t.sample_rate == RATE
    return t


@contextlib.contextmanager
def running(app: Any, sock: socket.socket | None = None) -> Iterator[str]:
    """Serve `app` with uvicorn on a free loopback port in a thread (or on `sock`, bound); its base URL."""
    if sock is None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def wait_ready(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{url}/health").status_code != 200:
        assert time.monotonic() < deadline, "the server did not get ready"
        time.sleep(0.05)


def speech(**kw: Any) -> dict[str, Any]:
    body = {"model": "soprano", "input": TEXT, "voice": "soprano", "max_new_tokens": TOKENS}
    body.update(kw)
    return {k: v for k, v in body.items() if v is not None}


@pytest.fixture(scope="module")
def app(tts: Any) -> Any:
    return create_app(Settings(tts=tts))


@pytest.fixture(scope="module")
def url(app: Any) -> Iterator[str]:
    with running(app) as u:
        wait_ready(u)
        yield u


@pytest.fixture(scope="module")
def client(url: str) -> Any:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(tts: Any) -> np.ndarray:
    return tts.synthesize(TEXT, max_new_tokens=TOKENS)["audio"]


def pcm(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2")


def assert_greedy_equal(got: np.ndarray, ref: np.ndarray) -> None:
    """16-bit audio from the server vs the float reference: within 1 LSB + 1e-4 of the peak."""
    want = to_pcm16(ref).astype(np.int32)
    assert len(got) == len(want)
    tol = 1 + 1e-4 * float(np.abs(ref).max()) * 32767
    assert np.abs(got.astype(np.int32) - want).max() <= tol


def error_of(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


# -- the OpenAI client ---------------------------------------------------------------------------

def test_wav_with_openai_client(client: Any, reference: np.ndarray) -> None:
    r = client.audio.speech.create(model="tts-1", voice="alloy", input=TEXT, response_format="wav",
                                   extra_body={"max_new_tokens": TOKENS})
    audio, rate = sf.read(io.BytesIO(r.content), dtype="int16")
    assert rate == RATE and r.response.headers["x-sample-rate"] == str(RATE)
    assert r.response.headers["content-type"] == "audio/wav"
    assert_greedy_equal(audio, reference)


def test_streamed_pcm_with_openai_client(client: Any, reference: np.ndarray) -> None:
    with client.audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts", voice="nova", input=TEXT, response_format="pcm", instructions="Speak cheerfully.",
        extra_body={"max_new_tokens": TOKENS},
    ) as r:
        assert r.headers["x-sample-rate"] == str(PCM_DEFAULT_RATE)
        chunks = [c for c in r.iter_bytes() if c]
    assert len(chunks) > 1  # streamed, not one blob
    audio = pcm(b"".join(chunks))
    assert abs(len(audio) - len(reference) * PCM_DEFAULT_RATE / RATE) <= 2
    assert np.abs(audio).max() > 100


def test_sse_with_openai_client(client: Any, reference: np.ndarray) -> None:
    with client.audio.speech.with_streaming_response.create(
        model="soprano", voice="soprano", input=TEXT, response_format="pcm", stream_format="sse",
        extra_body={"max_new_tokens": TOKENS, "sample_rate": RATE},
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: "):]) for line in r.iter_lines() if line.startswith("data: ")]
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1) and len(events) > 2
    done = events[-1]
    assert done["type"] == "speech.audio.done"
    usage = done["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] == TOKENS
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    audio = pcm(b"".join(base64.b64decode(e["audio"]) for e in events[:-1]))
    assert_greedy_equal(audio, reference)


def decode(fmt: str, data: bytes) -> tuple[np.ndarray, int]:
    """Decoded samples (int16) and rate: soundfile, except aac (PyAV) and raw pcm."""
    if fmt == "aac":
        with av.open(io.BytesIO(data)) as c:
            rate = c.streams.audio[0].rate
            frames = [f.to_ndarray().reshape(-1) for f in c.decode(audio=0)]
        return to_pcm16(np.concatenate(frames)), rate
    audio, rate = sf.read(io.BytesIO(data), dtype="int16")
    return audio, rate


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_decodes(fmt: str, client: Any, reference: np.ndarray) -> None:
    rate = {"opus": 48000, "pcm": PCM_DEFAULT_RATE}.get(fmt, RATE)
    r = client.audio.speech.create(model="tts-1-hd", voice="echo", input=TEXT, response_format=fmt,
                                   extra_body={"max_new_tokens": TOKENS})
    assert r.response.headers["x-sample-rate"] == str(rate)
    assert r.response.headers["content-type"] == FORMATS[fmt].content_type
    expected = round(len(reference) * rate / RATE)
    data = r.content
    if fmt == "pcm":
        audio, got_rate = pcm(data), rate
    elif fmt == "flac":
        # A streamed FLAC's STREAMINFO says "length unknown" (it is written before the audio);
        # libsndfile then loses the last block at the end of the file, FFmpeg reads it all.
        with sf.SoundFile(io.BytesIO(data)) as f:
            got_rate = f.samplerate
            head = f.read(expected - 4096, dtype="int16")
        with av.open(io.BytesIO(data)) as c:
            audio = np.concatenate([fr.to_ndarray().reshape(-1) for fr in c.decode(audio=0)])
        assert audio.dtype == np.int16 and np.array_equal(head, audio[: len(head)])  # lossless, both readers
    else:
        audio, got_rate = decode(fmt, data)
    assert got_rate == rate
    padding = {"mp3": 3 * 1152, "aac": 3 * 1024}.get(fmt, 0)  # encoder delay + the last frame's fill
    assert expected <= len(audio) <= expected + padding, (len(audio), expected)
    rms = float(np.sqrt(np.mean(audio.astype(np.float64) ** 2)))
    ref_rms = float(np.sqrt(np.mean((reference.astype(np.float64) * 32767) ** 2)))
    assert 0.5 * ref_rms < rms < 2 * ref_rms
    if fmt in ("wav", "flac"):
        assert_greedy_equal(audio, reference)


# -- streaming, rates, exactness -----------------------------------------------------------------

def test_streamed_wav_header_is_read_by_soundfile_and_wave(url: str, reference: np.ndarray) -> None:
    r = httpx.post(f"{url}/v1/audio/speech", json=speech(response_format="wav"))
    data = r.content
    assert data[:4] == b"RIFF" and data[8:16] == b"WAVEfmt " and data[36:40] == b"data"
    assert struct.unpack("<I", data[4:8])[0] == struct.unpack("<I", data[40:44])[0] == 0xFFFFFFFF
    with sf.SoundFile(io.BytesIO(data)) as f:
        assert (f.samplerate, f.channels, f.subtype, f.frames) == (RATE, 1, "PCM_16", len(reference))
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getframerate(), w.getsampwidth()) == (RATE, 2)
        assert len(w.readframes(10**9)) == 2 * len(reference)


def test_pcm_default_24k_and_32k_on_request(url: str, reference: np.ndarray) -> None:
    default = httpx.post(f"{url}/v1/audio/speech", json=speech(response_format="pcm"))
    native = httpx.post(f"{url}/v1/audio/speech", json=speech(response_format="pcm", sample_rate=RATE))
    assert default.headers["x-sample-rate"] == "24000" and native.headers["x-sample-rate"] == str(RATE)
    assert default.headers["content-type"] == "audio/pcm"
    assert abs(len(pcm(default.content)) - len(reference) * 24000 / RATE) <= 2
    assert_greedy_equal(pcm(native.content), reference)


def test_greedy_equals_synthesize_with_seven_others_in_flight(url: str, tts: Any) -> None:
    texts = [TEXT, "A second one counts to three.", "Four is short.", "Five talks about the weather today.",
             "Six reads a list: apples, pears.", "Seven whispers something.", "Eight ends the row.",
             "Nine, the last, asks a question?"]
    refs = [tts.synthesize(t, max_new_tokens=TOKENS)["audio"] for t in texts]
    results: list[Any] = [None] * len(texts)
    start = threading.Barrier(len(texts))

    def one(i: int) -> None:
        start.wait()
        results[i] = httpx.post(f"{url}/v1/audio/speech", json=speech(input=texts[i], response_format="pcm",
                                                                        sample_rate=RATE), timeout=120)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r, ref in zip(results, refs):
        assert r.status_code == 200
        assert_greedy_equal(pcm(r.content), ref)


def test_encoders_emit_bytes_before_the_end() -> None:
    """Compressed formats stream: bytes come out of write() as audio goes in, not only at finish."""
    t = np.arange(RATE) / RATE
    audio = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    for fmt in FORMATS:
        enc = open_stream(fmt, RATE)
        try:
            early = sum(len(enc.write(audio[i:i + 2048])) for i in range(0, len(audio), 2048))
            tail = len(enc.finish())
        finally:
            enc.close()
        assert early > 0 and early > tail, fmt


# -- the other routes ----------------------------------------------------------------------------

def test_health_models_voices_info(url: str, client: Any) -> None:
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "soprano" and {"tts-1", "tts-1-hd", "gpt-4o-mini-tts"} <= set(ids)
    assert client.models.retrieve("tts-1").id == "tts-1"
    error_of(httpx.get(f"{url}/v1/models/whisper-1"), 404)
    voices = httpx.get(f"{url}/v1/audio/voices").json()["voices"]
    names = {v["id"] for v in voices}
    assert {"soprano", "alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer",
            "verse"} <= names
    info = httpx.get(f"{url}/v1/server/info").json()
    assert {"backend", "lm_precision", "decoder_precision", "threads", "sample_rate", "max_batch", "max_queue",
            "model"} <= set(info)
    assert (info["backend"], info["sample_rate"], info["threads"]) == ("onnx_cpu", RATE, 2)
    assert info["lm_precision"] == info["decoder_precision"] == "fp32"  # an export: no conversion record


def test_index_static_and_openapi(url: str) -> None:
    r = httpx.get(f"{url}/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert httpx.get(f"{url}/static/index.html").status_code == 200
    assert "/v1/audio/speech" in httpx.get(f"{url}/openapi.json").json()["paths"]


def test_metrics(url: str) -> None:
    before = metric(url, 'soprano_http_requests_total{code="400",route="/v1/audio/speech"}') if \
        'code="400",route="/v1/audio/speech"' in httpx.get(f"{url}/metrics").text else 0.0
    httpx.post(f"{url}/v1/audio/speech", json=speech(input=""))
    text = httpx.get(f"{url}/metrics").text
    for name in ("soprano_http_requests_total", "soprano_scheduler_queue_depth", "soprano_scheduler_batch_rows",
                 "soprano_time_to_first_audio_seconds_bucket", "soprano_tokens_total", "soprano_decode_seconds_total",
                 "soprano_audio_seconds_total", "soprano_speech_in_flight", "soprano_speech_cancelled_total"):
        assert name in text, name
    assert metric(url, 'soprano_http_requests_total{code="400",route="/v1/audio/speech"}') == before + 1
    assert metric(url, "soprano_tokens_total") > 0 and metric(url, "soprano_audio_seconds_total") > 0
    assert metric(url, "soprano_time_to_first_audio_seconds_count") > 0


def test_precision_from_the_conversion_record_or_the_folder(tmp_path: Path) -> None:
    from pipeline_lib.server.app import _precision

    lm = tmp_path / "onnx" / "int8" / "lm"
    lm.mkdir(parents=True)
    (lm / "c.json").write_text(json.dumps({"conversion": {"backend": "onnx", "precision": "int8"}}))
    assert _precision(lm / "c.json", lm / "m.onnx") == "int8"
    (lm / "d.json").write_text(json.dumps({"onnx": {"conversion": {"precision": "fp32"}}}))  # the decoder's layout
    assert _precision(lm / "d.json", lm / "m.onnx") == "fp32"
    assert _precision(None, lm / "m.onnx") == "int8"  # the folder name
    assert _precision(None, tmp_path / "m.onnx") == "unknown"


def test_observer_feeds_metrics() -> None:
    m = ServerMetrics(lambda: 3)
    m.on_step(rows=4, queued=3, tokens=4, seconds=0.5)
    m.on_first_audio(0.25)
    m.on_audio(1.5)
    text = m.render().decode()
    for line in ("soprano_scheduler_batch_rows 4.0", "soprano_scheduler_queue_depth 3.0", "soprano_tokens_total 4.0",
                 "soprano_decode_seconds_total 0.5", "soprano_audio_seconds_total 1.5",
                 "soprano_time_to_first_audio_seconds_count 1.0"):
        assert line in text, line


# -- errors --------------------------------------------------------------------------------------

BAD_REQUESTS = [
    (speech(input=""), "input"),
    (speech(input="x" * 4097), "input"),
    (speech(input="   "), "input"),
    (speech(input="!!! ..."), "input"),
    (speech(input="a\ud800b"), "input"),
    (speech(model="tts-2"), "model"),
    (speech(voice="bob"), "voice"),
    (speech(voice={"id": "voice_1234"}), "voice"),
    (speech(response_format="ogg"), "response_format"),
    (speech(speed=1.5), "speed"),
    (speech(stream_format="websocket"), "stream_format"),
    (speech(temperature=-1.0), "temperature"),
    (speech(top_p=2.0), "top_p"),
    (speech(top_k=-1), "top_k"),
    (speech(repetition_penalty=0.0), "repetition_penalty"),
    (speech(seed=-1, temperature=0.7), "seed"),
    (speech(max_new_tokens=0), "max_new_tokens"),
    (speech(max_new_tokens=100000), "max_new_tokens"),
    (speech(max_new_tokens="24"), "max_new_tokens"),
    (speech(max_new_tokens=True), "max_new_tokens"),
    (speech(sample_rate=12345), "sample_rate"),
    (speech(response_format="opus", sample_rate=RATE), "sample_rate"),
    (speech(colour="blue"), "colour"),
    ({"model": "soprano", "voice": "soprano"}, "input"),
    ({"model": "soprano", "input": "Hi."}, "voice"),
]


@pytest.mark.parametrize("body,param", BAD_REQUESTS, ids=[p for _, p in BAD_REQUESTS])
def test_bad_requests_are_400_in_openai_shape(url: str, body: dict[str, Any], param: str) -> None:
    r = httpx.post(f"{url}/v1/audio/speech", content=json.dumps(body), headers={"content-type": "application/json"})
    err = error_of(r, 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_bad_bodies_are_400(url: str) -> None:
    for content in (b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe{}", b""):
        err = error_of(httpx.post(f"{url}/v1/audio/speech", content=content,
                                  headers={"content-type": "application/json"}), 400)
        assert err["type"] == "invalid_request_error"


def test_unknown_route_and_method(url: str) -> None:
    assert error_of(httpx.get(f"{url}/v1/nothing"), 404)["code"] == "not_found"
    assert error_of(httpx.get(f"{url}/v1/audio/speech"), 405)["code"] == "method_not_allowed"


def test_body_too_large_is_413(url: str, app: Any) -> None:
    limit = app.state.service.settings.max_body_bytes
    assert limit == 64 * 1024
    big = json.dumps(speech(input="a" * limit)).encode()
    err = error_of(httpx.post(f"{url}/v1/audio/speech", content=big, headers={"content-type": "application/json"}), 413)
    assert str(limit) in err["message"]

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted while reading
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]

    r = httpx.post(f"{url}/v1/audio/speech", content=chunked(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    error_of(r, 413)
    assert httpx.get(f"{url}/health").status_code == 200


def test_api_key(tts: Any) -> None:
    with running(create_app(Settings(tts=tts, api_key="s3cret"))) as u:
        wait_ready(u)
        assert error_of(httpx.get(f"{u}/v1/models"), 401)["code"] == "invalid_api_key"
        error_of(httpx.get(f"{u}/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        error_of(httpx.post(f"{u}/v1/audio/speech", json=speech(), headers={"Authorization": "Basic s3cret"}), 401)
        good = openai.OpenAI(base_url=f"{u}/v1", api_key="s3cret", max_retries=0)
        assert good.models.list().data[0].id == "soprano"
        r = good.audio.speech.create(model="tts-1", voice="alloy", input=TEXT, response_format="pcm",
                                     extra_body={"max_new_tokens": 4})
        assert len(r.content) > 0
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{u}/v1", api_key="nope", max_retries=0).models.list()
        assert httpx.get(f"{u}/health").status_code == 200  # open: load balancers probe it


class _FailingScheduler:
    """Stands in for the scheduler: every job yields one chunk, then fails."""

    queue_depth = active_rows = 0

    def check_room(self) -> None:
        pass

    def submit(self, request: Any) -> Any:
        from pipeline_lib.runtime.scheduler import SpeechJob

        job = SpeechJob(request, RATE)
        job._push(np.full(2048, 0.1, dtype=np.float32))
        job._finish(RuntimeError("the decoder failed"))
        return job

    def close(self, drain: bool = True) -> None:
        pass


def test_a_job_failing_mid_response(tts: Any) -> None:
    """After the 200 is sent: audio ends without the closing chunk, SSE with an error event."""
    app = create_app(Settings(tts=tts))
    with running(app) as u:
        wait_ready(u)
        app.state.service.scheduler = _FailingScheduler()
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.post(f"{u}/v1/audio/speech", json=speech(response_format="pcm"))
        r = httpx.post(f"{u}/v1/audio/speech", json=speech(response_format="pcm", stream_format="sse"))
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
        assert [e["type"] for e in events] == ["speech.audio.delta", "error"]
        assert "the decoder failed" in events[1]["error"]["message"]
        assert httpx.get(f"{u}/health").status_code == 200


def _wait(cond: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_queue_full_is_429_and_leaving_clients_cancel(tts: Any) -> None:
    app = create_app(Settings(tts=tts, max_batch=1, max_queue=1))
    service = app.state.service
    long = speech(input="This one is long, and it keeps going.", max_new_tokens=512, response_format="pcm")
    with running(app) as u:
        wait_ready(u)
        with httpx.Client(base_url=u, timeout=60) as c1, httpx.Client(base_url=u, timeout=60) as c2:
            with c1.stream("POST", "/v1/audio/speech", json=long) as running_r:
                assert running_r.status_code == 200
                running_chunks = running_r.iter_bytes()  # kept: a dropped iterator closes the response
                next(running_chunks)  # its row is decoding
                with c2.stream("POST", "/v1/audio/speech", json=long) as waiting_r:
                    assert waiting_r.status_code == 200  # submitted; waits for the one row
                    _wait(lambda: service.scheduler.queue_depth == 1)
                    r = httpx.post(f"{u}/v1/audio/speech", json=long)
                    err = error_of(r, 429)
                    assert int(r.headers["retry-after"]) >= 1 and err["code"] == "queue_full"
                # the waiting client left before its first audio: its job is dropped from the queue
                _wait(lambda: metric(u, "soprano_speech_cancelled_total") == 1)
            _wait(lambda: metric(u, "soprano_speech_cancelled_total") == 2)
            _wait(lambda: service.scheduler.active_rows == 0 and service.scheduler.queue_depth == 0)
        assert metric(u, "soprano_speech_in_flight") == 0
        t0 = time.monotonic()
        r = httpx.post(f"{u}/v1/audio/speech", json=speech(response_format="pcm"), timeout=60)
        assert r.status_code == 200 and time.monotonic() - t0 < 30  # the cancelled jobs hold no rows


def test_loading_then_ready_and_a_failed_load(tiny_export: Path, tmp_path: Path) -> None:
    app = create_app(Settings(model=tiny_export, threads=1))
    with running(app) as u:
        r = httpx.get(f"{u}/health")
        if r.status_code == 503:  # the model loads after the port opens
            assert r.json()["status"] == "loading"
            r = httpx.post(f"{u}/v1/audio/speech", json=speech())
            if r.status_code == 503:
                assert error_of(r, 503)["code"] == "loading" and "retry-after" in r.headers
        wait_ready(u)
        assert httpx.post(f"{u}/v1/audio/speech", json=speech(max_new_tokens=4)).status_code == 200
    (tmp_path / "empty").mkdir()
    with running(create_app(Settings(model=tmp_path / "empty"))) as u:
        _wait(lambda: httpx.get(f"{u}/health").json()["status"] == "failed")
        r = httpx.get(f"{u}/health")
        assert r.status_code == 503 and "empty" in r.json()["error"]
        assert error_of(httpx.post(f"{u}/v1/audio/speech", json=speech()), 503)["code"] == "model_load_failed"


def test_settings_from_env() -> None:
    s = Settings.from_env({"SOPRANO_MODEL": "/m", "SOPRANO_BACKEND": "openvino", "SOPRANO_THREADS": "3",
                           "SOPRANO_MAX_QUEUE": "5", "SOPRANO_API_KEY": "k", "SOPRANO_MAX_INPUT_CHARS": "100"})
    assert (s.model, s.backend, s.threads, s.max_queue, s.api_key, s.max_input_chars) == \
        (Path("/m"), "openvino_cpu", 3, 5, "k", 100)
    assert s.max_batch is None and s.max_body_bytes == 16 * 1024 + 12 * 100
    from pipeline_lib.errors import InputError

    with pytest.raises(InputError, match="SOPRANO_THREADS"):
        Settings.from_env({"SOPRANO_MODEL": "/m", "SOPRANO_THREADS": "many"})
    with pytest.raises(InputError, match="SOPRANO_MODEL"):
        Settings.from_env({})


# -- fuzz ----------------------------------------------------------------------------------------

_POOLS = [
    [chr(c) for c in range(0x20, 0x7F)],
    [chr(c) for c in (*range(0x00, 0x20), 0x7F, 0x85, 0x2028, 0x2029, 0xFEFF, 0x200B, 0x200D, 0x202E)],
    [chr(c) for c in range(0x1F600, 0x1F650)] + ["\U0001F469\u200D\U0001F4BB", "\U0001F1FA\U0001F1F8"],
    [chr(c) for c in (*range(0x05D0, 0x05EA), *range(0x0627, 0x064A))],  # Hebrew, Arabic
    [chr(c) for c in (*range(0x0300, 0x0340), *range(0x4E00, 0x4E40), *range(0x0400, 0x0450))],
    [chr(c) for c in (0xD800, 0xDBFF, 0xDC00, 0xDFFF)],  # lone surrogates (JSON \u escapes allow them)
    list("0123456789.,:;!?$%-'\"()[] ") + ["3:45 PM", "$1,000,000", "1e10", "-0.5", "12345678901234567890", "Dr.",
                                            "U.S.A.", "...", "\u2026", "15%", "1/2", "#1", "&", "@"],
]


def test_fuzz_unicode_inputs_leave_the_server_up(url: str) -> None:
    rng = random.Random(1234)
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=url, timeout=60) as c:
        for _ in range(200):
            pools = rng.sample(_POOLS, rng.randint(1, 3))
            text = "".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, 40)))
            body = json.dumps(speech(input=text, response_format=rng.choice(["pcm", "wav", "mp3"]), max_new_tokens=2))
            r = c.post("/v1/audio/speech", content=body, headers={"content-type": "application/json"})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code != 200:
                assert 400 <= r.status_code < 500, (text, r.status_code, r.text)
                error_of(r, r.status_code)
        assert c.get("/health").status_code == 200
    print("fuzz statuses", statuses)
    assert statuses.get(200, 0) > 20 and statuses.get(400, 0) > 20, statuses


def test_openvino_server_batches_on_the_step_ir_and_equals_the_runtime(tiny_openvino: Path, tts: Any) -> None:
    """With --backend openvino the server loads the step IR (the stateful LM cannot take rows into a
    running batch), and greedy audio of concurrent requests equals the ONNX runtime's."""
    app = create_app(Settings(model=tiny_openvino, backend="openvino", threads=2))
    texts = [TEXT, "A second request, in flight at the same time.", "And a third one."]
    with running(app) as u:
        wait_ready(u)
        info = httpx.get(f"{u}/v1/server/info").json()
        assert info["backend"] == "openvino_cpu"
        got: list[Any] = [None] * len(texts)

        def call(i: int) -> None:
            r = httpx.post(f"{u}/v1/audio/speech", json=speech(input=texts[i], response_format="pcm", sample_rate=RATE), timeout=120)
            got[i] = (r.status_code, r.content)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(texts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for (status, body), text in zip(got, texts):
        assert status == 200
        assert_greedy_equal(pcm(body), tts.synthesize(text, max_new_tokens=TOKENS)["audio"])


def test_an_empty_body_and_a_request_that_gives_no_audio_are_400s(url: str) -> None:
    r = httpx.post(f"{url}/v1/audio/speech", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "body is empty" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/audio/speech", json=speech(max_new_tokens=1, response_format="mp3"))
    assert r.status_code == 400 and "audio needs at least two" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "max_new_tokens"


LONG_INPUT = ("123456789 " * 410)[:4096]


def test_a_full_queue_answers_429_in_milliseconds_for_a_long_input(tts: Any) -> None:
    """The queue's room is checked before the text is prepared: 429s for a 4096-character input
    with a full queue take milliseconds (p95 of 20 under 50 ms, HTTP round trip included)."""
    app = create_app(Settings(tts=tts, max_batch=1, max_queue=1))
    service = app.state.service
    long = speech(input="This one is long, and it keeps going.", max_new_tokens=512, response_format="pcm")
    with running(app) as u:
        wait_ready(u)
        with httpx.Client(base_url=u, timeout=60) as c1, httpx.Client(base_url=u, timeout=60) as c2:
            with c1.stream("POST", "/v1/audio/speech", json=long) as running_r:
                chunks = running_r.iter_bytes()
                next(chunks)
                with c2.stream("POST", "/v1/audio/speech", json=long) as waiting_r:
                    assert waiting_r.status_code == 200
                    _wait(lambda: service.scheduler.queue_depth == 1)
                    times = []
                    for _ in range(20):  # raw HTTP/1.1 on a fresh connection: the server's time, not a client's
                        t0 = time.perf_counter()
                        status, reply = _raw_post(u, speech(input=LONG_INPUT))
                        times.append(time.perf_counter() - t0)
                        assert status == 429 and json.loads(reply)["error"]["code"] == "queue_full"
    assert sorted(times)[18] < 0.05, times


def _raw_post(url: str, body: dict[str, Any]) -> tuple[int, bytes]:
    """POST /v1/audio/speech over a plain socket (Connection: close); the status and the body."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, rest = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), rest


def test_a_stuck_reader_stops_its_rows_and_is_cancelled(tts: Any) -> None:
    """A client that reads nothing: its job's audio ahead of what it read is bounded (max_unread_s),
    so its rows stop stepping (soprano_tokens_total flat while it is stuck), and after
    read_timeout_s without a read the job is cancelled."""
    app = create_app(Settings(tts=tts, max_unread_s=1.0, read_timeout_s=15.0))
    body = json.dumps(speech(input=LONG_INPUT, max_new_tokens=64, response_format="pcm")).encode()
    with running(app) as u:
        wait_ready(u)
        host, port = u.removeprefix("http://").split(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel holds little for us
        sock.connect((host, int(port)))
        try:
            sock.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            assert sock.recv(12).startswith(b"HTTP/1.1 200")  # then nothing more is read
            # The server goes on until the socket's kernel buffers are full (they are not the
            # server's memory); from then on its rows are parked and no token is made.
            sched = app.state.service.scheduler
            _wait(lambda: sched.parks >= 1)
            job = sched._jobs[0]
            deadline = time.monotonic() + 60
            while True:
                tokens = metric(u, "soprano_tokens_total")
                time.sleep(1.0)
                if metric(u, "soprano_tokens_total") == tokens:
                    break
                assert time.monotonic() < deadline, "tokens never stopped"
            assert not job.done and job.unread_s <= 1.0 + 2 * sched.max_chunk * sched._block_s
            _wait(lambda: job.done, timeout=30)  # read_timeout_s: the job ends, its rows are gone
            assert "read_timeout_s" in str(job.error) and sched.active_rows == 0 and not sched._parked
        finally:
            sock.close()
        _wait(lambda: metric(u, "soprano_speech_in_flight") == 0)


@pytest.mark.slow
def test_a_stuck_reader_on_the_serve_commands_socket_stops_within_seconds_of_the_unread_bound(tts: Any) -> None:
    """`soprano-onnx serve`'s socket (server.command.listen: a small kernel send buffer) with a
    client that reads nothing and leaves its own buffers as they are: the audio its job generates
    stops a few seconds of audio past max_unread_s (what the kernel holds on both ends and the
    ASGI server's write buffer count as read), and stays flat. With the kernel's autotuned send
    buffer (4 MiB: about 85 s of pcm) it ran on for a minute of audio and more."""
    from pipeline_lib.server.command import listen

    app = create_app(Settings(tts=tts, max_unread_s=2.0, read_timeout_s=120.0))
    body = json.dumps(speech(input=LONG_INPUT, max_new_tokens=64, response_format="pcm")).encode()
    with running(app, listen("127.0.0.1", 0)) as u:
        wait_ready(u)
        host, port = u.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            assert sock.recv(12).startswith(b"HTTP/1.1 200")  # then nothing more is read
            sched = app.state.service.scheduler
            _wait(lambda: sched.parks >= 1, timeout=120)
            job = sched._jobs[0]
            deadline = time.monotonic() + 120
            while True:  # flat for 2 s
                tokens = metric(u, "soprano_tokens_total")
                time.sleep(2.0)
                if metric(u, "soprano_tokens_total") == tokens:
                    break
                assert time.monotonic() < deadline, "tokens never stopped"
            generated = job.generated_samples / tts.sample_rate
            # pcm is 48 kB/s: the client's default receive buffer (about 130 kB on loopback), the
            # server's send buffer (about 55 kB) and uvicorn's 64 KiB write buffer: under 6 s. The
            # sentence playing next steps on until its window goes out: one window more at most.
            bound = sched.max_unread_s + sched.max_chunk * sched._block_s + 6.0
            assert generated <= bound, (generated, job.read_samples / tts.sample_rate)
            time.sleep(3.0)
            assert metric(u, "soprano_tokens_total") == tokens and not job.done


def test_server_info_gives_the_runtimes_sampling_defaults(url: str) -> None:
    """The web page fills its sampling fields from these: the values live in SamplingParams only."""
    from pipeline_lib.runtime.sampling import DEFAULT_MAX_NEW_TOKENS, SamplingParams

    got = httpx.get(f"{url}/v1/server/info").json()["sampling_defaults"]
    want = SamplingParams()
    assert got == {"temperature": want.temperature, "top_p": want.top_p, "top_k": want.top_k,
                   "repetition_penalty": want.repetition_penalty, "max_new_tokens": DEFAULT_MAX_NEW_TOKENS}
