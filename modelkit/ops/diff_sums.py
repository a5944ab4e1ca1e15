"""One fused pass over a chunk pair: every sum diff needs, reading each element once.

Diff's statistics of a tensor pair (A.A, A.B, B.B, D.D with D = B - A, max |D|, the count
of changed elements) cost eight or nine passes over a chunk in eager torch (conversions,
three dots, aminmax, a sign count) -- about 0.2 s of CPU per GB, more than reading the
files. No torch operation fuses them, and ``torch.compile`` costs 5-35 s per process, so
this module compiles a 40-line C loop once per machine with the system C compiler
(``cc -O3``, a second or so; cached under ``$MODELKIT_CACHE/kernels``) and calls it through
``ctypes``, which releases the GIL, so diff's worker threads run it in parallel. The loop is
compiled three times (plain, AVX2, AVX-512 via ``target`` attributes, not ``-march=native``:
a cached library may be used on another CPU); the best one the CPU runs is picked when the
library is loaded (the kernel asks the CPU, ``__builtin_cpu_supports``). ``target_clones``
is not used: its AVX-512 clone ran at 0.8x the ``target``-attribute one here.

Inside a chunk, sums are taken in float32 over blocks of 1024 elements (vectorised), and
the block sums are added in float64, as precise as the eager path. When no compiler is
found, the build fails, ``MODELKIT_FUSED_SUMS=off`` is set, or the dtypes are not bfloat16
or float32, :func:`pair_sums` returns None and the caller uses eager torch.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

#define BLOCK 1024

static inline float bf16(uint16_t x) { uint32_t u = (uint32_t)x << 16; float f; memcpy(&f, &u, 4); return f; }

/* out: a.a, b.b, a.b, d.d, max|d|, changed; d = b - a in float32 */
#define BODY(LOAD_A, LOAD_B)                                                        \
    double aa = 0, bb = 0, ab = 0, dd = 0; float mx = 0; int64_t ch = 0;            \
    for (int64_t s = 0; s < n; s += BLOCK) {                                        \
        int64_t e = s + BLOCK < n ? s + BLOCK : n;                                  \
        float saa = 0, sbb = 0, sab = 0, sdd = 0, smx = 0, sch = 0;                 \
        _Pragma("omp simd reduction(+:saa,sbb,sab,sdd,sch) reduction(max:smx)")      \
        for (int64_t i = s; i < e; i++) {                                           \
            float x = LOAD_A, y = LOAD_B, d = y - x;                                \
            saa += x * x; sbb += y * y; sab += x * y; sdd += d * d;                 \
            float ad = fabsf(d); smx = ad > smx ? ad : smx; sch += (d != 0.0f);     \
        }                                                                           \
        aa += saa; bb += sbb; ab += sab; dd += sdd; ch += (int64_t)sch; mx = smx > mx ? smx : mx; \
    }                                                                               \
    out[0] = aa; out[1] = bb; out[2] = ab; out[3] = dd; out[4] = mx; out[5] = (double)ch;

#define VARIANT(LEVEL, ATTR)                                                        \
    ATTR void sums_bf16_##LEVEL(const uint16_t *a, const uint16_t *b, int64_t n, double *out) \
        { BODY(bf16(a[i]), bf16(b[i])) }                                            \
    ATTR void sums_f32_##LEVEL(const float *a, const float *b, int64_t n, double *out) { BODY(a[i], b[i]) }

VARIANT(base, )
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
/* x86-64-v3 and v4 (AVX-512: 512-bit vectors, about 1.7x the AVX2 loop's speed on Zen 5) */
VARIANT(avx2, __attribute__((target("avx2,fma,f16c,bmi,bmi2,lzcnt,movbe"))))
VARIANT(avx512, __attribute__((target("avx2,fma,f16c,bmi,bmi2,lzcnt,movbe,avx512f,avx512bw,avx512vl,avx512dq,avx512cd"))))
int fusedsums_level(void) {  /* the best variant this CPU runs: 2 avx512, 1 avx2, 0 base */
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")
            && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return 2;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
}
#else
int fusedsums_level(void) { return 0; }
#endif
"""

