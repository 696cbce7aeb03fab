"""The engine against transformers on a real model, side by side on this machine.

    python -m experiments.cpu_bench --output_dir=runs/cpu_bench
    python -m experiments.cpu_bench --num_prompts=32,64 --new_tokens=64

Model: SmolLM2-135M-Instruct (the GGUF from `fineserve_jax.real_models`, float32), loaded by
both stacks from the same file. Prompts: natural-text snippets cut to 24-48 tokens (seeded).
Scenarios (`--scenarios`):
- `fixed` (the issue's measurement): every prompt asks for exactly `--new_tokens` tokens,
  greedily (EOS ignored): transformers with one padded `generate` call over all prompts, the
  engine with `LLM.generate` (continuous batching). Both do the same work per token here, so
  this compares the two stacks' per-step speed; continuous batching has nothing to win.
- `mixed`: each prompt asks for its own number of tokens, drawn uniformly from
  [new_tokens / 4, 7 * new_tokens / 4] (seeded; mean `--new_tokens`), as requests of a real
  workload do. `generate` has one `max_new_tokens` per call, so transformers runs the whole
  batch to the longest request and a prompt's tokens past its own request are discarded; the
  engine retires each request when it is done. tokens/s counts the requested tokens only
  (useful tokens), on both sides.
Both are timed after a warm-up call, the engine with prefix caching off (a repeated call
recomputes its prompts, as transformers does); tokens/s = (useful) generated tokens / wall
time of the call (median of `--reps`). The two stacks' calls alternate (engine, transformers,
engine, ...), and the ratio is the median over those pairs of the pair's ratio: this
machine's speed drifts over minutes, and a ratio of calls made seconds apart compares the
stacks, not the minutes. Start-up is measured separately in fresh processes: cold (empty
compilation cache folder) and warm (the same folder again), with the engine's own breakdown
(load, quantize, compile, profile). Prints a table and writes OUTPUT_DIR/cpu_bench.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from experiments.output import write_json

_NUM = flags.DEFINE_list("num_prompts", ["32", "64"], "prompt counts to measure")
_NEW = flags.DEFINE_integer("new_tokens", 64, "tokens generated per prompt")
_REPS = flags.DEFINE_integer("reps", 3, "timed calls per side, the two sides alternating "
                             "call by call; the ratio is the median of the pairs' ratios")
_STARTUP = flags.DEFINE_boolean("startup", True, "measure cold and warm engine start-up")
_HF = flags.DEFINE_boolean("transformers", True, "also run transformers (needs the hf extra)")
_SEED = flags.DEFINE_integer("seed", 0, "prompt (and mixed output length) seed")
_SCENARIOS = flags.DEFINE_list("scenarios", ["fixed", "mixed"], "fixed: every prompt asks for "
                               "--new_tokens tokens; mixed: each its own count (see the docstring)")
_OUT = flags.DEFINE_string("output_dir", "runs/cpu_bench", "where to write cpu_bench.json")
_T0 = time.perf_counter()  # the origin of the calls' start times in the JSON

TEXT = (
    "The morning was cold and clear, and the river ran quickly past the old mill. "
    "A boy and his dog walked along the bank, watching the boats go by. In the village the "
    "baker had opened his shop, and the smell of fresh bread drifted across the square. "
    "Farmers brought their carts to market, loaded with apples, cabbages and sacks of grain. "
    "Nobody noticed the stranger who arrived on the early coach, carrying a small leather case "
    "and asking the way to the house on the hill. Scientists have long studied how birds find "
    "their way across oceans; some follow the stars, others the magnetic field of the earth. "
    "The recipe calls for two cups of flour, a pinch of salt, three eggs and a little milk. "
)


def make_prompts(tokenizer, n: int, seed: int):
    """n token-id prompts of 24-48 tokens, cut from the text at seeded offsets."""
    import numpy as np

    ids = tokenizer.encode(TEXT)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(24, 49))
        start = int(rng.integers(0, len(ids) - length))
        out.append(ids[start:start + length])
    return out


SCENARIOS = ("fixed", "mixed")


def output_lengths(scenario: str, n: int, new_tokens: int, seed: int):
    """Tokens each of n prompts asks for in `scenario` (one of SCENARIOS)."""
    import numpy as np

    if scenario == "fixed":
        return [new_tokens] * n
    lo, hi = max(1, new_tokens // 4), max(1, 7 * new_tokens // 4)
    return [int(x) for x in np.random.default_rng(seed + 1).integers(lo, hi + 1, n)]


def step_breakdown(before, after, wall_s: float) -> dict:
    """Where one `generate` call's wall time went, from the loop's counters before and after
    it (`core.loop.LoopStats`): prefill and decode steps, and the host time between them."""
    prefill_s = after.prefill_busy_s - before.prefill_busy_s
    decode_s = (after.busy_s - before.busy_s) - prefill_s
    prefill = after.prefill_steps - before.prefill_steps
    decode = (after.steps - before.steps) - prefill
    return {"prefill_steps": prefill, "prefill_s": prefill_s, "decode_steps": decode,
            "decode_s": decode_s, "decode_step_ms": 1e3 * decode_s / max(decode, 1),
            "host_s": wall_s - prefill_s - decode_s}


class EngineSide:
    """The engine, set up and warmed for one scenario; `call()` times one `generate`."""

    def __init__(self, path: str, prompts, lengths):
        from fineserve_jax import LLM, SamplingParams
        from fineserve_jax.core.buckets import Buckets

        t0 = time.perf_counter()
        # Prefix caching off: the timed calls repeat the same prompts, and transformers
        # recomputes every prompt each call, so the engine must too (same work on both sides).
        self.llm = LLM(model=path, quant="org", dtype="float32", enable_prefix_caching=False,
                       max_model_len=max(len(p) for p in prompts) + max(lengths) + 8,
                       buckets=Buckets(decode_sizes=(1, 2, 4, 8, 16, 32, 64),
                                       prefill_sizes=(32, 128, 256), prefill_seqs=8))
        self.startup_s = time.perf_counter() - t0
        self.prompts, self.lengths = prompts, list(lengths)
        self.params = [SamplingParams(max_tokens=k, temperature=0.0, ignore_eos=True)
                       for k in lengths]
        self.llm.generate(prompts[:4], self.params[:4])  # warm the host path
        self.times, self.starts, self.outs, self.breakdown = [], [], None, None

    def call(self) -> float:
        stats = self.llm.engine.loop.stats
        before = dataclasses.replace(stats)
        t0 = time.perf_counter()
        self.starts.append(t0 - _T0)
        self.outs = self.llm.generate(self.prompts, self.params)
        self.times.append(time.perf_counter() - t0)
        self.breakdown = step_breakdown(before, stats, self.times[-1])
        got = [len(o.token_ids) for o in self.outs]
        if got != self.lengths:  # the figure would count other work than asked for
            raise RuntimeError(f"the engine generated {got} tokens, asked for {self.lengths}")
        return self.times[-1]

    def summary(self) -> dict:
        tokens, wall, engine = sum(self.lengths), statistics.median(self.times), self.llm.engine
        return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
                "walls_s": self.times, "starts_s": self.starts,
                "steps": self.breakdown["prefill_steps"] + self.breakdown["decode_steps"],
                "breakdown": self.breakdown,  # of the last timed call
                "cached_prompt_tokens": sum(o.num_cached_tokens for o in self.outs),  # 0: full prefill
                "startup_s": self.startup_s, "startup": engine.startup,
                "steady_state_compiles": engine.steady_state_compiles,
                "profile_ms": {k: round(v * 1e3, 2) for k, v in
                               engine.cost.as_dict().get("model/decode", {}).items()},
                "_tokens": [o.token_ids for o in self.outs]}


class TransformersSide:
    """transformers `generate` over the same prompts, left-padded into one batch; `call()`
    times one call."""

    def __init__(self, path: str, prompts, lengths):
        import torch
        import transformers

        self.torch = torch
        d, f = os.path.dirname(path), os.path.basename(path)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            d, gguf_file=f, dtype=torch.float32).eval()
        pad = 0
        self.width = max(len(p) for p in prompts)
        self.ids = torch.tensor([[pad] * (self.width - len(p)) + p for p in prompts])  # left pad
        self.mask = torch.tensor([[0] * (self.width - len(p)) + [1] * len(p) for p in prompts])
        self.lengths = list(lengths)
        longest = max(lengths)  # one generate call: every row runs to the longest request
        self.kw = dict(max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                       pad_token_id=pad)
        with torch.inference_mode():  # warm-up
            self.model.generate(self.ids[:4], attention_mask=self.mask[:4], **self.kw)
        self.times, self.starts, self.out = [], [], None

    def call(self) -> float:
        with self.torch.inference_mode():
            t0 = time.perf_counter()
            self.starts.append(t0 - _T0)
            self.out = self.model.generate(self.ids, attention_mask=self.mask, **self.kw)
            self.times.append(time.perf_counter() - t0)
        return self.times[-1]

    def summary(self) -> dict:
        gen = [g[:k] for g, k in zip(self.out[:, self.width:].tolist(), self.lengths)]
        tokens, wall = sum(len(g) for g in gen), statistics.median(self.times)
        return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
                "walls_s": self.times, "starts_s": self.starts, "threads": self.torch.get_num_threads(), "_tokens": gen}


def run_interleaved(sides, reps: int) -> None:
    """`reps` timed calls of each side, alternating call by call: this box's speed drifts
    over minutes, and a ratio of two calls made seconds apart is what compares the stacks."""
    for _ in range(reps):
        for side in sides:
            side.call()


STARTUP_SCRIPT = """
import json, sys, time
t0 = time.perf_counter()
from fineserve_jax import LLM
llm = LLM(model=sys.argv[1], quant="org", dtype="float32", max_model_len=128)
print(json.dumps({"startup_s": time.perf_counter() - t0, **llm.engine.startup}))
"""


def measure_startup(path: str) -> dict:
    """Engine start-up in fresh processes: cold (empty cache folders: compiled steps and the
    C++ CPU kernels, so cold includes building them), then warm."""
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, FINESERVE_JAX_CACHE=cache,
                   FINESERVE_JAX_CPU_KERNEL_DIR=os.path.join(cache, "cpu_kernels"))
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        for label in ("cold", "warm"):
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", STARTUP_SCRIPT, path], env=env,
                                  capture_output=True, text=True, timeout=1800)
            if proc.returncode:
                raise RuntimeError(f"start-up run failed:\n{proc.stderr[-3000:]}")
            rec = json.loads(proc.stdout.strip().splitlines()[-1])
            rec["process_s"] = time.perf_counter() - t0
            out[label] = rec
    return out


def main(argv):
    del argv
    bad = [x for x in _SCENARIOS.value if x not in SCENARIOS]
    if bad or not _SCENARIOS.value:
        raise app.UsageError(f"--scenarios: {bad or 'empty'}; choose from {', '.join(SCENARIOS)}")
    if not all(x.isdigit() and int(x) >= 1 for x in _NUM.value):
        raise app.UsageError(f"--num_prompts: positive integers, got {_NUM.value}")
    if _NEW.value < 1:
        raise app.UsageError(f"--new_tokens must be >= 1, got {_NEW.value}")
    from fineserve_jax.real_models import smollm2_gguf
    from fineserve_jax.tokenizer import load_tokenizer  # noqa: F401  (the engine's tokenizer)
    from fineserve_jax import load_model

    path = smollm2_gguf()
    tok = load_model(path, dtype="float32").tokenizer
    result = {"model": path, "new_tokens": _NEW.value, "runs": {}}
    if _STARTUP.value:
        result["startup"] = measure_startup(path)
    for scenario, n in ((s, int(x)) for s in _SCENARIOS.value for x in _NUM.value):
        prompts = make_prompts(tok, n, _SEED.value)
        lengths = output_lengths(scenario, n, _NEW.value, _SEED.value)
        sides = [EngineSide(path, prompts, lengths)]
        if _HF.value:
            sides.append(TransformersSide(path, prompts, lengths))
        run_interleaved(sides, _REPS.value)
        run = {"scenario": scenario, "prompts": n, "requested_tokens": sum(lengths),
               "longest_request": max(lengths), "engine": sides[0].summary()}
        if _HF.value:
            run["transformers"] = sides[1].summary()
            e, t = run["engine"], run["transformers"]
            pairs = [(e["tokens"] / ew) / (t["tokens"] / tw)  # tokens/s over tokens/s
                     for ew, tw in zip(e["walls_s"], t["walls_s"])]
            run["ratios_per_pair"] = pairs
            run["ratio_engine_over_transformers"] = statistics.median(pairs)
            run["same_tokens"] = e["_tokens"] == t["_tokens"]
            run["same_first_8"] = [a[:8] for a in e["_tokens"]] == [b[:8] for b in t["_tokens"]]
            # Greedy float32 decoding in two stacks (transformers pads its batch on the left,
            # so its sums run in another order) can part at a near-tie and then diverge: say
            # how many prompts agree fully and how long they agree on average.
            agree = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
                     for a, b in zip(e["_tokens"], t["_tokens"])]
            run["prompts_identical"] = sum(a == len(x) for a, x in zip(agree, e["_tokens"]))
            run["mean_tokens_agreeing"] = sum(agree) / len(agree)
        result["runs"][f"{scenario}/{n}"] = {k: ({kk: vv for kk, vv in v.items() if not kk.startswith("_")}
                                 if isinstance(v, dict) else v) for k, v in run.items()}
    print(f"{'scenario':>8} {'prompts':>7} {'engine tok/s':>13} {'transformers tok/s':>19} {'ratio':>6} {'identical prompts':>18} {'agreeing tokens':>16}")
    for r in result["runs"].values():
        t = r.get("transformers", {})
        print(f"{r['scenario']:>8} {r['prompts']:>7} {r['engine']['tokens_per_s']:>13.1f} {t.get('tokens_per_s', float('nan')):>19.1f} "
              f"{r.get('ratio_engine_over_transformers', float('nan')):>6.2f} {r.get('prompts_identical', '-'):>18} {r.get('mean_tokens_agreeing', float('nan')):>16.1f}")
    print(f"\nengine, last timed call: {'scenario':>8} {'prompts':>7} {'prefill steps':>13} "
          f"{'prefill s':>9} {'decode steps':>12} {'decode s':>8} {'ms/decode step':>14} {'host s':>6}")
    for r in result["runs"].values():
        b = r["engine"]["breakdown"]
        print(f"{'':24} {r['scenario']:>8} {r['prompts']:>7} {b['prefill_steps']:>13} "
              f"{b['prefill_s']:>9.2f} {b['decode_steps']:>12} {b['decode_s']:>8.2f} "
              f"{b['decode_step_ms']:>14.1f} {b['host_s']:>6.2f}")
    for label, s in result.get("startup", {}).items():
        print(f"start-up {label}: {s['startup_s']:.1f} s (load {s['load_s']:.1f}, quantize "
              f"{s['quantize_s']:.1f}, compile {s['compile_s']:.1f}, profile {s['profile_s']:.1f}; "
              f"{s['executables_loaded']} executables loaded, {s['backend_compiles']} backend "
              f"compiles, {s['steps_profile_reused']} profiles reused)")
    write_json(_OUT.value, "cpu_bench.json", result)


if __name__ == "__main__":
    app.run(main)
