"""Upstream's HTTP server (`soprano.server`, from the soprano-tts package) on a local checkpoint, for
the load benchmark: `python -m pipeline_lib.bench.upstream_server --checkpoint DIR --port P ...`.

Upstream's server builds `tts = SopranoTTS(cache_size_mb=100)` when it is imported, which downloads
the model from the Hugging Face hub, and its transformers backend asks `generate()` for 512 new
tokens (random weights never emit [STOP], so every sentence would take all 512). Two patches, both
installed before `soprano.server` is imported and nothing else changed (its route, its WAV encoding,
its blocking call of `tts.infer` inside an async handler are upstream's own):

* `soprano.tts.SopranoTTS` is replaced by a subclass whose constructor forces
  `model_path=<checkpoint>, device="cpu", backend="transformers"` (the other arguments, such as
  `cache_size_mb`, pass through);
* `soprano.backends.transformers.TransformersModel` is replaced by a subclass that, after upstream's
  constructor, wraps its `model.generate` so that every call gets `max_new_tokens=<N>` instead of
  512: the same token count as our server's requests (`max_new_tokens` in the request body).
  Upstream's server calls only `tts.infer` (through `generate`), never its streaming loop, so this
  caps every synthesis, upstream's warm-up in the constructor included.

torch's intra-op pool gets `--threads` threads (`torch.set_num_threads`); the process runs alone,
like our server, so each gets the cores it would have in deployment.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

DEFAULT_MAX_NEW_TOKENS = 64


def install_patches(checkpoint: Path, max_new_tokens: int) -> None:
    """Point upstream's SopranoTTS at `checkpoint` (CPU, transformers) and hold its generate() to
    `max_new_tokens`. Call before importing `soprano.server`."""
    import soprano.backends.transformers as upstream_backend
    import soprano.tts as upstream_tts

    checkpoint = Path(checkpoint).resolve()
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint}: no config.json; pass a checkpoint directory in the upstream layout "
                                "(artifacts/checkpoints/<name>)")
    base_tts = upstream_tts.SopranoTTS
    base_model = upstream_backend.TransformersModel

    class LocalSopranoTTS(base_tts):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.update(model_path=str(checkpoint), device="cpu", backend="transformers")
            super().__init__(*args, **kwargs)

    class CappedTransformersModel(base_model):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            generate = self.model.generate

            def capped_generate(*g_args: Any, **g_kwargs: Any) -> Any:
                g_kwargs["max_new_tokens"] = max_new_tokens
                return generate(*g_args, **g_kwargs)

            self.model.generate = capped_generate

    upstream_tts.SopranoTTS = LocalSopranoTTS
    upstream_backend.TransformersModel = CappedTransformersModel


def load_app(checkpoint: Path, max_new_tokens: int, threads: int) -> Any:
    """Upstream's FastAPI app (`soprano.server.app`), its model loaded from `checkpoint`."""
    import torch

    torch.set_num_threads(threads)
    install_patches(checkpoint, max_new_tokens)
    import soprano.server

    return soprano.server.app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory (upstream layout)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int,
                   default=DEFAULT_MAX_NEW_TOKENS, help="tokens per sentence (replaces upstream's 512)")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing to fetch: the model is local
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import uvicorn

    app = load_app(a.checkpoint, a.max_new_tokens, a.threads)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
