// y[M, N] = x[M, K] @ W[layer] on the CPU, W one layer of stacked weights ([layers, K, N])
// read in place, called from XLA through the FFI. W is float32, or one of the quantized
// formats of models/quant_linear.py, dequantized here on the fly.
//
// The decoder's layer scan stacks every layer's weights; XLA's dot needs its operand
// contiguous, so inside the scan it copies layer i's slice before every GEMM (the weights
// stream from memory three times per step). This kernel reads layer `layer` of the stacked
// buffer in place, streaming each weight once. For quantized weights XLA also built the
// dequantized [K, N] matrix (and, per 16-row block of x, a loop around the dot): per step,
// that was most of the compile time of a quantized model and a float copy of its weights.
//
// Register-blocked: a tile of MR rows x NR columns is accumulated in registers (one weight
// row segment loaded, each x element broadcast). K is walked in blocks: a block's rows of
// weights are used by every panel of a group of columns before the next block, so the
// weights stream from memory in page-sized runs (a panel walking all of K alone touches a
// new page at every k: no hardware prefetch, a TLB miss each row; 1.3-3x slower for decode
// batches, WORKSPACE_NOTES 2026-12-03). Between blocks the running sums wait in y and are
// loaded back, so every output element is still one sum in increasing k, whatever M is: a
// row's result does not depend on the batch. Groups of column panels (and chunks of rows)
// are spread over XLA's intra-op thread pool. Quantized weights: each K block of a column
// group is dequantized into a per-thread float buffer (cache-resident), which the same tiles
// read. The dequantized values are those of quant_linear.py (one float rounding, or exact).
// W4A8 (QoQ) multiplies whole numbers: int8 activations (as float) by int8 weights
// (q - zero) * group_scale. A K block's sum is exact in float (|sum| <= 64 * 127 * 127 <
// 2^24) and blocks add up in int32, so y is the exact int32 GEMM, like XLA's.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "parallel_for.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using fineserve::AccumulateInt;
using fineserve::Broadcast;
using fineserve::Fma;
using fineserve::kVec;
using fineserve::Load;
using fineserve::Store;
using fineserve::Vec;
using fineserve::Zero;
#if defined(__AVX512F__)
constexpr int kRows = 8;  // 8 x 3 accumulators + 3 weight vectors + 1 broadcast of 32 zmm
#else
constexpr int kRows = 4;  // 4 x 3 accumulators + 4 of 16 ymm
#endif
constexpr int kPanelVecs = 3;
constexpr int kPanel = kPanelVecs * kVec;  // columns per panel
constexpr int64_t kRowChunk = 64;          // rows per unit of work (a multiple of kRows)
constexpr int64_t kGroupPanels = 8;        // column panels per unit of work, at most
constexpr int kPrefetchRows = 16;          // weight rows ahead (strided: no hardware prefetch)
constexpr int64_t kMaxKBlock = 64;         // W4A8's exactness bound above assumes <= 64

// Weight rows per K block for a unit of `rows` rows: fewer rows do less work per weight,
// so the block must stay small enough to be reused from cache across the group (measured).
inline int64_t KBlock(int64_t rows) { return rows <= 16 ? 32 : kMaxKBlock; }

// The stored weight formats (the `format` attribute of the quantized handler).
enum Format : int32_t { kF32 = 0, kFp8 = 1, kInt8 = 2, kInt4 = 3, kW4A8 = 4 };

// fp8 e4m3fn byte -> float32 (exact): no infinities; exponent 15 with mantissa 7 is NaN.
struct Fp8Table {
  float v[256];
  Fp8Table() {
    for (int b = 0; b < 256; ++b) {
      const int e = (b >> 3) & 15, m = b & 7;
      float f = e == 0 ? std::ldexp(static_cast<float>(m), -9)
                       : std::ldexp(static_cast<float>(8 + m), e - 10);
      if (e == 15 && m == 7) f = NAN;
      v[b] = (b & 128) ? -f : f;
    }
  }
};
const Fp8Table kFp8Values;

struct Weights {
  Format fmt = kF32;
  const void* w = nullptr;          // the layer's [K, N], or [K/2, N] nibble pairs (int4, w4a8)
  const float* scale = nullptr;     // int8, int4: the layer's [G, N]
  const uint8_t* zero = nullptr;    // int4, w4a8: [G, N]
  const uint8_t* gscale = nullptr;  // w4a8: [G, N]
  int64_t group = 1;                // rows of K per group
};

struct Problem {
  const float* x;  // [M, K]
  Weights wt;
  void* y;  // [M, N]: float32, int32 for w4a8
  int64_t m, k, n;
};

