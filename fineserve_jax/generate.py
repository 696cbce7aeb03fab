"""Offline batch generation.

    python -m fineserve_jax.generate --model=tiny-llama --quant=org \
        --input=in.jsonl --output=out.jsonl

Each input line is a JSON object with `prompt` (text or token ids) and optional sampling
fields (`max_tokens`, `temperature`, `top_p`, `top_k`, `seed`, `stop_token_ids`,
`ignore_eos`). The output has one line per input line, in order: the input object plus
`text`, `token_ids`, `finish_reason`, or `error` (a malformed line or a bad request).
"""

from __future__ import annotations

import json
import sys
from typing import List, Optional, Tuple

from absl import app, flags

_MODEL = flags.DEFINE_string("model", "tiny-llama", "model preset name or HF checkpoint dir")
_QUANT = flags.DEFINE_string("quant", "org", "precision preset")
_INPUT = flags.DEFINE_string("input", None, "input JSONL")
_OUTPUT = flags.DEFINE_string("output", None, "output JSONL")
_IMPL = flags.DEFINE_string("attention_impl", "auto", "reference | pallas_triton | auto")
_MAXLEN = flags.DEFINE_integer("max_model_len", 512, "longest prompt + output")
_DTYPE = flags.DEFINE_string("dtype", "float32", "float32 | bfloat16")


def parse_lines(lines) -> List[Tuple[Optional[dict], Optional[str]]]:
    """-> per line (request dict, None) or (None, error)."""
    from fineserve_jax.core.sampling_params import SamplingParams

    out = []
    for n, line in enumerate(lines, 1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            out.append((None, f"line {n}: not valid JSON: {e.msg}"))
            continue
        if not isinstance(obj, dict) or "prompt" not in obj:
            out.append((None, f"line {n}: expected an object with a 'prompt' field"))
            continue
        fields = {k: v for k, v in obj.items() if k != "prompt"}
        try:
            SamplingParams.from_dict(fields)
        except (TypeError, ValueError) as e:
            out.append((None, f"line {n}: {e}"))
            continue
        out.append((obj, None))
    return out


def run(model: str, quant: str, input_path: str, output_path: str, attention_impl="auto",
        max_model_len=512, dtype="float32", progress=True) -> int:
    """Generate for every line; returns the number of error lines."""
    from fineserve_jax.core.sampling_params import SamplingParams
    from fineserve_jax.engine.llm import LLM

    with open(input_path) as f:
        lines = [l for l in f.read().splitlines() if l.strip()]
    parsed = parse_lines(lines)
    llm = LLM(model=model, quant=quant, attention_impl=attention_impl, dtype=dtype,
              max_model_len=max_model_len)
    good = [(i, obj) for i, (obj, err) in enumerate(parsed) if err is None]
    outs = llm.generate([obj["prompt"] for _, obj in good],
                        [SamplingParams.from_dict({k: v for k, v in obj.items() if k != "prompt"})
                         for _, obj in good], progress=progress) if good else []
    results = {i: o for (i, _), o in zip(good, outs)}
    errors = 0
    with open(output_path, "w") as f:
        for i, (obj, err) in enumerate(parsed):
            if err is None:
                o = results[i]
                if o.status == "finished":
                    rec = {**obj, "text": o.text, "token_ids": o.token_ids,
                           "finish_reason": o.finish_reason}
                else:
                    rec = {**obj, "error": o.error or o.status}
            else:
                rec = {"error": err, "line": lines[i]}
            errors += "error" in rec
            f.write(json.dumps(rec) + "\n")
    return errors


def main(argv):
    del argv
    if not _INPUT.value or not _OUTPUT.value:
        sys.exit("--input and --output are required")
    errors = run(_MODEL.value, _QUANT.value, _INPUT.value, _OUTPUT.value, _IMPL.value,
                 _MAXLEN.value, _DTYPE.value)
    print(f"wrote {_OUTPUT.value}" + (f" ({errors} line(s) with errors)" if errors else ""))


if __name__ == "__main__":
    app.run(main)
