"""A target's quality certificate: what parity_convert measured, against which limits, for which checkpoint
and which model files, and the verdict. It travels with the models (``<backend>/<precision>/certificate.json``,
beside ``lm/`` and ``decoder/``; a release bundle carries one per variant), so that whoever loads a folder
knows how good it is without the factory's metrics/.

    {"format": 1, "target": "onnx-int4", "backend": "onnx", "precision": "int4",
     "verdict": "pass" | "fail" | "unchecked", "passed": bool,
     "limits_kind": "guard" | "quality",          # guard: random weights, only a broken conversion misses
     "reference": "...",                           # what the target was compared with
     "checkpoint": {"name", "source", "repo_id", "revision", "random_weights", "weights_sha256": {...}},
     "limits": {...}, "metrics": {...}, "failures": [...], "note": "...",
     "files": {"lm/soprano_lm_step.onnx": "<sha256>", ...}}   # the model files it certifies

No time, date or host: the same inputs give the same certificate (it is a DVC out like the models).
`status` reads a folder's certificate and checks that its files are the ones certified, so an edited or
rebuilt model is never covered by an old verdict. A leaf: standard library and pipeline_lib.errors /
fsutil / registry only (the runtime reads it; recommend's `auto` picks only passed certificates).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline_lib import registry
from pipeline_lib.fsutil import write_json

CERTIFICATE_FILE = "certificate.json"
FORMAT = 1
VERDICTS = ("pass", "fail", "unchecked")
LIMITS_GUARD, LIMITS_QUALITY = "guard", "quality"
# The checkpoint files whose bytes identify the weights (model.safetensors: the LM; decoder.pth: the decoder).
WEIGHT_FILES = ("model.safetensors", "decoder.pth")
SOURCE_KEYS = ("name", "source", "repo_id", "revision", "seed", "random_weights")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checkpoint_identity(ckpt_dir: Path | str) -> dict[str, Any]:
    """The checkpoint a target was built from: source.json's name, source, hub repo and revision, seed and
    whether the weights are random, plus the sha256 of the weight files (WEIGHT_FILES)."""
    ckpt_dir = Path(ckpt_dir)
    src = ckpt_dir / "source.json"
    source = json.loads(src.read_text()) if src.is_file() else {"name": ckpt_dir.name}
    ident = {k: source.get(k) for k in SOURCE_KEYS}
    ident["random_weights"] = bool(source.get("random_weights", False))
    ident["weights_sha256"] = {n: sha256_file(ckpt_dir / n) for n in WEIGHT_FILES if (ckpt_dir / n).is_file()}
    return ident


def model_files(folder: Path | str) -> dict[str, str]:
    """sha256 of every file under ``folder``'s lm/ and decoder/, by path relative to ``folder``."""
    folder = Path(folder)
    out = {}
    for sub in registry.MODELS:
        for p in sorted((folder / sub).rglob("*")):
            if p.is_file():
                out[p.relative_to(folder).as_posix()] = sha256_file(p)
    return out


def limits_kind(identity: Mapping[str, Any]) -> str:
    """guard on random weights (chaotic: the limits only catch a broken conversion), quality otherwise."""
    return LIMITS_GUARD if identity.get("random_weights") else LIMITS_QUALITY


def build(target: registry.Target, identity: Mapping[str, Any], files: Mapping[str, str], *,
          reference: str, limits: Mapping[str, Any] | None, metrics: Mapping[str, float] | None,
          failures: Sequence[str] = (), unchecked: str | None = None) -> dict[str, Any]:
    """The certificate of ``target``'s folder. ``unchecked``: why nothing was measured (verdict "unchecked",
    not passed); else the verdict is "pass" exactly when there are no failures."""
    verdict = "unchecked" if unchecked else ("fail" if failures else "pass")
    kind = limits_kind(identity)
    note = unchecked or (
        "random weights: the limits are guards against a broken conversion, not a quality claim"
        if kind == LIMITS_GUARD else "trained weights: the limits are quality limits (conf/parity/default.yaml says why)")
    return {"format": FORMAT, "target": target.label, "backend": target.backend, "precision": target.precision,
            "verdict": verdict, "passed": verdict == "pass", "limits_kind": kind, "reference": reference,
            "note": note, "checkpoint": dict(identity), "limits": dict(limits or {}),
            "metrics": {k: _finite(v) for k, v in (metrics or {}).items()}, "failures": list(failures),
            "files": dict(files)}


def _finite(v: float) -> float | str:
    v = float(v)
    return v if v == v and abs(v) != float("inf") else str(v)  # JSON has no inf / nan


def write(folder: Path | str, certificate: Mapping[str, Any]) -> Path:
    path = Path(folder) / CERTIFICATE_FILE
    write_json(path, certificate)
    return path


@dataclass(frozen=True)
class Status:
    """A folder's certificate as the runtime sees it: ``state`` is "passed", "failed", "unchecked",
    "uncertified" (no certificate) or "stale" (the files are not the ones certified); ``why`` says so in
    words, ``certificate`` is the parsed file (None when there is none)."""

    folder: Path
    state: str
    why: str
    certificate: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        return self.state == "passed"


def status(folder: Path | str, verify_files: bool = True, path: Path | str | None = None) -> Status:
    """The certificate of a target folder (the one holding lm/ and decoder/). verify_files: check that every
    certified file is there with the certified sha256, and that lm/ and decoder/ hold no model file it does
    not list. ``path``: a certificate elsewhere (a release bundle's certificates/<label>.json): its files are
    relative to ``folder``, and only those are checked."""
    folder = Path(folder)
    listed_only = path is not None
    path = Path(path) if path is not None else folder / CERTIFICATE_FILE
    if not path.is_file():
        return Status(folder, "uncertified", f"{path} not found (no parity check recorded for these models)")
    try:
        cert = json.loads(path.read_text())
        verdict, files = cert["verdict"], cert["files"]
    except (ValueError, KeyError, TypeError) as exc:
        return Status(folder, "uncertified", f"{path}: not a certificate ({exc!r})")
    if verify_files:
        now = ({k: sha256_file(folder / k) for k in files if (folder / k).is_file()} if listed_only
               else model_files(folder))
        changed = sorted(k for k in files.keys() | now.keys() if files.get(k) != now.get(k))
        if changed:
            return Status(folder, "stale", f"{path}: certifies other files than the folder holds "
                                           f"({', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}); rerun "
                                           "parity_convert (dvc repro)", cert)
    kind = cert.get("limits_kind", "?")
    if verdict == "pass":
        return Status(folder, "passed", f"{path}: passed ({kind} limits; checkpoint "
                                        f"{(cert.get('checkpoint') or {}).get('name')})", cert)
    if verdict == "fail":
        return Status(folder, "failed", f"{path}: failed ({kind} limits): {'; '.join(cert.get('failures') or [])}", cert)
    return Status(folder, "unchecked", f"{path}: not checked: {cert.get('note')}", cert)
