"""Audio for HTTP responses: float32 chunks at the model's rate -> bytes of one response format,
chunk by chunk, so that bytes go out while the audio is still being generated.

Formats (OpenAI's `response_format` names): `mp3` (CBR), `opus` (Ogg Opus), `flac`, `wav` (16-bit),
`pcm` (headerless 16-bit little-endian mono), `aac` (ADTS). Encoders are libraries, never our own
code: libsndfile (soundfile) for mp3, opus and flac, PyAV (FFmpeg) for aac, which libsndfile lacks.
The one thing written here is the 44-byte header of a streamed WAV (see `WavEncoder`).

libsndfile writes to an OS pipe, which it recognises as a stream: it then writes each format's
stream form itself (an MP3 without the Xing/Info frame it could only fill in by seeking back, a FLAC
whose STREAMINFO says "total samples: unknown"). Through a seekable file it would leave those
placeholders unfilled, since the bytes are already sent when it seeks back to patch them.

Sample rates: `sample_rate` (any of `SAMPLE_RATES`; Opus only `OPUS_SAMPLE_RATES`) resamples with
soxr, streaming. Defaults: the model's own rate, except `pcm` at 24 kHz (`PCM_DEFAULT_RATE`: OpenAI's
pcm is 24 kHz and its clients play it so; the header-less bytes cannot say otherwise) and `opus` at
48 kHz (Opus's own rate; libsndfile's Ogg Opus takes 8, 12, 16, 24 or 48 kHz only).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from pipeline_lib.errors import InputError

__all__ = [
    "AudioFormat",
    "EXTENSIONS",
    "FORMATS",
    "format_of_file",
    "SAMPLE_RATES",
    "OPUS_SAMPLE_RATES",
    "PCM_DEFAULT_RATE",
    "StreamEncoder",
    "open_stream",
    "to_pcm16",
]

SAMPLE_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)  # MPEG, AAC, WAV, FLAC all take these
OPUS_SAMPLE_RATES = (8000, 12000, 16000, 24000, 48000)
PCM_DEFAULT_RATE = 24000
OPUS_DEFAULT_RATE = 48000
# libsndfile's MP3 quality scale (0 = 320 kbit/s ... 1 = 32 kbit/s); 0.65 is 128 kbit/s at 32 kHz.
MP3_COMPRESSION_LEVEL = 0.65
AAC_BIT_RATE = 64000
# libsndfile holds Ogg Opus audio for up to a second per page by default; shorter pages stream sooner.
OGG_PAGE_LATENCY_MS = 100.0
_SFC_SET_OGG_PAGE_LATENCY_MS = 0x1302  # sndfile.h; soundfile does not expose this command
# Samples per libsndfile write: what one write encodes must fit in the pipe (the reader is this thread).
_WRITE_BLOCK = 4096
_PIPE_SIZE = 1 << 20


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    """float32 [-1, 1] -> int16 little-endian, as `pipeline_lib.runtime.tts.write_wav` rounds."""
    return np.round(np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0) * 32767.0).astype("<i2")


class Encoder:
    """One response's encoder: `write` 16-bit samples at its rate, `finish` once, `close` always."""

    def write(self, pcm: np.ndarray) -> bytes:
        raise NotImplementedError

    def finish(self) -> bytes:
        return b""

    def close(self) -> None:
        """Release files and codecs; safe after finish and more than once."""


class PcmEncoder(Encoder):
    def write(self, pcm: np.ndarray) -> bytes:
        return pcm.tobytes()


class WavEncoder(PcmEncoder):
    """16-bit mono WAV of unknown length: RIFF and data sizes 0xFFFFFFFF, the streaming convention
    that libsndfile, Python's wave, FFmpeg and browsers read to the end of the data. Written here
    because libsndfile cannot stream a WAV: it refuses to write WAV to a pipe, and through a seekable
    file its header says 0 bytes of data until it seeks back at close, which a sent stream cannot
    take (a reader then sees an empty file)."""

    UNKNOWN = 0xFFFFFFFF

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self._header_sent = False

    def header(self) -> bytes:
        fmt = struct.pack("<HHIIHH", 1, 1, self.sample_rate, self.sample_rate * 2, 2, 16)  # PCM, mono, 16-bit
        return (b"RIFF" + struct.pack("<I", self.UNKNOWN) + b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
                + b"data" + struct.pack("<I", self.UNKNOWN))

    def _head(self) -> bytes:
        if self._header_sent:
            return b""
        self._header_sent = True
        return self.header()

    def write(self, pcm: np.ndarray) -> bytes:
        return self._head() + pcm.tobytes()

    def finish(self) -> bytes:
        return self._head()


