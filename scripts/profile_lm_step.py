"""Where an ONNX LM decode step's time goes: per-op-type kernel time, time outside the kernels, Python
overhead of the generation loop, and the step's memory-bandwidth floor.

    python scripts/profile_lm_step.py --model artifacts/onnx/int4 [--threads 1 2] [--rows 1 8] [--steps 150]

For each (threads, rows) pair, the runtime's own path (`runtime.ort_backend.OrtLM`, IO binding, the
session options of `ort_backend.ort_session`, and `runtime.generate.generate_steps`, greedy with the
repetition penalty) decodes `--warmup` steps, then `--steps` measured steps, from prompts of
`--prompt` + i tokens (row i), in `--rounds` rounds. Two sessions per pair, alternating each round:

- a plain one, timed with `time.perf_counter`: wall time per decode step (one event of
  generate_steps to the next), time inside `session.run_with_iobinding`, inside `OrtLM.run` but
  outside the session (binding, lock), and in the loop outside `OrtLM.run` (sampling, KV-cache
  append, feed building);
- one with ONNX Runtime's profiler (`SessionOptions.enable_profiling`): per decode run, each node's
  kernel time summed by op type (MatMulNBits split into the logits head and the rest), and
  `model_run` minus the kernel times (the executor's time between kernels). The profiler itself
  adds time per node (1.5-3x the plain session's step on the 2-core AMD EPYC), so read its
  shares, not its milliseconds;
- two synthetic graphs in sessions with the same options, to bracket the step: a chain of
  `--chain-nodes` Add nodes on a [rows, 1, 512] tensor (the executor's cost of a trivial node), and
  the model's MatMulNBits nodes alone (same weights, nothing else; int4 / nbits models only).

At 1 thread ONNX Runtime runs every kernel on the calling thread, so the script also reports that
thread's CPU time (`time.thread_time`): on shared cores, time-slicing by other processes inflates
wall time but not CPU time, which then is the steadier figure for comparisons.

The floor: the bytes one step must read (every initializer except the rows of embedding tables that
a Gather does not touch, plus the KV cache at the mean width of the measured steps) over the memory
bandwidth of a NumPy float32 matrix-vector product over `--floor-mb` MB at the same thread count
(run in a subprocess with OPENBLAS_NUM_THREADS / OMP_NUM_THREADS set). Figures are medians over
rounds, with [min-max].
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LM_HEAD_HINT = "lm_head"

_BW_CODE = r"""
import sys, time, numpy as np
mb, reps = float(sys.argv[1]), int(sys.argv[2])
cols = 4096
rows = int(mb * 1e6 / 4 / cols)
a = np.random.default_rng(0).standard_normal((rows, cols), dtype=np.float32)
x = np.ones(cols, dtype=np.float32)
y = a @ x
ts = []
for _ in range(reps):
    t = time.perf_counter(); a @ x; ts.append(time.perf_counter() - t)
