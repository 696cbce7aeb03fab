"""The engine's compiled steps on the XLA path against the model's plain forward, and the
compile time of one step against depth.

    python -m experiments.xla_path_bench --output_dir=runs/xla_path            # CPU, all parts
    python -m experiments.xla_path_bench --quick --output_dir=/tmp/xp          # smoke test

Part 1, steps (per model preset, random weights): the engine's AOT-compiled decode step at
`--decode_batch` rows (contexts spread evenly over `--decode_context`) and prefill step of
`--prefill_tokens` packed tokens (`--prefill_seqs` fresh prompts), for every attention impl in
`--impls`, next to `Model.logits` (the cache-free full forward: all the matmuls, attention
inside the given tokens only) at the same shape: `[batch, 1]` for decode, `[seqs, tokens /
seqs]` for prefill. Ablations say where a step's time goes: the same compiled step with the
KV write only (attention replaced by q), the attention only, and neither.

Part 2, compile time vs depth: the decode and prefill steps of `--depth_model`'s widths at
each of `--depths` layers are lowered and compiled (persistent compilation cache off); the
table gives seconds per depth and the ratio of the deepest to the shallowest.

Times are the minimum (`--stat`) of `--reps` calls after warm-up. Results go to OUTPUT_DIR/xla_path.json and
a table is printed.
"""

from __future__ import annotations

import datetime
import time
from typing import Dict, List

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.output import write_json
from experiments.timing import time_call

_MODELS = flags.DEFINE_list("models", ["tiny-llama", "smollm2-135m"], "model presets (random "
                            "weights; real-size shapes allowed)")
_QUANT = flags.DEFINE_string("quant", "org", "precision preset")
_DTYPE = flags.DEFINE_string("dtype", "float32", "float32 | bfloat16")
_IMPLS = flags.DEFINE_list("impls", ["reference", "xla"], "attention impls to time")
_BATCH = flags.DEFINE_integer("decode_batch", 32, "decode rows")
_CONTEXT = flags.DEFINE_list("decode_context", ["32", "112"], "decode context lengths: lo,hi "
                             "(rows spread evenly between them)")
_PREFILL = flags.DEFINE_integer("prefill_tokens", 256, "packed prefill tokens")
_PREFILL_SEQS = flags.DEFINE_integer("prefill_seqs", 1, "fresh prompts in the prefill step")
_MAXLEN = flags.DEFINE_integer("max_model_len", 512, "block-table width x tokens per block")
_TPB = flags.DEFINE_integer("tokens_per_block", 16, "tokens per KV block")
_REPS = flags.DEFINE_integer("reps", 7, "timed calls per measurement")
_ABLATIONS = flags.DEFINE_boolean("ablations", True, "also time the steps with the KV write "
                                  "only, the attention only, and neither")
_STAT = flags.DEFINE_enum("stat", "min", ["min", "median"], "statistic over the timed calls "
                          "(min: steadier on a CPU shared with other jobs)")
_DEPTH_MODEL = flags.DEFINE_string("depth_model", "smollm2-135m", "widths for part 2")
_DEPTHS = flags.DEFINE_list("depths", ["2", "24"], "layer counts for part 2 (empty: skip)")
_DEPTH_IMPL = flags.DEFINE_string("depth_impl", "auto", "attention impl for part 2")
_TRIALS = flags.DEFINE_integer("compile_trials", 3, "fresh compilations per depth (fastest)")
_QUICK = flags.DEFINE_boolean("quick", False, "smoke test: tiny-llama, tiny shapes, depths 1,2")
_OUT = flags.DEFINE_string("output_dir", "runs/xla_path", "where to write xla_path.json")


def _load(name: str, num_layers=None):
    from fineserve_jax.loader import load_model

    return load_model(name, quant=_QUANT.value, dtype=_DTYPE.value, random_weights=True,
                      num_layers=num_layers)


