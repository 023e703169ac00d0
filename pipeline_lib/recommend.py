"""Which converted models to run on this CPU: the rule behind `precision="auto"` and the report's
recommendation.

The rule is a table: for each CPU class (what its instruction sets allow: AMX, AVX-512 BF16, VNNI, plain
AVX2) and each objective (one stream's speed, the first chunk's latency, a batch's throughput), the
model choices (pipeline_lib.registry.Choice labels) in order of preference, fastest first, as measured by
the benchmark stage on a CPU of that class; docs/design.md ("Recommendation") gives the measurements
behind each row. `pick` takes the first choice of the row whose models are present under ROOT, can
run on this CPU (bf16 needs AVX512-BF16 or AMX-BF16) and whose targets' quality certificates passed
(pipeline_lib.certificate: written by parity_convert, checked against the files), and says why, naming the
certificates it relied on.

The report (pipeline_lib.report) names the measured fastest configuration that passed quality on the
benchmark's machine beside what this rule picks for that machine's class, so a row that a new
measurement contradicts shows up there.

A leaf below the runtime: it imports the registry, certificate, cpuinfo and errors only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from pipeline_lib import certificate, registry
from pipeline_lib.cpuinfo import BF16_FEATURES, read_cpuinfo
from pipeline_lib.errors import InputError, ModelFileError

# What the user wants most. "stream": one synthesis's x real time (speak, infer); "first_chunk": the
# latency of a stream's first audio; "batch": x real time of eight sentences at once (infer_batch, a server).
OBJECTIVES = ("stream", "first_chunk", "batch")
OBJECTIVE_NAMES = {"stream": "single stream (x real time)", "first_chunk": "streaming first chunk (ms)",
                   "batch": "batch of 8 (x real time)"}

# CPU classes, most capable first; a CPU belongs to the first whose flags it has (any one of them).
CPU_CLASSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("amx", ("amx_bf16", "amx_int8")),
    ("avx512_bf16", ("avx512_bf16",)),
    ("vnni", ("avx512_vnni", "avx_vnni")),
    ("avx2", ("avx2",)),
    ("baseline", ()),
)

# Preference per class and objective (fastest first; later entries are what to use when the earlier ones
# were not built). A pair first in a list was not measured as a whole where its parts were each the fastest
# of their kind: the benchmark measures it (bench.pairs) and the report flags a disagreement. Measurements:
# docs/design.md, "Recommendation".
RULES: dict[str, dict[str, tuple[str, ...]]] = {
    # Xeon with AMX (issue measurements, 2 threads): 4-bit ONNX Runtime LM + OpenVINO bf16 decoder for one
    # stream; OpenVINO int8 for the first chunk and for batches.
    "amx": {
        "stream": ("onnx-int4+openvino-bf16", "onnx-int4", "openvino-int8", "onnx-int8", "onnx-fp32"),
        "first_chunk": ("openvino-int8", "openvino-bf16", "onnx-int8", "onnx-int4", "onnx-fp32"),
        "batch": ("openvino-int8", "openvino-bf16", "onnx-int4", "onnx-int8", "onnx-fp32"),
    },
    # AVX-512 BF16 and VNNI without AMX (AMD Zen 5): ONNX Runtime's 4-bit LM is the fastest LM, OpenVINO's
    # int8 decoder the fastest decoder; OpenVINO int8 for batches.
    "avx512_bf16": {
        "stream": ("onnx-int4+openvino-int8", "onnx-int4", "openvino-int8", "onnx-int8", "onnx-fp32"),
        "first_chunk": ("onnx-int4", "openvino-int8", "onnx-int8", "onnx-fp32"),
        "batch": ("openvino-int8", "onnx-int4", "onnx-int8", "onnx-fp32"),
    },
    # VNNI without bf16: not measured; the avx512_bf16 order, which uses no bf16.
    "vnni": {
        "stream": ("onnx-int4+openvino-int8", "onnx-int4", "openvino-int8", "onnx-int8", "onnx-fp32"),
        "first_chunk": ("onnx-int4", "openvino-int8", "onnx-int8", "onnx-fp32"),
        "batch": ("openvino-int8", "onnx-int4", "onnx-int8", "onnx-fp32"),
    },
    # AVX2 only (AMD Zen 3): OpenVINO computes int8 weights in f32 here; ONNX Runtime's integer kernels win.
    "avx2": {
        "stream": ("onnx-int4", "onnx-int8", "openvino-int8", "onnx-fp32"),
        "first_chunk": ("onnx-int4", "onnx-int8", "openvino-int8", "onnx-fp32"),
        "batch": ("onnx-int8", "onnx-int4", "openvino-int8", "onnx-fp32"),
    },
    "baseline": {
        "stream": ("onnx-int8", "onnx-fp32"),
        "first_chunk": ("onnx-int8", "onnx-fp32"),
        "batch": ("onnx-int8", "onnx-fp32"),
    },
}


def cpu_class(flags: Iterable[str]) -> str:
    """The first of CPU_CLASSES whose flags the CPU has (any one of them); "baseline" otherwise."""
    flags = set(flags)
    for name, needs in CPU_CLASSES:
        if not needs or flags & set(needs):
            return name
    return "baseline"


def runnable(choice: registry.Choice, flags: Iterable[str]) -> str | None:
    """None where this CPU can run both models of `choice`; else why not (a bf16 model without bf16 flags)."""
    flags = set(flags)
    for t in choice.targets:
        if registry.precision(t.precision).inference == "bf16" and not flags & set(BF16_FEATURES):
            return f"{t.label} computes in bf16 and this CPU has none of {' / '.join(BF16_FEATURES)}"
    return None


def check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise InputError(f"objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
    return objective


def rule(cls: str, objective: str) -> tuple[registry.Choice, ...]:
    """The choices of RULES for a CPU class and objective, in order of preference."""
    return tuple(registry.choice(label) for label in RULES[cls][check_objective(objective)])


def present(root: Path, choice: registry.Choice) -> bool:
    """Both models of `choice` are under `root` (registry.model_dir_under)."""
    return (registry.model_dir_under(root, choice.lm.backend, choice.lm.precision, registry.LM_DIR) is not None
            and registry.model_dir_under(root, choice.decoder.backend, choice.decoder.precision,
                                         registry.DECODER_DIR) is not None)


# Model files (weights and graphs) as opposed to their JSON configs, which a conversion rewrites.
_MODEL_SUFFIXES = (".onnx", ".xml", ".bin", ".data")


def certificate_of(root: Path, t: registry.Target) -> certificate.Status:
    """The certificate of target `t` under `root`: the first of its folders (registry.folders_under) that holds
    one (onnx-fp32: ROOT/onnx/fp32, whose files are the export's), checked against that folder's files;
    "uncertified" where none does. Where the runtime loads a model from another folder than the certificate's
    (onnx-fp32: ROOT/export comes first), that folder's model files must be the certified ones too, else the
    certificate is "stale" (an export rebuilt after its fp32 target was certified)."""
    folders = registry.folders_under(root, t.backend, t.precision)
    for folder in folders:
        if (folder / certificate.CERTIFICATE_FILE).is_file():
            status = certificate.status(folder)
            if status.certificate is None or status.state == "stale":
                return status
            for which in registry.MODELS:
                loaded = registry.model_dir_under(root, t.backend, t.precision, which)
                if loaded is None or loaded == folder / which:
                    continue
                for key, sha in status.certificate.get("files", {}).items():
                    sub, _, name = key.partition("/")
                    if sub == which and name.endswith(_MODEL_SUFFIXES) and (
                            not (loaded / name).is_file() or certificate.sha256_file(loaded / name) != sha):
                        return certificate.Status(folder, "stale", f"{folder / certificate.CERTIFICATE_FILE}: "
                                                  f"certifies other files than {loaded / name}, which is loaded; "
                                                  "rerun convert and parity_convert (dvc repro)", status.certificate)
            return status
    return certificate.status(folders[-1] if folders else Path(root))


@dataclass(frozen=True)
class Pick:
    """What `pick` chose and why (a sentence for logs and the report), and the certificates it relied on."""

    choice: registry.Choice
    cpu_class: str
    objective: str
    reason: str
    certificates: tuple[certificate.Status, ...] = ()


def pick(root: str | Path, objective: str = "stream", flags: Iterable[str] | None = None,
         cpu_name: str | None = None) -> Pick:
    """The first choice of RULES[cpu_class(flags)][objective] whose models are under `root`, run on this
    CPU and carry passed certificates (every target of the choice: `certificate_of`; failed, unchecked,
    stale or missing ones are skipped, with the reason). flags / cpu_name: this CPU's (/proc/cpuinfo)
    unless given. A ModelFileError naming what was looked for and why each was skipped when none qualifies."""
    check_objective(objective)
    if flags is None:
        cpu_name, flags = read_cpuinfo()
    flags = set(flags)
    cls = cpu_class(flags)
    root = Path(root)
    passed: list[str] = []
    for c in rule(cls, objective):
        why_not = runnable(c, flags)
        if why_not is None and not present(root, c):
            why_not = "not built under " + str(root)
        certs: tuple[certificate.Status, ...] = ()
        if why_not is None:
            certs = tuple(certificate_of(root, t) for t in dict.fromkeys(c.targets))
            bad = [s for s in certs if not s.passed]
            if bad:
                why_not = "certificate " + "; ".join(f"{s.state}: {s.why}" for s in bad)
        if why_not is None:
            skipped = f"; skipped before it: {'; '.join(passed)}" if passed else ""
            relied = "; ".join(s.why for s in certs)
            reason = (f"CPU {cpu_name or 'unknown'} is of class {cls}; for {OBJECTIVE_NAMES[objective]} the rule's "
                      f"order is {', '.join(x.label for x in rule(cls, objective))}; picked {c.label}{skipped}; "
                      f"relied on {relied}")
            return Pick(c, cls, objective, reason, certs)
        passed.append(f"{c.label} ({why_not})")
    raise ModelFileError(
        f"{root}: none of the models that precision='auto' picks from on this CPU (class {cls}, objective {objective}) "
        f"is there with a passed certificate: {'; '.join(passed)}. Pass the artifacts/ folder of `dvc repro` (parity_convert "
        "writes the certificates), a folder with <backend>/<precision>/{lm,decoder} from `soprano-onnx convert --out "
        "ROOT/<backend>/<precision>`, or name a precision explicitly (precision='onnx-int8': loads it, with a warning "
        "when it is not certified).")


# The benchmark column (pipeline_lib.bench.COLUMNS) of each objective, and whether higher is better.
OBJECTIVE_COLUMNS = {"stream": ("xrt", True), "first_chunk": ("first_chunk_ms", False), "batch": ("batch8_xrt", True)}


def fastest(rows: Sequence[dict], objective: str, passed: Iterable[str]) -> dict | None:
    """The benchmark row fastest for `objective` (OBJECTIVE_COLUMNS) among rows whose "choice" (the config
    label without the thread suffix) is in `passed`."""
    key, higher = OBJECTIVE_COLUMNS[check_objective(objective)]
    ok = set(passed)
    best = None
    for r in rows:
        v = r.get(key)
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        if v != v or str(r.get("choice") or "") not in ok:
            continue
        if best is None or (v > float(best[key]) if higher else v < float(best[key])):
            best = r
    return best