ts.sort()
print(a.nbytes, ts[0], ts[len(ts) // 2])
"""


def bandwidth(threads: int, mb: float, reps: int) -> tuple[float, float]:
    """(best, median) GB/s of a float32 matvec over `mb` MB at `threads` BLAS threads."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", _BW_CODE, str(mb), str(reps)], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    nbytes, best, med = int(out[0]), float(out[1]), float(out[2])
    return nbytes / best / 1e9, nbytes / med / 1e9


def step_bytes(model_path: Path) -> tuple[int, int, int]:
    """(bytes of initializers a decode step reads, of which the logits head's, number of graph nodes):
    every initializer in full, except Gather tables (one row per token read; counted as one row)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(model_path))
    sizes = {t.name: numpy_helper.to_array(t).nbytes for t in m.graph.initializer}
    dims = {t.name: list(t.dims) for t in m.graph.initializer}
    total, head, counted = 0, 0, set()
    for node in m.graph.node:
        for k, name in enumerate(node.input):
            if name not in sizes or name in counted:
                continue
            counted.add(name)
            n = sizes[name]
            if node.op_type == "Gather" and k == 0 and dims[name]:
                n = n // dims[name][0]
            total += n
            if LM_HEAD_HINT in node.name:
                head += n
    return total, head, len(m.graph.node)


def session_factory(profile_dir: str | None):
    """A replacement for ort_backend.ort_session: the same options, plus the profiler when asked."""
    from pipeline_lib.runtime import ort_backend

    real = ort_backend.ort_session

    def make(path: Path, num_threads: int, low_memory: bool = True, spin: bool = True, mem_pattern: bool = True) -> Any:
        if profile_dir is None:
            return real(path, num_threads, low_memory, spin, mem_pattern)
        ort = ort_backend._import_ort()
        orig = ort.SessionOptions

        def options() -> Any:
            o = orig()
            o.enable_profiling = True
            o.profile_file_prefix = os.path.join(profile_dir, "lm")
            return o

        with mock.patch.object(ort, "SessionOptions", options):
            return real(path, num_threads, low_memory, spin, mem_pattern)

    return make


def load_lm(lm_path: Path, threads: int, profile_dir: str | None) -> Any:
    from pipeline_lib.runtime import ort_backend

    with mock.patch.object(ort_backend, "ort_session", session_factory(profile_dir)):
        return ort_backend.OrtLM(lm_path, threads)


class Timed:
    """Wraps an OrtLM (once): records per call the time in OrtLM.run and in session.run_with_iobinding."""

    stateful = False

    def __init__(self, lm: Any) -> None:
        self.lm, self.run_s, self.session_s, self.session_cpu = lm, [], [], []
        sess = lm.session
        inner = sess.run_with_iobinding

        def timed_run(*a: Any, **k: Any) -> Any:
            t, c = time.perf_counter(), time.thread_time()
            try:
                return inner(*a, **k)
            finally:
                self.session_s.append(time.perf_counter() - t)
                self.session_cpu.append(time.thread_time() - c)

        sess.run_with_iobinding = timed_run  # instance attribute: the Python wrapper class allows it

    def static_kv_width(self, batch: int) -> None:
        return None

    def run(self, feed: Any) -> Any:
        t = time.perf_counter()
        try:
            return self.lm.run(feed)
        finally:
            self.run_s.append(time.perf_counter() - t)


def generation(timed: Timed, spec: Any, rows: int, prompt: int, warmup: int, steps: int) -> dict[str, Any]:
    """Decode warmup + steps steps; per measured step: wall, OrtLM.run and session time (seconds).
    first_run: the index, among the session's runs so far, of the first measured decode run."""
    from pipeline_lib.runtime.generate import generate_steps
    from pipeline_lib.runtime.sampling import SamplingParams

    prompts = [[5 + (i + j) % 50 for j in range(prompt + i)] for i in range(rows)]
    stamps: list[float] = []
    cpu: list[float] = []
    n_run_before: list[int] = []
    t0 = time.perf_counter()
    for _ in generate_steps(timed, spec, prompts, max_new_tokens=warmup + steps + 1,
                            params=SamplingParams(0.0, 1.0, 0, 1.2)):
        stamps.append(time.perf_counter())
        cpu.append(time.thread_time())
        n_run_before.append(len(timed.run_s))
    # event k (k >= 1) follows the decode run number n_run_before[k] - 1 (prefill: one run per row, first);
    # wall of step k: event k-1 to event k
    first = n_run_before[warmup + 1] - 1
    wall = np.diff(stamps)[warmup:warmup + steps]
    thread_cpu = np.diff(cpu)[warmup:warmup + steps]
    runs = np.array(timed.run_s[first:first + steps])
    sess = np.array(timed.session_s[first:first + steps])
    sess_cpu = np.array(timed.session_cpu[first:first + steps])
    assert len(timed.run_s) == len(timed.session_s), "every OrtLM.run went through the IO binding"
    return {"wall": float(wall.mean()), "run": float(runs.mean()), "session": float(sess.mean()),
            "cpu": float(thread_cpu.mean()), "session_cpu": float(sess_cpu.mean()), "prefill": stamps[0] - t0,
            "first_run": first, "mean_past": prompt + (rows - 1) / 2 + warmup + steps / 2}


def parse_profile(path: str, first: int, steps: int) -> dict[str, Any]:
    """Per decode run (runs first .. first + steps - 1 of the trace): kernel time by op type, node counts,
    model_run time. Times in seconds per run."""
    events = json.loads(Path(path).read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"), key=lambda e: e["ts"])
    sel = runs[first:first + steps]
    if len(sel) < steps:
        raise RuntimeError(f"{path}: {len(runs)} runs in the trace, need {first + steps}")
    lo, hi = sel[0]["ts"], sel[-1]["ts"] + sel[-1]["dur"]
    by_op: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    node_durs: dict[str, list[int]] = defaultdict(list)
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or not lo <= e["ts"] <= hi:
            continue
        op = e["args"].get("op_name", "?")
        if op == "MatMulNBits" and LM_HEAD_HINT in e["name"]:
            op = "MatMulNBits (lm_head)"
        elif op == "MatMul" and LM_HEAD_HINT in e["name"]:
            op = "MatMul (lm_head)"
        by_op[op] += e["dur"] * 1e-6
        count[op] += 1
        node_durs[op].append(e["dur"])
    model_run = sum(r["dur"] for r in sel) * 1e-6
    return {"by_op": {k: v / steps for k, v in by_op.items()}, "count": {k: v / steps for k, v in count.items()},
            "median_us": {k: float(np.median(v)) for k, v in node_durs.items()}, "model_run": model_run / steps}


def med(xs: list[float]) -> str:
    return f"{1e3 * statistics.median(xs):.3f} [{1e3 * min(xs):.3f}-{1e3 * max(xs):.3f}]"


def synthetic_models(lm_path: Path, rows: int, n_nodes: int, tmp: str) -> dict[str, str]:
    """Two graphs that bracket the step: `chain`, n_nodes Add nodes on a [rows, 1, 512] tensor one after
    the other (per-node executor cost of a trivial kernel); `matmuls`, the model's MatMulNBits nodes
    alone (same weights and attributes), each fed its own input, with no other node."""
    import onnx
    from onnx import TensorProto, helper

    hidden = 512
    nodes = [helper.make_node("Add", ["x" if i == 0 else f"t{i - 1}", "c"], [f"t{i}" if i < n_nodes - 1 else "y"])
             for i in range(n_nodes)]
    chain = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, 1, hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, 1, hidden])],
                              [helper.make_tensor("c", TensorProto.FLOAT, [hidden], [0.0] * hidden)])
    out = {"chain": os.path.join(tmp, "chain.onnx")}
    onnx.save(helper.make_model(chain, opset_imports=[helper.make_opsetid("", 17)]), out["chain"])
    m = onnx.load(str(lm_path))
    inits = {t.name: t for t in m.graph.initializer}
    mm = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    if mm:
        ks = sorted({next(a.i for a in n.attribute if a.name == "K") for n in mm})
        ins = [helper.make_tensor_value_info(f"a{k}", TensorProto.FLOAT, [rows, 1, k]) for k in ks]
        outs, new_nodes, used = [], [], {}
        for i, n in enumerate(mm):
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            k = attrs["K"]
            new_nodes.append(helper.make_node("MatMulNBits", [f"a{k}", *n.input[1:]], [f"y{i}"], domain="com.microsoft", **attrs))
            outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [rows, 1, attrs["N"]]))
            for name in n.input[1:]:
                if name in inits:
                    used[name] = inits[name]
        g = helper.make_graph(new_nodes, "matmuls", ins, outs, list(used.values()))
        out["matmuls"] = os.path.join(tmp, "matmuls.onnx")
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]),
                  out["matmuls"])
    return out


