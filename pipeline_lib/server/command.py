"""`soprano-onnx serve`: the OpenAI-compatible speech server (pipeline_lib.server.app) under uvicorn.

Loopback only unless --host says otherwise. The model loads in the background after the port is
open: GET /health answers 503 until it is ready. A model that fails to load stops the server with
exit status 2.

SIGTERM or Ctrl+C: at once GET /health answers 503 (readiness fails, so a load balancer stops
sending) and new requests get 503 `shutting_down` with `Connection: close`, while the responses in
flight go on. After --drain-seconds the listener closes (uvicorn's graceful shutdown: idle
connections close, the responses in flight still finish), the scheduler drains, and the process
exits (uvicorn then re-raises the signal, so the exit status says which one). A second signal
skips the rest of the drain period.

Every request gets an access log line (logger pipeline_lib.server.access) with its x-request-id;
uvicorn's own access log is off.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys
import threading
from pathlib import Path

from pipeline_lib.errors import InputError
from pipeline_lib.runtime.command import ranged


DEFAULT_DRAIN_S = 5.0

# The kernel send buffer of every accepted connection (inherited from the listening socket; a set
# SO_SNDBUF also turns Linux's send-buffer autotuning off for them). Audio the kernel holds for a
# client counts as read (the response's writer got rid of it), so this bounds how far a client that
# reads nothing can fall behind beyond the scheduler's max_unread_s; autotuned, it grows to
# net.ipv4.tcp_wmem's maximum (4 MiB by default: about 85 s of 24 kHz pcm). Linux doubles the value
# for its bookkeeping. The price: one connection carries at most about one buffer per round trip
# (docs/design.md, "A stuck reader": what it holds, and the throughput it allows).
SEND_BUFFER_BYTES = 32 * 1024


port_number = ranged(int, lambda v: 1 <= v <= 65535, "a port number 1..65535")
seconds = ranged(float, lambda v: 0 <= v < math.inf, "seconds >= 0")


def token_count(text: str) -> int:
    """argparse type: audio tokens per sentence, 1 to the runtime's MAX_NEW_TOKENS."""
    from pipeline_lib.server.schemas import MAX_NEW_TOKENS

    return ranged(int, lambda v: 1 <= v <= MAX_NEW_TOKENS, f"a whole number 1..{MAX_NEW_TOKENS}")(text)


