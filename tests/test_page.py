"""The speech page (pipeline_lib/server/static/) in a real headless browser against a real server.

Debian's chromium (/usr/bin/chromium; scripts/setup.sh installs it) driven by Playwright's Python
API; the server is `create_app` on the tiny export, run by uvicorn in a thread on a free loopback
port. The tiny model never emits [STOP], so `max_new_tokens` sets each sentence's length: 64 tokens
are ~4 s of audio made in ~1.5 s here, 512 tokens ~33 s made in ~17 s (plenty of time to stop it).
Set SOPRANO_SCREENSHOT_DIR to keep the screenshot (it is always written under pytest's tmp_path).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import threading
import time
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

CHROMIUM = Path("/usr/bin/chromium")
# The flags this machine's probe used; the network ones keep Chromium from calling out (refused here).
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required",
]
SCREENSHOT_DIR_ENV = "SOPRANO_SCREENSHOT_DIR"
SHORT_TOKENS = 64
LONG_TOKENS = 512
MAX_INPUT_CHARS = 200
TEXT = "Hello there. This page plays while it streams."
STATE = "document.getElementById('app').dataset.state"


def _require_chromium() -> None:
    if CHROMIUM.exists():
        return
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing in CI: scripts/setup.sh should have installed Debian's chromium")
    pytest.skip(f"{CHROMIUM} is missing (not CI): run scripts/setup.sh or `apt-get install chromium`")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    app: Any  # the FastAPI app, for the scheduler's own state

    def metrics(self) -> dict[str, float]:
        """/metrics' Prometheus text -> {'name{labels}': value} (comments skipped)."""
        import httpx

        out: dict[str, float] = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out


@contextlib.contextmanager
def _serve(**settings: Any) -> Iterator[Server]:
    import httpx
    import uvicorn

    from pipeline_lib.server.app import create_app
    from pipeline_lib.server.settings import Settings

    app = create_app(Settings(**settings))
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, name="uvicorn-test-page", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while not (srv.started and httpx.get(base + "/health", timeout=10).status_code == 200):
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the speech server did not become ready within 120 s")
        time.sleep(0.1)
    try:
        yield Server(base, app)
    finally:
        srv.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def server(tiny_export: Path) -> Iterator[Server]:
    with _serve(model=tiny_export, threads=1, max_input_chars=MAX_INPUT_CHARS) as s:
        yield s


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    _require_chromium()
    from playwright.sync_api import sync_playwright

    # launch() starts Chromium on a fresh temporary profile of its own (it refuses --user-data-dir).
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any, server: Server) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1000, "height": 1100}, accept_downloads=True)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.goto(server.url + "/")
    pg.wait_for_function("document.getElementById('status').textContent === 'Ready.'")
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def _wait_state(page: Any, state: str, timeout_s: float) -> None:
    page.wait_for_function(f"{STATE} === {state!r}", timeout=timeout_s * 1000)


def _save_screenshot(page: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get(SCREENSHOT_DIR_ENV):
        out = Path(os.environ[SCREENSHOT_DIR_ENV])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out / name)
    return path


