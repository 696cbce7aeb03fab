"""Prefix-caching flags shared by `experiments.serve` and `experiments.simulate`: the cache
switch and the shared-prefix workload option (`fineserve_jax.workload.prefixes`)."""

from __future__ import annotations

from typing import Optional

from absl import app, flags

ENABLE_PREFIX_CACHING = flags.DEFINE_boolean(
    "enable_prefix_caching", True, "share the KV of cached prompt prefixes between requests of a model")
_SHARED_FRACTION = flags.DEFINE_float(
    "shared_prefix_fraction", 0.0, "share of each model's requests that start with one of its "
    "system prompts (synthetic workloads)")
_SHARED_LEN = flags.DEFINE_integer("shared_prefix_len", 256, "tokens of a system prompt")
_SHARED_NUM = flags.DEFINE_integer("prefixes_per_model", 1, "system prompts per model")
_TURNS = flags.DEFINE_integer("session_turns", 1, "turns per multi-turn session (1: none)")


def prefix_sharing(max_session_tokens: Optional[int] = None):
    """The workload's `PrefixSharing` from the flags, or None when they ask for none.
    Raises `app.UsageError` naming the problem for values it refuses."""
    if _SHARED_FRACTION.value <= 0 and _TURNS.value <= 1:
        return None
    from fineserve_jax.workload import PrefixSharing

    extra = {} if max_session_tokens is None else {"max_session_tokens": max_session_tokens}
    try:
        return PrefixSharing(_SHARED_FRACTION.value, _SHARED_LEN.value, _SHARED_NUM.value,
                             _TURNS.value, **extra)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