// Rows [k0, k1) x columns [n0, n1) of the layer's weights, dequantized into out
// [k1 - k0, n1 - n0] (float32, row-major). Inner loops run along N and vectorize.
void Dequantize(const Weights& wt, int64_t n, int64_t k0, int64_t k1, int64_t n0, int64_t n1,
                float* out) {
  const int64_t width = n1 - n0;
  for (int64_t k = k0; k < k1; ++k) {
    float* o = out + (k - k0) * width;
    const int64_t g = (k / wt.group) * n + n0;
    const int shift = (k & 1) * 4;  // int4: row 2i in the low nibble of byte row i
#ifdef FINESERVE_MUTATE_NIBBLE_ORDER
    const int nibble = 4 - shift;  // test-only mutant: the two rows of a byte swapped
#else
    const int nibble = shift;
#endif
    switch (wt.fmt) {
      case kFp8: {
        const uint8_t* q = static_cast<const uint8_t*>(wt.w) + k * n + n0;
        for (int64_t c = 0; c < width; ++c) o[c] = kFp8Values.v[q[c]];
        break;
      }
      case kInt8: {
        const int8_t* q = static_cast<const int8_t*>(wt.w) + k * n + n0;
        const float* s = wt.scale + g;
        for (int64_t c = 0; c < width; ++c) o[c] = static_cast<float>(q[c]) * s[c];
        break;
      }
      case kInt4: {
        const uint8_t* q = static_cast<const uint8_t*>(wt.w) + (k / 2) * n + n0;
        const float* s = wt.scale + g;
        const uint8_t* z = wt.zero + g;
        for (int64_t c = 0; c < width; ++c)
          o[c] = (static_cast<float>((q[c] >> nibble) & 15) - static_cast<float>(z[c])) * s[c];
        break;
      }
      case kW4A8: {
        const uint8_t* q = static_cast<const uint8_t*>(wt.w) + (k / 2) * n + n0;
        const uint8_t* z = wt.zero + g;
        const uint8_t* s = wt.gscale + g;
        for (int64_t c = 0; c < width; ++c)
          o[c] = static_cast<float>((((q[c] >> nibble) & 15) - z[c]) * s[c]);
        break;
      }
      case kF32:
        break;
    }
  }
}

