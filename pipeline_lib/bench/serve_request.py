"""One request of the server load benchmark, measured: what it asks (the texts, the body), what it
gets (audio samples counted from a pcm or WAV stream, when each piece arrived), and what a listener
playing it would hear (`stall_s`, `longest_stall_s`). The closed and open loops
(pipeline_lib.bench.serve_drivers) post these; pipeline_lib.bench.serve_summary sums them up.

Random weights never emit [STOP]: every sentence runs to `max_new_tokens` tokens, so a complete
response holds exactly (max_new_tokens - 1) * samples_per_token samples per sentence (the decoder's
rule, see pipeline_lib.runtime.tts); one with any other length counts as an error (`incomplete`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

from pipeline_lib.errors import InputError

log = logging.getLogger(__name__)

SPEECH_PATH = "/v1/audio/speech"
OURS, UPSTREAM = "ours", "upstream"  # the servers the benchmark loads
SERVERS = (OURS, UPSTREAM)
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
# Long texts (LONG_SENTENCES or more sentences each, every one at least 30 characters): the open
# loop's mixed load draws one now and then (pipeline_lib.bench.serve_drivers.OpenLoopSettings.long_share).
LONG_TEXTS = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk. He wound the great clock and "
    "polished the heavy brass lens until it shone. Ships far out at sea watched for its steady white beam. "
    "In the morning he wrote the weather in a thick leather book.",
    "Our village holds a market in the square every Saturday morning. Farmers bring baskets of apples, pears "
    "and fresh eggs from the hills. A fiddler plays old tunes beside the fountain for anyone who stops. By "
    "noon the stalls are empty and the pigeons take over the cobbles. Children chase them until their parents "
    "call them home for lunch.",
    "The expedition set out before sunrise with three mules and a guide. They followed the dry riverbed until "
    "the cliffs rose high on both sides. At midday they rested in the shade of a giant rock arch. The guide "
    "told stories of travellers who had lost their way in the canyon.",
)
LONG_SENTENCES = 3  # a text of this many sentences or more is long


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


class RequestSettings(Protocol):
    """What a request needs from the loop's settings (LoadSettings, OpenLoopSettings)."""

    texts: Sequence[str]
    max_new_tokens: int


def request_body(target: Target, text: str, settings: RequestSettings, geometry: AudioGeometry) -> dict[str, Any]:
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


async def one_request(client: Any, target: Target, text_index: int, settings: RequestSettings,
                      geometry: AudioGeometry, out: list[RequestResult],
                      player_buffer_s: float | None = None) -> RequestResult:
    """Post `settings.texts[text_index]`, stream its body, check its length; the result is in `out`
    from the start (a request cancelled at the level's end is marked `cut` there, with the audio it
    had received). `player_buffer_s`: None reads the body as fast as it comes; a number reads it
    like a player playing from its first audio byte with that much buffer: after each piece it
    waits while more than `player_buffer_s` of audio is ahead of playback (so the server sees a
    client reading at real-time pace; the wait never makes the listener run dry)."""
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
                play_end = 0.0  # perf_counter when the audio read so far has played (paced reading)
                async for chunk in resp.aiter_raw():
                    if body.feed(chunk) > 0:
                        now = time.perf_counter()
                        if res.first_audio_s is None:
                            res.first_audio_s = now - res.started
                        added = body.samples - (res.arrivals[-1][1] if res.arrivals else 0)
                        res.arrivals.append((now, body.samples))
                        if player_buffer_s is not None:
                            play_end = max(play_end, now) + added / geometry.sample_rate
                            ahead = play_end - time.perf_counter()
                            if ahead > player_buffer_s:
                                await asyncio.sleep(ahead - player_buffer_s)
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


def _waits(arrivals: Sequence[tuple[float, int]], sample_rate: int, until: float | None = None) -> Iterator[float]:
    """Each wait of a listener who plays the body from its first audio byte on, pausing whenever it
    runs out: one per underrun, in seconds. `until`: when the body was cut (a request still running
    at a level's end); a listener whose audio had run out by then is waiting, and that wait counts."""
    play_end, prev = None, 0
    for t, n in arrivals:
        if play_end is None:
            play_end = t
        elif t > play_end:
            yield t - play_end
            play_end = t
        play_end += (n - prev) / sample_rate
        prev = n
    if until is not None and play_end is not None and until > play_end:
        yield until - play_end


def stall_s(arrivals: Sequence[tuple[float, int]], sample_rate: int, until: float | None = None) -> float:
    """Seconds a listener playing the body from its first audio byte on (pausing whenever it runs
    out) would have waited for audio: the underruns of a streamed response, in total (`until`: see
    `_waits`)."""
    return float(sum(_waits(arrivals, sample_rate, until)))


def longest_stall_s(arrivals: Sequence[tuple[float, int]], sample_rate: int, until: float | None = None) -> float:
    """The longest single wait of that listener (0.0: it never ran dry)."""
    return max(_waits(arrivals, sample_rate, until), default=0.0)
