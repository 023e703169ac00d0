"""Where a benchmark ran: the CPU (model and the vector extensions that change the kernels), core counts,
Python and library versions, and when. The benchmark stage records it beside its CSV (ENV_JSON); the
report prints it (pipeline_lib.report). Its own module so that the benchmark does not depend on the
report's code.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable

from pipeline_lib.cpuinfo import CPUINFO, read_cpuinfo
from pipeline_lib.errors import InputError

LIBRARIES = ("numpy", "onnxruntime", "openvino", "torch", "nncf", "transformers")
# The vector extensions that change int8 / fp32 kernels (and int8 accuracy: without VNNI, ONNX Runtime's
# u8 x s8 products saturate; see conf/convert/default.yaml), as /proc/cpuinfo names them.
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's model name and which of CPU_FEATURES it has, e.g. 'AMD EPYC (avx2)'."""
    name, flags = read_cpuinfo(cpuinfo)
    name = name or platform.processor() or platform.machine() or "unknown"
    if not flags:
        return name
    found = [f for f in CPU_FEATURES if f in flags]
    return f"{name} ({', '.join(found) if found else 'none of ' + ', '.join(CPU_FEATURES)})"


def core_counts() -> tuple[int | None, int | None]:
    """(logical CPUs usable by this process, physical cores) where known."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:
        physical = None
    return logical, physical


def library_versions(names: Iterable[str] = LIBRARIES) -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


ENV_JSON = "bench_env.json"  # written beside the benchmark CSV by the benchmark stage


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


@dataclass
class Environment:
    cpu: str
    logical_cpus: int | None
    physical_cores: int | None
    python: str
    libraries: dict[str, str]
    date: str
    # Where these facts come from: "benchmark" (recorded by the run that measured the figures) or
    # "report" (read where and when the report was built).
    origin: str = "report"
    # Which of CPU_FEATURES the CPU has (None in records written before this field: see features()).
    cpu_flags: list[str] | None = None

    def features(self) -> set[str]:
        """The CPU's CPU_FEATURES: cpu_flags, else the list in parentheses of `cpu` (older records)."""
        if self.cpu_flags is not None:
            return set(self.cpu_flags)
        inside = self.cpu.rsplit("(", 1)[-1].rstrip(")") if self.cpu.endswith(")") else ""
        return {f.strip() for f in inside.split(",") if f.strip() in CPU_FEATURES}

    @classmethod
    def here(cls, date: str | None = None, origin: str = "report") -> "Environment":
        logical, physical = core_counts()
        flags = read_cpuinfo()[1]
        return cls(cpu=cpu_model(), logical_cpus=logical, physical_cores=physical, python=platform.python_version(),
                   libraries=library_versions(), date=date or utc_now(), origin=origin,
                   cpu_flags=[f for f in CPU_FEATURES if f in flags] if flags else None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, path: Path | str) -> "Environment":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot read the benchmark environment record ({exc}); rerun the benchmark "
                             "stage") from exc
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except (TypeError, AttributeError) as exc:  # not an object, or a field missing
            raise InputError(f"{path}: not a benchmark environment record ({exc}); rerun the benchmark stage") from exc
