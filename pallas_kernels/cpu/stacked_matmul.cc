// y[M, N] = x[M, K] @ w[layer, K, N] in float32 on the CPU, called from XLA through the FFI.
//
// The decoder's layer scan stacks every layer's weights ([layers, K, N]); XLA's dot needs
// its operand contiguous, so inside the scan it copies layer i's slice before every GEMM
// (the weights stream from memory three times per step). This kernel reads layer `layer`
// of the stacked buffer in place, streaming each weight once.
//
// Register-blocked: a tile of MR rows x NR columns is accumulated in registers (one weight
// row segment loaded, each x element broadcast). K is walked in blocks: a block's rows of
// weights are used by every panel of a group of columns before the next block, so the
// weights stream from memory in page-sized runs (a panel walking all of K alone touches a
// new page at every k: no hardware prefetch, a TLB miss each row; 1.3-3x slower for decode
// batches, WORKSPACE_NOTES 2026-12-03). Between blocks the running sums wait in y and are
// loaded back, so every output element is still one sum in increasing k, whatever M is: a
// row's result does not depend on the batch. Groups of column panels (and chunks of rows)
// are spread over XLA's intra-op thread pool.

#include <algorithm>
#include <cstdint>

#include "parallel_for.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

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

// Weight rows per K block for a unit of `rows` rows: fewer rows do less work per weight,
// so the block must stay small enough to be reused from cache across the group (measured).
inline int64_t KBlock(int64_t rows) { return rows <= 16 ? 32 : 64; }

// Rows [0, R) x vector columns [0, C) of one tile, summed over k in [0, k_end) of this
// block of x columns and weight rows; `first`: start from 0, else from the sums in y.
template <int R, int C>
inline __attribute__((always_inline)) void Tile(const float* x, int64_t ldx, const float* w,
                                                int64_t ldw, float* y, int64_t ldy, int64_t k_end,
                                                bool first) {
  Vec acc[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 3
    for (int c = 0; c < C; ++c) acc[r][c] = first ? Zero() : Load(y + r * ldy + c * kVec);
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
    for (int c = 0; c < C; ++c) Store(y + r * ldy + c * kVec, acc[r][c]);
}

template <int C>
void Rows(const float* x, int64_t ldx, const float* w, int64_t ldw, float* y, int64_t ldy,
          int64_t rows, int64_t k, bool first) {
  int64_t m = 0;
  for (; m + kRows <= rows; m += kRows)
    Tile<kRows, C>(x + m * ldx, ldx, w, ldw, y + m * ldy, ldy, k, first);
  const float* xm = x + m * ldx;
  float* ym = y + m * ldy;
  switch (rows - m) {  // the same per-row arithmetic as a full tile
    case 1: Tile<1, C>(xm, ldx, w, ldw, ym, ldy, k, first); break;
    case 2: Tile<2, C>(xm, ldx, w, ldw, ym, ldy, k, first); break;
    case 3: Tile<3, C>(xm, ldx, w, ldw, ym, ldy, k, first); break;
#if defined(__AVX512F__)
    case 4: Tile<4, C>(xm, ldx, w, ldw, ym, ldy, k, first); break;
    case 5: Tile<5, C>(xm, ldx, w, ldw, ym, ldy, k, first); break;
    case 6: Tile<6, C>(xm, ldx, w, ldw, ym, ldy, k, first); break;
    case 7: Tile<7, C>(xm, ldx, w, ldw, ym, ldy, k, first); break;
#endif
    default: break;
  }
}

struct Problem {
  const float* x;  // [M, K]
  const float* w;  // layer's [K, N]
  float* y;        // [M, N]
  int64_t m, k, n;
};

// Vector columns of the panel at n0 (clipped to N), rows [0, rows), weight rows [k0, k1).
void Panel(const Problem& p, const float* x, float* y, int64_t rows, int64_t n0, int64_t k0,
           int64_t k1) {
  const int64_t vecs = std::min<int64_t>(kPanel, p.n - n0) / kVec;
  const float* w = p.w + k0 * p.n + n0;
  bool first = k0 == 0;
#ifdef FINESERVE_MUTATE_RESTART_BLOCKS
  first = true;  // test-only mutant: every K block starts from zero
#endif
  if (vecs == 3) Rows<3>(x + k0, p.k, w, p.n, y + n0, p.n, rows, k1 - k0, first);
  if (vecs == 2) Rows<2>(x + k0, p.k, w, p.n, y + n0, p.n, rows, k1 - k0, first);
  if (vecs == 1) Rows<1>(x + k0, p.k, w, p.n, y + n0, p.n, rows, k1 - k0, first);
}

// Columns [n0, n1) of rows [m0, m1).
void Unit(const Problem& p, int64_t n0, int64_t n1, int64_t m0, int64_t m1) {
  const float* x = p.x + m0 * p.k;
  float* y = p.y + m0 * p.n;
  const int64_t rows = m1 - m0, block = KBlock(rows);
  int64_t k_end = p.k;
#ifdef FINESERVE_MUTATE_SKIP_LAST_K
  k_end -= 1;  // test-only mutant: drops the last input feature
#endif
  for (int64_t k0 = 0; k0 < k_end; k0 += block)
    for (int64_t n = n0; n < n1; n += kPanel) Panel(p, x, y, rows, n, k0, std::min(k_end, k0 + block));
  const int64_t vec_end = n0 + (std::min<int64_t>(n1, p.n) - n0) / kVec * kVec;
  for (int64_t col = vec_end; col < n1; ++col) {  // N not a multiple of the vector
    for (int64_t r = 0; r < rows; ++r) {
      float s = 0.0f;
      for (int64_t k = 0; k < k_end; ++k) s = __builtin_fmaf(x[r * p.k + k], p.w[k * p.n + col], s);
      y[r * p.n + col] = s;
    }
  }
}

ffi::Error StackedMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::S32> layer,
                             ffi::ResultBuffer<ffi::F32> y) {
  auto wd = w.dimensions();
  auto xd = x.dimensions();
  if (wd.size() != 3 || xd.size() < 1 || xd[xd.size() - 1] != wd[1])
    return ffi::Error::InvalidArgument("stacked_matmul: x [..., K] and w [layers, K, N]");
  const int64_t layers = wd[0], k = wd[1], n = wd[2];
  const int64_t m = k == 0 ? 0 : x.element_count() / k;
  if (y->element_count() != m * n) return ffi::Error::InvalidArgument("stacked_matmul: y is not [..., N]");
  const int64_t lay = layer.typed_data()[0];
  if (lay < 0 || lay >= layers) return ffi::Error::InvalidArgument("stacked_matmul: layer out of range");
  if (m == 0 || n == 0) return ffi::Error::Success();
  const Problem p{x.typed_data(), w.typed_data() + lay * k * n, y->typed_data(), m, k, n};
  // Groups small enough for two units per thread (narrow layers like k/v: a few panels).
  const int64_t panels = (n + kPanel - 1) / kPanel;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t group = std::clamp<int64_t>(panels / (2 * threads), 1, kGroupPanels) * kPanel;
  const int64_t groups = (n + group - 1) / group, chunks = (m + kRowChunk - 1) / kRowChunk;
  // One unit: a group of column panels of one chunk of rows.
  fineserve::ParallelFor(pool, groups * chunks, 1, [p, chunks, group](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t m0 = (u % chunks) * kRowChunk, n0 = (u / chunks) * group;
      Unit(p, n0, std::min(p.n, n0 + group), m0, std::min(p.m, m0 + kRowChunk));
    }
  });
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
