"""Fixed-shape step inputs and the host-side batch builder that fills them from numpy.

Every array has a shape fixed by the bucket, so a compiled step takes any batch of that
bucket. Padding rows/tokens point at block 0 (the null slab) and have length 0 /
position -1.
"""

from __future__ import annotations

import dataclasses
from typing import List

import jax
import numpy as np

from fineserve_jax.core.request import RequestState


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepInputs:
    """Inputs of one prefill or decode step.

    tokens [N] int32, positions [N] int32, slot_block [N] int32, slot_offset [N] int32:
        the new tokens (N = bucket tokens for prefill, batch rows for decode)
    block_tables [R, W] int32: R = prefill sequences or decode rows
    lengths [R] int32: context length after this step (decode; 0 = padding row)
    q_seq [N] int32, q_pos [N] int32: row of each token and its position (-1 = padding)
    logits_idx [R] int32: which token's logits are sampled for each row
    temperature/top_p [R] f32, top_k [R] int32, seeds [R] uint32, steps [R] int32
    """

    tokens: np.ndarray
    positions: np.ndarray
    slot_block: np.ndarray
    slot_offset: np.ndarray
    block_tables: np.ndarray
    lengths: np.ndarray
    q_seq: np.ndarray
    q_pos: np.ndarray
    logits_idx: np.ndarray
    temperature: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray
    seeds: np.ndarray
    steps: np.ndarray


def empty_inputs(num_tokens: int, rows: int, table_width: int) -> StepInputs:
    i32 = lambda *s: np.zeros(s, np.int32)
    return StepInputs(
        tokens=i32(num_tokens), positions=i32(num_tokens), slot_block=i32(num_tokens),
        slot_offset=i32(num_tokens), block_tables=i32(rows, table_width), lengths=i32(rows),
        q_seq=i32(num_tokens), q_pos=np.full(num_tokens, -1, np.int32), logits_idx=i32(rows),
        temperature=np.zeros(rows, np.float32), top_k=i32(rows),
        top_p=np.ones(rows, np.float32), seeds=np.zeros(rows, np.uint32), steps=i32(rows))


def _fill_sampling(x: StepInputs, row: int, s: RequestState) -> None:
    p = s.sampling
    x.temperature[row] = p.temperature
    x.top_k[row] = p.top_k
    x.top_p[row] = p.top_p
    x.seeds[row] = (p.seed if p.seed is not None else s.request_id) & 0xFFFFFFFF
    x.steps[row] = len(s.output_token_ids)
    x.block_tables[row, : len(s.block_ids)] = s.block_ids


def build_prefill(seqs: List[RequestState], chunks: List[int], num_tokens: int, rows: int,
                  table_width: int, tokens_per_block: int) -> StepInputs:
    x = empty_inputs(num_tokens, rows, table_width)
    at = 0
    for row, (s, n) in enumerate(zip(seqs, chunks)):
        start = s.num_computed
        pos = np.arange(start, start + n, dtype=np.int32)
        sl = slice(at, at + n)
        x.tokens[sl] = s.token_slice(start, start + n)
        x.positions[sl] = pos
        x.slot_block[sl] = np.asarray(s.block_ids, np.int32)[pos // tokens_per_block]
        x.slot_offset[sl] = pos % tokens_per_block
        x.q_seq[sl] = row
        x.q_pos[sl] = pos
        x.logits_idx[row] = at + n - 1
        x.lengths[row] = start + n
        _fill_sampling(x, row, s)
        at += n
    return x


def build_decode(seqs: List[RequestState], rows: int, table_width: int,
                 tokens_per_block: int) -> StepInputs:
    x = empty_inputs(rows, rows, table_width)
    for row, s in enumerate(seqs):
        pos = s.num_tokens - 1
        x.tokens[row] = s.token_slice(pos, pos + 1)[0]
        x.positions[row] = pos
        x.slot_block[row] = s.block_ids[pos // tokens_per_block]
        x.slot_offset[row] = pos % tokens_per_block
        x.q_seq[row] = row
        x.q_pos[row] = pos
        x.logits_idx[row] = row
        x.lengths[row] = pos + 1
        _fill_sampling(x, row, s)
    return x