class Synthetic:
    """A synthetic graph in a session with the runtime's options, run through one IO binding with bound
    output buffers (as OrtLM runs the step)."""

    def __init__(self, path: str, threads: int) -> None:
        from pipeline_lib.runtime import ort_backend

        self.session = ort_backend.ort_session(Path(path), threads, mem_pattern=ort_backend.OrtLM.MEM_PATTERN)
        self.binding = self.session.io_binding()
        self.keep = []
        for i in self.session.get_inputs():
            a = np.full(i.shape, 0.01, dtype=np.float32)
            self.keep.append(a)
            self.binding.bind_input(i.name, "cpu", 0, np.float32, a.shape, a.ctypes.data)
        for o in self.session.get_outputs():
            a = np.empty(o.shape, dtype=np.float32)
            self.keep.append(a)
            self.binding.bind_output(o.name, "cpu", 0, np.float32, a.shape, a.ctypes.data)

    def time(self, n: int) -> tuple[float, float]:
        """Mean (wall, main-thread CPU) seconds per run over n runs (after one warm-up run)."""
        self.session.run_with_iobinding(self.binding)
        t, c = time.perf_counter(), time.thread_time()
        for _ in range(n):
            self.session.run_with_iobinding(self.binding)
        return (time.perf_counter() - t) / n, (time.thread_time() - c) / n