// Rows [0, R) x vector columns [0, C) of one tile, summed over k in [0, k_end) of this
// block of x columns and weight rows. Float output: `first` starts from 0, else from the
// sums in y. Int output (kInt): the block's sum is added to y's int32 (stored when `first`).
template <int R, int C, bool kInt>
inline __attribute__((always_inline)) void Tile(const float* x, int64_t ldx, const float* w,
                                                int64_t ldw, void* y, int64_t ldy,
                                                int64_t k_end, bool first) {
  Vec acc[R][C];
  float* yf = static_cast<float*>(y);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 3
    for (int c = 0; c < C; ++c)
      acc[r][c] = (kInt || first) ? Zero() : Load(yf + r * ldy + c * kVec);
  for (int64_t k = 0; k < k_end; ++k) {
    const float* wk = w + k * ldw;
#pragma GCC unroll 3
    for (int c = 0; c < C; ++c) __builtin_prefetch(wk + kPrefetchRows * ldw + c * kVec);
    Vec b[C];
#pragma GCC unroll 3
    for (int c = 0; c < C; ++c) b[c] = Load(wk + c * kVec);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const Vec a = Broadcast(x + r * ldx + k);
#pragma GCC unroll 3
      for (int c = 0; c < C; ++c) acc[r][c] = Fma(a, b[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 3
    for (int c = 0; c < C; ++c) {
      if constexpr (kInt)
        AccumulateInt(static_cast<int32_t*>(y) + r * ldy + c * kVec, acc[r][c], first);
      else
        Store(yf + r * ldy + c * kVec, acc[r][c]);
    }
}

template <int C, bool kInt>
void Rows(const float* x, int64_t ldx, const float* w, int64_t ldw, void* y, int64_t ldy,
          int64_t rows, int64_t k, bool first) {
  using Out = std::conditional_t<kInt, int32_t, float>;
  Out* yo = static_cast<Out*>(y);
  int64_t m = 0;
  for (; m + kRows <= rows; m += kRows)
    Tile<kRows, C, kInt>(x + m * ldx, ldx, w, ldw, yo + m * ldy, ldy, k, first);
  const float* xm = x + m * ldx;
  Out* ym = yo + m * ldy;
  switch (rows - m) {  // the same per-row arithmetic as a full tile
    case 1: Tile<1, C, kInt>(xm, ldx, w, ldw, ym, ldy, k, first); break;
    case 2: Tile<2, C, kInt>(xm, ldx, w, ldw, ym, ldy, k, first); break;
    case 3: Tile<3, C, kInt>(xm, ldx, w, ldw, ym, ldy, k, first); break;
#if defined(__AVX512F__)
    case 4: Tile<4, C, kInt>(xm, ldx, w, ldw, ym, ldy, k, first); break;
    case 5: Tile<5, C, kInt>(xm, ldx, w, ldw, ym, ldy, k, first); break;
    case 6: Tile<6, C, kInt>(xm, ldx, w, ldw, ym, ldy, k, first); break;
    case 7: Tile<7, C, kInt>(xm, ldx, w, ldw, ym, ldy, k, first); break;
#endif
    default: break;
  }
}

// Columns [n0, n1) of rows [m0, m1).
template <bool kInt>
void Unit(const Problem& p, int64_t n0, int64_t n1, int64_t m0, int64_t m1) {
  using Out = std::conditional_t<kInt, int32_t, float>;
  const float* x = p.x + m0 * p.k;
  Out* y = static_cast<Out*>(p.y) + m0 * p.n;
  const int64_t rows = m1 - m0, block = KBlock(rows), width = n1 - n0;
  int64_t k_end = p.k;
#ifdef FINESERVE_MUTATE_SKIP_LAST_K
  k_end -= 1;  // test-only mutant: drops the last input feature
#endif
  thread_local std::vector<float> scratch;
  if (p.wt.fmt != kF32 && static_cast<int64_t>(scratch.size()) < block * width)
    scratch.resize(block * width);
  const int64_t vec_end = n0 + width / kVec * kVec;
  for (int64_t k0 = 0; k0 < k_end; k0 += block) {
    const int64_t k1 = std::min(k_end, k0 + block);
    bool first = k0 == 0;
#ifdef FINESERVE_MUTATE_RESTART_BLOCKS
    first = true;  // test-only mutant: every K block starts from zero
#endif
    const float* w = scratch.data();
    int64_t ldw = width;
    if (p.wt.fmt == kF32) {
      w = static_cast<const float*>(p.wt.w) + k0 * p.n + n0;
      ldw = p.n;
    } else {
      Dequantize(p.wt, p.n, k0, k1, n0, n1, scratch.data());
    }
    for (int64_t n = n0; n < vec_end; n += kPanel) {
      const int64_t vecs = std::min<int64_t>(kPanel, vec_end - n) / kVec;
      const float* xb = x + k0;
      const float* wn = w + (n - n0);
      if (vecs == 3) Rows<3, kInt>(xb, p.k, wn, ldw, y + n, p.n, rows, k1 - k0, first);
      if (vecs == 2) Rows<2, kInt>(xb, p.k, wn, ldw, y + n, p.n, rows, k1 - k0, first);
      if (vecs == 1) Rows<1, kInt>(xb, p.k, wn, ldw, y + n, p.n, rows, k1 - k0, first);
    }
    for (int64_t col = vec_end; col < n1; ++col) {  // N not a multiple of the vector
      for (int64_t r = 0; r < rows; ++r) {
        float s = (kInt || first) ? 0.0f : static_cast<float>(y[r * p.n + col]);
        for (int64_t k = k0; k < k1; ++k)
          s = __builtin_fmaf(x[r * p.k + k], w[(k - k0) * ldw + (col - n0)], s);
        if constexpr (kInt)
          y[r * p.n + col] = static_cast<int32_t>(std::nearbyint(s)) + (first ? 0 : y[r * p.n + col]);
        else
          y[r * p.n + col] = s;
      }
    }
  }
}

// Splits the problem over the pool: units are a group of column panels of a chunk of rows.
void Run(ffi::ThreadPool& pool, const Problem& p) {
  if (p.m == 0 || p.n == 0) return;
  // Groups small enough for two units per thread (narrow layers like k/v: a few panels).
  const int64_t panels = (p.n + kPanel - 1) / kPanel;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t group = std::clamp<int64_t>(panels / (2 * threads), 1, kGroupPanels) * kPanel;
  const int64_t groups = (p.n + group - 1) / group, chunks = (p.m + kRowChunk - 1) / kRowChunk;
  const bool integer = p.wt.fmt == kW4A8;
  fineserve::ParallelFor(pool, groups * chunks, 1, [p, chunks, group, integer](int64_t begin,
                                                                             int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t m0 = (u % chunks) * kRowChunk, n0 = (u / chunks) * group;
      const int64_t n1 = std::min(p.n, n0 + group), m1 = std::min(p.m, m0 + kRowChunk);
      if (integer) Unit<true>(p, n0, n1, m0, m1);
      else Unit<false>(p, n0, n1, m0, m1);
    }
  });
}

// Checks x [..., K] and w [layers, K_stored, N]; sets m, k, n and the layer. "" when good.
const char* Shape(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> wd, int64_t x_count,
                  int64_t k_per_row, int64_t y_count, int32_t lay, Problem* p, int64_t* layers) {
  if (wd.size() != 3 || xd.size() < 1 || xd[xd.size() - 1] != wd[1] * k_per_row)
    return "stacked_matmul: x [..., K] and w [layers, K, N]";
  *layers = wd[0];
  p->k = xd[xd.size() - 1];
  p->n = wd[2];
  p->m = p->k == 0 ? 0 : x_count / p->k;
  if (y_count != p->m * p->n) return "stacked_matmul: y is not [..., N]";
  if (lay < 0 || lay >= *layers) return "stacked_matmul: layer out of range";
  return "";
}

ffi::Error StackedMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::S32> layer,
                             ffi::ResultBuffer<ffi::F32> y) {
  Problem p{x.typed_data(), {}, y->typed_data(), 0, 0, 0};
  int64_t layers = 0;
  const int32_t lay = layer.typed_data()[0];
  const char* bad = Shape(x.dimensions(), w.dimensions(), x.element_count(), 1,
                          y->element_count(), lay, &p, &layers);
  if (*bad) return ffi::Error::InvalidArgument(bad);
  p.wt.w = w.typed_data() + lay * p.k * p.n;
  Run(pool, p);
  return ffi::Error::Success();
}

// w: fp8 e4m3fn [layers, K, N] (fmt 1), int8 [layers, K, N] (2), uint8 nibble pairs
// [layers, K/2, N] (3: int4, 4: w4a8). scale f32, zero and gscale uint8: [layers, G, N]
// where the format reads them (others may be any shape). y: float32, int32 for w4a8.
ffi::Error QuantMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                           ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::U8> zero,
                           ffi::Buffer<ffi::U8> gscale, ffi::Buffer<ffi::S32> layer,
                           ffi::Result<ffi::AnyBuffer> y, int32_t format) {
  const Format fmt = static_cast<Format>(format);
  const ffi::DataType want_w = fmt == kFp8 ? ffi::DataType::F8E4M3FN
                               : fmt == kInt8 ? ffi::DataType::S8 : ffi::DataType::U8;
  if (fmt < kFp8 || fmt > kW4A8) return ffi::Error::InvalidArgument("quant_matmul: unknown format");
  if (w.element_type() != want_w) return ffi::Error::InvalidArgument("quant_matmul: w has the wrong dtype for its format");
  if (y->element_type() != (fmt == kW4A8 ? ffi::DataType::S32 : ffi::DataType::F32))
    return ffi::Error::InvalidArgument("quant_matmul: y must be int32 for w4a8, else float32");
  const bool packed = fmt == kInt4 || fmt == kW4A8;
  Problem p{x.typed_data(), {}, y->untyped_data(), 0, 0, 0};
  int64_t layers = 0;
  const int32_t lay = layer.typed_data()[0];
  const char* bad = Shape(x.dimensions(), w.dimensions(), x.element_count(), packed ? 2 : 1,
                          y->element_count(), lay, &p, &layers);
  if (*bad) return ffi::Error::InvalidArgument(bad);
  const int64_t stored = w.dimensions()[1] * p.n;
  p.wt.fmt = fmt;
  p.wt.w = static_cast<const uint8_t*>(w.untyped_data()) + lay * stored;
  if (fmt != kFp8) {  // grouped formats: [layers, G, N] scales (and zeros)
    auto gd = fmt == kW4A8 ? gscale.dimensions() : scale.dimensions();
    if (gd.size() != 3 || gd[0] != layers || gd[1] < 1 || gd[2] != p.n || p.k % gd[1])
      return ffi::Error::InvalidArgument("quant_matmul: scales must be [layers, G, N], G dividing K");
    const int64_t groups = gd[1], offset = lay * groups * p.n;
    p.wt.group = p.k / groups;
    auto same = [&](ffi::Span<const int64_t> d) {
      return d.size() == 3 && d[0] == layers && d[1] == groups && d[2] == p.n;
    };
    if (fmt != kW4A8) p.wt.scale = scale.typed_data() + offset;
    if (packed) {
      if (!same(zero.dimensions())) return ffi::Error::InvalidArgument("quant_matmul: zero must be [layers, G, N]");
      p.wt.zero = zero.typed_data() + offset;
    }
    if (fmt == kW4A8) p.wt.gscale = gscale.typed_data() + offset;
  }
  Run(pool, p);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FineserveStackedMatmul, StackedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FineserveQuantMatmul, QuantMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("format"));
