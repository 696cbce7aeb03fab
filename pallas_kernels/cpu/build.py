"""Builds the C++ CPU kernels once per machine and registers them with XLA's FFI.

The sources ship with the package (`ragged_attention.cc`, `stacked_matmul.cc`, `swiglu.cc`);
the first process that asks for a kernel compiles them, as one library, with the system C++
compiler against jaxlib's FFI headers (a few seconds) into a per-user folder, keyed by
everything that changes the object code (sources, defines, flags, compiler, jaxlib, CPU features), and later
processes load that file. The FFI target names carry the key, so an executable XLA cached
for one build never calls another build.
Without a compiler (or with `FINESERVE_JAX_CPU_KERNELS=0`) nothing is built and the
dispatcher's "auto" uses the XLA path; an explicit `impl="cpu"` then raises with the reason.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import Dict, Optional, Tuple

import jax

log = logging.getLogger("fineserve_jax")

__all__ = ["ENV_VAR", "DIR_ENV_VAR", "CpuKernelUnavailable", "kernel_dir",
           "ragged_attention_target", "stacked_matmul_target", "quant_matmul_target",
           "swiglu_target", "build_key",
           "unavailable_reason"]

ENV_VAR = "FINESERVE_JAX_CPU_KERNELS"  # "0": never build or use the C++ kernels
DIR_ENV_VAR = "FINESERVE_JAX_CPU_KERNEL_DIR"
_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = tuple(os.path.join(_HERE, f)
                for f in ("ragged_attention.cc", "stacked_matmul.cc", "swiglu.cc"))
HEADERS = tuple(os.path.join(_HERE, f) for f in ("parallel_for.h", "vector_math.h"))
# kernel -> the handler symbol the library exports for it
SYMBOLS = {"ragged_attention": "FineserveRaggedAttention",
           "stacked_matmul": "FineserveStackedMatmul",
           "quant_matmul": "FineserveQuantMatmul",
           "swiglu": "FineserveSwiglu"}
# -fassociative-math lets GCC vectorize the dot and sum loops (summation order only; NaN and
# infinities keep their meaning, unlike -ffast-math). -march=native: built where it runs.
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-march=native", "-fno-math-errno",
         "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math", "-w")
_libraries = {}  # build key -> ctypes.CDLL (kept alive for the process)
_targets = {}  # build key -> {kernel: registered target name}
_failures = {}  # build key -> why it cannot be used
_lock = threading.Lock()


class CpuKernelUnavailable(RuntimeError):
    """The C++ CPU kernels cannot be built or loaded here (the message says why)."""


def kernel_dir() -> str:
    """`$FINESERVE_JAX_CPU_KERNEL_DIR`, else `$XDG_CACHE_HOME/fineserve_jax/cpu_kernels`,
    else `~/.cache/fineserve_jax/cpu_kernels`."""
    if os.environ.get(DIR_ENV_VAR):
        return os.path.expanduser(os.environ[DIR_ENV_VAR])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fineserve_jax", "cpu_kernels")


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@functools.lru_cache(maxsize=None)
def _compiler_version(cxx: str) -> str:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True,
                          timeout=60).stdout.splitlines()[0]


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("flags", "model name"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


@functools.lru_cache(maxsize=None)
def _key(cxx: str, defines: Tuple[str, ...]) -> str:
    import jaxlib

    h = hashlib.sha256()
    for source in SOURCES + HEADERS:
        with open(source, "rb") as f:
            h.update(f.read())
    for part in (*FLAGS, *defines, _compiler_version(cxx), jaxlib.__version__,
                 platform.machine(), _cpu_features()):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def _build(cxx: str, defines: Tuple[str, ...], path: str) -> None:
    """Compiles the sources in parallel (each parses XLA's FFI header, seconds apiece: a
    cold start waits for the slowest, not the sum), then links them into `path`."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as work:
        compile_flags = [f for f in FLAGS if f != "-shared"]
        jobs = []
        for source in SOURCES:
            obj = os.path.join(work, os.path.basename(source) + ".o")
            cmd = [cxx, *compile_flags, *(f"-D{d}" for d in defines),
                   f"-I{jax.ffi.include_dir()}", "-c", source, "-o", obj]
            jobs.append((cmd, obj, subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                                    stderr=subprocess.PIPE, text=True)))
        failures = []
        for cmd, _, proc in jobs:
            try:
                _, err = proc.communicate(timeout=600)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if proc.returncode != 0:
                failures.append(f"({' '.join(cmd)}):\n{err[-2000:]}")
        if failures:
            raise CpuKernelUnavailable("compiling the CPU kernels failed " + "\n".join(failures))
        tmp = os.path.join(work, "kernels.so")
        cmd = [cxx, *FLAGS, *(obj for _, obj, _ in jobs), "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise CpuKernelUnavailable(f"linking the CPU kernels failed "
                                       f"({' '.join(cmd)}):\n{res.stderr[-2000:]}")
        os.replace(tmp, path)  # atomic: a concurrent process sees the whole file or none


