"""What one benchmark configuration is: `BenchConfig` (backend, model files, precision, threads, token
count, text, repeats, streaming, batch), checked when it is made (an InputError names the bad field),
and the texts it measures by default (`DEFAULT_TEXT`, `BATCH_TEXTS`). Read by the engines that run it
(pipeline_lib.bench.engines) and by `measure` (pipeline_lib.bench.measure)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline_lib.bench import row_names
from pipeline_lib.errors import InputError
from pipeline_lib.registry import BACKENDS, BENCH_BACKENDS, PRECISIONS

DEFAULT_TEXT = "The quick brown fox jumps over the lazy dog, then runs back across the quiet green field."
# Eight sentences of 30+ characters each, so the text front end keeps them apart (no merging).
BATCH_TEXTS = (
    "The morning train left the station exactly on time.",
    "She painted the old wooden fence a bright shade of blue.",
    "Rain fell softly on the roof for most of the night.",
    "A small boat drifted slowly toward the distant harbour.",
    "He opened the letter and read it twice before smiling.",
    "The library stays open late on the first Friday of the month.",
    "Fresh bread from the corner bakery filled the street with warmth.",
    "Our guide pointed out three kinds of birds along the river.",
)


@dataclass(frozen=True)
class BenchConfig:
    backend: str
    lm: Path | None
    decoder: Path | None = None
    precision: str = "fp32"
    threads: int = 1
    num_tokens: int = 128
    text: str = DEFAULT_TEXT
    repeats: int = 3
    warmup_tokens: int = 16
    stream: bool = True
    batch_size: int = 8
    # The decoder's backend and precision where they differ from the LM's (a registry.Choice pair such as
    # onnx-int4+openvino-int8); None: the LM's.
    decoder_backend: str | None = None
    decoder_precision: str | None = None

    @property
    def pair(self) -> bool:
        return (self.decoder_backend or self.backend) != self.backend or \
            (self.decoder_precision or self.precision) != self.precision

    @property
    def label(self) -> str:
        """The config column: <backend>-<precision>-t<threads>, or <lm target>+<decoder target>-t<threads>."""
        return f"{row_names(self.backend, self.precision, self.decoder_backend, self.decoder_precision)[0]}-t{self.threads}"

    def __post_init__(self) -> None:
        if self.backend not in BENCH_BACKENDS:
            raise InputError(f"--backend {self.backend!r}: choose one of {', '.join(BENCH_BACKENDS)}")
        if self.pair:
            if self.backend not in BACKENDS or (self.decoder_backend or self.backend) not in BACKENDS:
                raise InputError(f"--decoder_backend: a decoder of its own needs runtime backends ({', '.join(BACKENDS)})")
            if (self.decoder_precision or self.precision) not in PRECISIONS:
                raise InputError(f"--decoder_precision {self.decoder_precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.precision not in PRECISIONS:
            raise InputError(f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        for name in ("threads", "num_tokens", "repeats"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.batch_size <= len(BATCH_TEXTS):
            raise InputError(f"--batch {self.batch_size}: between 0 (off) and {len(BATCH_TEXTS)}")
        if self.backend != "upstream" and self.lm is None:
            raise InputError(f"--backend {self.backend} needs --lm")
        if self.backend in BACKENDS and self.decoder is None:
            raise InputError(f"--backend {self.backend} needs --decoder")
