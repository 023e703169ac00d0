"""What /proc/cpuinfo says about the CPU: its model name and instruction-set flags (Linux only).

int8 speed, and for ONNX Runtime int8 accuracy, depend on the flags: without VNNI, ONNX Runtime's
u8 x s8 products saturate (conf/convert/default.yaml), and OpenVINO's CPU plugin computes int8-weight
layers in f32 (runtime.backends.openvino_int8_note).

Also the number of CPUs the process may use (`available_cpus`), the default thread count of speak, bench
and serve (`default_threads`: the physical cores among them, within the cgroup CPU quota), and a warning
when a runtime is asked for more threads than the CPUs (`warn_if_oversubscribed`)."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)

CPUINFO = Path("/proc/cpuinfo")
# Integer dot-product instructions (AVX-512 VNNI, AVX-VNNI, AMX): OpenVINO's CPU plugin quantises the
# activations of int8-weight layers at run time and multiplies in integers only with one of these.
INT8_DOT_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8")


def read_cpuinfo(cpuinfo: Path = CPUINFO) -> tuple[str, set[str]]:
    """(model name, flags) of the first CPU listed; ("", set()) where the file cannot be read."""
    name, flags = "", set()
    try:
        for line in cpuinfo.read_text().splitlines():
            key = line.split(":", 1)[0].strip().lower()
            if key == "model name" and not name:
                name = line.split(":", 1)[1].strip()
            elif key == "flags" and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return name, flags


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask where the OS reports one (Linux), else
    os.cpu_count(); 1 where neither is known. A cgroup CPU quota (e.g. docker --cpus) is not counted."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


SYS_CPU = Path("/sys/devices/system/cpu")
CGROUP = Path("/sys/fs/cgroup")


def physical_cores(cpus: set[int] | None = None, sys_cpu: Path = SYS_CPU) -> int:
    """Physical cores among `cpus` (default: this process's affinity): SMT siblings count once, told
    apart by (physical_package_id, core_id) from sysfs; a CPU without topology counts as its own core."""
    if cpus is None:
        try:
            cpus = set(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = set(range(os.cpu_count() or 1))
    cores = set()
    for c in cpus:
        topo = sys_cpu / f"cpu{c}" / "topology"
        try:
            cores.add((topo.joinpath("physical_package_id").read_text().strip(), topo.joinpath("core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(c)))
    return max(1, len(cores))


def cgroup_cpu_limit(cgroup: Path = CGROUP) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (docker --cpus, Kubernetes limits): cgroup v2
    cpu.max, else v1 cpu.cfs_quota_us / cpu.cfs_period_us; None when there is none or it cannot be read."""
    rel = ""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) == 3 and parts[0] == "0" and parts[1] == "":
                rel = parts[2].lstrip("/")  # cgroup v2: the process's own group
    except OSError:
        pass
    for base in dict.fromkeys([cgroup / rel, cgroup]):
        try:
            quota, period = (base / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        except (OSError, ValueError):
            pass
    try:
        quota = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def default_threads() -> int:
    """The default intra-op thread count of speak, bench and serve (and SopranoTTS): the physical cores this
    process may run on (affinity, SMT siblings once), at most the cgroup CPU quota rounded up; at least 1.
    More threads than cores compete for them (docs/design.md, "Thread default")."""
    n = physical_cores()
    quota = cgroup_cpu_limit()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


_OVERSUBSCRIBED_WARNED: set[int] = set()


def warn_if_oversubscribed(num_threads: object, what: str = "num_threads") -> bool:
    """Log a warning, once per process per thread count, when `num_threads` exceeds available_cpus():
    threads that outnumber the cores wait on each other, and the models run slower than with one per core.
    True when it warns. Values that are not an int >= 1 are left to the caller's validation."""
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        return False
    cpus = available_cpus()
    if num_threads <= cpus or num_threads in _OVERSUBSCRIBED_WARNED:
        return False
    _OVERSUBSCRIBED_WARNED.add(num_threads)
    log.warning(
        "%s=%d exceeds the %d CPU%s available to this process: the threads compete for cores and run "
        "slower than %d would; set %s to at most %d.",
        what, num_threads, cpus, "" if cpus == 1 else "s", cpus, what, cpus,
    )
    return True


# bf16 arithmetic (OpenVINO INFERENCE_PRECISION_HINT "bf16"): AVX-512 BF16 or AMX BF16. Without either,
# OpenVINO's CPU plugin quietly computes in f32 instead, so a "bf16" measurement would be an f32 one.
BF16_FEATURES = ("avx512_bf16", "amx_bf16")


def missing_bf16(cpuinfo: Path = CPUINFO) -> str | None:
    """None where the CPU has a bf16 instruction set (BF16_FEATURES); else a sentence naming the missing
    flags and the CPU, for errors and benchmark notes."""
    name, flags = read_cpuinfo(cpuinfo)
    if any(f in flags for f in BF16_FEATURES):
        return None
    return (f"this CPU ({name or 'unknown model'}) has none of the CPU flags {' / '.join(BF16_FEATURES)} "
            "that bf16 inference needs (OpenVINO would silently compute in f32)")