def _load(defines: Tuple[str, ...]) -> Dict[str, str]:
    if os.environ.get(ENV_VAR, "1") == "0":
        raise CpuKernelUnavailable(f"the C++ CPU kernels are turned off ({ENV_VAR}=0)")
    cxx = _compiler()
    if cxx is None:
        raise CpuKernelUnavailable("no C++ compiler found (set CXX, or install g++)")
    key = _key(cxx, defines)
    with _lock:
        if key in _failures:  # a build fails once per process, not once per call
            raise CpuKernelUnavailable(_failures[key])
        if key in _targets:
            return _targets[key]
        path = os.path.join(kernel_dir(), f"cpu_kernels_{key}.so")
        try:
            if not os.path.exists(path):
                log.info("building the CPU kernels into %s", path)
                _build(cxx, defines, path)
            lib = ctypes.cdll.LoadLibrary(path)
        except (CpuKernelUnavailable, OSError, subprocess.SubprocessError) as e:
            _failures[key] = f"the CPU kernels are unavailable: {e}"
            raise CpuKernelUnavailable(_failures[key]) from e
        names = {}
        for kernel, symbol in SYMBOLS.items():
            names[kernel] = f"fineserve_{kernel}_{key}"
            jax.ffi.register_ffi_target(names[kernel], jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
        _libraries[key] = lib
        _targets[key] = names
        return names


def ragged_attention_target(defines: Tuple[str, ...] = ()) -> str:
    """The registered FFI target name of the CPU attention kernel, built if needed.
    `defines`: extra preprocessor macros (tests build mutated kernels this way).
    Raises CpuKernelUnavailable."""
    return _load(tuple(defines))["ragged_attention"]


def stacked_matmul_target(defines: Tuple[str, ...] = ()) -> str:
    """The registered FFI target name of the CPU in-place stacked GEMM, built if needed
    (`defines` as for `ragged_attention_target`). Raises CpuKernelUnavailable."""
    return _load(tuple(defines))["stacked_matmul"]


def quant_matmul_target(defines: Tuple[str, ...] = ()) -> str:
    """The registered FFI target name of the CPU in-place GEMM by quantized stacked weights
    (`stacked_matmul.cc`), built if needed (`defines` as for `ragged_attention_target`).
    Raises CpuKernelUnavailable."""
    return _load(tuple(defines))["quant_matmul"]


def swiglu_target(defines: Tuple[str, ...] = ()) -> str:
    """The registered FFI target name of the CPU silu(gate) * up kernel, built if needed
    (`defines` as for `ragged_attention_target`). Raises CpuKernelUnavailable."""
    return _load(tuple(defines))["swiglu"]


def build_key() -> Optional[str]:
    """The key the kernels are (or would be) built under here, without building them; None
    without a compiler. Stored executables that call a kernel are keyed by it too."""
    cxx = _compiler()
    return None if cxx is None else _key(cxx, ())


def unavailable_reason() -> Optional[str]:
    """None when the CPU kernels can be used in this process, else why not."""
    try:
        ragged_attention_target()
    except CpuKernelUnavailable as e:
        return str(e)
    return None