def measure(args: argparse.Namespace, lm_path: Path, spec: Any, threads: int, rows: int) -> dict[str, Any]:
    plain = Timed(load_lm(lm_path, threads, None))
    tmp = tempfile.mkdtemp(prefix="ort_profile_")
    prof = Timed(load_lm(lm_path, threads, tmp))
    gen_args = (spec, rows, args.prompt, args.warmup, args.steps)
    syn = {k: Synthetic(v, threads) for k, v in synthetic_models(lm_path, rows, args.chain_nodes, tmp).items()}
    walls, runs, sessions, cpus, sess_cpus, firsts, prefills = [], [], [], [], [], [], []
    syn_s: dict[str, list[float]] = {k: [] for k in syn}
    syn_cpu: dict[str, list[float]] = {k: [] for k in syn}
    for r in range(args.rounds):
        for which in ((plain, prof, *syn) if r % 2 == 0 else (*syn, prof, plain)):
            time.sleep(0.1)  # let the other session's threads stop spinning
            if isinstance(which, str):
                wall, cpu = syn[which].time(args.steps)
                syn_s[which].append(wall), syn_cpu[which].append(cpu)
                continue
            g = generation(which, *gen_args)
            if which is plain:
                walls.append(g["wall"]), runs.append(g["run"]), sessions.append(g["session"])
                cpus.append(g["cpu"]), sess_cpus.append(g["session_cpu"]), prefills.append(g["prefill"])
            else:
                firsts.append(g["first_run"])
    trace = prof.lm.session.end_profiling()
    parsed = [parse_profile(trace, first, args.steps) for first in firsts]
    del syn
    shutil.rmtree(tmp)  # the trace too
    return {"synthetic": syn_s, "synthetic_cpu": syn_cpu, "wall": walls, "run": runs, "session": sessions, "cpu": cpus, "session_cpu": sess_cpus,
            "profiles": parsed, "mean_past": g["mean_past"],
            "prefill": prefills}


