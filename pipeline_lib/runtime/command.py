"""`soprano-onnx speak`: text -> an audio file with an exported model folder.

The output's extension names its format: .wav (16-bit PCM at the model's 32 kHz), .flac, .mp3,
.ogg / .opus (Ogg Opus, 48 kHz), .aac (ADTS), encoded by pipeline_lib.audio.encode (the server's
encoders); another extension is an error.

Text comes from the positional argument, from `--text-file F`, or from stdin when the text is `-`.
Heavy imports (numpy, onnxruntime, tokenizers) happen inside `run`, so building the CLI parser
stays cheap.

Checked before anything is synthesised: the output's extension, that it can be written (its folder
exists, it is not a folder, a file can be created there), the numeric options are in range. The file
is written atomically (a temporary file beside it, renamed into place once complete), also with
--stream; a result without audio is an error and writes nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pipeline_lib.errors import InputError
from pipeline_lib.recommend import OBJECTIVES
from pipeline_lib.registry import BACKEND_CHOICES, DECODER_FILE, LM_FILE, TOKENIZER_FILE

if TYPE_CHECKING:
    from pipeline_lib.audio.encode import AudioFormat


def ranged(convert: Callable[[str], Any], ok: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
    """An argparse type: ``convert(text)``, accepted where ``ok(value)``; anything else is a usage error
    "expected EXPECTED, got ..." (one line from argparse, never a traceback)."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


positive_int = ranged(int, lambda v: v >= 1, "a whole number >= 1")  # e.g. --threads


def add_model_choice_arguments(p: argparse.ArgumentParser, auto: str) -> None:
    """--backend and --precision, shared by speak and serve; `auto` says what --precision auto picks."""
    p.add_argument("--backend", choices=sorted(BACKEND_CHOICES), default=None,
                   help="inference backend (default: onnx; with --precision it comes from the precision)")
    p.add_argument("--precision", default=None,
                   help="with a ROOT folder as --model (artifacts/ after dvc repro, or <backend>/<precision>/ folders "
                        f"from `soprano-onnx convert`): 'auto' ({auto}, logged with the reason), a target such as "
                        "onnx-int8, or LM+DECODER such as onnx-int4+openvino-bf16")


