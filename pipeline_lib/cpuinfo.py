"""What /proc/cpuinfo says about the CPU: its model name and instruction-set flags (Linux only).

int8 speed, and for ONNX Runtime int8 accuracy, depend on the flags: without VNNI, ONNX Runtime's
u8 x s8 products saturate (conf/convert/default.yaml), and OpenVINO's CPU plugin computes int8-weight
layers in f32 (runtime.backends.openvino_int8_note)."""

from __future__ import annotations

from pathlib import Path

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
