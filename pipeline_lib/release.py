"""A release bundle: the targets chosen, for people who never run the factory (`soprano-onnx release`, and
the release stage: artifacts/release/<checkpoint>/).

The layout is the onnx-community convention for the Hugging Face hub (pipeline_lib.runtime.bundle reads it):
``onnx/`` with one file per model and variant (suffix "" fp32, "_quantized" int8, "_q4" int4), each with
its JSON config beside it, ``config.json`` (the variants, the default, the checkpoint), the tokenizer,
``certificates/<label>.json`` (each variant's parity certificate, files named by their bundle paths) and a
``README.md`` model card: the parity table from the certificates, the benchmark table of the machine that
built it (reports/bench.csv, reports/bench_env.json), the license and how to run and publish it.

Model files are hard links to the targets' (a copy where the file system refuses), so a bundle costs no
second copy on disk. The bundle's bytes depend on its inputs only (no build time or host; the benchmark's
machine and date are the benchmark's, an input). ONNX targets only: the hub's ONNX convention, and the
runtime's light install (onnxruntime) runs them.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from pipeline_lib import certificate, registry
from pipeline_lib.errors import InputError, ModelFileError

VARIANT_SUFFIX = {"fp32": "", "int8": "_quantized", "int4": "_q4"}
ONNX_DIR = "onnx"
CERT_DIR = "certificates"
CODE_LICENSE = "apache-2.0"  # pyproject.toml's
# What the parity table shows, per metric: (column title, limit key, "min" or "max").
PARITY_COLUMNS = {
    "lm_hidden_cosine_min": ("hidden cosine min", "lm_hidden_cosine_min", "min"),
    "lm_hidden_cosine_mean": ("hidden cosine mean", "lm_hidden_cosine_mean_min", "min"),
    "lm_token_agreement": ("teacher-forced agreement", "lm_token_agreement_min", "min"),
    "audio_log_mel_distance_db": ("log-mel distance (dB)", "audio_log_mel_distance_max", "max"),
    "decoder_audio_snr_db": ("decoder SNR (dB)", "decoder_audio_snr_db_min", "min"),
    "audio_snr_db": ("audio SNR vs torch (dB)", "audio_snr_db_min", "min"),
    "lm_hidden_max_abs": ("hidden max abs vs torch", "lm_hidden_max_abs", "max"),
}
BENCH_COLUMNS = (("threads", "threads"), ("xrt", "x real time"), ("per_token_median_ms", "LM ms / token"),
                 ("first_chunk_ms", "first chunk (ms)"), ("batch8_xrt", "batch of 8 (x real time)"),
                 ("peak_rss_mb", "peak RSS (MB)"))


def _targets(labels: Sequence[str], default: str) -> list[registry.Target]:
    out = []
    for label in labels:
        c = registry.choice(label)
        if len(c.targets) != 1 or c.lm.backend != "onnx" or c.lm.precision not in VARIANT_SUFFIX:
            raise InputError(f"release target {label}: a bundle holds ONNX targets, one of "
                             f"{', '.join('onnx-' + p for p in VARIANT_SUFFIX)}")
        out.append(c.lm)
    if default not in [t.label for t in out]:
        raise InputError(f"release default {default!r}: not among the targets {', '.join(labels)}")
    return out


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _dump(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def build_bundle(root: Path | str, labels: Sequence[str], out: Path | str, default: str,
                 bench_csv: Path | str | None = None, bench_env: Path | str | None = None) -> Path:
    """Write the bundle of targets ``labels`` (under ``root``: artifacts/ after dvc repro) to ``out``, replacing
    it as a whole once complete. ModelFileError when a target's models are missing."""
    from pipeline_lib.recommend import certificate_of
    from pipeline_lib.runtime.bundle import BUNDLE_CONFIG, BUNDLE_KEY, FORMAT

    root, out = Path(root), Path(out)
    targets = _targets(labels, default)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / ONNX_DIR).mkdir()
        (tmp / CERT_DIR).mkdir()
        variants: dict[str, Any] = {}
        certs: dict[str, dict[str, Any]] = {}
        tokenizer_from = None
        for t in targets:
            suffix = VARIANT_SUFFIX[t.precision]
            entry: dict[str, Any] = {"backend": t.backend, "precision": t.precision}
            # The bundle ships the files a certificate vouches for: the target folder that holds the
            # certificate (onnx-fp32: ROOT/onnx/fp32, whose LM is the fused graph, not the export's traced one).
            certified = next((f for f in registry.folders_under(root, t.backend, t.precision)
                              if (f / certificate.CERTIFICATE_FILE).is_file()), None)
            status = certificate.status(certified) if certified is not None else certificate_of(root, t)
            renamed: dict[str, str] = {}
            for which, spec in registry.MODELS.items():
                src_dir = (certified / which if certified is not None and (certified / which / f"{spec.file}.onnx").is_file()
                           else registry.model_dir_under(root, t.backend, t.precision, which))
                if src_dir is None:
                    raise ModelFileError(f"{root}: no {which} of {t.label}; build it first (dvc repro convert@{t.label})")
                src = src_dir / f"{spec.file}.onnx"
                name = f"{spec.file}{suffix}.onnx"
                _link(src, tmp / ONNX_DIR / name)
                cfg = json.loads((src_dir / spec.config).read_text())
                spec.block(cfg)["file"] = name
                _dump(tmp / ONNX_DIR / (f"{spec.file}{suffix}" + spec.config[len(spec.file):]), cfg)
                entry[which] = f"{ONNX_DIR}/{name}"
                renamed[f"{which}/{spec.file}.onnx"] = entry[which]
                if which == registry.LM_DIR and tokenizer_from is None:
                    tokenizer_from = src_dir
            if status.certificate is not None:
                cert = dict(status.certificate)
                files = cert.pop("files", {})
                cert["files"] = {renamed[k]: v for k, v in files.items() if k in renamed}
                cert["target_files"] = files
                if status.state == "stale":
                    cert["verdict"], cert["passed"] = "fail", False
                    cert["failures"] = [*cert.get("failures", []), status.why]
                _dump(tmp / CERT_DIR / f"{t.label}.json", cert)
                entry["certificate"] = f"{CERT_DIR}/{t.label}.json"
                certs[t.label] = cert
            variants[t.label] = entry
        for name in registry.TOKENIZER_FILES:
            if (tokenizer_from / name).is_file():
                shutil.copyfile(tokenizer_from / name, tmp / name)
        first_cert = next(iter(certs.values()), {})
        dec_cfg = json.loads((tmp / ONNX_DIR / (registry.DECODER_FILE + VARIANT_SUFFIX[targets[0].precision]
                                                + registry.DECODER_CONFIG[len(registry.DECODER_FILE):])).read_text())
        config = {"model_type": "soprano", "architectures": ["SopranoTTS"], "library": "soprano-onnx",
                  "sample_rate": dec_cfg.get("sample_rate"), "checkpoint": first_cert.get("checkpoint"),
                  BUNDLE_KEY: {"format": FORMAT, "default": default, "variants": variants}}
        _dump(tmp / BUNDLE_CONFIG, config)
        rows = _bench_rows(bench_csv, [t.label for t in targets])
        env = json.loads(Path(bench_env).read_text()) if bench_env and Path(bench_env).is_file() else None
        (tmp / "README.md").write_text(model_card(out.name, config, certs, rows, env))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _bench_rows(bench_csv: Path | str | None, labels: Sequence[str]) -> list[dict[str, str]]:
    if not bench_csv or not Path(bench_csv).is_file():
        return []
    with open(bench_csv, newline="") as f:
        return [r for r in csv.DictReader(f) if f"{r.get('backend')}-{r.get('precision')}" in labels]


