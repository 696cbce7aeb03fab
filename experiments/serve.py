"""Main job (interim demo until the engine lands): load three tiny models and decode greedily
by repeated full forwards. It serves no workload yet and writes only the tokens it made."""

import json
import os

import numpy as np
from absl import app, flags

import fineserve_jax as fj

FLAGS = flags.DEFINE_string("output_dir", "runs/serve", "where to write summary.json")


def main(_):
    out = {}
    for name in ("tiny-llama", "tiny-mistral", "tiny-qwen2"):
        m = fj.load_model(name, dtype="float32")
        ids = m.tokenizer.encode("Hello")
        for _ in range(8):
            ids.append(int(np.argmax(np.asarray(m.logits([ids]))[0, -1])))
        out[name] = ids
        print(f"{name}: greedy tokens {ids}")
    os.makedirs(FLAGS.value, exist_ok=True)
    with open(os.path.join(FLAGS.value, "demo_tokens.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    app.run(main)
