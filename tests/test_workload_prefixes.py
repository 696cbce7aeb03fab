"""Shared prompt prefixes in generated workloads: system prompts and multi-turn sessions."""

import numpy as np
import pytest

from fineserve_jax.workload import PrefixSharing, generate_workload, token_stream

MODELS = {"a": 20.0, "b": 10.0}


def test_prefixes_do_not_move_arrivals_or_own_lengths():
    base = generate_workload(MODELS, num_requests=200, seed=4)
    shared = generate_workload(MODELS, num_requests=200, seed=4,
                               prefixes=PrefixSharing(shared_fraction=0.8, prefix_len=32))
    assert [w.arrival_s for w in base] == [w.arrival_s for w in shared]
    for b, s in zip(base, shared):
        assert s.prompt_len == b.prompt_len + (32 if s.prefix else 0)
    frac = np.mean([bool(w.prefix) for w in shared])
    assert 0.7 < frac < 0.9


def test_system_prompts_are_shared_exactly_and_only_within_a_model():
    wl = generate_workload(MODELS, num_requests=100, seed=1,
                           prefixes=PrefixSharing(shared_fraction=1.0, prefix_len=16, prefixes_per_model=2))
    by_key = {}
    for w in wl:
        toks = w.prompt_tokens(1000)
        assert len(toks) == w.prompt_len and min(toks) >= 3
        (key, n), = w.prefix
        assert key.startswith(f"system/{w.model}/") and n == 16
        by_key.setdefault(key, set()).add(tuple(toks[:16]))
    assert len(by_key) == 4 and all(len(v) == 1 for v in by_key.values())
    # The parts after the prefix are the requests' own.
    tails = {tuple(w.prompt_tokens(1000)[16:]) for w in wl}
    assert len(tails) == len(wl)


def test_sessions_extend_the_previous_turn():
    wl = generate_workload({"a": 5.0}, num_requests=30, seed=2,
                           prefixes=PrefixSharing(session_turns=3, max_session_tokens=10_000))
    turns = {}
    for w in wl:
        (key, _), = w.prefix
        turns.setdefault(key, []).append(w)
    assert all(len(v) <= 3 for v in turns.values()) and any(len(v) == 3 for v in turns.values())
    for ts in turns.values():
        for prev, cur in zip(ts, ts[1:]):
            p, c = prev.prompt_tokens(500), cur.prompt_tokens(500)
            assert c[: len(p)] == p  # the earlier prompt is a prefix of the next
            assert len(c) >= len(p) + prev.output_len  # plus a stand-in reply and new tokens


def test_token_streams_are_prefix_consistent_and_distinct():
    assert token_stream("x", 50, 300)[:20] == token_stream("x", 20, 300)
    assert token_stream("x", 20, 300) != token_stream("y", 20, 300)


@pytest.mark.parametrize("bad", [dict(shared_fraction=1.5), dict(prefix_len=0),
                                 dict(session_turns=0), dict(prefixes_per_model=True)])
def test_bad_sharing_options_are_refused(bad):
    with pytest.raises(ValueError):
        PrefixSharing(**bad)
