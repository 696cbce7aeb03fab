// Paged attention over the KV arena on the CPU, called from XLA through the FFI.
//
// One kernel serves decode and prefill: query row n attends to positions 0..pos[n] of the
// sequence whose block-table row is seq[n] (pos -1: no query, zeros). K and V are read in
// place from the arena words and dequantized row by row (bf16 / fp8 e4m3fn / int8 / int4,
// the layout of fineserve_jax/formats/kv_layout.py); softmax is online, in float32. Each
// (query row, KV head) is computed alone, in one fixed order, so a row's result does not
// depend on the rest of the batch. Rows are split over XLA's intra-op thread pool.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel_for.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum KvDtype : int64_t { kBf16 = 0, kFp8 = 1, kInt8 = 2, kInt4 = 3 };

// Finite, so that exp(m_old - m_new) is never exp(-inf + inf) (tile_math.MASK).
constexpr float kMask = -0.7f * 3.4028234663852886e38f;

struct Geometry {
  int64_t kv_dtype, num_layers, num_kv_heads, tokens_per_block, head_dim;
  int64_t data_words, scale_words, data_region_words, block_words;
};

float Fp8E4m3fnToFloat(uint8_t b) {
  const int sign = b >> 7, exp = (b >> 3) & 0xF, man = b & 0x7;
  float v;
  if (exp == 0xF && man == 0x7) return std::nanf("");
  if (exp == 0) {
    v = std::ldexp(static_cast<float>(man), -9);  // subnormal: man / 8 * 2^-6
  } else {
    v = std::ldexp(1.0f + man / 8.0f, exp - 7);
  }
  return sign ? -v : v;
}

struct Fp8Table {
  float value[256];
  Fp8Table() {
    for (int i = 0; i < 256; ++i) value[i] = Fp8E4m3fnToFloat(static_cast<uint8_t>(i));
  }
};
const Fp8Table kFp8Values;

// Rows row0..row0+n-1 (consecutive tokens of one layer, K|V and head) of a block in fp8,
// int8 or int4 (bf16 is read in place) ->
// float32 [n, head_dim] in `out`. Word by word: element e of a row sits in word e / per_word
// at bit (e % per_word) * bits (kv_codec.pack_narrow, little-endian).
inline void DequantRows(const Geometry& g, const uint32_t* block, int64_t row0, int64_t n,
                        float* out) {
  const uint32_t* w = block + row0 * g.data_words;
  const int64_t d = g.head_dim;
  const uint32_t* sw = block + g.data_region_words + row0 * g.scale_words;
  for (int64_t r = 0; r < n; ++r) {
    const uint32_t* wr = w + r * g.data_words;
    float* orow = out + r * d;
    float s0, s1 = 0.0f;
    std::memcpy(&s0, &sw[r * g.scale_words], 4);
    if (g.scale_words > 1) std::memcpy(&s1, &sw[r * g.scale_words + 1], 4);
    if (g.kv_dtype == kFp8) {
      for (int64_t i = 0; i < d; ++i)
        orow[i] = kFp8Values.value[(wr[i >> 2] >> ((i & 3) * 8)) & 0xFFu] * s0;
    } else if (g.kv_dtype == kInt8) {
      const int8_t* b = reinterpret_cast<const int8_t*>(wr);  // little-endian bytes
      for (int64_t i = 0; i < d; ++i) orow[i] = static_cast<float>(b[i]) * s0;
    } else {  // int4: nib * scale + zero
      const uint8_t* b = reinterpret_cast<const uint8_t*>(wr);
      for (int64_t i = 0; i < d / 2; ++i) {
        orow[2 * i] = static_cast<float>(b[i] & 0xFu) * s0 + s1;
        orow[2 * i + 1] = static_cast<float>(b[i] >> 4) * s0 + s1;
      }
    }
  }
}