def report(args: argparse.Namespace, threads: int, rows: int, res: dict[str, Any], bytes_info: tuple[int, int, int],
           spec: Any, bw: tuple[float, float]) -> None:
    profs = res["profiles"]
    ops = sorted({k for p in profs for k in p["by_op"]}, key=lambda k: -statistics.median(p["by_op"].get(k, 0.0) for p in profs))
    model_run = [p["model_run"] for p in profs]
    kernels = [sum(p["by_op"].values()) for p in profs]
    mr = statistics.median(model_run)
    print(f"\n== threads {threads}, rows {rows}: {args.steps} decode steps after {args.warmup}, {args.rounds} rounds, "
          f"mean cache width {res['mean_past']:.0f}")
    print(f"{'op type':26s} {'nodes/step':>10s} {'ms/step':>8s} {'share':>6s} {'median us/node':>14s}")
    for op in ops:
        ms = statistics.median(p["by_op"].get(op, 0.0) for p in profs)
        n = statistics.median(p["count"].get(op, 0.0) for p in profs)
        us = statistics.median(p["median_us"].get(op, 0.0) for p in profs)
        print(f"{op:26s} {n:10.0f} {1e3 * ms:8.3f} {ms / mr:6.1%} {us:14.1f}")
    gaps = [m - k for m, k in zip(model_run, kernels)]
    gm = statistics.median(gaps)
    print(f"{'(outside kernels)':26s} {'':10s} {1e3 * gm:8.3f} {gm / mr:6.1%}")
    n_nodes = statistics.median(sum(p["count"].values()) for p in profs)
    mm = {"MatMulNBits", "MatMulNBits (lm_head)", "MatMul", "MatMul (lm_head)", "FusedMatMul",
          "DynamicQuantizeMatMul", "MatMulInteger"}
    other = [sum(v for k, v in p["by_op"].items() if k not in mm) for p in profs]
    print(f"profiled model_run {med(model_run)} ms/step; kernels {med(kernels)}; {n_nodes:.0f} nodes/step; "
          f"not MatMul-type kernels {med(other)}")
    print(f"plain session: wall per step {med(res['wall'])} ms, session.run {med(res['session'])}, "
          f"OrtLM.run outside the session {med([a - b for a, b in zip(res['run'], res['session'])])}, "
          f"loop outside OrtLM.run {med([a - b for a, b in zip(res['wall'], res['run'])])}, "
          f"Python overhead (wall - session) {med([a - b for a, b in zip(res['wall'], res['session'])])}; "
          f"main-thread CPU time outside the session {med([a - b for a, b in zip(res['cpu'], res['session_cpu'])])}"
          + (f", session CPU time (1 thread: the whole step's kernels) {med(res['session_cpu'])}" if threads == 1 else ""))
    # At 1 thread ONNX Runtime runs every kernel on the calling thread: its CPU time is the step's work,
    # which time-slicing by other processes on shared cores does not inflate (wall time it does).
    one = threads == 1
    chain = res["synthetic"]["chain"]
    per_node = [c / args.chain_nodes for c in chain]
    print(f"dispatch: a chain of {args.chain_nodes} Add nodes on [{rows}, 1, 512] {med(chain)} ms per run"
          + (f" (CPU {med(res['synthetic_cpu']['chain'])})" if one else "")
          + f", {1e6 * statistics.median(per_node):.2f} us per node -> {n_nodes:.0f} nodes x that = "
          f"{1e3 * n_nodes * statistics.median(per_node):.3f} ms per step")
    if "matmuls" in res["synthetic"]:
        mmr, mmc = res["synthetic"]["matmuls"], res["synthetic_cpu"]["matmuls"]
        print(f"the MatMulNBits nodes alone (same weights, no other node): {med(mmr)} ms per run"
              + (f" (CPU {med(mmc)})" if one else "")
              + f"; step session.run minus that {med([a - b for a, b in zip(res['session'], mmr)])}"
              + (f" (CPU {med([a - b for a, b in zip(res['session_cpu'], mmc)])})" if one else ""))
    print(f"prefill ({rows} row(s) of {args.prompt}+ tokens, one call per row): {med(res['prefill'])} ms "
          f"= {statistics.median(res['prefill']) / statistics.median(res['wall']):.1f} decode steps")
    w_bytes, head_bytes, _ = bytes_info
    kv = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 4 * res["mean_past"] * rows
    floor_ms = 1e3 * (w_bytes + kv) / (bw[0] * 1e9)
    print(f"floor: weights {w_bytes / 1e6:.1f} MB (lm_head {head_bytes / 1e6:.1f}) + KV cache {kv / 1e6:.1f} MB "
          f"at {bw[0]:.1f} GB/s (matvec best; median {bw[1]:.1f}) = {floor_ms:.2f} ms; "
          f"wall / floor {statistics.median(res['wall']) * 1e3 / floor_ms:.2f}x, "
          f"session / floor {statistics.median(res['session']) * 1e3 / floor_ms:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a pipeline folder (with lm/) or an LM .onnx file")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=150, help="measured decode steps per generation")
    ap.add_argument("--warmup", type=int, default=20, help="decode steps before the measured ones")
    ap.add_argument("--prompt", type=int, default=30, help="prompt tokens of row 0 (row i has prompt + i)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chain-nodes", type=int, default=855, help="nodes of the synthetic dispatch chain")
    ap.add_argument("--floor-mb", type=float, default=1024.0, help="matrix size of the bandwidth matvec")
    ap.add_argument("--floor-reps", type=int, default=20)
    args = ap.parse_args()

    from pipeline_lib import registry
    from pipeline_lib.runtime.generate import LMSpec

    model = Path(args.model)
    lm_path = model if model.suffix == ".onnx" else model / registry.LM_DIR / f"{registry.LM_FILE}.onnx"
    cfg = lm_path.with_name(lm_path.stem + registry.LM_CONFIG_SUFFIX)
    if not cfg.is_file():
        cfg = lm_path.parent / f"{registry.LM_FILE}{registry.LM_CONFIG_SUFFIX}"
    spec = LMSpec.from_json(cfg)
    bytes_info = step_bytes(lm_path)
    print(f"model {lm_path}: {bytes_info[2]} nodes in the file; initializer bytes read per step {bytes_info[0] / 1e6:.1f} MB")
    bws = {t: bandwidth(t, args.floor_mb, args.floor_reps) for t in sorted(set(args.threads))}
    for t, (best, medbw) in bws.items():
        print(f"matvec bandwidth, {t} thread(s), {args.floor_mb:.0f} MB: best {best:.1f} GB/s, median {medbw:.1f}")
    for threads in args.threads:
        for rows in args.rows:
            res = measure(args, lm_path, spec, threads, rows)
            report(args, threads, rows, res, bytes_info, spec, bws[threads])


if __name__ == "__main__":
    main()
