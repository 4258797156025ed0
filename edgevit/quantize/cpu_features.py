"""What the host x86 CPU's integer kernels can do, for choosing an INT8 weight range.

ONNX Runtime's u8×s8 kernels on x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) add
pairs of products in 16 bits (``vpmaddubsw``), which saturates with full-range 8-bit
weights: on an AMD EPYC (Zen 3, AVX2) the logits of a QDQ model were off by 13-32 % RMS
instead of the 2 % the quantization itself costs. Seven-bit weights (``reduce_range``)
cannot saturate; with VNNI (``vpdpbusd`` adds in 32 bits) full range is exact and better."""

from __future__ import annotations

import platform
from pathlib import Path

VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first processor's feature flags (Linux); empty where they cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def int8_weights_need_reduced_range(machine: str | None = None, flags: frozenset[str] | None = None) -> bool:
    """True on an x86 CPU whose INT8 dot products can saturate (no VNNI): quantize the
    weights to 7 bits there. ARM and VNNI CPUs accumulate in 32 bits and keep 8."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686"):
        return False
    flags = cpu_flags() if flags is None else flags
    return not (flags & VNNI_FLAGS)