def listen(host: str, port: int, send_buffer: int = SEND_BUFFER_BYTES) -> socket.socket:
    """The bound listening socket (before the model loads), or InputError naming why not. Its
    connections get a kernel send buffer of `send_buffer` bytes (SEND_BUFFER_BYTES)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; check --host") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        sock.bind(address)
        sock.set_inheritable(True)
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port or --host "
                         "(or stop what uses it)") from None
    return sock


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pipeline_lib.runtime.command import add_model_choice_arguments, positive_int

    p.add_argument("--model", type=Path, required=True,
                   help="export folder (soprano-onnx export --out DIR) or pipeline folder with lm/ and decoder/")
    add_model_choice_arguments(p, "the fastest for this CPU for batches")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="intra-op threads (default: the physical cores this process may use, cgroup quota included)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=port_number, default=8000, help="port, 1..65535 (default: 8000)")
    p.add_argument("--max-batch", type=positive_int, default=None,
                   help="rows (sentences) decoded together at most (default: the scheduler's)")
    p.add_argument("--max-queue", type=positive_int, default=None,
                   help="requests waiting at most; more get 429 with Retry-After (default: the scheduler's)")
    p.add_argument("--api-key", default=os.environ.get("SOPRANO_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $SOPRANO_API_KEY; none: open)")
    p.add_argument("--max-input-chars", type=positive_int, default=None,
                   help="longest input in characters (default: 4096, as OpenAI)")
    p.add_argument("--max-body-bytes", type=positive_int, default=None,
                   help="largest request body; more get 413 (default: 12 bytes per input character + 16 KiB)")
    p.add_argument("--max-new-tokens", type=token_count, default=None,
                   help="audio tokens per sentence at most, and the default of requests that leave it out (default: 512)")
    p.add_argument("--drain-seconds", type=seconds, default=DEFAULT_DRAIN_S,
                   help="after SIGTERM: how long /health and new requests get 503 before the listener closes; "
                        f"requests in flight finish either way (default: {DEFAULT_DRAIN_S:g})")
    from pipeline_lib.runtime.rules import DEFAULT_GUARD, HOLDBACKS, MAX_RETRIES

    p.add_argument("--hallucination-guard", action="store_true", default=DEFAULT_GUARD.enabled,
                   help="run the hallucination guard for requests that leave hallucination_guard out (default: off)")
    p.add_argument("--hallucination-retries", type=ranged(int, lambda v: 0 <= v <= MAX_RETRIES, f"an int in 0..{MAX_RETRIES}"), default=DEFAULT_GUARD.retries,
                   help=f"retries of a flagged sentence for requests that leave it out, 0..{MAX_RETRIES}; > 0 turns "
                        f"the guard on (default: {DEFAULT_GUARD.retries})")
    p.add_argument("--holdback", choices=HOLDBACKS, default=DEFAULT_GUARD.holdback,
                   help="what a guarded stream holds back: 'clean' (audio the guard can no longer flag) or "
                        f"'sentence' (each sentence until it ends) (default: {DEFAULT_GUARD.holdback})")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from pipeline_lib.runtime.command import BACKEND_CHOICES, check_model_choice
    from pipeline_lib.runtime.bundle import resolve
    from pipeline_lib.server.app import create_app
    from pipeline_lib.server.settings import DEFAULT_MAX_INPUT_CHARS, Settings

    args.model = resolve(args.model)  # a hub id ("owner/name") -> its downloaded folder
    if not args.model.is_dir():
        raise InputError(f"{args.model}: model folder not found; pass an export folder (soprano-onnx export --out DIR)")
    server: uvicorn.Server | None = None

    def stop(exc: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    check_model_choice(args)  # before the port opens
    settings = Settings(
        model=args.model, backend=BACKEND_CHOICES[args.backend or "onnx"], precision=args.precision,
        threads=args.threads, max_batch=args.max_batch,
        max_queue=args.max_queue, api_key=args.api_key,
        max_input_chars=args.max_input_chars if args.max_input_chars is not None else DEFAULT_MAX_INPUT_CHARS,
        max_body_bytes=args.max_body_bytes, on_load_error=stop,
        hallucination_guard=args.hallucination_guard, hallucination_retries=args.hallucination_retries,
        holdback=args.holdback,
        **({"max_new_tokens": args.max_new_tokens} if args.max_new_tokens is not None else {}),
    )
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    app = create_app(settings)
    service = app.state.service

    log = logging.getLogger("pipeline_lib.server")

    class Server(uvicorn.Server):
        drain: threading.Timer | None = None

        def handle_exit(self, sig: int, frame: object) -> None:
            first = service.status != "draining"
            service.begin_draining()
            if first and args.drain_seconds > 0 and self.started:
                log.info("signal %d: draining for %g s (/health and new requests: 503), then closing", sig,
                         args.drain_seconds)
                self.drain = threading.Timer(args.drain_seconds, super().handle_exit, (sig, frame))
                self.drain.daemon = True
                self.drain.start()
                return
            if self.drain is not None:
                self.drain.cancel()
            super().handle_exit(sig, frame)  # type: ignore[arg-type]

    sock = listen(args.host, args.port)
    host = f"[{args.host}]" if ":" in args.host else args.host
    log.info("listening on http://%s:%d (the model loads in the background; GET /health says when it is ready)",
             host, args.port)
    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if service.status == "failed":
        print(f"error: the model failed to load: {service.error}", file=sys.stderr)
        return 2
    return 0