// Element i of a K or V row: float32 (dequantized into scratch) or bf16 read in place (the
// row's halfwords are its elements in order, kv_codec.pack_narrow).
inline float Elem(const float* row, int64_t i) { return row[i]; }
inline float Elem(const uint16_t* row, int64_t i) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(row[i]) << 16);
}

template <typename T>
inline float Dot(const float* a, const T* b, int64_t n) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * Elem(b, i);
  return s;
}

inline fineserve::Vec LoadRow(const float* p) { return fineserve::Load(p); }
inline fineserve::Vec LoadRow(const uint16_t* p) { return fineserve::LoadBf16(p); }

// Query heads (of one KV head) and column vectors taken together in the loops below: enough
// independent sums to hide the FMA latency, few enough to stay in registers.
constexpr int64_t kHeadsAtOnce = 4;
constexpr int64_t kVecsAtOnce = 4;

// sc[j, t] = q_j . k_t * scale for the block's nt rows k [nt, d] (each K row is loaded once
// for all query heads).
template <typename T>
void Scores(const float* qs, const T* k, int64_t nt, int64_t d, int64_t groups, int64_t t_blk,
            float scale, float* sc) {
  using namespace fineserve;
  if (d % kVec != 0) {
    for (int64_t t = 0; t < nt; ++t)
      for (int64_t j = 0; j < groups; ++j) sc[j * t_blk + t] = Dot(qs + j * d, k + t * d, d) * scale;
    return;
  }
  for (int64_t t = 0; t < nt; ++t) {
    const T* kt = k + t * d;
    for (int64_t j0 = 0; j0 < groups; j0 += kHeadsAtOnce) {
      const int64_t jn = std::min(kHeadsAtOnce, groups - j0);
      Vec s[kHeadsAtOnce];
#pragma GCC unroll 4
      for (int64_t j = 0; j < kHeadsAtOnce; ++j) s[j] = Zero();
      for (int64_t i0 = 0; i0 < d; i0 += kVec) {
        const Vec kv = LoadRow(kt + i0);
#pragma GCC unroll 4
        for (int64_t j = 0; j < kHeadsAtOnce; ++j)
          if (j < jn) s[j] = Fma(Load(qs + (j0 + j) * d + i0), kv, s[j]);
      }
      for (int64_t j = 0; j < jn; ++j) sc[(j0 + j) * t_blk + t] = ReduceAdd(s[j]) * scale;
    }
  }
}

// acc[j, :] += sum over t (in increasing t) of sc[j, t] * v_t, for the block's rows v [nt, d].
template <typename T>
void Accumulate(const float* sc, const T* v, int64_t nt, int64_t d, int64_t groups,
                int64_t t_blk, float* acc) {
  using namespace fineserve;
  if (d % kVec != 0) {
    for (int64_t t = 0; t < nt; ++t)
      for (int64_t j = 0; j < groups; ++j) {
        const float e = sc[j * t_blk + t];
        for (int64_t i = 0; i < d; ++i) acc[j * d + i] = std::fma(e, Elem(v + t * d, i), acc[j * d + i]);
      }
    return;
  }
  // Up to kVecsAtOnce column vectors of one head at a time, their sums in registers over t.
  for (int64_t j = 0; j < groups; ++j) {
    for (int64_t i0 = 0; i0 < d; i0 += kVecsAtOnce * kVec) {
      const int64_t vn = std::min<int64_t>(kVecsAtOnce, (d - i0) / kVec);
      float* a = acc + j * d + i0;
      Vec s[kVecsAtOnce];
#pragma GCC unroll 4
      for (int64_t c = 0; c < kVecsAtOnce; ++c) s[c] = c < vn ? Load(a + c * kVec) : Zero();
      for (int64_t t = 0; t < nt; ++t) {
        const Vec e = Broadcast(sc + j * t_blk + t);
        const T* row = v + t * d + i0;
#pragma GCC unroll 4
        for (int64_t c = 0; c < kVecsAtOnce; ++c)
          if (c < vn) s[c] = Fma(e, LoadRow(row + c * kVec), s[c]);
      }
#pragma GCC unroll 4
      for (int64_t c = 0; c < kVecsAtOnce; ++c)
        if (c < vn) Store(a + c * kVec, s[c]);
    }
  }
}

