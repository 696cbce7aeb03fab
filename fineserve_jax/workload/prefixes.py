"""Shared prompt prefixes in a workload: system prompts per model and multi-turn sessions.
Pure Python + numpy, seeded.

A workload request names what its prompt starts with as *segments* `(stream, tokens)`: the
first `tokens` tokens of a named, deterministic token stream. Requests that name the same
stream share those tokens exactly (and their KV, with prefix caching); the rest of a prompt
comes from the request's own stream, so unrelated prompts never share a block by accident.

  system prompts  a `shared_fraction` of each model's requests start with one of the
                  model's `prefixes_per_model` system prompts of `prefix_len` tokens.
  sessions        with `session_turns` > 1, each model's requests form sessions of that
                  many consecutive turns (in arrival order); turn j's prompt is turn j-1's
                  prompt, a stand-in for its reply (`output_len` tokens of the session
                  stream: the real reply differs, so only the previous *prompt* can hit),
                  and its own new tokens. A session ends early at `max_session_tokens`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Dict, List, Sequence, Tuple

import numpy as np

Segments = Tuple[Tuple[str, int], ...]

# Token ids below this are left out of generated prompts (BOS/EOS/pad of common tokenizers).
FIRST_TOKEN = 3


@dataclasses.dataclass(frozen=True)
class PrefixSharing:
    shared_fraction: float = 0.0
    prefix_len: int = 256
    prefixes_per_model: int = 1
    session_turns: int = 1
    max_session_tokens: int = 2048

    def __post_init__(self):
        if not 0.0 <= self.shared_fraction <= 1.0:
            raise ValueError(f"shared_fraction must be in [0, 1], got {self.shared_fraction!r}")
        for name in ("prefix_len", "prefixes_per_model", "session_turns", "max_session_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"PrefixSharing.{name} must be an int >= 1, got {v!r}")


def token_stream(name: str, n: int, vocab_size: int) -> List[int]:
    """The first `n` tokens of the stream `name` (ids in [FIRST_TOKEN, vocab_size)); the
    first k of any longer draw are the same, so streams are prefixes of themselves."""
    # A 128-bit seed from the name: distinct names must not share a stream by accident.
    seed = int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=16).digest(), "little")
    rng = np.random.default_rng(seed)
    return rng.integers(FIRST_TOKEN, vocab_size, size=n).tolist()


def prompt_tokens(request_id: int, prompt_len: int, prefix: Segments, vocab_size: int) -> List[int]:
    """A workload request's prompt: its prefix segments, then its own tokens."""
    out: List[int] = []
    for name, n in prefix:
        out += token_stream(name, n, vocab_size)
    return out + token_stream(f"request/{request_id}", prompt_len - len(out), vocab_size)


def assign_prefixes(models: Sequence[str], prompt_len: np.ndarray, output_len: np.ndarray,
                    sharing: PrefixSharing, rng: np.random.Generator
                    ) -> Tuple[np.ndarray, List[Segments]]:
    """(new prompt lengths, prefix segments) for requests of `models` (arrival order)."""
    n = len(models)
    lens = prompt_len.astype(np.int64).copy()
    segments: List[Segments] = [()] * n
    shared = rng.random(n) < sharing.shared_fraction
    which = rng.integers(0, sharing.prefixes_per_model, size=n)
    sys_seg: List[Segments] = [
        ((f"system/{models[i]}/{which[i]}", sharing.prefix_len),) if shared[i] else ()
        for i in range(n)]
    if sharing.session_turns <= 1:
        for i in range(n):
            lens[i] += sharing.prefix_len if shared[i] else 0
            segments[i] = sys_seg[i]
        return lens, segments
    sessions: Dict[str, dict] = {}  # model -> its open session
    next_id = 0
    for i, m in enumerate(models):
        own = int(prompt_len[i])
        s = sessions.get(m)
        if s is not None:
            grown = s["length"] + s["reply"] + own
            if s["turns"] >= sharing.session_turns or grown - s["sys_len"] > sharing.max_session_tokens:
                s = None
        if s is None:
            sys_len = sum(t for _, t in sys_seg[i])
            s = sessions[m] = {"id": next_id, "turns": 0, "sys": sys_seg[i], "sys_len": sys_len}
            next_id += 1
            total = sys_len + own
        else:
            total = grown
        s["turns"] += 1
        s["length"], s["reply"] = total, int(output_len[i])
        segments[i] = s["sys"] + ((f"session/{m}/{s['id']}", total - s["sys_len"]),)
        lens[i] = total
    return lens, segments
