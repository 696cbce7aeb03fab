"""Seconds-long starts: compiled steps and their measured times, reused instead of redone.

Four levels:
  * in one process, models of the same structure, KV format, kind and attention impl share
    one jitted step function, so a second engine of the same shapes (an `LLM` rebuilt in a
    notebook, a benchmark's second engine) gets its executables from JAX's own cache;
  * across processes, a step's executable is stored (`executables/` in the cache folder) by
    its identity: the jitted function's key, the abstract arguments, this checkout's source
    (`code_digest`) and the JAX/XLA environment. A warm start loads it without tracing or
    lowering, which is most of a warm start once compiling is a cache read;
  * under that, XLA's persistent compilation cache (on by default, in a per-user folder;
    `enable_persistent_cache`) turns compiles of a lowered program into disk reads;
  * the warm-up timing of each compiled bucket is stored by the step's identity, in memory
    and in `profiles.json` beside the compilation cache, so profiling measures only steps it
    has not measured before. A single cold run (`profile_reps=0`, as `LLM` starts) is stored
    apart, as `cold|<identity>`: it serves later single-run starts only, never an engine
    that asked for a real profile.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import os
import pickle
import threading
from typing import Callable, Dict, Optional, Tuple, TypeVar

import jax
from jax.experimental import serialize_executable

from models.compile_options import compiler_options
from pallas_kernels.cpu.build import build_key as cpu_kernel_build_key

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


@dataclasses.dataclass(frozen=True)
class StepJob:
    """One executable to build: `lower()` gives its `jax.stages.Lowered`; `identity`
    (`executable_identity`) names it in the executable store."""
    identity: str
    lower: Callable[[], object]


def build_many(jobs: Dict[K, StepJob], workers: Optional[int] = None
               ) -> Tuple[Dict[K, object], int]:
    """{key: StepJob} -> ({key: Compiled}, number of executables loaded from the store);
    jobs of one identity share one executable. Each executable is loaded from the store
    when it holds the identity; the others are lowered here, one after another (tracing
    holds the GIL), and compiled in `workers` threads (default: one per CPU core) as soon
    as each is lowered, so compiling one overlaps lowering the next (XLA compiles with the
    GIL released). Fresh compiles are stored for the next process."""
    unique = {job.identity: job for job in jobs.values()}
    workers = max(1, min(workers or os.cpu_count() or 1, len(unique) or 1))
    built: Dict[str, object] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        loads = {i: pool.submit(load_executable, i) for i in unique}
        compiles = {}
        for i, job in unique.items():
            built[i] = loads[i].result()
            if built[i] is None:
                compiles[i] = pool.submit(_compile_noting_cache_hit, job.lower())
        for i, f in compiles.items():
            built[i], from_xla_cache = f.result()
            with _lock:
                first = i not in _COMPILED
                _COMPILED.add(i)
            if first and not from_xla_cache:
                store_executable(i, built[i])
    return {k: built[job.identity] for k, job in jobs.items()}, len(unique) - len(compiles)


_thread = threading.local()
# Identities compiled in this process. Only the first compile of one may be stored: a later
# one (a second engine of the same shapes) is JAX's in-memory reuse of the first executable,
# which raises no cache-hit event even when XLA's persistent cache supplied it.
_COMPILED: set = set()


def _note_cache_hit(event: str, **kwargs) -> None:
    if event == "/jax/compilation_cache/cache_hits":  # recorded in the compiling thread
        _thread.cache_hit = True


jax.monitoring.register_event_listener(_note_cache_hit)


def _compile_noting_cache_hit(lowered) -> Tuple[object, bool]:
    """(Compiled, whether XLA's persistent cache supplied it). An executable read from that
    cache serializes without its kernels' object code on CPU (loading it back fails at the
    first call: "Function ... not found"), so only fresh compiles go to the store; a cache
    hit is lowered again on the next start, as without the store (`build_many` stores only
    the first compile of an identity in a process: `_COMPILED`)."""
    _thread.cache_hit = False
    compiled = compile_lowered(lowered)
    return compiled, _thread.cache_hit


def compile_lowered(lowered):
    """`lowered.compile()` with the project's compile options for JAX's default backend."""
    return lowered.compile(compiler_options=compiler_options())


@functools.lru_cache(maxsize=None)
def code_digest() -> str:
    """A hash of this checkout's source (the Python packages a step is traced from and the
    C++ kernels it may call): an edit anywhere in them is a new identity for every stored
    executable."""
    h = hashlib.sha256()
    for pkg in ("fineserve_jax", "models", "pallas_kernels"):
        root = os.path.abspath(importlib.util.find_spec(pkg).submodule_search_locations[0])
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(f for f in files if f.endswith((".py", ".cc"))):
                path = os.path.join(folder, name)
                h.update(os.path.relpath(path, os.path.dirname(root)).encode())
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


def _environment() -> tuple:
    """What besides the source and the arguments decides a compiled program."""
    import flax
    import jaxlib

    devs = jax.devices()
    flags = ("jax_enable_x64", "jax_default_matmul_precision", "jax_threefry_partitionable",
             "jax_default_prng_impl", "jax_numpy_rank_promotion")
    return (jax.__version__, jaxlib.__version__, flax.__version__, devs[0].platform,
            devs[0].device_kind, len(devs), sorted(compiler_options().items()),
            os.environ.get("XLA_FLAGS", ""), [(f, getattr(jax.config, f, None)) for f in flags],
            cpu_kernel_build_key())  # names the FFI target a step calls (CPU flags, compiler)


def executable_identity(fn_key: tuple, args: tuple) -> str:
    """The identity of jitted function `fn_key` (its `shared_step` key, whose parts have
    stable reprs) lowered for `args` (arrays or ShapeDtypeStructs; only shapes, dtypes and
    shardings count), with this source and environment."""
    leaves, tree = jax.tree.flatten(args)
    abstract = [(tuple(x.shape), str(x.dtype), repr(getattr(x, "sharding", None))) for x in leaves]
    text = repr((code_digest(), _environment(), fn_key, str(tree), abstract))
    return hashlib.sha256(text.encode()).hexdigest()


def _store_path(identity: str) -> Optional[str]:
    return None if _cache_dir is None else os.path.join(_cache_dir, "executables", identity)


def load_executable(identity: str):
    """The stored executable of `identity` (a `jax.stages.Compiled`), or None."""
    path = _store_path(identity)
    if path is None or not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            device_ids, blob, in_tree, out_tree = pickle.load(f)
        # The executable runs on the devices it was compiled for; loading it onto others
        # aborts the process inside XLA, so a missing device is a miss, not a load.
        by_id = {d.id: d for d in jax.devices()}
        if not set(device_ids) <= set(by_id):
            raise ValueError(f"compiled for devices {device_ids}, not all present")
        return serialize_executable.deserialize_and_load(
            blob, in_tree, out_tree, execution_devices=[by_id[i] for i in device_ids])
    except Exception as e:  # a damaged or foreign entry: compile instead
        log.warning("stored executable %s unusable (%s: %s); compiling", path,
                    type(e).__name__, e)
        return None


def store_executable(identity: str, compiled) -> None:
    """Store `compiled` under `identity` (atomically; a step that cannot be serialized, or
    an unwritable folder, is logged and skipped: the next start compiles it again)."""
    path = _store_path(identity)
    if path is None:
        return
    try:
        devices = [d.id for d in compiled.runtime_executable().local_devices()]
        data = pickle.dumps((devices, *serialize_executable.serialize(compiled)))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except Exception as e:
        log.warning("could not store executable %s (%s: %s)", path, type(e).__name__, e)


def known_time(fp: str, cold_ok: bool = False) -> Optional[float]:
    """The stored time of step `fp` (its identity): a profiled one, else (cold_ok) a single
    cold run's."""
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
