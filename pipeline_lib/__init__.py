"""soprano-onnx: build, verify and run CPU inference artifacts of the Soprano TTS model."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["SopranoTTS", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `import pipeline_lib.checkpoint` does not pull in the runtime and vice versa.
    if name == "SopranoTTS":
        from pipeline_lib.runtime.tts import SopranoTTS

        return SopranoTTS
    raise AttributeError(name)
