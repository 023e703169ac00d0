"""Release bundles as the runtime reads them, and hub ids.

A bundle (written by `soprano-onnx release` / the release stage: pipeline_lib.release) is a folder in the
layout ONNX models use on the Hugging Face hub (the onnx-community convention):

    README.md                      model card (parity and benchmark tables, license, how to run)
    config.json                    {"model_type": "soprano", "soprano_onnx": {"format": 1, "default": LABEL,
                                    "variants": {LABEL: {"lm": "onnx/...", "decoder": "onnx/...",
                                    "certificate": "certificates/LABEL.json"}}}, ...}
    tokenizer.json (+ tokenizer_config.json, special_tokens_map.json)
    onnx/soprano_lm_step{,_quantized,_q4}.onnx            + {stem}_config.json
    onnx/soprano_decoder_preistft{,_quantized,_q4}.onnx   + {stem}_istft_config.json
    certificates/LABEL.json        each variant's certificate, its files named by their bundle paths

`variant` chooses one: a label names it (a failed or missing certificate: a warning); "auto" takes the first
of pipeline_lib.recommend's rule for this CPU that the bundle holds with a passed certificate; None the
bundle's default. `resolve` turns a hub id ("owner/name") into a local folder through huggingface_hub; offline
(or without the package) it is a ModelFileError that names the local-folder way.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline_lib import certificate, recommend, registry
from pipeline_lib.cpuinfo import read_cpuinfo
from pipeline_lib.errors import ModelFileError

log = logging.getLogger(__name__)

BUNDLE_CONFIG = "config.json"
BUNDLE_KEY = "soprano_onnx"
FORMAT = 1
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_bundle(folder: Path) -> bool:
    cfg = folder / BUNDLE_CONFIG
    if not cfg.is_file():
        return False
    try:
        return BUNDLE_KEY in json.loads(cfg.read_text())
    except ValueError:
        return False


def read(folder: Path) -> dict[str, Any]:
    """The bundle's ``soprano_onnx`` block, checked: a known format, a default and variants whose files exist."""
    cfg_path = folder / BUNDLE_CONFIG
    try:
        block = json.loads(cfg_path.read_text())[BUNDLE_KEY]
        variants, default = block["variants"], block["default"]
        fmt = block["format"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelFileError(f"{cfg_path}: not a soprano-onnx bundle config ({exc!r}); rebuild it with "
                             "`soprano-onnx release`") from exc
    if fmt != FORMAT:
        raise ModelFileError(f"{cfg_path}: bundle format {fmt}, this runtime reads {FORMAT}; upgrade soprano-onnx")
    for label, v in variants.items():
        for key in ("lm", "decoder"):
            if not (folder / v[key]).is_file():
                raise ModelFileError(f"{folder / v[key]}: the {key} of variant {label} is missing from the bundle; "
                                     "download the whole folder again")
    if default not in variants:
        raise ModelFileError(f"{cfg_path}: default variant {default!r} is not among {sorted(variants)}")
    return block


def certificate_status(folder: Path, label: str, variant: dict[str, Any]) -> certificate.Status:
    cert = variant.get("certificate")
    if not cert or not (folder / cert).is_file():
        return certificate.Status(folder, "uncertified", f"variant {label}: no certificate in the bundle")
    return certificate.status(folder, path=folder / cert)


@dataclass(frozen=True)
class Variant:
    label: str
    lm: Path
    decoder: Path
    certificate: certificate.Status
    reason: str


def variant(folder: Path, precision: str | None, objective: str = "stream") -> Variant:
    """The variant to load (see the module doc), logged with the certificate it relies on."""
    block = read(folder)
    variants = block["variants"]

    def make(label: str, reason: str) -> Variant:
        v = variants[label]
        return Variant(label, folder / v["lm"], folder / v["decoder"], certificate_status(folder, label, v), reason)

    if precision == "auto":
        _, flags = read_cpuinfo()
        cls = recommend.cpu_class(flags)
        skipped = []
        order = [c.label for c in recommend.rule(cls, objective)] + [block["default"]] + sorted(variants)
        for label in dict.fromkeys(order):
            if label not in variants:
                continue
            chosen = make(label, "")
            if chosen.certificate.passed:
                why = (f"CPU class {cls}, objective {objective}: picked bundle variant {label}"
                       f"{'; skipped ' + '; '.join(skipped) if skipped else ''}; relied on {chosen.certificate.why}")
                log.info("precision auto: %s", why)
                return Variant(label, chosen.lm, chosen.decoder, chosen.certificate, why)
            skipped.append(f"{label} ({chosen.certificate.state}: {chosen.certificate.why})")
        raise ModelFileError(f"{folder}: no variant of the bundle has a passed certificate ({'; '.join(skipped)}); "
                             f"name one explicitly (precision='{block['default']}') to load it anyway")
    label = block["default"] if precision is None else registry.choice(precision).label
    if label not in variants:
        raise ModelFileError(f"{folder}: the bundle has no variant {label}; it has {', '.join(sorted(variants))}")
    chosen = make(label, f"bundle variant {label}" + (" (the default)" if precision is None else ""))
    if not chosen.certificate.passed:
        log.warning("bundle variant %s is %s (%s); loading it because it was %s", label, chosen.certificate.state,
                    chosen.certificate.why, "the default" if precision is None else "named")
    return chosen


def resolve(model: str | Path) -> Path:
    """A local folder as it is; a hub id ("owner/name", no such local path) downloaded through huggingface_hub
    into its cache. Offline, or without the package: a ModelFileError naming the local-folder way."""
    path = Path(model).expanduser()
    # "owner/name" only where neither the path nor its first folder exists here ("artifacts/onnx" with no
    # onnx/ built is a missing local folder, reported as such by the caller, not a hub id)
    if path.exists() or not HUB_ID.match(str(model)) or Path(str(model).split("/")[0]).exists():
        return path
    fix = (f"download it where there is a network (huggingface-cli download {model} --local-dir DIR) and pass "
           f"the local folder instead: --model DIR, or SopranoTTS.from_dir(DIR)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise ModelFileError(f"{model}: no such local folder, and a hub id needs the huggingface_hub package "
                             f"(pip install huggingface_hub); or {fix}") from exc
    try:
        return Path(snapshot_download(repo_id=str(model)))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, auth: all end here, named
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelFileError(f"{model}: no such local folder, and the hub could not be reached for it "
                             f"({type(exc).__name__}: {first}); {fix}") from exc
