"""The fused step graph's attention-core options (export/lm_fused.ATTENTION_CORES), timed side by side.

    python scripts/lm_attention_cores.py build             # fp32 graphs (checked against gqa_bias) + int4
    python scripts/lm_attention_cores.py main THREADS ROUNDS RUNS

Each variant is built from random-80m (CKPT) and quantised as the onnx-int4 target is (MatMulNBits 4-bit,
block 128, level 4) into /tmp/lm/var. `main` times one decode step (raw session, the runtime's session
options, IO binding; shared-buffer variants bind present_* to past_*) at 1 and 8 rows and 64 / 192 / 320
cached columns, rows of different lengths (row b holds width - 1 - 7b tokens in columns [0, len)), each
variant in a fresh process per round, alternating the order. At 1 thread the figure is the calling
thread's CPU time (time.thread_time), else wall time; medians over RUNS, then median [min-max] over rounds.
"""
import json, statistics, subprocess, sys, time
from pathlib import Path
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from pipeline_lib.export.lm_fused import ATTENTION_CORES  # noqa: E402

OUT = Path("/tmp/lm/var")
CKPT = "/work/main/artifacts/checkpoints/random-80m"
VARIANTS = ["gqa_bias", "gqa_rows", "gqa_shared", "gqa_shared_rotary", "attention23", "matmul"]
ROWS, WIDTHS = (1, 8), (64, 192, 320)


def layout(B, W, KV=1, D=128, layers=17, shared=False):
    rng = np.random.default_rng(0)
    lens = np.array([W - 1 - 7 * b for b in range(B)])
    mask = np.zeros((B, W + 1), np.int64)
    for b in range(B):
        mask[b, :lens[b]] = 1
    mask[:, W] = 1
    if shared:  # the shared-buffer graphs: [B, W], ones over each row's tokens and its new column
        mask = (np.arange(W)[None, :] <= lens[:, None]).astype(np.int64)
    past = [np.zeros((B, KV, W, D), np.float32) for _ in range(2 * layers)]
    for a in past:
        for b in range(B):
            a[b, :, :lens[b]] = rng.standard_normal((KV, lens[b], D), dtype=np.float32)
    ids = rng.integers(4, 8000, (B, 1))
    return ids.astype(np.int64), mask, lens[:, None].astype(np.int64), past, lens


def build():
    import onnx
    from pipeline_lib.export.lm_fused import build_fused_lm
    from pipeline_lib.model.lm import load_lm
    from pipeline_lib.quantize_ort import quantize_onnx_int8
    import onnxruntime as ort
    OUT.mkdir(parents=True, exist_ok=True)
    model = load_lm(CKPT)
    ref = None
    for v in VARIANTS:
        f = OUT / f"{v}.fp32.onnx"
        onnx.save(build_fused_lm(model, 17, attention=v), str(f))
        s = ort.InferenceSession(str(f), providers=["CPUExecutionProvider"])
        ids, mask, pos, past, lens = layout(3, 64, shared=ATTENTION_CORES[v].shared)
        names = [i.name for i in s.get_inputs()]
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        for n, a in zip([n for n in names if n.startswith("past_")], past):
            feed[n] = a.copy()
        out = s.run(["logits", "hidden_states"], feed)
        if ref is None:
            ref = out
        print(v, "max |logits - gqa_bias|", float(np.abs(out[0] - ref[0]).max()), "hidden", float(np.abs(out[1] - ref[1]).max()), flush=True)
        quantize_onnx_int8(f, OUT / f"{v}.int4.onnx", method="matmul_nbits", bits=4, block_size=128, accuracy_level=4)


def child(v, threads, runs):
    global CLOCK
    CLOCK = time.thread_time if threads == 1 else time.perf_counter
    from pipeline_lib.runtime.ort_backend import ort_session
    s = ort_session(OUT / f"{v}.int4.onnx", threads, low_memory=True, spin=True, mem_pattern=False)
    outs = [o.name for o in s.get_outputs()]
    res = {}
    for B in ROWS:
        for W in WIDTHS:
            ids, mask, pos, past, lens = layout(B, W, shared=ATTENTION_CORES[v].shared)
            binding = s.io_binding()
            pnames = [i.name for i in s.get_inputs() if i.name.startswith("past_")]
            feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **dict(zip(pnames, past))}
            for n, a in feed.items():
                binding.bind_input(n, "cpu", 0, a.dtype, a.shape, a.ctypes.data)
            bufs = {}
            for o in outs:
                if o.startswith("present_"):
                    a = feed[o.replace("present_", "past_")]
                else:
                    shape = {"logits": (B, 1, 8192), "hidden_states": (B, 1, 512)}.get(o, (B, 1, 1, 128))
                    a = bufs[o] = np.empty(shape, np.float32)
                binding.bind_output(o, "cpu", 0, np.float32, a.shape, a.ctypes.data)
            for _ in range(10):
                s.run_with_iobinding(binding)
            ts = []
            for _ in range(runs):
                t = CLOCK(); s.run_with_iobinding(binding); ts.append(CLOCK() - t)
            res[f"{B}x{W}"] = 1e3 * statistics.median(ts)
    print(json.dumps(res))


def main(threads, rounds, runs):
    allres = {v: [] for v in VARIANTS}
    for r in range(rounds):
        order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
        for v in order:
            p = subprocess.run([sys.executable, __file__, "child", v, str(threads), str(runs)], capture_output=True, text=True)
            if p.returncode:
                print(v, "FAILED", p.stderr[-1500:]); allres[v].append(None); continue
            allres[v].append(json.loads(p.stdout.strip().splitlines()[-1]))
        print("round", r + 1, "done", flush=True)
    keys = [f"{B}x{W}" for B in ROWS for W in WIDTHS]
    print(f"threads {threads}, {rounds} rounds, {runs} runs each; median over rounds [min-max] ms per decode step (rows x width)")
    print("variant".ljust(20) + "".join(k.rjust(22) for k in keys))
    for v in VARIANTS:
        rr = [x for x in allres[v] if x]
        if not rr:
            print(v.ljust(20) + " failed"); continue
        cells = []
        for k in keys:
            xs = [x[k] for x in rr]
            cells.append(f"{statistics.median(xs):.2f} [{min(xs):.2f}-{max(xs):.2f}]".rjust(22))
        print(v.ljust(20) + "".join(cells))
    json.dump(allres, open(f"/tmp/lm/attn_t{threads}.json", "w"))


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build()
    elif sys.argv[1] == "child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        main(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
