"""`soprano-onnx serve`: the OpenAI-compatible speech server (pipeline_lib.server.app) under uvicorn.

Loopback only unless --host says otherwise. The model loads in the background after the port is
open: GET /health answers 503 until it is ready. SIGTERM or Ctrl+C: /health and new requests get
503, the responses in flight finish (uvicorn's graceful shutdown), the scheduler drains, the process
exits (uvicorn then re-raises the signal, so the exit status says which one). A model that fails to
load stops the server with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline_lib.errors import InputError


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pipeline_lib.runtime.command import add_model_choice_arguments

    p.add_argument("--model", type=Path, required=True,
                   help="export folder (soprano-onnx export --out DIR) or pipeline folder with lm/ and decoder/")
    add_model_choice_arguments(p, "the fastest for this CPU for batches")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the physical cores this process may use, cgroup quota included)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--max-batch", type=int, default=None, help="rows (sentences) decoded together at most (default: the scheduler's)")
    p.add_argument("--max-queue", type=int, default=None,
                   help="requests waiting at most; more get 429 with Retry-After (default: the scheduler's)")
    p.add_argument("--api-key", default=os.environ.get("SOPRANO_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $SOPRANO_API_KEY; none: open)")
    p.add_argument("--max-input-chars", type=int, default=None, help="longest input in characters (default: 4096, as OpenAI)")
    p.add_argument("--max-body-bytes", type=int, default=None,
                   help="largest request body; more get 413 (default: 12 bytes per input character + 16 KiB)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from pipeline_lib.runtime.command import BACKEND_CHOICES, check_model_choice
    from pipeline_lib.server.app import DEFAULT_MAX_INPUT_CHARS, Settings, create_app

    from pipeline_lib.runtime.bundle import resolve

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
    )
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    app = create_app(settings)
    service = app.state.service

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: object) -> None:
            service.begin_draining()
            super().handle_exit(sig, frame)  # type: ignore[arg-type]

    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))
    server.run()
    if service.status == "failed":
        print(f"error: the model failed to load: {service.error}", file=sys.stderr)
        return 2
    return 0