LEVELS = ("base", "avx2", "avx512")   # the compiled variants, in the order of the CPU level

_lock = threading.Lock()
_lib: Any = None                       # {level: {"bf16": fn, "f32": fn}} for the levels this CPU runs
_tried = False


def _cache_dir() -> Path | None:
    from modelkit.cache import cache_dir

    return cache_dir() / "kernels"  # a temp folder with MODELKIT_CACHE=off: the kernel is still built


def _build() -> dict[str, dict[str, Any]] | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    flags = ["-O3", "-fopenmp-simd", "-fPIC", "-shared"]
    digest = hashlib.sha256((_SOURCE + cc + " ".join(flags)).encode()).hexdigest()[:16]
    folder = _cache_dir()
    lib = folder / f"fusedsums-{digest}.so"
    if not lib.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            src, out = Path(tmp) / "fusedsums.c", Path(tmp) / "fusedsums.so"
            src.write_text(_SOURCE)
            done = subprocess.run([cc, *flags, str(src), "-o", str(out), "-lm"], capture_output=True, timeout=120)
            if done.returncode != 0 or not out.exists():
                return None
            os.replace(out, lib)  # atomic: a concurrent process sees all of it or nothing
    handle = ctypes.CDLL(str(lib))
    handle.fusedsums_level.argtypes, handle.fusedsums_level.restype = [], ctypes.c_int
    top = handle.fusedsums_level()  # a variant the CPU lacks is never called (SIGILL)
    fns: dict[str, dict[str, Any]] = {}
    for level in LEVELS[:top + 1]:
        fns[level] = {}
        for kind in ("bf16", "f32"):
            fn = getattr(handle, f"sums_{kind}_{level}")
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
            fn.restype = None
            fns[level][kind] = fn
    return fns


def _setting() -> str:
    return os.environ.get("MODELKIT_FUSED_SUMS", "").strip().lower()


def available() -> bool:
    """Whether the fused kernel is built (building it on first call)."""
    global _lib, _tried
    if _setting() in ("0", "off", "false", "no"):
        return False
    if not _tried:
        with _lock:
            if not _tried:
                try:
                    _lib = _build()
                except (OSError, subprocess.SubprocessError, AttributeError):
                    _lib = None
                _tried = True
    return _lib is not None


def levels() -> list[str]:
    """The kernel's variants this CPU runs, slowest first (``[]`` without a kernel)."""
    return list(_lib) if available() else []


def level() -> str | None:
    """The variant :func:`pair_sums` uses: the best this CPU runs, or the one
    ``MODELKIT_FUSED_SUMS=base|avx2|avx512`` names when the CPU runs it."""
    runs = levels()
    if not runs:
        return None
    return _setting() if _setting() in runs else runs[-1]


def pair_sums(a: "Any", b: "Any", variant: str | None = None) -> tuple[float, float, float, float, float, int] | None:
    """``(A.A, B.B, A.B, D.D, max|D|, changed)`` of two contiguous 1-D tensors of one dtype
    (bfloat16 or float32), or None when the fused kernel cannot take them. ``variant``:
    one of :func:`levels` (default :func:`level`)."""
    import torch

    if a.dtype != b.dtype or a.numel() != b.numel() or not (a.is_contiguous() and b.is_contiguous()) \
            or a.device.type != "cpu" or not available():
        return None
    kind = "bf16" if a.dtype == torch.bfloat16 else "f32" if a.dtype == torch.float32 else None
    if kind is None:
        return None
    fn = _lib[variant or level()][kind]
    out = (ctypes.c_double * 6)()
    fn(a.data_ptr(), b.data_ptr(), a.numel(), ctypes.addressof(out))
    return out[0], out[1], out[2], out[3], out[4], int(out[5])
