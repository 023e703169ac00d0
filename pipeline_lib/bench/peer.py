"""The LM step beside a peer engine: ONNX Runtime GenAI's model builder on the same checkpoint.

What a user would pick instead of this project to run the Soprano LM on a CPU: the builder writes its own
fused ONNX graph (int4 MatMulNBits, block 128, with the hidden-state output Soprano's decoder needs:
``include_hidden_states=true``) and GenAI's Generator runs it. `build_genai` writes that model;
`*_step_ms` times one decode step of ours (the runtime's loop over a target's LM folder) or of the GenAI
model, in the calling process, and `*_prefill_ms` one prompt's prefill; `compare` times both in fresh processes, in alternating rounds, and
returns medians and the per-round ratio. Reported, never gated: where the package is missing or the
builder rejects the checkpoint, `build_genai` raises PeerSkipped with the reason.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

GENAI_PACKAGE = "onnxruntime-genai"
GENAI_INSTALL = "pip install 'soprano-onnx[pipeline]'"
PROMPT_FIRST_ID = 5  # prompt ids: text-like ids above the special tokens
WARMUP_STEPS = 20


class PeerSkipped(RuntimeError):
    """The peer cannot be built or run here; the message is the reason the report prints."""


def prompt_ids(n: int) -> list[int]:
    return [PROMPT_FIRST_ID + j % 50 for j in range(n)]


def build_genai(ckpt_dir: Path | str, out_dir: Path | str, precision: str = "int4", block_size: int = 128,
                timeout_s: float = 900.0) -> Path:
    """Run `python -m onnxruntime_genai.models.builder` on the checkpoint folder (the transformers layout
    the fetch stage writes): int4 or int8 weights in blocks of `block_size`, CPU, hidden states as an
    output. Returns `out_dir` (model.onnx + genai_config.json)."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError as exc:
        raise PeerSkipped(f"{GENAI_PACKAGE} is not installed ({GENAI_INSTALL})") from exc
    out_dir = Path(out_dir)
    argv = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt_dir), "-o", str(out_dir),
            "-p", precision, "-e", "cpu", "-c", str(out_dir / "cache"),
            "--extra_options", "include_hidden_states=true", f"block_size={block_size}"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise PeerSkipped(f"the {GENAI_PACKAGE} builder took over {timeout_s:.0f} s") from exc
    if proc.returncode != 0 or not (out_dir / "genai_config.json").is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise PeerSkipped(f"the {GENAI_PACKAGE} builder failed on this checkpoint: {tail[0][:300]}")
    return out_dir


def ours_step_ms(lm_dir: Path, threads: int, prompt: int, steps: int) -> tuple[float, int]:
    """Mean decode step (ms) of the runtime's loop (greedy, repetition penalty 1.2) over a target's LM
    folder, one row, and the steps timed."""
    from pipeline_lib import registry
    from pipeline_lib.runtime.backends import OrtLM
    from pipeline_lib.runtime.generate import LMSpec, generate
    from pipeline_lib.runtime.sampling import SamplingParams

    spec = LMSpec.from_json(lm_dir / registry.LM_CONFIG)
    lm = OrtLM(lm_dir / f"{registry.LM_FILE}.onnx", threads)
    params = SamplingParams(0.0, 1.0, 0, 1.2)
    generate(lm, spec, [prompt_ids(prompt)], max_new_tokens=WARMUP_STEPS, params=params)
    out = generate(lm, spec, [prompt_ids(prompt)], max_new_tokens=steps, params=params)
    return 1e3 * out.timings.per_step_s, out.timings.decode_steps


def genai_step_ms(model_dir: Path, threads: int, prompt: int, steps: int) -> tuple[float, int]:
    """Mean decode step (ms) of GenAI's Generator (greedy; min_length holds the stop token off so that the
    same number of steps runs), one row, and the steps timed."""
    import numpy as np
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)

    def run(n: int) -> tuple[float, int]:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=prompt + n + 1, min_length=prompt + n + 1)
        gen = og.Generator(model, params)
        gen.append_tokens(np.array([prompt_ids(prompt)], dtype=np.int32))  # the prefill
        gen.generate_next_token()
        t0, done = time.perf_counter(), 0
        while not gen.is_done() and done < n - 1:
            gen.generate_next_token()
            done += 1
        return 1e3 * (time.perf_counter() - t0) / max(done, 1), done

    run(WARMUP_STEPS)
    return run(steps)


