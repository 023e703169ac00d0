"""A voice-agent framework's OpenAI TTS client against the server: livekit-plugins-openai's `TTS`
(what a LiveKit agent uses to speak), pointed at the server's /v1 as a LiveKit user would. Its
frames must be 24 kHz mono (the plugin's rate) and hold the server's own audio: with pcm, the
samples the server sends for the same request, up to rounding (the last frame padded with
silence); with the other formats and SSE, as many samples as that pcm, up to codec padding.

The plugin has no max_new_tokens, and random weights never emit [STOP]: the server caps
max_new_tokens instead (Settings.max_new_tokens, the default of requests that leave it out)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

pytest.importorskip("livekit.plugins.openai")
httpx = pytest.importorskip("httpx")

from livekit.plugins import openai as lk_openai  # noqa: E402
from test_server import running, wait_ready  # noqa: E402

from pipeline_lib.server.app import create_app  # noqa: E402
from pipeline_lib.server.settings import Settings  # noqa: E402

TEXT = "Hello there, how are you?"
TOKENS = 24
LIVEKIT_RATE = 24000


@pytest.fixture(scope="module")
def url(tiny_export: Path) -> Iterator[str]:
    from pipeline_lib.runtime.tts import SopranoTTS

    tts = SopranoTTS.from_dir(tiny_export, num_threads=1)
    with running(create_app(Settings(tts=tts, max_new_tokens=TOKENS))) as u:
        wait_ready(u)
        yield u


@pytest.fixture(scope="module")
def server_pcm(url: str) -> np.ndarray:
    """The server's own pcm (24 kHz, its default for pcm) for TEXT."""
    r = httpx.post(f"{url}/v1/audio/speech", json={"model": "tts-1", "input": TEXT, "voice": "alloy",
                                                    "response_format": "pcm"}, timeout=60)
    assert r.status_code == 200 and r.headers["x-sample-rate"] == str(LIVEKIT_RATE)
    return np.frombuffer(r.content, dtype="<i2")


async def _synthesize(url: str, model: str, response_format: str) -> tuple[list[Any], str]:
    tts = lk_openai.TTS(base_url=f"{url}/v1", api_key="unused", model=model, voice="alloy",
                        response_format=response_format)
    frames, request_ids = [], set()
    try:
        async with tts.synthesize(TEXT) as stream:
            async for audio in stream:
                frames.append(audio.frame)
                request_ids.add(audio.request_id)
    finally:
        await tts.aclose()
    assert len(request_ids) == 1
    return frames, request_ids.pop()


def _samples(frames: list[Any]) -> np.ndarray:
    assert frames, "no frames"
    for f in frames:
        assert (f.sample_rate, f.num_channels) == (LIVEKIT_RATE, 1)
    return np.concatenate([np.frombuffer(f.data, dtype=np.int16) for f in frames])


def test_livekit_pcm_frames_are_the_servers_pcm(url: str, server_pcm: np.ndarray) -> None:
    frames, request_id = asyncio.run(_synthesize(url, "tts-1", "pcm"))
    got, n = _samples(frames), len(server_pcm)
    assert n == round((TOKENS - 1) * 2048 * LIVEKIT_RATE / 32000)
    # The plugin cuts the bytes into fixed frames and pads the last one with silence. The samples are
    # the server's up to rounding: its streaming windows fall where each request's timing puts them,
    # and each decoder call rounds on its own (a sample may land a 16-bit step or two away, as in
    # test_page); a dropped, repeated or resampled piece would be far off.
    diff = np.abs(got[:n].astype(np.int32) - server_pcm.astype(np.int32))
    print(f"livekit pcm vs the server's: max diff {int(diff.max())} LSB, "
          f"{int(np.count_nonzero(diff))} of {n} samples differ")
    assert int(diff.max()) <= 2, (int(diff.max()), int(np.count_nonzero(diff)))
    assert not got[n:].any() and len(got) - n <= frames[-1].samples_per_channel
    assert request_id.startswith("req_")  # the server's x-request-id reached the plugin


@pytest.mark.parametrize("model, response_format", [("tts-1", "wav"), ("tts-1", "mp3"), ("tts-1", "flac"),
                                                    ("tts-1", "opus"), ("tts-1", "aac"),
                                                    ("gpt-4o-mini-tts", "pcm"), ("gpt-4o-mini-tts", "mp3")])
def test_livekit_frames_in_every_format_and_sse(url: str, server_pcm: np.ndarray, model: str,
                                                response_format: str) -> None:
    """tts-1 streams the audio bytes; gpt-4o-mini-tts makes the plugin ask for SSE."""
    got = _samples(asyncio.run(_synthesize(url, model, response_format))[0])
    short = 0
    if response_format == "flac":
        # The plugin's stream decoder drops the stream's last FLAC frame (4096 samples at 32 kHz);
        # PyAV and libsndfile decode all of it from the same bytes (test_server's every-format test).
        short = 4096 * LIVEKIT_RATE // 32000
    tol = 0.01 * LIVEKIT_RATE if response_format in ("pcm", "wav", "flac") else 0.06 * LIVEKIT_RATE  # codec padding
    assert abs(len(got) + short - len(server_pcm)) <= tol, (len(got), len(server_pcm))
    assert np.abs(got.astype(np.int32)).max() > 0
