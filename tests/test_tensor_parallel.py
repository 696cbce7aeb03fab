"""Tensor parallelism on CPU virtual devices: tp 2 and 4 against tp 1.

The checks run in a subprocess of this file with XLA_FLAGS giving it 4 CPU devices (set in
the subprocess's environment before JAX starts; never in library code). One subprocess
computes every figure; the tests assert on its JSON.

Runner level (the compiled steps over a real arena, two sequences, prefill then decode,
greedy): float32 logits of every step within 1e-5 relative of tp 1 and identical greedy
tokens; the arena's per-device shards hold 1/tp of the KV bytes when KV heads >= tp (and
count replicated heads when there are fewer); the partitioned layer body has exactly the
collectives Megatron's layout needs. Engine level: `LLM(tensor_parallel_size=N)` greedy
outputs equal tp 1's, with debug poisoning and compaction on, and nothing compiles after
warm-up. Mutations: picking another device's KV head, a column-parallel projection split on
its input dim, and a replicated arena must each fail a check.

The full family x preset x tp grid is `tests/test_tensor_parallel_grid.py` (slow).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 4
# Default suite: every family, both tp sizes, both KV-head cases (split: qwen2's 2 heads at
# tp 2; replicated: mistral's 1 head and llama's 2 heads at tp 4), a bias + tied-embedding
# model (qwen2), per-token fp8 activations (row-parallel amax), int4 packing with group
# scales/zeros and AWQ act_scale. QoQ and the rest of the grid: test_tensor_parallel_grid.py.
DEFAULT_CASES = ["tiny-qwen2:org:2", "tiny-mistral:fp8_kv8:4", "tiny-llama:awq:4"]


def run_worker(task: str, tmp_path, *args, timeout=1500) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / f"{task}.json"
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), task, str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    return run_worker("parity", tmp_path_factory.mktemp("tp"), *DEFAULT_CASES)


def check_parity_case(c):
    assert c["tokens"] == c["tokens_tp1"], c
    # float32 logits of the model (the cache-free forward with the sharded parameters): the
    # partitioned arithmetic differs from one device's only in the order of its sums.
    assert c["rel_full_forward_diff"] <= 1e-5, c
    # Served logits (the paged steps): the same, except where that last-bit difference rounds
    # a stored K/V element to the neighbouring code of the KV dtype (bf16: 2^-8 relative),
    # which moves logits by ~1e-4 at most in these models.
    assert c["rel_logits_diff"] <= 1e-3, c
    k = c["kv"]
    if k["kv_heads"] >= c["tp"]:  # split: each device holds 1/tp of the KV bytes
        assert k["block_bytes_per_device"] * c["tp"] == k["block_bytes_tp1"], k
    else:  # replicated heads (vLLM): one head per device, counted on every device
        assert k["block_bytes_per_device"] * k["kv_heads"] == k["block_bytes_tp1"], k
        assert k["replication"] == c["tp"] // k["kv_heads"], k
    assert k["arena_shard_bytes"] * c["tp"] == k["arena_bytes"], k
    assert k["arena_shard_blocks"] == k["arena_blocks_tp1_same_slabs"], k


@pytest.mark.parametrize("case", DEFAULT_CASES)
def test_tp_logits_and_greedy_tokens_match_tp1(parity, case):
    check_parity_case(parity["cases"][case])


def test_layer_collectives_are_megatrons(parity):
    """Per layer: one all-reduce after o_proj and one after down_proj; per-token activation
    quantization (fp8 W8A8, QoQ W4A8) adds a max all-reduce of each token's amax before the
    two row-parallel layers; no all-gather, all-to-all or permute inside the layer body."""
    c = parity["cases"]
    assert c["tiny-qwen2:org:2"]["collectives"]["per_layer"] == {"all-reduce": 2}
    assert c["tiny-mistral:fp8_kv8:4"]["collectives"]["per_layer"] == {"all-reduce": 4}
    assert c["tiny-llama:awq:4"]["collectives"]["per_layer"] == {"all-reduce": 2}


def test_mutations_fail(parity):
    m = parity["mutations"]
    # Another device's KV head: the attention reads the wrong head's KV.
    assert m["wrong_kv_head"]["rel_logits_diff"] > 1e-3
    # q_proj split on its input dim: XLA keeps the math right but adds collectives to the
    # layer body, which the layout check sees.
    assert m["q_proj_rows"]["collectives"]["per_layer"] != {"all-reduce": 2}
    # A replicated arena: every device holds all the KV bytes.
    r = m["replicated_arena"]
    assert r["arena_shard_bytes"] == r["arena_bytes"] != r["arena_shard_bytes"] * 2


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory):
    return run_worker("engine", tmp_path_factory.mktemp("tp_engine"))


def check_engine_runs(runs, tps):
    assert set(runs) == {str(t) for t in tps}
    for tp, r in runs.items():
        assert r["token_ids"] == runs["1"]["token_ids"], tp
        assert all(len(t) == 10 for t in r["token_ids"]), r
        assert r["steady_state_compiles"] == 0, (tp, r)
        assert r["arena_shards"] == int(tp), r
    assert runs["1"]["preemptions"] > 0  # the small arena makes the recompute path run


def test_llm_tensor_parallel_matches_tp1_with_no_recompiles(engine_run):
    """Greedy outputs of the whole engine (scheduler, preemption under a small arena, freed
    blocks poisoned on every device) equal tp 1's; nothing compiles after warm-up."""
    check_engine_runs(engine_run["runs"], (1, 2))