struct Problem {
  Geometry g;
  const float* q;          // [N, Hq, D]
  const uint32_t* view;    // [num_blocks, block_words]
  int64_t num_blocks;
  const int32_t* tables;   // [S, W]
  int64_t num_seqs, width;
  const int32_t* seq;      // [N]
  const int32_t* pos;      // [N]
  int64_t layer, num_q_heads;
  float* out;              // [N, Hq, D]
};

// Query row n, KV head h: out[n, h*G:(h+1)*G, :].
void AttendOne(const Problem& p, int64_t n, int64_t h, std::vector<float>& scratch) {
  const Geometry& g = p.g;
  const int64_t d = g.head_dim, t_blk = g.tokens_per_block;
  const int64_t groups = p.num_q_heads / g.num_kv_heads;
  float* out = p.out + (n * p.num_q_heads + h * groups) * d;
  const int64_t s = p.seq[n];
#ifdef FINESERVE_MUTATE_DROP_LAST_POSITION  // test-only: a kernel that must fail the tests
  const int64_t last = p.pos[n] - 1;
#else
  const int64_t last = p.pos[n];
#endif
  if (last < 0 || s < 0 || s >= p.num_seqs) {
    std::fill(out, out + groups * d, 0.0f);
    return;
  }
  scratch.resize(groups * d * 2 + groups * t_blk + groups * 2 + t_blk * d);
  float* qs = scratch.data();                 // [G, D] this head's queries
  float* acc = qs + groups * d;               // [G, D]
  float* sc = acc + groups * d;               // [G, T] scores of one block
  float* m = sc + groups * t_blk;             // [G]
  float* l = m + groups;                      // [G]
  float* kv = l + groups;                     // [T, D] one block's K (then V) rows
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  for (int64_t j = 0; j < groups; ++j) {
    const float* qj = p.q + (n * p.num_q_heads + h * groups + j) * d;
    for (int64_t i = 0; i < d; ++i) qs[j * d + i] = qj[i];
    m[j] = kMask;
    l[j] = 0.0f;
  }
  std::fill(acc, acc + groups * d, 0.0f);
  const int64_t k_row0 = ((p.layer * 2 + 0) * g.num_kv_heads + h) * t_blk;
  const int64_t v_row0 = ((p.layer * 2 + 1) * g.num_kv_heads + h) * t_blk;
  const int64_t cols = last / t_blk + 1;
  for (int64_t c = 0; c < cols; ++c) {
    const int64_t col = std::min(c, p.width - 1);
    const int64_t bid = std::clamp<int64_t>(p.tables[s * p.width + col], 0, p.num_blocks - 1);
    const uint32_t* block = p.view + bid * g.block_words;
    const int64_t nt = std::min(t_blk, last - c * t_blk + 1);
    // bf16 rows are read where they lie; the other formats are dequantized into scratch.
    const bool bf16 = g.kv_dtype == kBf16;
    auto rows = [&](int64_t row0) {
      return reinterpret_cast<const uint16_t*>(block + row0 * g.data_words);
    };
    if (bf16) {
      Scores(qs, rows(k_row0), nt, d, groups, t_blk, scale, sc);
    } else {
      DequantRows(g, block, k_row0, nt, kv);
      Scores(qs, kv, nt, d, groups, t_blk, scale, sc);
    }
    for (int64_t j = 0; j < groups; ++j) {
      float mx = m[j];
      for (int64_t t = 0; t < nt; ++t) mx = std::max(mx, sc[j * t_blk + t]);
      const float corr = fineserve::Exp(m[j] - mx);
      float sum = 0.0f;
      for (int64_t t = 0; t < nt; ++t) {
        const float e = fineserve::Exp(sc[j * t_blk + t] - mx);
        sc[j * t_blk + t] = e;
        sum += e;
      }
      l[j] = l[j] * corr + sum;
      m[j] = mx;
      float* a = acc + j * d;
      for (int64_t i = 0; i < d; ++i) a[i] *= corr;
    }
    if (bf16) {
      Accumulate(sc, rows(v_row0), nt, d, groups, t_blk, acc);
    } else {
      DequantRows(g, block, v_row0, nt, kv);
      Accumulate(sc, kv, nt, d, groups, t_blk, acc);
    }
  }
  for (int64_t j = 0; j < groups; ++j) {
    // l == 0: no position counted (acc is 0 too) -> zeros; a NaN in K or V stays NaN.
    const float inv = l[j] == 0.0f ? 0.0f : 1.0f / l[j];
    for (int64_t i = 0; i < d; ++i) out[j * d + i] = acc[j * d + i] * inv;
  }
}