def check_model_choice(args: argparse.Namespace) -> None:
    """Before any work: --precision and --backend are not both given, and a named precision is a target or pair."""
    if args.precision is not None and args.backend is not None:
        raise InputError("--precision names the backends (e.g. onnx-int4+openvino-bf16); leave --backend out")
    if args.precision not in (None, "auto"):
        from pipeline_lib.registry import choice

        choice(args.precision)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", nargs="?", help="text to speak; '-' reads it from stdin (UTF-8)")
    p.add_argument("--text-file", type=Path, help="read the text from this UTF-8 file instead")
    p.add_argument("-o", "--output", type=Path, required=True, help="output audio file; its extension names the format: .wav (16-bit PCM, mono), .flac, .mp3, "
                        ".ogg/.opus, .aac")
    p.add_argument("--model", type=Path, required=True,
                   help=f"export folder ({LM_FILE}.onnx, {DECODER_FILE}.onnx, JSON configs, {TOKENIZER_FILE})")
    add_model_choice_arguments(p, "the fastest for this CPU")
    p.add_argument("--objective", choices=OBJECTIVES, default=None,
                   help="what --precision auto optimises (default: first_chunk with --stream, else stream)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="intra-op threads (default: the physical cores this process may use, cgroup quota included)")
    p.add_argument("--stream", action="store_true", help="stream: write audio chunks as they are generated")
    p.add_argument("--chunk-size", type=positive_int, default=1, help="tokens per streamed chunk (with --stream)")
    # Sampling defaults: None here, the library's (SamplingParams, DEFAULT_MAX_NEW_TOKENS) in `run`,
    # so the parser imports no numpy and the values are written once.
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (the default)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default: the library's)")
    p.add_argument("--top-k", type=int, default=None, help="0 = off (the default)")
    p.add_argument("--repetition-penalty", type=float, default=None, help="1 = off (default: the library's)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="audio tokens per sentence (default: the library's)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="sentences per LM batch")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")


def _decode_utf8(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{source}: not valid UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start} ({exc.reason}); "
            "save the text as UTF-8"
        ) from exc


def read_text(args: argparse.Namespace) -> str:
    if args.text_file is not None:
        if args.text is not None:
            raise InputError("give the text either as an argument or with --text-file, not both")
        try:
            data = args.text_file.read_bytes()
        except OSError as exc:
            raise InputError(f"{args.text_file}: cannot read the text file ({exc.strerror or exc})") from exc
        return _decode_utf8(data, str(args.text_file))
    if args.text is None:
        raise InputError("no text: pass it as an argument, with --text-file F, or '-' to read stdin")
    if args.text == "-":
        return _decode_utf8(sys.stdin.buffer.read(), "<stdin>")
    return args.text


def no_audio_error(max_new_tokens: int) -> InputError:
    """Why a synthesis gave no samples: a sentence of n hidden vectors gives n - 1 tokens' worth of audio."""
    if max_new_tokens < 2:
        why = (f"--max-new-tokens {max_new_tokens} gives each sentence one hidden vector, and audio needs at least "
               "two (a sentence of n hidden vectors gives n - 1 tokens of audio)")
    else:
        why = "every sentence ended (the model emitted [STOP]) before its second hidden vector, and audio needs two"
    return InputError(f"no audio to write: {why}; raise --max-new-tokens or change the text. "
                      "Nothing was written.")


def run(args: argparse.Namespace) -> int:
    from pipeline_lib.audio.encode import format_of_file
    from pipeline_lib.fsutil import atomic_file, check_output_file
    from pipeline_lib.runtime.tts import SopranoTTS

    from pipeline_lib.runtime.sampling import DEFAULT_MAX_NEW_TOKENS, DEFAULTS

    for name in ("temperature", "top_p", "top_k", "repetition_penalty"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(DEFAULTS, name))
    if args.max_new_tokens is None:
        args.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    text = read_text(args)
    check_output_file(args.output, "-o/--output")
    fmt = format_of_file(args.output)
    if args.max_new_tokens == 1:  # 0 and > 512: the library's own range error
        raise no_audio_error(1)
    check_model_choice(args)
    if args.objective is not None and args.precision != "auto":
        raise InputError("--objective only applies to --precision auto")
    start = time.perf_counter()
    if args.precision is not None:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        objective = args.objective or ("first_chunk" if args.stream else "stream")
        tts = SopranoTTS.from_dir(args.model, precision=args.precision, objective=objective, num_threads=args.threads)
        print(f"models: {tts.choice.label} (LM {tts.lm_path}, decoder {tts.decoder_path})")
    else:
        tts = SopranoTTS.from_dir(args.model, backend=BACKEND_CHOICES[args.backend or "onnx"], num_threads=args.threads)
    load_s = time.perf_counter() - start
    _check_encoder(fmt, tts.sample_rate, args.output)
    sampling = dict(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens, seed=args.seed,
    )
    t0 = time.perf_counter()
    first_chunk_s = None
    if args.stream:
        chunks = tts.infer_stream(text, chunk_size=args.chunk_size, **sampling)
    else:
        result = tts.synthesize(text, batch_size=args.batch_size, **sampling)
        chunks = iter([result["audio"]])
    samples = 0
    with atomic_file(args.output) as tmp:
        writer = _AudioWriter(tmp, fmt, tts.sample_rate)
        try:
            for chunk in chunks:
                if first_chunk_s is None and args.stream:
                    first_chunk_s = time.perf_counter() - t0
                writer.write(chunk)
                samples += len(chunk)
            if samples == 0:  # inside atomic_file: the empty file is removed, not renamed into place
                raise no_audio_error(args.max_new_tokens)
            writer.finish()
        finally:
            writer.close()
    wall = time.perf_counter() - t0
    audio_s = samples / tts.sample_rate
    print(f"wrote {args.output} ({fmt.name}, {writer.rate} Hz): {audio_s:.2f} s of audio ({samples} samples at "
          f"{tts.sample_rate} Hz)")
    line = f"wall time {wall:.2f} s (model load {load_s:.2f} s), x-real-time {audio_s / wall if wall > 0 else 0.0:.2f}"
    if first_chunk_s is not None:
        line += f", first chunk after {first_chunk_s * 1000:.0f} ms"
    print(line)
    return 0


def _check_encoder(fmt: "AudioFormat", model_rate: int, output: Path) -> None:
    """Open and close the encoder `_AudioWriter` will use, before the synthesis: a runtime-only install
    (`pip install .`) lacks the serve extra's soundfile / av / soxr that .flac, .mp3, .ogg, .aac need."""
    from pipeline_lib.audio.encode import StreamEncoder
    from pipeline_lib.errors import MissingBackendError

    try:
        StreamEncoder(fmt, model_rate, fmt.sample_rate(None, model_rate) if fmt.name != "wav" else model_rate).close()
    except ModuleNotFoundError as exc:
        raise MissingBackendError(f"-o {output}: the Python package {exc.name!r} is not installed, and writing "
                                  f"{fmt.name} needs it: pip install 'soprano-onnx[serve]', or write a .wav") from None


class _AudioWriter:
    """Float chunks at the model's rate -> `path` in `fmt`: WAV through Python's wave (a complete
    header), the other formats through the server's encoders at their default rates (libsndfile's
    writing the file itself, so headers are complete; AAC's ADTS stream as it is)."""

    def __init__(self, path: Path, fmt: "AudioFormat", model_rate: int) -> None:
        from pipeline_lib.audio.encode import StreamEncoder

        self.rate = fmt.sample_rate(None, model_rate) if fmt.name != "wav" else model_rate
        self._file: Any = None
        self._wav: Any = None
        self._encoder: Any = None
        if fmt.make_file is None:  # the bytes go to the file here
            self._file = open(path, "wb")
        if fmt.name == "wav":
            import wave

            self._wav = wave.open(self._file, "wb")
            self._wav.setnchannels(1)
            self._wav.setsampwidth(2)
            self._wav.setframerate(model_rate)
        else:
            self._encoder = StreamEncoder(fmt, model_rate, self.rate, path=str(path))

    def write(self, audio: Any) -> None:
        from pipeline_lib.audio.encode import to_pcm16

        if self._wav is not None:
            self._wav.writeframes(to_pcm16(audio).tobytes())
            return
        data = self._encoder.write(audio)
        if self._file is not None:
            self._file.write(data)

    def finish(self) -> None:
        if self._wav is not None:
            self._wav.close()
            return
        data = self._encoder.finish()
        if self._file is not None:
            self._file.write(data)

    def close(self) -> None:
        if self._encoder is not None:
            self._encoder.close()
        if self._wav is not None:
            self._wav.close()
        if self._file is not None:
            self._file.close()
