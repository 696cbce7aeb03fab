"""The engine against transformers on a real model, side by side on this machine.

    python -m experiments.cpu_bench --output_dir=runs/cpu_bench
    python -m experiments.cpu_bench --num_prompts=32,64 --new_tokens=64

Model: SmolLM2-135M-Instruct (the GGUF from `fineserve_jax.real_models`, float32), loaded by
both stacks from the same file. Prompts: natural-text snippets cut to 24-48 tokens (seeded).
Each side generates exactly `--new_tokens` tokens per prompt, greedily (EOS ignored):
transformers with one padded `generate` call over all prompts, the engine with `LLM.generate`
(continuous batching). Both are timed after a warm-up call; tokens/s = generated tokens / wall
time of the call. Start-up is measured separately in fresh processes: cold (empty compilation
cache folder) and warm (the same folder again), with the engine's own breakdown (load,
quantize, compile, profile). Prints a table and writes OUTPUT_DIR/cpu_bench.json.
"""

from __future__ import annotations

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
_REPS = flags.DEFINE_integer("reps", 2, "timed calls per side (median)")
_STARTUP = flags.DEFINE_boolean("startup", True, "measure cold and warm engine start-up")
_HF = flags.DEFINE_boolean("transformers", True, "also run transformers (needs the hf extra)")
_SEED = flags.DEFINE_integer("seed", 0, "prompt seed")
_OUT = flags.DEFINE_string("output_dir", "runs/cpu_bench", "where to write cpu_bench.json")

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


def engine_side(path: str, prompts, new_tokens: int, reps: int):
    from fineserve_jax import LLM, SamplingParams
    from fineserve_jax.core.buckets import Buckets

    t0 = time.perf_counter()
    llm = LLM(model=path, quant="org", dtype="float32",
              max_model_len=max(len(p) for p in prompts) + new_tokens + 8,
              buckets=Buckets(decode_sizes=(1, 2, 4, 8, 16, 32, 64), prefill_sizes=(32, 128, 256),
                              prefill_seqs=8))
    startup = time.perf_counter() - t0
    sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:4], sp)  # warm the host path
    times, outs = [], None
    for _ in range(reps):
        steps0 = llm.engine.num_steps
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp)
        times.append(time.perf_counter() - t0)
        steps = llm.engine.num_steps - steps0
    tokens = sum(len(o.token_ids) for o in outs)
    wall = statistics.median(times)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "steps": steps,
            "startup_s": startup, "startup": llm.engine.startup,
            "steady_state_compiles": llm.engine.steady_state_compiles,
            "profile_ms": {k: round(v * 1e3, 2) for k, v in llm.engine.cost.as_dict().get("model/decode", {}).items()},
            "_tokens": [o.token_ids for o in outs]}


def transformers_side(path: str, prompts, new_tokens: int, reps: int):
    import torch
    import transformers

    d, f = os.path.dirname(path), os.path.basename(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    pad = 0
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              pad_token_id=pad)
    with torch.inference_mode():
        model.generate(ids[:4], attention_mask=mask[:4], **kw)  # warm-up
        times, out = [], None
        for _ in range(reps):
            t0 = time.perf_counter()
            out = model.generate(ids, attention_mask=mask, **kw)
            times.append(time.perf_counter() - t0)
    gen = out[:, width:].tolist()
    tokens = sum(len(g) for g in gen)
    wall = statistics.median(times)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "threads": torch.get_num_threads(), "_tokens": gen}


STARTUP_SCRIPT = """
import json, sys, time
t0 = time.perf_counter()
from fineserve_jax import LLM
llm = LLM(model=sys.argv[1], quant="org", dtype="float32", max_model_len=128)
print(json.dumps({"startup_s": time.perf_counter() - t0, **llm.engine.startup}))
"""


def measure_startup(path: str) -> dict:
    """Engine start-up in fresh processes: cold (empty cache folder), then warm."""
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, FINESERVE_JAX_CACHE=cache)
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
    from fineserve_jax.real_models import smollm2_gguf
    from fineserve_jax.tokenizer import load_tokenizer  # noqa: F401  (the engine's tokenizer)
    from fineserve_jax import load_model

    path = smollm2_gguf()
    tok = load_model(path, dtype="float32").tokenizer
    result = {"model": path, "new_tokens": _NEW.value, "runs": {}}
    if _STARTUP.value:
        result["startup"] = measure_startup(path)
    for n in (int(x) for x in _NUM.value):
        prompts = make_prompts(tok, n, _SEED.value)
        run = {"engine": engine_side(path, prompts, _NEW.value, _REPS.value)}
        if _HF.value:
            run["transformers"] = transformers_side(path, prompts, _NEW.value, _REPS.value)
            e, t = run["engine"], run["transformers"]
            run["ratio_engine_over_transformers"] = e["tokens_per_s"] / t["tokens_per_s"]
            run["same_tokens"] = e["_tokens"] == t["_tokens"]
            run["same_first_8"] = [a[:8] for a in e["_tokens"]] == [b[:8] for b in t["_tokens"]]
            # Greedy float32 decoding in two stacks (transformers pads its batch on the left,
            # so its sums run in another order) can part at a near-tie and then diverge: say
            # how many prompts agree fully and how long they agree on average.
            agree = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
                     for a, b in zip(e["_tokens"], t["_tokens"])]
            run["prompts_identical"] = sum(a == len(x) for a, x in zip(agree, e["_tokens"]))
            run["mean_tokens_agreeing"] = sum(agree) / len(agree)
        result["runs"][n] = {k: ({kk: vv for kk, vv in v.items() if not kk.startswith("_")}
                                 if isinstance(v, dict) else v) for k, v in run.items()}
    print(f"{'prompts':>7} {'engine tok/s':>13} {'transformers tok/s':>19} {'ratio':>6} {'identical prompts':>18} {'agreeing tokens':>16}")
    for n, r in result["runs"].items():
        t = r.get("transformers", {})
        print(f"{n:>7} {r['engine']['tokens_per_s']:>13.1f} {t.get('tokens_per_s', float('nan')):>19.1f} "
              f"{r.get('ratio_engine_over_transformers', float('nan')):>6.2f} {r.get('prompts_identical', '-'):>18} {r.get('mean_tokens_agreeing', float('nan')):>16.1f}")
    for label, s in result.get("startup", {}).items():
        print(f"start-up {label}: {s['startup_s']:.1f} s (load {s['load_s']:.1f}, quantize "
              f"{s['quantize_s']:.1f}, compile {s['compile_s']:.1f}, profile {s['profile_s']:.1f}; "
              f"{s['backend_compiles']} backend compiles, {s['steps_profile_reused']} profiles reused)")
    write_json(_OUT.value, "cpu_bench.json", result)


if __name__ == "__main__":
    app.run(main)
