"""What this machine's CPU can do, as far as it changes the code onnxopt emits.

Read from /proc/cpuinfo (Linux); elsewhere nothing is known and the answers are the safe ones.
"""

from __future__ import annotations

import platform

# Instructions that multiply u8 x s8 into an int32 accumulator directly (no int16 intermediate).
_DOT_PRODUCT_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}


def cpuinfo() -> dict[str, str]:
    """First value of each /proc/cpuinfo key (Linux); empty elsewhere."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep:
                    info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def cpu_flags(info: dict[str, str] | None = None) -> set[str]:
    """x86 "flags" or arm64 "Features" of the first CPU."""
    info = cpuinfo() if info is None else info
    return set((info.get("flags") or info.get("Features") or "").split())


def u8s8_saturates(flags: set[str] | None = None, machine: str | None = None) -> bool:
    """True when onnxruntime's u8 x s8 integer kernels on this CPU add pairs of products in int16.

    x86-64 without VNNI/AMX runs them with vpmaddubsw (AVX2, AVX-512BW), whose int16 pair sum
    saturates for 8-bit weights; unknown x86 CPUs count as such. Other architectures (arm64 dot
    products, or their widening multiplies) accumulate in 32 bits.
    """
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    flags = cpu_flags() if flags is None else flags
    return not (flags & _DOT_PRODUCT_FLAGS)