def _fmt(v: Any) -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v) if v not in (None, "") else "—"
    if x != x:
        return "—"
    return f"{x:.4g}"


def parity_table(certs: dict[str, dict[str, Any]]) -> str:
    keys = [k for k in PARITY_COLUMNS if any(k in c.get("metrics", {}) for c in certs.values())]
    head = ["variant", "verdict", "limits", *[PARITY_COLUMNS[k][0] for k in keys]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for label, c in certs.items():
        cells = [label, c.get("verdict", "?"), c.get("limits_kind", "?")]
        for k in keys:
            v = c.get("metrics", {}).get(k)
            title, lim_key, kind = PARITY_COLUMNS[k]
            lim = c.get("limits", {}).get(lim_key)
            cells.append("—" if v is None else f"{_fmt(v)}" + (f" ({'≥' if kind == 'min' else '≤'} {_fmt(lim)})"
                                                                if lim is not None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bench_table(rows: list[dict[str, str]]) -> str:
    head = ["variant", *[t for _, t in BENCH_COLUMNS]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([f"{r['backend']}-{r['precision']}", *[_fmt(r.get(k)) for k, _ in BENCH_COLUMNS]])
                     + " |")
    return "\n".join(lines)


def model_card(name: str, config: dict[str, Any], certs: dict[str, dict[str, Any]], rows: list[dict[str, str]],
               env: dict[str, Any] | None) -> str:
    """The README.md of the bundle (hub model card: YAML front matter, then Markdown)."""
    ck = config.get("checkpoint") or {}
    random = bool(ck.get("random_weights"))
    block = config["soprano_onnx"]
    base = ck.get("repo_id")
    front = ["---", f"license: {CODE_LICENSE if random or not base else 'other'}", "library_name: onnxruntime",
             "pipeline_tag: text-to-speech", "tags: [onnx, text-to-speech, soprano]"]
    if base:
        front.append(f"base_model: {base}")
    front.append("---")
    variants = ", ".join(f"`{k}`" for k in block["variants"])
    source = (f"random weights (seed {ck.get('seed')}): noise audio, for timing and wiring only" if random
              else f"{base or ck.get('source')} at revision {ck.get('revision')}")
    weights = ", ".join(f"{k} sha256 {v[:12]}…" for k, v in (ck.get("weights_sha256") or {}).items())
    license_text = (f"The code that built and runs these files is Apache-2.0. "
                    + ("The weights are random (generated by soprano-onnx), Apache-2.0 as well." if random else
                       f"The weights keep the license of their source, {base or ck.get('source')}: read it there before use."))
    machine = ""
    if env:
        libs = env.get("libraries") or {}
        machine = (f"Measured on {env.get('cpu', 'an unnamed CPU')} ({env.get('physical_cores', '?')} physical cores), "
                   f"onnxruntime {libs.get('onnxruntime', '?')}, {env.get('date', '')}.")
    bench = (f"{machine}\n\n{bench_table(rows)}" if rows else "No benchmark was run for this bundle.")
    parity = parity_table(certs) if certs else "No variant carries a certificate: nothing was checked."
    return "\n".join(front) + f"""

# {name}: Soprano text-to-speech, ONNX

ONNX models of [Soprano](https://github.com/ekwek1/soprano) (an 80M-parameter LM that writes audio tokens,
and a decoder that turns its hidden states into a spectrum; 32 kHz audio after an inverse STFT), built by
soprano-onnx. Variants: {variants}; default `{block['default']}`.

Checkpoint: `{ck.get('name')}`, {source}. {weights}

## Quality (parity against fp32)

Each variant's certificate (`certificates/<variant>.json`) holds the metrics, the limits, the checkpoint and
the sha256 of the files it certifies. int8 / int4 are compared with the fp32 export on the same inputs
(teacher-forced), fp32 with the PyTorch reference. Limits of kind `guard` (random weights) only catch a
broken conversion; `quality` limits (trained weights) are a verdict. `precision="auto"` loads only
variants whose certificate passed.

{parity}

## Speed

{bench}

## How to run

```bash
pip install "soprano-onnx[serve]"     # numpy, onnxruntime, tokenizers: no torch
soprano-onnx speak "Hello there." -o hello.wav --model .          # the default variant
soprano-onnx speak "Hello there." -o hello.wav --model . --precision auto
soprano-onnx serve --model .          # OpenAI-compatible POST /v1/audio/speech on 127.0.0.1:8000
```

```python
from pipeline_lib import SopranoTTS
tts = SopranoTTS.from_dir(".", precision="auto")      # or a variant: "onnx-int8"; or a hub id "owner/name"
tts.infer("Hello there.", out_path="hello.wav")
```

Publish this folder: `huggingface-cli upload OWNER/NAME . .` (run in it; `huggingface-cli login` first).

## License

{license_text}
"""


# --- soprano-onnx release ------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"), metavar="ROOT",
                   help="the built targets: <backend>/<precision>/{lm,decoder} with certificate.json (default: artifacts)")
    p.add_argument("--targets", default="onnx-int8,onnx-int4,onnx-fp32",
                   help="comma-separated ONNX targets to bundle (default: onnx-int8,onnx-int4,onnx-fp32)")
    p.add_argument("--default", default=None, help="the variant loaded when none is named (default: the first target)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the bundle folder (replaced as a whole)")
    p.add_argument("--bench-csv", type=Path, default=Path("reports/bench.csv"), help="benchmark rows for the model card")
    p.add_argument("--bench-env", type=Path, default=Path("reports/bench_env.json"), help="the benchmark's machine")


def run(args: argparse.Namespace) -> int:
    from pipeline_lib.fsutil import check_output_dir

    labels = [x.strip() for x in args.targets.split(",") if x.strip()]
    if not labels:
        raise InputError("--targets: name at least one target, e.g. onnx-int8")
    check_output_dir(args.out, "--out")
    out = build_bundle(args.artifacts, labels, args.out, args.default or labels[0], args.bench_csv, args.bench_env)
    print(f"release bundle -> {out}; publish it: huggingface-cli upload OWNER/NAME {out} .")
    return 0
