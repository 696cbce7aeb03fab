"""KV block formats: the KV dtypes and the byte layout of one block.

Pure Python (no JAX): the allocator, the scheduler, the cost model and the simulator
read these values; the arena, the kernels and the model loader read them too.

KV block layout (uint32 words; see WORKSPACE_NOTES.md "KV block layout"):

    data   [layers, 2 (K, V), kv_heads, tokens_per_block, data_words]   then
    scales [layers, 2 (K, V), kv_heads, tokens_per_block, scale_words]  (float32 words)

`data_words = head_dim * bits / 32`. Elements are packed little-endian inside a word
(element 0 in the low bits), which is exactly what `lax.bitcast_convert_type(uint32 ->
[..., n] narrow type)` produces, so the reference reads a row with one bitcast.

Per-row quantization (one row = one layer, K or V, kv head, token):
  bf16: no scales.
  fp8 (e4m3fn) and int8: one float32 scale per row, symmetric, `scale = amax / qmax`.
  int4: a float32 scale and a float32 zero (the row minimum) per row, asymmetric,
        unsigned nibbles 0..15: `x ~= q * scale + zero`.
"""

from __future__ import annotations

import dataclasses

# --- KV dtypes -------------------------------------------------------------------------

KV_DTYPES = ("bf16", "fp8", "int8", "int4")
KV_BITS = {"bf16": 16, "fp8": 8, "int8": 8, "int4": 4}
KV_SCALE_WORDS = {"bf16": 0, "fp8": 1, "int8": 1, "int4": 2}
FP8_E4M3_MAX = 448.0
INT8_QMAX = 127.0
INT4_LEVELS = 15.0
WORD_BYTES = 4


def check_kv_dtype(kv_dtype: str) -> str:
    if kv_dtype not in KV_BITS:
        raise ValueError(f"unknown KV dtype {kv_dtype!r}; valid: {', '.join(KV_DTYPES)}")
    return kv_dtype


@dataclasses.dataclass(frozen=True)
class KVFormat:
    """The byte layout of one KV block: one model geometry x one KV dtype x block size.

    A block holds K and V of *all* layers for `tokens_per_block` tokens of one sequence,
    so models of any depth share slabs.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_dtype: str = "bf16"
    tokens_per_block: int = 16

    def __post_init__(self):
        check_kv_dtype(self.kv_dtype)
        for name in ("num_layers", "num_kv_heads", "head_dim", "tokens_per_block"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KVFormat.{name} must be positive, got {getattr(self, name)}")
        per_word = 32 // KV_BITS[self.kv_dtype]
        if self.head_dim % per_word:
            raise ValueError(
                f"head_dim {self.head_dim} must be a multiple of {per_word} for {self.kv_dtype} KV"
            )

    # -- geometry of one row (layer, K|V, head, token) --
    @property
    def elems_per_word(self) -> int:
        return 32 // KV_BITS[self.kv_dtype]

    @property
    def data_words(self) -> int:
        """uint32 words of packed data per row."""
        return self.head_dim // self.elems_per_word

    @property
    def scale_words(self) -> int:
        """float32 words of scale (and zero) per row."""
        return KV_SCALE_WORDS[self.kv_dtype]

    @property
    def rows_per_block(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.tokens_per_block

    @property
    def data_region_words(self) -> int:
        return self.rows_per_block * self.data_words

    @property
    def block_words(self) -> int:
        return self.rows_per_block * (self.data_words + self.scale_words)

    @property
    def block_bytes(self) -> int:
        return self.block_words * WORD_BYTES

    @property
    def bytes_per_token(self) -> int:
        return self.block_bytes // self.tokens_per_block

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.tokens_per_block)

    def describe(self) -> str:
        return (
            f"{self.kv_dtype} KV, {self.num_layers}L x {self.num_kv_heads}H x {self.head_dim}D, "
            f"{self.tokens_per_block} tok/block = {self.block_bytes} B/block "
            f"({self.bytes_per_token} B/token)"
        )