class SndfileEncoder(Encoder):
    """libsndfile through an OS pipe (see the module docstring); both ends non-blocking, so a full
    pipe is an error, never a deadlock. With `path`, libsndfile writes that (seekable) file instead,
    headers complete (a FLAC's STREAMINFO with its length), and `write` / `finish` return b""."""

    def __init__(self, sample_rate: int, format: str, subtype: str, page_latency_ms: float | None = None,
                 path: str | None = None, **options: Any) -> None:
        import soundfile as sf

        self._r = self._w = -1
        if path is None:
            self._r, self._w = os.pipe()
            for fd in (self._r, self._w):
                os.set_blocking(fd, False)
            try:
                import fcntl

                fcntl.fcntl(self._w, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
            except (ImportError, AttributeError, OSError):
                pass  # the default pipe size holds one _WRITE_BLOCK's output too
        try:
            self._file: Any = sf.SoundFile(self._w if path is None else path, mode="w", samplerate=sample_rate,
                                           channels=1, format=format, subtype=subtype,
                                           **({"closefd": False} if path is None else {}), **options)
        except Exception:
            self.close()
            raise
        if page_latency_ms is not None:
            latency = sf._ffi.new("double[1]", [page_latency_ms])
            sf._snd.sf_command(self._file._file, _SFC_SET_OGG_PAGE_LATENCY_MS, latency, sf._ffi.sizeof(latency))

    def _drain(self) -> bytes:
        if self._r < 0:
            return b""
        parts = []
        while True:
            try:
                b = os.read(self._r, _PIPE_SIZE)
            except BlockingIOError:
                break
            if not b:
                break
            parts.append(b)
        return b"".join(parts)

    def write(self, pcm: np.ndarray) -> bytes:
        out = [self._drain()]
        for start in range(0, len(pcm), _WRITE_BLOCK):
            self._file.write(pcm[start:start + _WRITE_BLOCK])
            out.append(self._drain())
        return b"".join(out)

    def finish(self) -> bytes:
        self._file.close()
        if self._w >= 0:
            os.close(self._w)
            self._w = -1
        return self._drain()

    def close(self) -> None:
        f = getattr(self, "_file", None)
        if f is not None and not f.closed:
            try:
                f.close()
            except Exception:  # noqa: BLE001 - a full pipe at close: the response is being dropped anyway
                pass
        for name in ("_w", "_r"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


class _Collect:
    """The write-only file PyAV muxes into; without `seek`, FFmpeg treats it as a stream."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        out, self.parts = b"".join(self.parts), []
        return out


class AacEncoder(Encoder):
    """AAC-LC in ADTS (each frame carries its own header, so the stream needs no index), by FFmpeg's
    native encoder through PyAV."""

    def __init__(self, sample_rate: int) -> None:
        import av

        self._av = av
        self._sink = _Collect()
        self._container: Any = av.open(self._sink, mode="w", format="adts")
        self._stream: Any = self._container.add_stream("aac", rate=sample_rate, layout="mono")
        self._stream.bit_rate = AAC_BIT_RATE
        self.sample_rate = sample_rate
        self._pts = 0

    def _mux(self, frame: Any) -> bytes:
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        return self._sink.take()

    def write(self, pcm: np.ndarray) -> bytes:
        if len(pcm) == 0:
            return b""
        frame = self._av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm, dtype="<i2")[None, :], format="s16", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self._pts
        self._pts += len(pcm)
        return self._mux(frame)

    def finish(self) -> bytes:
        out = self._mux(None)
        self._container.close()
        self._container = None
        return out + self._sink.take()

    def close(self) -> None:
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # noqa: BLE001 - dropping an unfinished response
                pass
            self._container = None


@dataclass(frozen=True)
class AudioFormat:
    """One `response_format`: its content type, the sample rates it takes, its default rate (None:
    the model's) and how to make its encoder; `make_file` (None: the stream form is the file form)
    makes one that writes a seekable file itself."""

    name: str
    content_type: str
    sample_rates: tuple[int, ...]
    default_rate: int | None
    make: Callable[[int], Encoder]
    make_file: Callable[[int, str], Encoder] | None = None

    def sample_rate(self, requested: int | None, model_rate: int) -> int:
        """The output rate for a request (`requested` None: the default); InputError if unsupported."""
        rate = requested if requested is not None else (self.default_rate or model_rate)
        if rate not in self.sample_rates and not (requested is None and rate == model_rate):
            raise InputError(
                f"sample_rate {rate} is not supported for response_format {self.name!r}: "
                f"choose one of {', '.join(map(str, self.sample_rates))}"
            )
        return rate


def _mp3(sr: int, path: str | None = None) -> Encoder:
    return SndfileEncoder(sr, "MP3", "MPEG_LAYER_III", path=path, compression_level=MP3_COMPRESSION_LEVEL,
                          bitrate_mode="CONSTANT")


def _opus(sr: int, path: str | None = None) -> Encoder:
    return SndfileEncoder(sr, "OGG", "OPUS", page_latency_ms=OGG_PAGE_LATENCY_MS, path=path)


def _flac(sr: int, path: str | None = None) -> Encoder:
    return SndfileEncoder(sr, "FLAC", "PCM_16", path=path)


FORMATS: dict[str, AudioFormat] = {
    f.name: f
    for f in (
        AudioFormat("mp3", "audio/mpeg", SAMPLE_RATES, None, _mp3, _mp3),
        AudioFormat("opus", "audio/ogg; codecs=opus", OPUS_SAMPLE_RATES, OPUS_DEFAULT_RATE, _opus, _opus),
        AudioFormat("aac", "audio/aac", SAMPLE_RATES, None, AacEncoder),
        AudioFormat("flac", "audio/flac", SAMPLE_RATES, None, _flac, _flac),
        AudioFormat("wav", "audio/wav", SAMPLE_RATES, None, WavEncoder),
        AudioFormat("pcm", "audio/pcm", SAMPLE_RATES, PCM_DEFAULT_RATE, lambda sr: PcmEncoder()),
    )
}


class StreamEncoder:
    """float32 chunks at `in_rate` -> encoded bytes at `out_rate` (soxr's streaming resampler in
    between when the rates differ). `write` returns what is ready (possibly b""), `finish` the rest;
    `close` releases the encoder whether or not it finished. With `path`, a format that has a
    `make_file` writes that file itself (and returns b""); the others return their bytes."""

    def __init__(self, fmt: AudioFormat, in_rate: int, out_rate: int, path: str | None = None) -> None:
        self.format, self.in_rate, self.out_rate = fmt, in_rate, out_rate
        self._resampler: Any = None
        if in_rate != out_rate:
            import soxr

            self._resampler = soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality="HQ")
        self._encoder = fmt.make_file(out_rate, path) if path is not None and fmt.make_file else fmt.make(out_rate)

    def write(self, audio: np.ndarray) -> bytes:
        audio = np.asarray(audio, dtype=np.float32)
        if self._resampler is not None:
            audio = self._resampler.resample_chunk(audio, last=False)
        return self._encoder.write(to_pcm16(audio))

    def finish(self) -> bytes:
        tail = b""
        if self._resampler is not None:
            tail = self._encoder.write(to_pcm16(self._resampler.resample_chunk(np.zeros(0, np.float32), last=True)))
        return tail + self._encoder.finish()

    def close(self) -> None:
        self._encoder.close()


def open_stream(response_format: str, in_rate: int, sample_rate: int | None = None) -> StreamEncoder:
    """The encoder for one response (InputError for an unknown format or an unsupported rate)."""
    fmt = FORMATS.get(response_format)
    if fmt is None:
        raise InputError(f"response_format {response_format!r} is not supported: choose one of {', '.join(FORMATS)}")
    return StreamEncoder(fmt, in_rate, fmt.sample_rate(sample_rate, in_rate))


# File name extensions -> response_format (`soprano-onnx speak -o`).
EXTENSIONS = {".wav": "wav", ".flac": "flac", ".mp3": "mp3", ".ogg": "opus", ".opus": "opus", ".aac": "aac"}


def format_of_file(path: os.PathLike[str] | str) -> AudioFormat:
    """The format a file name's extension names (InputError for another extension)."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in EXTENSIONS:
        raise InputError(f"{os.fspath(path)}: the extension {ext or '(none)'!r} names no audio format this writes: "
                         f"use {', '.join(EXTENSIONS)}")
    return FORMATS[EXTENSIONS[ext]]