def test_block_ops_apply_to_every_devices_part(engine_run):
    """Compaction's block copy and debug poisoning on a tp 2 arena change the same block
    rows in every device's part and nothing else. Mutation: the unsharded op (global rows)
    touches one device's part only."""
    b = engine_run["block_ops"]
    assert b["copy_ok"] and b["poison_ok"], b
    assert not b["mutation_copy_ok"], b


def test_bad_device_groups_are_refused(engine_run):
    e = engine_run["errors"]
    assert "needs 8 devices but this process has 4" in e["tp8"]
    assert "query heads (4) to split evenly" in e["tp3_heads"]
    assert "distinct" in e["duplicate"]


# --- the worker (runs in the subprocess) --------------------------------------------------------

def _greedy_run(model, tp, *, steps=4, forward_ids=None, forward=True):
    """Prefill two packed prompts, then `steps` decode steps of both rows, greedy, with the
    compiled logits steps of a runner of `model` on `tp` devices; then the cache-free float32
    forward of `forward_ids` [2, T] (default: the generated sequences) with the runner's
    placed parameters. -> dict of figures. (The runner places the model's parameters on its
    devices: run tp 1 first.)"""
    import jax
    import numpy as np
    from flax import nnx

    from fineserve_jax.core.buckets import Buckets
    from fineserve_jax.engine import sharding as S
    from fineserve_jax.engine.model_runner import ModelRunner
    from fineserve_jax.kvslab import arena as A

    tpb, width = 4, 8
    buckets = Buckets(decode_sizes=(4,), prefill_sizes=(32,), prefill_seqs=2, table_width=width)
    group = S.device_group(list(range(tp))) if tp > 1 else None
    split = S.kv_split(model.config.num_heads, model.config.num_kv_heads, tp)
    full = model.kv_format(tpb)
    fmt = S.local_kv_format(full, split)
    runner = ModelRunner("m", model, fmt, buckets, "auto", group=group)
    per_slab, num_slabs = 16, 4
    slab = fmt.block_bytes * per_slab
    if group is None:
        arena = A.make_arena(num_slabs, slab)
    else:
        arena = A.make_arena(num_slabs, slab, device=group.arena_sharding, parts=tp)
    shard_bytes = arena.addressable_shards[0].data.nbytes
    prompts = [[1, 5, 9, 33, 70, 100, 7, 8, 9], [1, 200, 17, 4, 90, 61, 23, 23, 8, 5, 77, 3, 12]]
    tables = [list(range(16, 16 + width)), list(range(32, 32 + width))]
    seqs = [list(p) for p in prompts]
    logits_all, x = [], runner.inputs_for("prefill", 32)
    at = 0
    for row, (p, t) in enumerate(zip(prompts, tables)):
        n = len(p)
        sl = slice(at, at + n)
        pos = np.arange(n)
        x.tokens[sl], x.positions[sl], x.q_pos[sl], x.q_seq[sl] = p, pos, pos, row
        x.slot_block[sl] = [t[i // tpb] for i in pos]
        x.slot_offset[sl] = pos % tpb
        x.block_tables[row] = t
        x.logits_idx[row] = at + n - 1
        x.lengths[row] = n
        at += n
    arena, lg = runner.step_logits("prefill", 32, arena, x)
    lg = np.asarray(lg)[:2]
    logits_all.append(lg)
    for s, l in zip(seqs, lg):
        s.append(int(np.argmax(l)))
    for _ in range(steps):
        x = runner.inputs_for("decode", 4)
        for row, (s, t) in enumerate(zip(seqs, tables)):
            pos = len(s) - 1
            x.tokens[row], x.positions[row], x.q_pos[row], x.q_seq[row] = s[-1], pos, pos, row
            x.slot_block[row], x.slot_offset[row] = t[pos // tpb], pos % tpb
            x.block_tables[row], x.lengths[row], x.logits_idx[row] = t, pos + 1, row
        arena, lg = runner.step_logits("decode", 4, arena, x)
        lg = np.asarray(lg)[:2]
        logits_all.append(lg)
        for s, l in zip(seqs, lg):
            s.append(int(np.argmax(l)))
    text = runner.compile_logits("decode", 4, arena).as_text()
    if forward_ids is None:  # right-padded: causal, so the padding changes no real position
        forward_ids = np.zeros((2, max(map(len, seqs))), np.int32)
        for row, s in enumerate(seqs):
            forward_ids[row, :len(s)] = s
    ff_logits = None
    if forward:
        graphdef = nnx.graphdef(model.module)
        fn = jax.jit(lambda st, ids: nnx.merge(graphdef, st).full_forward(ids))
        ff_logits = np.asarray(fn(runner.params, forward_ids))[:, :min(map(len, seqs))]
    return {
        "tokens": [s[len(p):] for s, p in zip(seqs, prompts)],
        "logits": np.stack(logits_all),
        "forward_ids": forward_ids,
        "full_logits": ff_logits,
        "collectives": S.collectives(text),
        "kv": {"kv_heads": split.num_kv_heads, "replication": split.replication,
               "block_bytes_per_device": fmt.block_bytes, "block_bytes_tp1": full.block_bytes,
               "arena_bytes": int(arena.nbytes), "arena_shard_bytes": int(shard_bytes),
               "arena_shard_blocks": int(shard_bytes // fmt.block_bytes),
               "arena_blocks_tp1_same_slabs": num_slabs * per_slab},
    }


def _decode_collectives(model, tp):
    """The collectives of the compiled decode step (logits) of `model` on `tp` devices."""
    from fineserve_jax.core.buckets import Buckets
    from fineserve_jax.engine import sharding as S
    from fineserve_jax.engine.model_runner import ModelRunner
    from fineserve_jax.kvslab import arena as A

    group = S.device_group(list(range(tp)))
    fmt = S.local_kv_format(model.kv_format(4), S.kv_split(model.config.num_heads,
                                                           model.config.num_kv_heads, tp))
    runner = ModelRunner("m", model, fmt, Buckets(decode_sizes=(4,), prefill_sizes=(32,),
                                                  prefill_seqs=2, table_width=8), "auto",
                         group=group)
    arena = A.make_arena(2, fmt.block_bytes * 4, device=group.arena_sharding, parts=tp)
    return S.collectives(runner.compile_logits("decode", 4, arena).as_text())


def _load(name, preset, calibrated):
    """The model of a preset. calibrated: `load_model` as served (AWQ presets calibrated,
    their scales folded into norms and projections, so layers may have no `act_scale`); else
    AWQ presets get seeded random per-channel scales in [0.5, 2] kept on every projection
    (`act_scale`, unfolded): no calibration pass, and scales that differ per channel show a
    misplaced `act_scale` in either layout (replicated on column-, split on row-parallel)."""
    import numpy as np

    from fineserve_jax.formats import get_preset
    from fineserve_jax.loader import Model, load_model
    from fineserve_jax.quant import quantize_model
    from fineserve_jax.quant.projections import layer_path, projection_layers

    p = get_preset(preset)
    if calibrated or not p.awq:
        return load_model(name, quant=preset, dtype="float32")
    base = load_model(name, quant="org", dtype="float32")
    rng = np.random.default_rng(0)
    scales = {layer_path(i, site): rng.uniform(0.5, 2.0, getattr(parent, attr).in_features)
              .astype(np.float32)
              for site, parent, attr in projection_layers(base.module)
              for i in range(base.config.num_layers)}
    module = quantize_model(base.module, p, act_scales=scales, fold_scales=False)
    return Model(module=module, preset=p, tokenizer=base.tokenizer, name=name)


def _rel(a, b) -> float:
    import numpy as np

    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def worker_parity(out, cases, calibrated=False):
    from jax import lax

    from fineserve_jax.engine import paged_attention, sharding

    result, refs, models = {"cases": {}, "mutations": {}}, {}, {}
    for case in cases:
        name, preset, tp = case.split(":")
        tp = int(tp)
        if (name, preset) not in refs:
            models[(name, preset)] = _load(name, preset, calibrated)
            refs[(name, preset)] = _greedy_run(models[(name, preset)], 1)
        ref = refs[(name, preset)]
        r = _greedy_run(models[(name, preset)], tp, forward_ids=ref["forward_ids"])
        result["cases"][case] = {"tp": tp, "tokens": r["tokens"], "tokens_tp1": ref["tokens"],
                                 "rel_logits_diff": _rel(r["logits"], ref["logits"]),
                                 "rel_full_forward_diff": _rel(r["full_logits"],
                                                               ref["full_logits"]),
                                 "collectives": r["collectives"], "kv": r["kv"]}
        print(case, result["cases"][case], flush=True)

    # Mutation 1: each device reads the KV head of the next device's group.
    class OffByOne:
        def __getattr__(self, k):
            return getattr(lax, k)

        @staticmethod
        def axis_index(name):
            return (lax.axis_index(name) + 1) % 4

    qwen = models[("tiny-qwen2", "org")]  # 2 KV heads: replicated at tp 4
    paged_attention.lax = OffByOne()
    try:
        r = _greedy_run(qwen, 4, steps=1, forward=False)
    finally:
        paged_attention.lax = lax
    ref = refs[("tiny-qwen2", "org")]
    n = len(r["logits"])
    result["mutations"]["wrong_kv_head"] = {"rel_logits_diff": _rel(r["logits"],
                                                                    ref["logits"][:n])}

    # Mutation 2: q_proj split on its input rows instead of its output columns.
    real = sharding.param_layout

    def rows_rule(path, shape, dtype, cfg, tp, **kw):
        lay = real(path, shape, dtype, cfg, tp, **kw)
        if path.startswith("layers.self_attn.q_proj.kernel"):
            return sharding.ParamLayout(lay.path, lay.shape, lay.dtype, 1, "mutated: rows")
        return lay

    sharding.param_layout = rows_rule
    try:
        result["mutations"]["q_proj_rows"] = {"collectives": _decode_collectives(qwen, 2)}
    finally:
        sharding.param_layout = real

    # Mutation 3: the arena replicated on every device instead of split by rows (the
    # compiled steps refuse it; the per-device bytes show it).
    from fineserve_jax.kvslab import arena as A

    rep = sharding.device_group([0, 1]).replicated
    a = A.make_arena(4, 1024, device=rep, parts=2)
    result["mutations"]["replicated_arena"] = {
        "arena_bytes": int(a.nbytes), "arena_shard_bytes": int(a.addressable_shards[0].data.nbytes)}
    with open(out, "w") as f:
        json.dump(result, f)


def worker_engine(out, tps=(1, 2)):
    import fineserve_jax as fj
    from fineserve_jax.core.buckets import Buckets
    from fineserve_jax import Engine, ModelSpec
    from fineserve_jax.engine.sharding import device_group

    prompts = ["hello world", "the quick brown fox jumps over", list(range(3, 40))]
    sp = fj.SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    buckets = Buckets(decode_sizes=(4,), prefill_sizes=(32,), prefill_seqs=2)
    runs = {}
    for tp in tps:
        # An arena of 7 one-block slabs for 8 blocks of KV: a request is preempted and
        # recomputed; freed blocks are poisoned (NaN) on every device.
        llm = fj.LLM("tiny-llama", quant="int8_kv8", tensor_parallel_size=tp, buckets=buckets,
                     max_model_len=64, arena_bytes=7 * 2560 // min(tp, 2), slab_target_bytes=1,
                     compilation_cache_dir=None, debug_poison=True, profile_reps=0,
                     enable_prefix_caching=False)
        outs = llm.generate(prompts, sp)
        e = llm.engine
        runs[str(tp)] = {"token_ids": [o.token_ids for o in outs],
                         "steady_state_compiles": e.steady_state_compiles,
                         "preemptions": e.scheduler.num_preemptions,
                         "arena_shards": len(e.arena.addressable_shards),
                         "block_bytes": e.formats["model"].block_bytes}
        print(tp, runs[str(tp)], flush=True)
    errors = {}
    for key, fn in {
        "tp8": lambda: fj.LLM("tiny-llama", tensor_parallel_size=8),
        "tp3_heads": lambda: Engine([ModelSpec("m", "tiny-llama")], devices=[0, 1, 2]),
        "duplicate": lambda: device_group([1, 1]),
    }.items():
        try:
            fn()
            errors[key] = "no error"
        except ValueError as err:
            errors[key] = str(err)
    with open(out, "w") as f:
        json.dump({"runs": runs, "errors": errors, "block_ops": _block_ops_check()}, f)


def _block_ops_check():
    import jax
    import numpy as np

    from fineserve_jax.engine.block_ops import BlockOps
    from fineserve_jax.engine.sharding import device_group
    from fineserve_jax.formats import KVFormat
    from fineserve_jax.kvslab import arena as A

    group = device_group([0, 1])
    fmt = KVFormat(2, 1, 16, "bf16", 4)  # the per-device format
    slabs, per_slab = 3, 4
    words = per_slab * fmt.block_words
    host = np.random.default_rng(0).integers(0, 2**32, (2 * slabs, words), dtype=np.uint32)

    def arena():
        return jax.device_put(host, group.arena_sharding)

    def blocks(a):  # -> [device, block, words]
        return np.asarray(a).reshape(2, slabs * per_slab, fmt.block_words)

    ops = BlockOps(arena(), [fmt], chunk=4, copy=True, poison=True, group=group)
    want = blocks(host).copy()
    want[:, [5, 9]] = want[:, [4, 6]]
    copy_ok = bool(np.array_equal(blocks(ops.copy(arena(), fmt.block_bytes, [4, 6], [5, 9])), want))
    got = blocks(ops.poison(arena(), fmt.block_bytes, [7]))
    rest = np.delete(got, 7, axis=1)
    poison_ok = bool(np.all(got[:, 7] == A.POISON_WORD)
                     and np.array_equal(rest, np.delete(blocks(host), 7, axis=1)))
    ids = lambda v: np.array(v + [np.iinfo(np.int32).max] * 2, np.int32)  # noqa: E731
    mutated = blocks(jax.jit(lambda a, s, d: A.copy_blocks(a, fmt, s, d))(
        arena(), ids([4, 6]), ids([5, 9])))
    return {"copy_ok": copy_ok, "poison_ok": poison_ok,
            "mutation_copy_ok": bool(np.array_equal(mutated, want))}


if __name__ == "__main__":
    task, out, *rest = sys.argv[1:]
    {"parity": lambda: worker_parity(out, rest),
     "parity_calibrated": lambda: worker_parity(out, rest, calibrated=True),
     "engine": lambda: worker_engine(out, tuple(int(t) for t in rest) or (1, 2))}[task]()
