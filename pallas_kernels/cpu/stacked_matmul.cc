// y[M, N] = x[M, K] @ w[layer, K, N] in float32 on the CPU, called from XLA through the FFI.
//
// The decoder's layer scan stacks every layer's weights ([layers, K, N]); XLA's dot needs
// its operand contiguous, so inside the scan it copies layer i's slice before every GEMM
// (the weights stream from memory three times per step). This kernel reads layer `layer`
// of the stacked buffer in place, streaming each weight once.
//
// Register-blocked: a tile of MR rows x NR columns is accumulated over all of K in registers
// (one weight row segment loaded, each x element broadcast), so every output element is one
// sum in increasing k, whatever M is: a row's result does not depend on the batch. Column
// panels (and chunks of rows) are spread over XLA's intra-op thread pool.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int kVec = 16;
constexpr int kRows = 8;  // 8 x 3 accumulators + 3 weight vectors + 1 broadcast of 32 zmm
typedef __m512 Vec;
inline Vec Load(const float* p) { return _mm512_loadu_ps(p); }
inline void Store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec Broadcast(const float* p) { return _mm512_set1_ps(*p); }
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec Zero() { return _mm512_setzero_ps(); }
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kVec = 8;
constexpr int kRows = 4;  // 4 x 3 accumulators + 4 of 16 ymm
typedef __m256 Vec;
inline Vec Load(const float* p) { return _mm256_loadu_ps(p); }
inline void Store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec Broadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec Zero() { return _mm256_setzero_ps(); }
#else
// Portable fallback (one lane): same loop structure, the compiler vectorizes what it can.
constexpr int kVec = 1;
constexpr int kRows = 4;
typedef float Vec;
inline Vec Load(const float* p) { return *p; }
inline void Store(float* p, Vec v) { *p = v; }
inline Vec Broadcast(const float* p) { return *p; }
inline Vec Fma(Vec a, Vec b, Vec c) { return __builtin_fmaf(a, b, c); }
inline Vec Zero() { return 0.0f; }
#endif
constexpr int kPanelVecs = 3;
constexpr int kPanel = kPanelVecs * kVec;  // columns per panel
constexpr int64_t kRowChunk = 64;          // rows per unit of work (a multiple of kRows)
constexpr int kPrefetchRows = 16;          // weight rows ahead (strided: no hardware prefetch)

// Rows [0, R) x vector columns [0, C) of one tile, summed over every k.
template <int R, int C>
inline __attribute__((always_inline)) void Tile(const float* x, int64_t ldx, const float* w,
                                                int64_t ldw, float* y, int64_t ldy, int64_t k_end) {
  Vec acc[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 3
    for (int c = 0; c < C; ++c) acc[r][c] = Zero();
#ifdef FINESERVE_MUTATE_SKIP_LAST_K
  k_end -= 1;  // test-only mutant: drops the last input feature
#endif
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
          int64_t rows, int64_t k) {
  int64_t m = 0;
  for (; m + kRows <= rows; m += kRows) Tile<kRows, C>(x + m * ldx, ldx, w, ldw, y + m * ldy, ldy, k);
  const float* xm = x + m * ldx;
  float* ym = y + m * ldy;
  switch (rows - m) {  // the same per-row arithmetic as a full tile
    case 1: Tile<1, C>(xm, ldx, w, ldw, ym, ldy, k); break;
    case 2: Tile<2, C>(xm, ldx, w, ldw, ym, ldy, k); break;
    case 3: Tile<3, C>(xm, ldx, w, ldw, ym, ldy, k); break;
#if defined(__AVX512F__)
    case 4: Tile<4, C>(xm, ldx, w, ldw, ym, ldy, k); break;
    case 5: Tile<5, C>(xm, ldx, w, ldw, ym, ldy, k); break;
    case 6: Tile<6, C>(xm, ldx, w, ldw, ym, ldy, k); break;
    case 7: Tile<7, C>(xm, ldx, w, ldw, ym, ldy, k); break;
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

// Columns [n0, n0 + kPanel) (clipped to N) of rows [m0, m1).
void Unit(const Problem& p, int64_t n0, int64_t m0, int64_t m1) {
  const int64_t width = std::min<int64_t>(kPanel, p.n - n0);
  const int64_t vecs = width / kVec;
  const float* x = p.x + m0 * p.k;
  float* y = p.y + m0 * p.n + n0;
  const int64_t rows = m1 - m0;
  if (vecs == 3) Rows<3>(x, p.k, p.w + n0, p.n, y, p.n, rows, p.k);
  if (vecs == 2) Rows<2>(x, p.k, p.w + n0, p.n, y, p.n, rows, p.k);
  if (vecs == 1) Rows<1>(x, p.k, p.w + n0, p.n, y, p.n, rows, p.k);
  for (int64_t col = vecs * kVec; col < width; ++col) {  // N not a multiple of the vector
    for (int64_t r = 0; r < rows; ++r) {
      float s = 0.0f;
      for (int64_t k = 0; k < p.k; ++k) s = __builtin_fmaf(x[r * p.k + k], p.w[k * p.n + n0 + col], s);
      y[r * p.n + col] = s;
    }
  }
}

// Units (column panel, row chunk) are taken from a shared counter by the caller and by pool
// tasks, so the caller never waits on a task that has not started; the state outlives late
// tasks.
struct Work {
  Problem p;
  int64_t panels, chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  void Run() {
    for (;;) {
      const int64_t u = next.fetch_add(1);
      if (u >= panels * chunks) return;
      const int64_t m0 = (u % chunks) * kRowChunk;
      Unit(p, (u / chunks) * kPanel, m0, std::min(p.m, m0 + kRowChunk));
      done.fetch_add(1);
    }
  }
};

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
  auto work = std::make_shared<Work>();
  work->p = Problem{x.typed_data(), w.typed_data() + lay * k * n, y->typed_data(), m, k, n};
  work->panels = (n + kPanel - 1) / kPanel;
  work->chunks = (m + kRowChunk - 1) / kRowChunk;
  const int64_t units = work->panels * work->chunks;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t helpers = std::min<int64_t>(threads, units) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Run(); });
  work->Run();
  while (work->done.load(std::memory_order_acquire) < units) {
    std::this_thread::yield();  // the last units are with tasks that have started
  }
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