STEP_FUNCTIONS = {"ours": ours_step_ms, "genai": genai_step_ms}

PREFILL_WARMUPS = 2


def ours_prefill_ms(lm_dir: Path, threads: int, prompt: int, repeats: int) -> tuple[float, int]:
    """Median time (ms) of one prompt's prefill through the runtime (kv_cache.prefill_row: the prompt
    alone, its keys / values, last logits and hidden state), after PREFILL_WARMUPS untimed ones."""
    from pipeline_lib import registry
    from pipeline_lib.runtime.backends import OrtLM
    from pipeline_lib.runtime.generate import LMSpec
    from pipeline_lib.runtime.kv_cache import prefill_row

    spec = LMSpec.from_json(lm_dir / registry.LM_CONFIG)
    lm = OrtLM(lm_dir / f"{registry.LM_FILE}.onnx", threads)
    ids = prompt_ids(prompt)
    return median_ms(lambda: prefill_row(lm, spec, ids), repeats), repeats


def genai_prefill_ms(model_dir: Path, threads: int, prompt: int, repeats: int) -> tuple[float, int]:
    """Median time (ms) of GenAI's Generator.append_tokens of the prompt (its prefill) on a fresh
    Generator, after PREFILL_WARMUPS untimed ones."""
    import numpy as np
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    ids = np.array([prompt_ids(prompt)], dtype=np.int32)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=prompt + 2)
    gen: list = [None]

    def fresh() -> None:  # a new Generator per run, made outside the timing: its buffers are not the prefill
        gen[0] = None
        gen[0] = og.Generator(model, params)

    return median_ms(lambda: gen[0].append_tokens(ids), repeats, prepare=fresh), repeats


def median_ms(call: Callable[[], object], repeats: int, prepare: Callable[[], object] | None = None) -> float:
    """Median wall time (ms) of `call()` over `repeats` runs after PREFILL_WARMUPS untimed ones;
    `prepare()`, if given, runs before each call, outside the timing."""
    times = []
    for i in range(PREFILL_WARMUPS + repeats):
        if prepare is not None:
            prepare()
        t0 = time.perf_counter()
        call()
        if i >= PREFILL_WARMUPS:
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


PREFILL_FUNCTIONS = {"ours": ours_prefill_ms, "genai": genai_prefill_ms}


def step_in_process(kind: str, folder: Path, threads: int, prompt: int, steps: int, timeout_s: float) -> float:
    """`step_ms` of one engine in a fresh Python process (so no two engines' thread pools meet)."""
    code = ("import json, sys; from pathlib import Path; from pipeline_lib.bench.peer import STEP_FUNCTIONS; "
            f"ms, n = STEP_FUNCTIONS[{kind!r}](Path({str(folder)!r}), {threads}, {prompt}, {steps}); "
            "print(json.dumps({'ms': ms, 'steps': n}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise PeerSkipped(f"{kind} step timing failed: {proc.stderr.strip().splitlines()[-1:] or ['no output']}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["ms"])


@dataclass(frozen=True)
class PeerResult:
    threads: int
    prompt_tokens: int
    steps: int
    rounds: int
    ours_ms: float        # median over rounds, ms per decode step
    peer_ms: float
    ratio: float          # median over rounds of ours / peer within a round (< 1: ours faster)
    ours_all: tuple[float, ...]
    peer_all: tuple[float, ...]

    def to_dict(self) -> dict:
        return asdict(self)


def compare(ours_dir: Path, genai_dir: Path, threads: int, prompt: int = 24, steps: int = 200, rounds: int = 4,
            timeout_s: float = 600.0) -> PeerResult:
    """Ours and the peer, each in a fresh process per round, alternating which goes first."""
    ours: list[float] = []
    peer: list[float] = []
    for r in range(rounds):
        order = [("ours", ours_dir, ours), ("genai", genai_dir, peer)]
        for kind, folder, into in (order if r % 2 == 0 else order[::-1]):
            into.append(step_in_process(kind, folder, threads, prompt, steps, timeout_s))
    return PeerResult(threads, prompt, steps, rounds, statistics.median(ours), statistics.median(peer),
                      statistics.median(a / b for a, b in zip(ours, peer)), tuple(ours), tuple(peer))
