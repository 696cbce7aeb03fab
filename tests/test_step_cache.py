"""The executable store: a step's executable is saved by its identity and loaded, without
tracing or lowering, by the next start that asks for the same identity; anything that could
change the program (source, shapes, dtypes, the function) is a new identity."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fineserve_jax.engine import step_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setattr(step_cache, "_cache_dir", str(tmp_path))
    return tmp_path


def _affine(x):
    return x * 2.0 + 1.0


def _job(fn_key, spec, fn=_affine):
    return step_cache.StepJob(step_cache.executable_identity(fn_key, (spec,)),
                              lambda: jax.jit(fn).lower(spec))


def _no_lowering():
    raise AssertionError("lowered although the store holds this executable")


def test_a_stored_executable_is_loaded_without_lowering_and_computes_the_same(store):
    spec = jax.ShapeDtypeStruct((3, 4), jnp.float32)
    job = _job(("affine",), spec)
    built, loaded = step_cache.build_many({"a": job, "b": job})
    assert loaded == 0 and built["a"] is built["b"]  # one identity, one executable
    assert os.listdir(store / "executables") == [job.identity]
    x = jnp.arange(12, dtype=jnp.float32).reshape(3, 4)
    again, loaded = step_cache.build_many({"a": step_cache.StepJob(job.identity, _no_lowering)})
    assert loaded == 1
    np.testing.assert_array_equal(np.asarray(again["a"](x)), np.asarray(_affine(x)))
    # Mutation: without the store (no cache folder) the job must be lowered.
    step_cache._cache_dir = None
    with pytest.raises(AssertionError, match="lowered although"):
        step_cache.build_many({"a": step_cache.StepJob(job.identity, _no_lowering)})


def test_identity_covers_source_shapes_dtypes_shardings_and_function(monkeypatch):
    spec = jax.ShapeDtypeStruct((3, 4), jnp.float32)
    ident = step_cache.executable_identity
    base = ident(("affine",), (spec,))
    assert ident(("affine",), (jax.ShapeDtypeStruct((3, 4), jnp.float32),)) == base
    x = jnp.zeros((3, 4), jnp.float32)  # an array counts by shape, dtype and sharding only
    assert ident(("affine",), (x,)) == ident(("affine",), (
        jax.ShapeDtypeStruct((3, 4), jnp.float32, sharding=x.sharding),))
    others = [ident(("affine",), (jax.ShapeDtypeStruct((3, 5), jnp.float32),)),
              ident(("affine",), (jax.ShapeDtypeStruct((3, 4), jnp.bfloat16),)),
              ident(("other",), (spec,)),
              ident(("affine",), ((spec,),)),  # another tree of the same leaves
              ident(("affine",), (jax.ShapeDtypeStruct(
                  (3, 4), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(
                      jax.devices()[-1])),) if len(jax.devices()) > 1 else (spec, spec))]
    assert len({base, *others}) == 1 + len(others)
    with monkeypatch.context() as m:
        m.setattr(step_cache, "code_digest", lambda: "an edited checkout")
        assert ident(("affine",), (spec,)) != base
    assert ident(("affine",), (spec,)) == base
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=true")
    assert ident(("affine",), (spec,)) != base


def test_code_digest_sees_an_edit(tmp_path, monkeypatch):
    """The digest hashes the packages' files: a copy of the checkout with one byte added
    to one module has another digest."""
    import shutil
    for pkg in ("fineserve_jax", "models", "pallas_kernels"):
        shutil.copytree(os.path.join(ROOT, pkg), tmp_path / pkg,
                        ignore=shutil.ignore_patterns("__pycache__"))
    script = ("import sys; sys.path.insert(0, sys.argv[1]); "
              "from fineserve_jax.engine import step_cache; print(step_cache.code_digest())")
    run = lambda: subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True,  # noqa: E731
                                 capture_output=True, text=True).stdout.strip()
    first = run()
    assert first == run() and len(first) == 64
    with open(tmp_path / "models" / "compile_options.py", "a") as f:
        f.write("\n")
    assert run() != first


def test_a_damaged_entry_is_compiled_again_and_replaced(store, caplog):
    spec = jax.ShapeDtypeStruct((2,), jnp.float32)
    job = _job(("affine",), spec)
    os.makedirs(store / "executables")
    (store / "executables" / job.identity).write_bytes(b"not an executable")
    built, loaded = step_cache.build_many({"a": job})
    assert loaded == 0 and "unusable" in caplog.text
    np.testing.assert_array_equal(np.asarray(built["a"](jnp.ones(2))), [3.0, 3.0])
    assert step_cache.build_many({"a": step_cache.StepJob(job.identity, _no_lowering)})[1] == 1


START = """
import json, sys
from fineserve_jax import LLM, SamplingParams
from fineserve_jax.core.buckets import Buckets
llm = LLM(model="tiny-llama", quant=sys.argv[1], dtype="float32", max_model_len=32,
          buckets=Buckets(decode_sizes=(1, 2), prefill_sizes=(16,), prefill_seqs=2))
out = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
print(json.dumps({"tokens": out[0].token_ids, **llm.engine.startup}))
"""


@pytest.mark.parametrize("quant", ["org", "int8_kv8"])
def test_a_second_process_loads_every_step_and_generates_the_same(tmp_path, quant):
    """Two fresh processes, one cache folder: the second loads every step and sampler from
    the store (stable identities across processes), measures nothing again, and generates
    the same greedy tokens."""
    env = dict(os.environ, FINESERVE_JAX_CACHE=str(tmp_path),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", START, quant], env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    cold, warm = runs
    assert cold["executables_loaded"] == 0
    assert warm["executables_loaded"] == len(os.listdir(tmp_path / "executables")) > cold["steps"]
    assert warm["steps_profiled"] == 0 and warm["steps_profile_reused"] == warm["steps"]
    assert warm["tokens"] == cold["tokens"] and len(cold["tokens"]) == 6


TP_START = """
import json
import jax
from fineserve_jax import SamplingParams
from fineserve_jax.core.buckets import Buckets
from fineserve_jax.core.request import Request
from fineserve_jax.engine.device_engine import Engine
eng = Engine([("m", "tiny-llama", "org")], tokens_per_block=4, max_model_len=32,
             arena_bytes=1 << 20, profile_reps=0, devices=jax.devices()[2:4],
             buckets=Buckets(decode_sizes=(1, 2), prefill_sizes=(16,), prefill_seqs=2))
sp = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
outs = eng.run([Request(model="m", prompt=[5, 6, 7, 8], sampling=sp),
                Request(model="m", prompt=[9, 3], sampling=sp)], realtime=False)
print(json.dumps({"tokens": [o.token_ids for o in outs], **eng.startup}))
"""


def test_a_tensor_parallel_step_is_loaded_onto_its_own_devices(tmp_path):
    """A step compiled for devices 2 and 3 of 4 is loaded onto those two (loading it onto
    all four aborts the process inside XLA) and generates the same tokens."""
    env = dict(os.environ, FINESERVE_JAX_CACHE=str(tmp_path),
               XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", TP_START], env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert runs[0]["executables_loaded"] == 0 and runs[1]["executables_loaded"] > runs[1]["steps"]
    assert runs[1]["tokens"] == runs[0]["tokens"] and len(runs[0]["tokens"][0]) == 5


XLA_CACHE_HIT = """
import sys
import jax, jax.numpy as jnp, numpy as np
from fineserve_jax.engine import step_cache
step_cache.enable_persistent_cache(sys.argv[1])
f = jax.jit(lambda x: (jnp.sum(x.astype(jnp.float32) * 3, axis=-1)).astype(jnp.bfloat16))
spec = jax.ShapeDtypeStruct((8, 256), jnp.bfloat16)
job = step_cache.StepJob(step_cache.executable_identity((sys.argv[2],), (spec,)),
                         lambda: f.lower(spec))
for _ in range(int(sys.argv[3])):  # engines built one after another in this process
    built, loaded = step_cache.build_many({"a": job})
    print(loaded, float(np.asarray(built["a"](jnp.ones((8, 256), jnp.bfloat16)))[0]))
"""


def test_an_executable_from_xlas_cache_is_not_stored(tmp_path):
    """Function "b" lowers to the program "a" compiled: XLA's persistent cache supplies it,
    and such an executable serializes without its kernels (loading it back fails at the
    first call), so "b" is never stored: it keeps compiling from XLA's cache and runs. Also
    not when a second build in the same process gets it from JAX's in-memory cache (a second
    engine of the same shapes), which raises no cache-hit event."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    got = []
    for name, builds in (("a", 1), ("a", 1), ("b", 2), ("b", 1)):
        proc = subprocess.run([sys.executable, "-c", XLA_CACHE_HIT, str(tmp_path), name,
                               str(builds)], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got.append(proc.stdout.split())
    assert got == [["0", "768.0"], ["1", "768.0"], ["0", "768.0"] * 2, ["0", "768.0"]]
    assert len(os.listdir(tmp_path / "executables")) == 1
