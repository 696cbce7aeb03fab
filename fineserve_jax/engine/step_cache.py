"""Seconds-long starts: compiled steps and their measured times, reused instead of redone.

Three levels:
  * in one process, models of the same structure, KV format, kind and attention impl share
    one jitted step function, so a second engine of the same shapes (an `LLM` rebuilt in a
    notebook, a benchmark's second engine) gets its executables from JAX's own cache;
  * across processes, XLA's persistent compilation cache (on by default, in a per-user
    folder; `enable_persistent_cache`) turns compiles into disk reads;
  * the warm-up timing of each compiled bucket is stored by the step's fingerprint (a hash
    of its lowered program and the device kind), in memory and in `profiles.json` beside the
    compilation cache, so profiling measures only steps it has not measured before. A
    single cold run (`profile_reps=0`, as `LLM` starts) is stored apart, as `cold|<fp>`: it
    serves later single-run starts only, never an engine that asked for a real profile.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import threading
from typing import Callable, Dict, Optional, TypeVar

import jax

from models.compile_options import compiler_options

log = logging.getLogger("fineserve_jax")

ENV_VAR = "FINESERVE_JAX_CACHE"
_lock = threading.Lock()
_STEPS: Dict[tuple, Callable] = {}
_PROFILES: Dict[str, float] = {}
_COLD = "cold|"  # key prefix of single cold runs (`profile_reps=0`) in _PROFILES
_cache_dir: Optional[str] = None
K = TypeVar("K")


def default_cache_dir() -> str:
    """`$FINESERVE_JAX_CACHE`, else `$XDG_CACHE_HOME/fineserve_jax/xla`, else
    `~/.cache/fineserve_jax/xla`."""
    if os.environ.get(ENV_VAR):
        return os.path.expanduser(os.environ[ENV_VAR])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fineserve_jax", "xla")


def enable_persistent_cache(directory: Optional[str] = "auto") -> Optional[str]:
    """Turn on XLA's persistent compilation cache in `directory` ("auto": the per-user
    default; None or "": leave it off). Returns the folder in use. JAX has one cache folder
    per process: the first folder set wins."""
    global _cache_dir
    if not directory:
        return _cache_dir
    path = os.path.abspath(default_cache_dir() if directory == "auto" else os.path.expanduser(directory))
    with _lock:
        if _cache_dir is None:
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as e:  # an unwritable cache folder must not stop serving
                log.warning("compilation cache disabled: cannot create %s (%s)", path, e)
                return None
            jax.config.update("jax_compilation_cache_dir", path)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
            _cache_dir = path
            _load_profiles(path)
        elif _cache_dir != path:
            log.warning("compilation cache stays in %s (asked for %s): one folder per process",
                        _cache_dir, path)
    return _cache_dir


def shared_step(key: tuple, make: Callable[[], Callable]) -> Callable:
    """The process-wide jitted step for `key` (built once with `make`)."""
    with _lock:
        fn = _STEPS.get(key)
        if fn is None:
            fn = _STEPS[key] = make()
        return fn


def compile_many(lowered: Dict[K, object], workers: Optional[int] = None) -> Dict[K, object]:
    """{key: Lowered} -> {key: Compiled}, compiled in `workers` threads (default: one per
    CPU core) with the project's compile options (`models.compile_options`). XLA compiles
    with the GIL released, so a step's codegen runs beside another's; a start-up with dozens
    of bucketed steps is compile-bound."""
    if workers is None:
        workers = os.cpu_count() or 1
    items = list(lowered.items())
    if workers <= 1 or len(items) <= 1:
        return {k: compile_lowered(low) for k, low in items}
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        futures = {k: pool.submit(compile_lowered, low) for k, low in items}
        return {k: f.result() for k, f in futures.items()}


def compile_lowered(lowered):
    """`lowered.compile()` with the project's compile options for JAX's default backend."""
    return lowered.compile(compiler_options=compiler_options())


def fingerprint(lowered) -> str:
    """A step's identity for its profile: its lowered program on this kind of device."""
    dev = jax.devices()[0]
    text = lowered.as_text()
    return hashlib.sha256(f"{dev.platform}|{dev.device_kind}|{text}".encode()).hexdigest()


def known_time(fp: str, cold_ok: bool = False) -> Optional[float]:
    """The stored time of step `fp`: a profiled one, else (cold_ok) a single cold run's."""
    known = _PROFILES.get(fp)
    if known is None and cold_ok:
        known = _PROFILES.get(_COLD + fp)
    return known


def record_time(fp: str, seconds: float, cold: bool = False) -> None:
    """Store step `fp`'s time: a best-of-reps profile, or (cold) one cold run's."""
    _PROFILES[_COLD + fp if cold else fp] = seconds
    if _cache_dir is not None:
        _save_profiles(_cache_dir)


def _profiles_path(directory: str) -> str:
    return os.path.join(directory, "profiles.json")


def _load_profiles(directory: str) -> None:
    try:
        with open(_profiles_path(directory)) as f:
            data = json.load(f)
        _PROFILES.update({k: float(v) for k, v in data.items()})
    except (OSError, ValueError, TypeError, AttributeError):
        pass  # no profiles yet, or a damaged file: measure again


def _save_profiles(directory: str) -> None:
    path = _profiles_path(directory)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(_PROFILES, f)
        os.replace(tmp, path)  # atomic: concurrent processes never see half a file
    except OSError as e:
        log.warning("could not save step profiles to %s (%s)", path, e)