def _runner(model, impl: str, batch: int, prefill_tokens: int, prefill_seqs: int):
    try:
        from fineserve_jax.core.buckets import Buckets
    except ImportError:  # older layout (before/after comparisons against a checkout of HEAD)
        from fineserve_jax.engine.buckets import Buckets
    from fineserve_jax.engine.model_runner import ModelRunner

    t = _TPB.value
    buckets = Buckets(decode_sizes=(batch,), prefill_sizes=(prefill_tokens,),
                      prefill_seqs=prefill_seqs, table_width=-(-_MAXLEN.value // t))
    return ModelRunner(model.name, model, model.kv_format(t), buckets, impl)


def _arena(fmt, rows: int, width: int):
    """One sequence per slab (slab 0: the null slab), filled with finite random KV."""
    from experiments.kv_data import random_view

    view = random_view(fmt, (rows + 1) * width, jax.random.PRNGKey(0))
    return view.reshape(rows + 1, width * fmt.block_words)


def _decode_inputs(runner, lengths: np.ndarray):
    x = runner.inputs_for("decode", runner.buckets.max_decode)
    t, width = runner.fmt.tokens_per_block, runner.buckets.table_width
    for row, n in enumerate(lengths):
        ids = (row + 1) * width + np.arange(width)  # the row's slab
        pos = int(n) - 1
        x.tokens[row] = 3 + row
        x.positions[row] = x.q_pos[row] = pos
        x.slot_block[row], x.slot_offset[row] = ids[pos // t], pos % t
        x.q_seq[row] = x.logits_idx[row] = row
        x.lengths[row] = n
        x.block_tables[row] = ids
    return x


def _prefill_inputs(runner, seqs: int):
    n = runner.buckets.max_prefill
    x = runner.inputs_for("prefill", n)
    t, width = runner.fmt.tokens_per_block, runner.buckets.table_width
    per = n // seqs
    for row in range(seqs):
        ids = (row + 1) * width + np.arange(width)
        pos = np.arange(per)
        sl = slice(row * per, (row + 1) * per)
        x.tokens[sl] = 3 + pos
        x.positions[sl] = x.q_pos[sl] = pos
        x.slot_block[sl], x.slot_offset[sl] = ids[pos // t], pos % t
        x.q_seq[sl] = row
        x.logits_idx[row] = (row + 1) * per - 1
        x.lengths[row] = per
        x.block_tables[row] = ids
    return x


def _time_step(runner, kind: str, size: int, arena, x, reps: int):
    state = {"arena": arena}

    def step():
        state["arena"], tokens = runner.run(kind, size, state["arena"], x)
        return tokens

    return time_call(step, (), reps, 1, _STAT.value), state["arena"]


class _AblatedAttention:
    """The engine's paged attention with the KV write and/or the attention switched off
    (no attention: the layer's output is q itself). Ablations for this benchmark only."""

    def __init__(self, fmt, kind, x, impl, write: bool, attend: bool):
        self.fmt, self.kind, self.x, self.impl, self.write, self.attend = (
            fmt, kind, x, impl, write, attend)

    def __call__(self, view, layer, q, k, v):
        import pallas_kernels

        b, t, hq, d = q.shape
        n, x = b * t, self.x
        if self.write:
            view = pallas_kernels.write_kv_view(view, self.fmt, layer, k.reshape(n, -1, d),
                                                v.reshape(n, -1, d), x.slot_block,
                                                x.slot_offset)
        if not self.attend:
            return q, view
        if self.kind == "decode":
            out = pallas_kernels.decode_attention(q.reshape(n, hq, d), view, x.block_tables,
                                                  x.lengths, fmt=self.fmt, layer=layer,
                                                  impl=self.impl)
        else:
            out = pallas_kernels.prefill_attention(q.reshape(n, hq, d), view, x.block_tables,
                                                   x.q_seq, x.q_pos, fmt=self.fmt,
                                                   layer=layer, impl=self.impl)
        return out.reshape(b, t, hq, d), view


def _ablations(runner, arena, dx, px, reps: int):
    """Step time with the KV write only, the attention only, and neither (seconds)."""
    from flax import nnx

    from fineserve_jax.engine.model_runner import layer_kernels
    from fineserve_jax.engine.sampling import sample_tokens
    from fineserve_jax.kvslab import arena as arena_lib

    graphdef = nnx.graphdef(runner.model.module)
    fmt, out = runner.fmt, {}
    kernels = layer_kernels(runner.impl, runner.group)

    def make(kind, write, attend):
        def step(params, arena, x):
            module = nnx.merge(graphdef, params)
            att = _AblatedAttention(fmt, kind, x, runner.impl, write, attend)
            view = arena_lib.typed_view(arena, fmt)
            if kind == "decode":
                logits, view = module(x.tokens[:, None], x.positions[:, None], att, view,
                                      kernels=kernels)
                logits = logits[:, 0]
            else:
                logits, view = module(x.tokens[None], x.positions[None], att, view,
                                      logits_indices=x.logits_idx[None], kernels=kernels)
                logits = logits[0]
            tok = sample_tokens(logits, x.temperature, x.top_k, x.top_p, x.seeds, x.steps)
            return arena_lib.from_view(view, arena.shape), tok
        return jax.jit(step, donate_argnums=(1,))

    box = {"a": arena}
    for kind, x in (("decode", dx), ("prefill", px)):
        for label, write, attend in (("write_only", True, False), ("attention_only", False, True),
                                     ("neither", False, False)):
            fn = make(kind, write, attend)

            def call(fn=fn, x=x):
                box["a"], tok = fn(runner.params, box["a"], x)
                return tok

            out[f"{kind}_{label}_s"] = time_call(call, (), reps, 1, _STAT.value)
    return out, box["a"]


def steps_part(names: List[str], impls: List[str], reps: int) -> List[dict]:
    rows = []
    batch, n_pre, seqs = _BATCH.value, _PREFILL.value, _PREFILL_SEQS.value
    lo, hi = (int(v) for v in _CONTEXT.value)
    if hi > _MAXLEN.value:
        raise app.UsageError(f"--decode_context {hi} exceeds --max_model_len {_MAXLEN.value}")
    lengths = np.linspace(lo, hi, batch).round().astype(np.int32)
    for name in names:
        model = _load(name)
        cfg = model.config
        ids_d = jnp.full((batch, 1), 5, jnp.int32)
        ids_p = jnp.full((seqs, n_pre // seqs), 5, jnp.int32)
        plain_d = time_call(model.logits, (ids_d,), reps, 1, _STAT.value)
        plain_p = time_call(model.logits, (ids_p,), reps, 1, _STAT.value)
        print(f"{name}: {cfg.num_layers} layers, d {cfg.hidden_size}, heads {cfg.num_heads}/"
              f"{cfg.num_kv_heads}x{cfg.head_dim}, ffn {cfg.intermediate_size}, vocab "
              f"{cfg.vocab_size}; plain forward [{batch},1] {plain_d * 1e3:.1f} ms, "
              f"[{seqs},{n_pre // seqs}] {plain_p * 1e3:.1f} ms", flush=True)
        for impl in impls:
            runner = _runner(model, impl, batch, n_pre, seqs)
            width = runner.buckets.table_width
            arena = _arena(runner.fmt, max(batch, seqs), width)
            t0 = time.perf_counter()
            runner.compile_all(arena)
            compile_s = time.perf_counter() - t0
            dx, px = _decode_inputs(runner, lengths), _prefill_inputs(runner, seqs)
            dec, arena = _time_step(runner, "decode", batch, arena, dx, reps)
            pre, arena = _time_step(runner, "prefill", n_pre, arena, px, reps)
            abl = {}
            if _ABLATIONS.value:
                abl, arena = _ablations(runner, arena, dx, px, reps)
            row = dict(model=name, impl=impl, resolved_impl=getattr(runner, "impl", impl),
                       layers=cfg.num_layers, decode_batch=batch,
                       decode_context=[int(lo), int(hi)], prefill_tokens=n_pre,
                       prefill_seqs=seqs, table_width=width, compile_both_s=compile_s,
                       decode_step_s=dec, plain_decode_s=plain_d, prefill_step_s=pre,
                       plain_prefill_s=plain_p, **abl)
            rows.append(row)
            for kind, t, plain in (("decode", dec, plain_d), ("prefill", pre, plain_p)):
                parts = ""
                if abl:
                    parts = (f"  [write only {abl[kind + '_write_only_s'] * 1e3:7.1f}, attention "
                             f"only {abl[kind + '_attention_only_s'] * 1e3:7.1f}, neither "
                             f"{abl[kind + '_neither_s'] * 1e3:7.1f} ms]")
                print(f"  {impl:10s} {kind:8s} step {t * 1e3:8.1f} ms = {t / plain:5.2f}x plain"
                      f"{parts}", flush=True)
            print(f"  {impl:10s} compile (both steps) {compile_s:5.1f} s", flush=True)
            del arena
    return rows


def depth_part(name: str, depths: List[int], impl: str, trials: int) -> List[dict]:
    """Lower + compile the decode and prefill steps at each depth; the fastest of `trials`
    fresh compilations (alternating depths, so a busy spell hits all of them alike)."""
    models = {L: _load(name, num_layers=L) for L in depths}
    best: Dict[int, dict] = {L: {} for L in depths}
    for _ in range(trials):
        for L in depths:
            runner = _runner(models[L], impl, 8, 64, 4)
            arena = jax.ShapeDtypeStruct(
                (9, runner.buckets.table_width * runner.fmt.block_words), jnp.uint32)
            for kind, size in (("decode", 8), ("prefill", 64)):
                x = runner.inputs_for(kind, size)
                # Runners share step functions (step_cache.shared_step), and JAX keeps their
                # traces and compiled programs in memory: without this a later trial would
                # time a cache lookup, not a compilation.
                jax.clear_caches()
                t0 = time.perf_counter()
                lowered = runner._jit[kind].lower(runner.params, arena, x)
                t1 = time.perf_counter()
                lowered.compile()
                t2 = time.perf_counter()
                prev = best[L].get(kind)
                if prev is None or t2 - t0 < prev["lower_s"] + prev["compile_s"]:
                    best[L][kind] = {"lower_s": t1 - t0, "compile_s": t2 - t1}
    rows = []
    for L in depths:
        t = best[L]
        rows.append(dict(model=name, layers=L, impl=impl, **t))
        print(f"  {name} x {L:3d} layers: decode lower {t['decode']['lower_s']:5.2f} s + "
              f"compile {t['decode']['compile_s']:5.2f} s; prefill lower "
              f"{t['prefill']['lower_s']:5.2f} s + compile {t['prefill']['compile_s']:5.2f} s",
              flush=True)
    if len(rows) >= 2:
        for kind in ("decode", "prefill"):
            a = rows[0][kind]["lower_s"] + rows[0][kind]["compile_s"]
            b = rows[-1][kind]["lower_s"] + rows[-1][kind]["compile_s"]
            print(f"  {kind}: {rows[-1]['layers']} vs {rows[0]['layers']} layers: "
                  f"{b:.2f} s / {a:.2f} s = {b / a:.2f}x")
    return rows


def main(argv):
    del argv
    jax.config.update("jax_enable_compilation_cache", False)
    quick = _QUICK.value
    names = ["tiny-llama"] if quick else list(_MODELS.value)
    reps = 2 if quick else _REPS.value
    if quick:
        for name, v in (("decode_batch", 4), ("prefill_tokens", 32), ("prefill_seqs", 2),
                        ("max_model_len", 64), ("decode_context", ["8", "40"])):
            setattr(flags.FLAGS, name, v)
    print(f"backend {jax.default_backend()}, JAX {jax.__version__}")
    report = {"meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                       "jax": jax.__version__, "backend": jax.default_backend(),
                       "dtype": _DTYPE.value, "quant": _QUANT.value}}
    report["steps"] = steps_part(names, list(_IMPLS.value), reps)
    depths = [1, 2] if quick else [int(d) for d in _DEPTHS.value if d]
    if depths:
        depth_model = "tiny-llama" if quick else _DEPTH_MODEL.value
        print(f"compile time vs depth ({depth_model} widths, impl {_DEPTH_IMPL.value}):")
        report["depth"] = depth_part(depth_model, depths, _DEPTH_IMPL.value,
                                     1 if quick else _TRIALS.value)
    write_json(_OUT.value, "xla_path.json", report)


if __name__ == "__main__":
    app.run(main)
