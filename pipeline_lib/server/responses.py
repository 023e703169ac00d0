"""The speech endpoint's streamed responses: `JobResponse` (a job's audio, cancelled when the client goes away,
released at the end; a guarded job's status and headers wait for its first audio), and the two bodies it
streams: `audio_stream` (the response_format's bytes) and `sse_stream` (OpenAI's speech events). Audio goes
to the ASGI server in pieces of at most `_PIECE_BYTES`, so what counts as read stays bounded."""

from __future__ import annotations

import base64
import json
import logging
import math
from typing import Any, AsyncIterator, Iterator

import anyio
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pipeline_lib.audio.encode import StreamEncoder
from pipeline_lib.runtime.scheduler import JobCancelled, SpeechJob
from pipeline_lib.server.schemas import error_body

__all__ = ["GUARD_HEADERS", "JobResponse", "audio_stream", "sse_stream"]

log = logging.getLogger("pipeline_lib.server")  # the server's one log, as app.py's


GUARD_HEADERS = ("x-soprano-hallucinations", "x-soprano-hallucination-retries")


class JobResponse(StreamingResponse):
    """Streams a job's encoded audio; cancels the job when the client goes away (an
    `http.disconnect` while waiting, or a failed send) and always releases it at the end.

    With the hallucination guard on for the job, the status and headers go out with the first body
    bytes (or at the end of a job with none), so they can say what the guard did before the audio
    began (GUARD_HEADERS: flagged sentences, retries); the client waits for those bytes either way.
    Without it they go out at once (a queued request's client sees its 200 before its turn), with 0s."""

    def __init__(self, job: SpeechJob, content: AsyncIterator[bytes], service: Any, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.job, self.service = job, service

    async def stream_response(self, send: Send) -> None:
        first: bytes | None = b""
        if self.job.request.guard.enabled:
            try:
                first = await self.body_iterator.__anext__()  # type: ignore[attr-defined]
            except StopAsyncIteration:
                first = None
        for name, value in zip(GUARD_HEADERS, (self.job.hallucinations, self.job.retries)):
            self.raw_headers.append((name.encode("latin-1"), str(value).encode("latin-1")))
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        if first is not None:
            if first:
                await send({"type": "http.response.body", "body": first, "more_body": True})
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.service.metrics.speech_started()
        try:
            async with anyio.create_task_group() as tg:

                async def watch_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    self.job.cancel()
                    tg.cancel_scope.cancel()

                tg.start_soon(watch_disconnect)
                try:
                    await self.stream_response(send)
                except OSError:
                    pass  # the client closed the connection while we were sending
                except Exception as exc:  # noqa: BLE001 - the status is sent; end without the closing chunk
                    if not isinstance(exc, JobCancelled):
                        log.error("speech job failed mid-response: %s: %s", type(exc).__name__, exc, exc_info=exc)
                tg.cancel_scope.cancel()
        finally:
            abandoned = not self.job.done
            self.job.cancel()
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            self.service.metrics.speech_ended(cancelled=abandoned)


# The most bytes of audio handed to the ASGI server at once. uvicorn checks its flow control
# (a 64 KiB write buffer) before each write, not after, so a window of several seconds written in one
# piece would sit in its buffer counted as read (SpeechJob._took); pieces keep that bound.
_PIECE_BYTES = 12 * 1024


def _pieces(data: bytes) -> Iterator[bytes]:
    for i in range(0, len(data), _PIECE_BYTES):
        yield data[i: i + _PIECE_BYTES]


async def audio_stream(job: SpeechJob, encoder: StreamEncoder) -> AsyncIterator[bytes]:
    try:
        async for chunk in job:
            for piece in _pieces(encoder.write(chunk)):
                yield piece
        for piece in _pieces(encoder.finish()):
            yield piece
    finally:
        encoder.close()


def _sse(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


async def sse_stream(job: SpeechJob, encoder: StreamEncoder, tts: Any) -> AsyncIterator[bytes]:
    """OpenAI's speech events: `speech.audio.delta` (base64 of the response_format's bytes) and a
    closing `speech.audio.done` with usage (input_tokens: the text's prompt tokens; output_tokens:
    audio tokens) and the hallucination guard's counts (hallucinations: flagged sentences,
    hallucination_retries: retries made); a job that fails ends with an `error` event."""

    def delta(data: bytes) -> bytes:
        return _sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")})

    try:
        async for chunk in job:
            for piece in _pieces(encoder.write(chunk)):
                yield delta(piece)
        for piece in _pieces(encoder.finish()):
            yield delta(piece)
        _, ids = await run_in_threadpool(tts.prepare, [job.request.text])
        input_tokens = sum(len(i) for i in ids)
        output_tokens = job.tokens or math.ceil(job.samples / tts.samples_per_token)
        yield _sse({"type": "speech.audio.done", "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens,
                                                           "total_tokens": input_tokens + output_tokens},
                    "hallucinations": job.hallucinations, "hallucination_retries": job.retries})
    except JobCancelled:
        raise
    except Exception as exc:  # noqa: BLE001 - reported to the client as an event
        log.error("speech job failed mid-stream: %s: %s", type(exc).__name__, exc, exc_info=exc)
        yield _sse({"type": "error", **error_body(f"speech generation failed: {exc}", "server_error")})
    finally:
        encoder.close()