def test_page_shows_the_server_and_every_control_is_labelled(page: Any, server: Server) -> None:
    import httpx

    info = httpx.get(server.url + "/v1/server/info", timeout=10).json()
    for key in ("backend", "lm_precision", "decoder_precision", "threads"):
        assert page.text_content(f'#server-info dd[data-key="{key}"]') == str(info[key])
    voices = httpx.get(server.url + "/v1/audio/voices", timeout=10).json()
    assert page.eval_on_selector_all("#voice option", "os => os.map(o => o.value)") == [v["id"] for v in voices["voices"]]
    assert page.input_value("#voice") == voices["default"]
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea, button')]
             .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.textContent.trim())
             .map(el => el.id)"""
    )
    assert unlabelled == []
    # Tab order follows the form: text box, voice, format; the focused control gets an outline.
    page.focus("#text")
    for expected in ("voice", "format"):
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == expected
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") == "solid"


def test_speak_plays_while_it_streams(page: Any, server: Server, tmp_path: Path) -> None:
    import httpx

    page.fill("#max_new_tokens", str(SHORT_TOKENS))
    page.fill("#text", TEXT)
    page.focus("#text")
    page.keyboard.press("Enter")  # Enter in the text box speaks
    _wait_state(page, "playing", 30)
    ttfa = page.text_content("#stat-ttfa")
    assert re.fullmatch(r"\d+ ms", ttfa), ttfa
    t0 = page.evaluate("window.sopranoPage.audioContext.currentTime")
    page.wait_for_timeout(400)
    t1, start_at = page.evaluate("[window.sopranoPage.audioContext.currentTime, window.sopranoPage.playback.startAt]")
    assert t1 > t0 and t1 > start_at, (t0, t1, start_at)  # the clock runs and is past the first buffer's start
    _save_screenshot(page, tmp_path, "page.png")
    # "finished" comes only from the last buffer's `ended` event: every scheduled buffer was rendered.
    _wait_state(page, "finished", 60)
    played = page.evaluate("window.sopranoPage.playback")
    assert played["endedBuffers"] == played["buffers"] > 1
    # Greedy decoding is deterministic: the page played exactly the samples of a plain request at the
    # same rate (so samples split across network chunks were joined, not dropped).
    ref = httpx.post(server.url + "/v1/audio/speech", timeout=120, json={
        "model": "soprano", "voice": "soprano", "input": TEXT, "response_format": "pcm",
        "max_new_tokens": SHORT_TOKENS, "sample_rate": played["sampleRate"],
    })
    assert ref.status_code == 200, ref.text
    assert played["samples"] == len(ref.content) // 2
    assert page.text_content("#stat-length") == f"{played['samples'] / played['sampleRate']:.2f} s"
    assert re.fullmatch(r"\d+\.\d\d×", page.text_content("#stat-xrt"))
    # The WAV download is the audio that was played.
    page.select_option("#format", "wav")
    with page.expect_download() as download:
        page.click("#download")
    path = tmp_path / "speech.wav"
    download.value.save_as(path)
    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (played["sampleRate"], 1, 2)
        got = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    # The same samples up to rounding: the streaming windows fall where each request's timing puts
    # them (an early window when a listener would run dry), and each decoder call rounds on its own,
    # so a sample may land one 16-bit step away. A dropped or repeated piece would shift everything.
    want = np.frombuffer(ref.content, dtype="<i2")
    assert len(got) == len(want) and int(np.abs(got.astype(np.int32) - want).max()) <= 2
    # Other formats are encoded by the server, from a second request with the same settings.
    page.select_option("#format", "flac")
    with page.expect_download(timeout=60_000) as download:
        page.click("#download")
    path = tmp_path / "speech.flac"
    download.value.save_as(path)
    assert path.read_bytes()[:4] == b"fLaC"


def test_stop_closes_the_stream_and_the_server_drops_its_rows(page: Any, server: Server) -> None:
    before = server.metrics()
    page.fill("#max_new_tokens", str(LONG_TOKENS))
    page.fill("#text", "This one is long, and it will be stopped before it ends.")
    page.click("#speak")
    _wait_state(page, "playing", 30)
    page.wait_for_timeout(800)
    scheduler = server.app.state.service.scheduler
    assert server.metrics()["soprano_speech_in_flight"] == 1 and scheduler.active_rows >= 1
    page.click("#stop")
    assert page.get_attribute("#app", "data-state") == "stopped"
    assert page.is_enabled("#speak") and not page.is_enabled("#stop")
    # The request alone would run ~15 s more: within 10 s the server must have noticed the closed
    # connection, cancelled the job, dropped its rows and stopped making tokens. (Not checked:
    # soprano_scheduler_batch_rows, the rows of the *last* decode step, which nothing resets to 0
    # when the batch empties after a cancellation.)
    deadline = time.monotonic() + 10
    last_tokens = -1.0
    while True:
        now = server.metrics()
        settled = (now["soprano_speech_in_flight"] == 0 and scheduler.active_rows == 0
                   and now["soprano_speech_cancelled_total"] == before["soprano_speech_cancelled_total"] + 1
                   and now["soprano_tokens_total"] == last_tokens)
        if settled:
            break
        assert time.monotonic() < deadline, f"the server still works on the stopped request 10 s after Stop: {now}"
        last_tokens = now["soprano_tokens_total"]
        time.sleep(0.5)
    assert now["soprano_tokens_total"] > before["soprano_tokens_total"]


@pytest.mark.parametrize(("text", "key"), [("", None), ("x" * (MAX_INPUT_CHARS + 1), "Control+Enter")],
                         ids=["empty", "too-long"])
def test_server_errors_are_shown_in_words(page: Any, server: Server, tmp_path: Path, text: str, key: str | None) -> None:
    import httpx

    expected = httpx.post(server.url + "/v1/audio/speech", timeout=30,
                          json={"model": "soprano", "voice": "soprano", "input": text, "response_format": "pcm"})
    assert expected.status_code == 400
    message = expected.json()["error"]["message"]
    page.fill("#text", text)
    if key is None:
        page.click("#speak")
    else:
        page.focus("#text")
        page.keyboard.press(key)
    _wait_state(page, "error", 30)
    error = page.locator("#error")
    assert error.is_visible()
    assert error.text_content() == message
    assert error.get_attribute("aria-live") == "assertive"
    _save_screenshot(page, tmp_path, f"page-error-{'too-long' if text else 'empty'}.png")


API_KEY = "page-s3cret"


def test_the_page_with_an_api_key(browser: Any, tiny_export: Path, tmp_path: Path) -> None:
    """A server started with --api-key: the page says what is wrong until the key is entered, then
    works; the key stays in this tab's sessionStorage (a reload keeps it, a new session has none)
    and never reaches the URL."""
    with _serve(model=tiny_export, threads=1, api_key=API_KEY) as server:
        context = browser.new_context()
        try:
            pg = context.new_page()
            errors: list[str] = []
            pg.on("pageerror", lambda exc: errors.append(str(exc)))
            requests: list[tuple[str, str | None]] = []
            pg.on("request", lambda r: requests.append((r.url, r.headers.get("authorization"))))
            pg.goto(server.url + "/")
            error = pg.locator("#error")
            error.wait_for(state="visible", timeout=30_000)
            assert "API key" in error.text_content()
            pg.fill("#api_key", API_KEY)
            pg.dispatch_event("#api_key", "change")
            pg.wait_for_function("document.getElementById('status').textContent === 'Ready.'")
            assert not error.is_visible()
            assert pg.text_content('#server-info dd[data-key="backend"]') == "onnx_cpu"
            assert pg.evaluate("sessionStorage.getItem('soprano-api-key')") == API_KEY
            pg.fill("#max_new_tokens", "16")
            pg.fill("#text", "Hello with a key.")
            pg.click("#speak")
            _wait_state(pg, "finished", 60)
            assert pg.evaluate("window.sopranoPage.playback.samples") > 0
            speech = [auth for url, auth in requests if url.endswith("/v1/audio/speech")]
            assert speech and all(auth == f"Bearer {API_KEY}" for auth in speech)
            pg.reload()
            pg.wait_for_function("document.getElementById('status').textContent === 'Ready.'")
            assert pg.input_value("#api_key") == API_KEY
            assert all(API_KEY not in url for url, _ in requests) and API_KEY not in pg.url
            assert pg.evaluate("localStorage.length") == 0 and "page-s3cret" not in pg.evaluate("document.cookie")
            _save_screenshot(pg, tmp_path, "page-api-key.png")
            assert not errors, errors
        finally:
            context.close()
        fresh = browser.new_context()
        try:
            pg = fresh.new_page()
            pg.goto(server.url + "/")
            pg.locator("#error").wait_for(state="visible", timeout=30_000)
            assert pg.input_value("#api_key") == ""
        finally:
            fresh.close()
