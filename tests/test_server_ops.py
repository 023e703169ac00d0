"""The server's operational contract: HEAD on every GET route, x-request-id on every response and in
the access log, /docs served offline from an installed package, the errors of bodies that are not
JSON objects, and SIGTERM's drain (readiness 503 at once, requests in flight finish, new ones 503
until the listener closes)."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from test_server import RATE, error_of, running, speech, wait_ready  # noqa: E402

from pipeline_lib.server.app import create_app, swagger_ui_dir  # noqa: E402
from pipeline_lib.server.settings import Settings  # noqa: E402


@pytest.fixture(scope="module")
def tts(tiny_export: Path) -> Any:
    from pipeline_lib.runtime.tts import SopranoTTS

    return SopranoTTS.from_dir(tiny_export, num_threads=1)


@pytest.fixture(scope="module")
def url(tts: Any) -> Iterator[str]:
    with running(create_app(Settings(tts=tts))) as u:
        wait_ready(u)
        yield u


GET_ROUTES = ["/health", "/", "/v1/models", "/v1/models/tts-1", "/v1/audio/voices", "/v1/server/info", "/metrics",
              "/openapi.json", "/static/app.js", "/docs", "/docs/assets/swagger-ui-bundle.js"]


@pytest.mark.parametrize("path", GET_ROUTES)
def test_head_on_every_get_route(url: str, path: str) -> None:
    get = httpx.get(f"{url}{path}")
    head = httpx.head(f"{url}{path}")
    assert get.status_code == head.status_code == 200, (get.status_code, head.status_code)
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    if "content-length" in get.headers and path != "/metrics":  # /metrics changes between the two calls
        assert head.headers["content-length"] == get.headers["content-length"]


def test_head_on_a_post_route_is_405_naming_head(url: str) -> None:
    r = httpx.head(f"{url}/v1/audio/speech")
    assert r.status_code == 405 and r.content == b"" and "POST" in r.headers["allow"]
    r = httpx.request("PUT", f"{url}/v1/audio/speech")
    assert error_of(r, 405)["message"] == "PUT is not allowed on /v1/audio/speech"


def test_every_get_route_of_the_app_is_covered(url: str) -> None:
    documented = set(httpx.get(f"{url}/openapi.json").json()["paths"])
    assert {p for p in documented if "{" not in p} <= set(GET_ROUTES) | {"/v1/audio/speech"}


def test_request_id_echoed_or_made_and_logged(url: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="pipeline_lib.server.access"):
        mine = httpx.get(f"{url}/health", headers={"x-request-id": "trace-42/abc"})
        made = httpx.post(f"{url}/v1/audio/speech", json=speech(input=""))
        bad = httpx.get(f"{url}/v1/nothing", headers={"x-request-id": "x" * 300})
        streamed = httpx.post(f"{url}/v1/audio/speech", json=speech(response_format="pcm", max_new_tokens=4))
        rids = [r.headers["x-request-id"] for r in (mine, made, bad, streamed)]
        deadline = time.monotonic() + 10  # a streamed response's line comes when its stream has ended
        while not all(any(f"request_id={rid} " in r.getMessage() for r in caplog.records) for rid in rids):
            assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
            time.sleep(0.02)
    assert mine.headers["x-request-id"] == "trace-42/abc"
    for r in (made, bad, streamed):
        assert re.fullmatch(r"req_[0-9a-f]{32}", r.headers["x-request-id"]), r.headers
    assert made.status_code == 400 and bad.status_code == 404 and streamed.status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline_lib.server.access"]
    for r, status in ((mine, 200), (made, 400), (bad, 404), (streamed, 200)):
        rid = r.headers["x-request-id"]
        assert any(f"request_id={rid} " in line and f'" {status} ' in line for line in lines), (rid, lines)


def test_an_internal_error_is_a_500_in_openais_shape_with_the_request_id(tts: Any, caplog) -> None:
    app = create_app(Settings(tts=tts))
    with running(app) as u:
        wait_ready(u)

        def broken() -> None:
            raise RuntimeError("a bug")

        app.state.service.ready = broken  # what a bug in a route looks like
        with caplog.at_level(logging.ERROR, logger="pipeline_lib.server"):
            r = httpx.get(f"{u}/v1/server/info", headers={"x-request-id": "trace-500"})
        assert r.headers["x-request-id"] == "trace-500"
        err = error_of(r, 500)
        assert err["code"] == "internal_error" and "trace-500" in err["message"] and "a bug" not in err["message"]
        assert any("request_id=trace-500" in rec.getMessage() and rec.exc_info for rec in caplog.records)
        assert httpx.get(f"{u}/health").status_code == 200


def test_docs_are_served_offline(url: str) -> None:
    assert swagger_ui_dir() is not None, "the serve extra installs swagger-ui-bundle-v2"
    page = httpx.get(f"{url}/docs").text
    assert "cdn." not in page and "/docs/assets/swagger-ui-bundle.js" in page and "/openapi.json" in page
    js = httpx.get(f"{url}/docs/assets/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.content) > 100_000
    assert "GET /docs" in error_of(httpx.get(f"{url}/nope"), 404)["message"]


def test_openapi_has_no_422_and_documents_errors(url: str) -> None:
    doc = httpx.get(f"{url}/openapi.json").json()
    speech_op = doc["paths"]["/v1/audio/speech"]["post"]
    assert set(speech_op["responses"]) == {"200", "400", "413", "429", "503"}
    assert {"audio/mpeg", "audio/wav", "audio/pcm", "audio/flac", "audio/aac", "text/event-stream"} <= \
        set(speech_op["responses"]["200"]["content"])
    assert all("422" not in op["responses"] for ops in doc["paths"].values() for op in ops.values())
    props = doc["components"]["schemas"]["SpeechBody"]["properties"]
    assert "tts-1" in props["model"]["enum"] and "alloy" in props["voice"]["anyOf"][0]["enum"]
    assert props["response_format"]["enum"] == ["mp3", "opus", "aac", "flac", "wav", "pcm"]
    assert props["stream_format"]["enum"] == ["audio", "sse"]
    assert props["input"]["maxLength"] == 4096


def test_form_content_type_names_the_json_header(url: str) -> None:
    body = b'{"model": "soprano", "input": "Hi.", "voice": "alloy"}'
    for headers in ({"content-type": "application/x-www-form-urlencoded"}, {}):
        err = error_of(httpx.post(f"{url}/v1/audio/speech", content=body, headers=headers), 400)
        assert "Content-Type: application/json" in err["message"] and err["code"] == "invalid_content_type", err


@pytest.mark.parametrize("content", [b'{"input": "\xff\xfe"}', b"[" * 5000 + b"]" * 5000],
                         ids=["invalid-utf8", "nested-5000"])
def test_unparsable_bodies_get_a_code(url: str, content: bytes) -> None:
    err = error_of(httpx.post(f"{url}/v1/audio/speech", content=content,
                              headers={"content-type": "application/json"}), 400)
    assert err["code"] == "invalid_json" and "UTF-8" in err["message"], err
    assert "There was an error parsing the body" not in err["message"]
    assert httpx.get(f"{url}/health").status_code == 200


def _serve(model: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    u = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline_lib.cli", "serve", "--model", str(model), "--port", str(port),
         "--threads", "1", "--log-level", "warning", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        try:
            if httpx.get(f"{u}/health").status_code == 200:
                return proc, u
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "serve did not get ready"
        time.sleep(0.1)


def test_sigterm_readiness_503_at_once_stream_completes_byte_exact(tiny_export: Path) -> None:
    drain = 4.0
    proc, u = _serve(tiny_export, "--drain-seconds", str(drain))
    try:
        body = speech(input="Hello there.", response_format="pcm", sample_rate=RATE, max_new_tokens=256)
        want = httpx.post(f"{u}/v1/audio/speech", json=body, timeout=60).content
        assert len(want) == 2 * 255 * 2048
        during: dict[str, Any] = {}
        with httpx.Client(timeout=60) as other, httpx.stream("POST", f"{u}/v1/audio/speech", json=body,
                                                             timeout=60) as r:
            it = r.iter_bytes()
            data = next(it)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            while (h := other.get(f"{u}/health")).status_code != 503:
                assert time.monotonic() - t0 < 1.0, "readiness did not fail at once"
                time.sleep(0.01)
            during["health"] = h.json()
            during["health_s"] = time.monotonic() - t0
            during["speech"] = httpx.post(f"{u}/v1/audio/speech", json=body, timeout=10)  # a new connection
            during["models"] = other.get(f"{u}/v1/models")  # the kept-alive one
            during["head"] = httpx.head(f"{u}/health")
            data += b"".join(it)
            done_s = time.monotonic() - t0
        print(f"/health 503 {during['health_s'] * 1000:.0f} ms after SIGTERM; the stream ended {done_s:.2f} s after it")
        assert during["health"] == {"status": "draining"}
        err = error_of(during["speech"], 503)
        assert err["code"] == "shutting_down" and during["speech"].headers["connection"] == "close"
        assert during["speech"].headers["retry-after"]
        assert error_of(during["models"], 503)["code"] == "shutting_down"
        assert during["head"].status_code == 503
        # The stream in flight completes: every sample, equal to an undisturbed request's up to rounding (its
        # decoder windows fall where its timing puts them, an early window under load, and each decoder call
        # rounds on its own, as in test_page and test_voice_agent); a cut or a dropped piece would be far off.
        assert len(data) == len(want)
        got, ref = np.frombuffer(data, dtype="<i2"), np.frombuffer(want, dtype="<i2")
        assert int(np.abs(got.astype(np.int32) - ref.astype(np.int32)).max()) <= 2
        if done_s < drain - 0.5:  # the listener is still open for the rest of the drain period
            assert httpx.get(f"{u}/health").status_code == 503
        assert proc.wait(drain + 30) in (0, -signal.SIGTERM)
        assert time.monotonic() - t0 >= drain
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
