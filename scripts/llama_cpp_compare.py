"""Our LM decode step against llama.cpp's on the same checkpoint, by hand (llama-cpp-python has no
prebuilt wheel for most CPUs: building it took ~21 minutes on 2 cores, too long for CI).

    # 1. once: build llama-cpp-python for this CPU, and get llama.cpp's converter (same release)
    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python sentencepiece   # the converter imports sentencepiece; it uses its own gguf-py
    pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/llama-src && tar xf /tmp/llama-src/*.tar.gz -C /tmp/llama-src
    # 2. convert, quantise, time (alternating fresh processes, as scripts/lm_peer_step.py)
    python scripts/llama_cpp_compare.py --checkpoint artifacts/checkpoints/random-80m \
        --converter /tmp/llama-src/llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py \
        --ours int4=artifacts/onnx/int4/lm --ours int8=artifacts/onnx/int8/lm [--threads 2] [--rounds 6]
    # the prompt's prefill instead of the step (the first chunk's largest part): --prefill --prompt 71 --steps 10

Steps: `convert_hf_to_gguf.py` writes the checkpoint (the fetch stage's transformers layout) as an f32 GGUF;
llama.cpp's own quantiser (`llama_cpp.llama_model_quantize`) writes Q4_0 and Q8_0 (all tensors, as
llama.cpp's defaults do); each engine then decodes `--steps` greedy tokens after a `--prompt`-token
prompt, one row, `--threads` threads, after a 20-step warm-up, in its own fresh process per round
(alternating order). llama.cpp's stop token is never chosen (the loop takes the argmax itself and
feeds it back, like ours). Prints medians, ranges and each engine's median per-round ratio to the
first --ours engine. Put the figures, the CPU and the versions in docs/design.md ("The LM step beside
its peers").
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pipeline_lib.bench.peer import PREFILL_FUNCTIONS, STEP_FUNCTIONS, WARMUP_STEPS, median_ms, prompt_ids

# llama.cpp's llama_ftype values (llama.h): the quantisations compared.
LLAMA_FTYPES = {"q4_0": 2, "q8_0": 7}


def need_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        sys.exit('error: llama_cpp is not installed; build it first: CMAKE_ARGS="-DGGML_NATIVE=ON" pip install '
                 "llama-cpp-python sentencepiece (about 21 minutes on 2 cores)")
    return llama_cpp


# Runs convert_hf_to_gguf.py (argv[1]) with its own gguf-py, and with llama.cpp's BPE pre-tokenizer
# table extended by one answer: a tokenizer it does not know (the offline checkpoints' generated
# tokenizer; Soprano's real one) is written as "default". The step timed here is fed token ids, so the
# pre-tokenizer never runs; only the file's metadata needs a name.
_CONVERT = """
import runpy, sys
from pathlib import Path
conv = Path(sys.argv[1]).resolve()
sys.path[:0] = [str(conv.parent), str(conv.parent / "gguf-py")]
from conversion import base
known = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return "default"
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = sys.argv[1:]
runpy.run_path(str(conv), run_name="__main__")
"""


def convert(checkpoint: Path, converter: Path, out_dir: Path) -> dict[str, Path]:
    """f32 GGUF by llama.cpp's converter, then Q4_0 / Q8_0 by llama.cpp's quantiser; returns {label: file}."""
    llama_cpp = need_llama_cpp()
    if not converter.is_file():
        sys.exit(f"error: {converter}: not found; pass llama.cpp's convert_hf_to_gguf.py (the llama-cpp-python "
                 "source release has it under vendor/llama.cpp/)")
    out_dir.mkdir(parents=True, exist_ok=True)
    f32 = out_dir / "soprano-lm-f32.gguf"
    if not f32.is_file():
        proc = subprocess.run([sys.executable, "-c", _CONVERT, str(converter), str(checkpoint), "--outtype", "f32",
                               "--outfile", str(f32)], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"error: convert_hf_to_gguf.py failed on {checkpoint}:\n{proc.stderr[-2000:]}")
    files = {"f32": f32}
    for label, ftype in LLAMA_FTYPES.items():
        path = out_dir / f"soprano-lm-{label}.gguf"
        if not path.is_file():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftype
            params.nthread = 2
            if llama_cpp.llama_model_quantize(str(f32).encode(), str(path).encode(), params) != 0:
                sys.exit(f"error: llama.cpp could not quantise {f32} to {label}")
        files[label] = path
    return files


def llama_step_ms(gguf: Path, threads: int, prompt: int, steps: int) -> tuple[float, int]:
    """Mean decode step (ms) of llama.cpp: greedy, the argmax fed back, one row."""
    import numpy as np

    llama_cpp = need_llama_cpp()
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=prompt + WARMUP_STEPS + steps + 8, n_threads=threads,
                          n_threads_batch=threads, n_batch=prompt, verbose=False)

    n_vocab = llm.n_vocab()

    def last_argmax() -> int:
        # the last evaluated token's logits, from the context itself (Llama.eval keeps them only with
        # logits_all, which would compute every prompt row's logits too)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        return int(np.argmax(logits))

    def run(n: int) -> tuple[float, int]:
        llm.reset()
        llm.eval(prompt_ids(prompt))  # the prefill
        tok = last_argmax()
        t0 = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([tok])
            tok = last_argmax()
        return 1e3 * (time.perf_counter() - t0) / max(n - 1, 1), n - 1

    run(WARMUP_STEPS)
    return run(steps)


def llama_prefill_ms(gguf: Path, threads: int, prompt: int, repeats: int) -> tuple[float, int]:
    """Median time (ms) of llama.cpp's prefill of the prompt (one `eval` of all its ids, one batch, the last
    position's logits), after peer.PREFILL_WARMUPS untimed ones (peer.median_ms)."""
    llama_cpp = need_llama_cpp()
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=prompt + 8, n_threads=threads, n_threads_batch=threads,
                          n_batch=prompt, verbose=False)
    ids = prompt_ids(prompt)
    return median_ms(lambda: llm.eval(ids), repeats, prepare=llm.reset), repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=False)
    ap.add_argument("--converter", type=Path, help="llama.cpp's convert_hf_to_gguf.py")
    ap.add_argument("--gguf-dir", type=Path, default=Path("artifacts/llama_cpp"))
    ap.add_argument("--ours", action="append", default=[], metavar="LABEL=LM_FOLDER")
    ap.add_argument("--genai", action="append", default=[], metavar="LABEL=MODEL_FOLDER",
                    help="an ONNX Runtime GenAI model folder (the peer stage's builder output) timed in the same rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=24)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--prefill", action="store_true",
                    help="time the prefill of a --prompt-token prompt instead of the decode step (median of --steps runs)")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    for name in ("threads", "prompt", "steps", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.child:
        kind, path = args.child
        if args.prefill:
            fn = llama_prefill_ms if kind == "llama_cpp" else PREFILL_FUNCTIONS[kind]
        else:
            fn = llama_step_ms if kind == "llama_cpp" else STEP_FUNCTIONS[kind]
        ms, n = fn(Path(path), args.threads, args.prompt, args.steps)
        print(json.dumps({"ms": ms, "steps": n}))
        return
    if not args.ours or args.checkpoint is None or args.converter is None:
        sys.exit("error: give --checkpoint, --converter and at least one --ours LABEL=LM_FOLDER (see --help)")
    engines = [(f"ours {s.split('=', 1)[0]}", "ours", s.split("=", 1)[1]) for s in args.ours]
    engines += [(f"genai {s.split('=', 1)[0]}", "genai", s.split("=", 1)[1]) for s in args.genai]
    for label, _, folder in engines:
        if not Path(folder).is_dir():
            sys.exit(f"error: {label}: {folder} is not a folder")
    engines += [(f"llama.cpp {k}", "llama_cpp", str(p)) for k, p in convert(args.checkpoint, args.converter, args.gguf_dir).items()]
    ms: dict[str, list[float]] = {e[0]: [] for e in engines}
    for r in range(args.rounds):
        for label, kind, path in (engines if r % 2 == 0 else engines[::-1]):
            argv = [sys.executable, __file__, "--threads", str(args.threads), "--prompt", str(args.prompt),
                    "--steps", str(args.steps), *(["--prefill"] if args.prefill else []), "--child", kind, path]
            proc = subprocess.run(argv, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"error: {label} failed:\n{proc.stderr[-2000:]}")
            ms[label].append(json.loads(proc.stdout.strip().splitlines()[-1])["ms"])
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in ms.items()), flush=True)
    base = engines[0][0]
    what = (f"ms per prefill of the prompt, median of {args.steps} runs" if args.prefill
            else f"{args.steps} steps, ms per decode step")
    print(f"\nthreads {args.threads}, batch 1, prompt {args.prompt}, {args.rounds} rounds "
          f"({what}; ratio: median of per-round ratios to {base})")
    for label, v in ms.items():
        ratio = statistics.median(a / b for a, b in zip(v, ms[base]))
        print(f"  {label:22s} median {statistics.median(v):.2f}  range {min(v):.2f}-{max(v):.2f}  ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
