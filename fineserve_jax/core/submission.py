"""The one submission rule: may this request enter a device's queue? (pure Python)

The engine and the simulator refuse exactly the same requests: an unknown model, invalid
sampling parameters, a bad arrival time, a prompt that is empty, out of the vocabulary or
too long for the context, and a request that could not finish even alone on the device
(prompt + max_tokens must fit in the model's whole KV pool: otherwise it would preempt
itself and be re-admitted forever).
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

from fineserve_jax.core.model_entry import ModelEntry
from fineserve_jax.core.request import Request
from fineserve_jax.core.sampling_params import SamplingParams

Encode = Callable[[str], List[int]]


def check_request(req, entry: Optional[ModelEntry], served: str, capacity_blocks: int,
                  encode: Optional[Encode]) -> Tuple[Optional[List[int]], Optional[str]]:
    """(prompt token ids, None) when `req` may be queued, else (None, the reason).

    entry: the model's entry (None: the model is not served here; `served` lists those that
    are). capacity_blocks: blocks one sequence of this model could ever hold. encode: the
    model's text tokenizer (None: text prompts are refused).
    """
    if not isinstance(req, Request):
        return None, f"not a Request: {type(req).__name__}"
    if entry is None:
        return None, f"unknown model {req.model!r}; serving: {served}"
    if not isinstance(req.sampling, SamplingParams):
        return None, f"sampling must be SamplingParams, got {type(req.sampling).__name__}"
    problem = req.sampling.problem()
    if problem:
        return None, f"invalid sampling parameters: {problem}"
    if not isinstance(req.arrival_s, (int, float)) or not math.isfinite(req.arrival_s):
        return None, f"arrival_s must be a finite number, got {req.arrival_s!r}"
    if isinstance(req.prompt, str):
        if encode is None:
            return None, "text prompts need a tokenizer; this model has none (give token ids)"
        try:
            ids = list(encode(req.prompt))
        except Exception as e:  # a tokenizer error is this request's problem alone
            return None, f"could not tokenize the prompt: {type(e).__name__}: {e}"
    else:
        try:
            ids = [int(t) for t in req.prompt]
        except (TypeError, ValueError, OverflowError):
            return None, "prompt must be a string or a list of token ids"
        if any(isinstance(t, (bool, float)) for t in req.prompt):
            return None, "prompt token ids must be integers"
    if not ids:
        return None, "empty prompt"
    vocab = entry.vocab_size
    bad = [t for t in ids if t < 0 or (vocab is not None and t >= vocab)]
    if bad:
        return None, f"token ids out of range [0, {vocab}): {bad[:4]}"
    limit = entry.max_len
    if len(ids) >= limit:
        return None, (f"prompt of {len(ids)} tokens exceeds the model's maximum of "
                      f"{limit - 1} prompt tokens (context {limit})")
    longest = min(len(ids) + req.sampling.max_tokens, limit)
    need = entry.blocks_for_tokens(longest)
    if need > capacity_blocks:
        return None, (f"prompt + max_tokens ({longest} tokens) needs {need} KV blocks but "
                      f"the arena holds only {capacity_blocks} blocks of this model's format")
    return ids, None