ffi::Error RaggedAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                               ffi::Buffer<ffi::U32> view, ffi::Buffer<ffi::S32> tables,
                               ffi::Buffer<ffi::S32> seq, ffi::Buffer<ffi::S32> pos,
                               ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> out,
                               int64_t kv_dtype, int64_t num_layers, int64_t num_kv_heads,
                               int64_t tokens_per_block, int64_t data_words,
                               int64_t scale_words) {
  auto qd = q.dimensions();
  auto vd = view.dimensions();
  auto td = tables.dimensions();
  if (qd.size() != 3 || vd.size() != 2 || td.size() != 2)
    return ffi::Error::InvalidArgument("ragged_attention: q [N, Hq, D], view [blocks, words], tables [S, W]");
  Geometry g;
  g.kv_dtype = kv_dtype;
  g.num_layers = num_layers;
  g.num_kv_heads = num_kv_heads;
  g.tokens_per_block = tokens_per_block;
  g.head_dim = qd[2];
  if (kv_dtype < kBf16 || kv_dtype > kInt4) return ffi::Error::InvalidArgument("ragged_attention: kv_dtype code");
  // Word counts come from KVFormat (the one place that knows them); the view's width checks
  // that they agree with the arena.
  g.data_words = data_words;
  g.scale_words = scale_words;
  const int64_t rows = num_layers * 2 * num_kv_heads * tokens_per_block;
  g.data_region_words = rows * g.data_words;
  g.block_words = rows * (g.data_words + g.scale_words);
  if (vd[1] != g.block_words) return ffi::Error::InvalidArgument("ragged_attention: view width does not match the format");
  if (qd[1] % num_kv_heads) return ffi::Error::InvalidArgument("ragged_attention: Hq not a multiple of kv heads");
  const int64_t lay = layer.typed_data()[0];
  if (lay < 0 || lay >= num_layers) return ffi::Error::InvalidArgument("ragged_attention: layer out of range");
  const Problem p{g, q.typed_data(), view.typed_data(), vd[0], tables.typed_data(), td[0],
                  td[1], seq.typed_data(), pos.typed_data(), lay, qd[1], out->typed_data()};
  if (p.width <= 0 || p.num_blocks <= 0) {
    std::fill(out->typed_data(), out->typed_data() + out->element_count(), 0.0f);
    return ffi::Error::Success();
  }
  // One unit: a (query row, KV head).
  const int64_t units = qd[0] * num_kv_heads;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  fineserve::ParallelFor(pool, units, units / (threads * 4), [p](int64_t begin, int64_t end) {
    thread_local std::vector<float> scratch;  // one per worker, not one per piece
    for (int64_t u = begin; u < end; ++u)
      AttendOne(p, u / p.g.num_kv_heads, u % p.g.num_kv_heads, scratch);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FineserveRaggedAttention, RaggedAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kv_dtype")
                                  .Attr<int64_t>("num_layers")
                                  .Attr<int64_t>("num_kv_heads")
                                  .Attr<int64_t>("tokens_per_block")
                                  .Attr<int64_t>("data_words")
                                  .Attr<int64_t>("scale_words"));
