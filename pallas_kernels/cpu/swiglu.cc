// out = silu(gate) * up = gate * up / (1 + exp(-gate)), elementwise in float32 on the CPU,
// called from XLA through the FFI.
//
// XLA's CPU fusion of jax.nn.silu(g) * u runs at a few ns per element inside the layer scan;
// between the MLP's GEMMs that was a tenth of a prefill step. Here exp is the vectorizing
// polynomial of vector_math.h. NaN in gives NaN out.

#include <cmath>
#include <cstdint>

#include "parallel_for.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline float Silu(float g) {
#ifdef FINESERVE_MUTATE_SILU_SIGN
  return g / (1.0f + fineserve::Exp(g));  // test-only mutant: exp(g) for exp(-g)
#endif
  // exp(-g) is inf below g = -88.7: then g / inf = -0 (NaN for g = -inf, as jax.nn.silu).
  return g / (1.0f + fineserve::Exp(-g));
}

void SwigluRange(const float* __restrict g, const float* __restrict u, float* __restrict o,
                int64_t n) {
  for (int64_t i = 0; i < n; ++i) o[i] = Silu(g[i]) * u[i];
}

ffi::Error SwigluImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> gate, ffi::Buffer<ffi::F32> up,
                      ffi::ResultBuffer<ffi::F32> out) {
  const int64_t n = gate.element_count();
  if (up.element_count() != n || out->element_count() != n)
    return ffi::Error::InvalidArgument("swiglu: gate, up and out differ in size");
  const float* g = gate.typed_data();
  const float* u = up.typed_data();
  float* o = out->typed_data();
  // Pieces of 64 KiB of each operand: a decode step's call ([64, 1536]) is split once.
  fineserve::ParallelFor(pool, n, 16384, [g, u, o](int64_t begin, int64_t end) {
    SwigluRange(g + begin, u + begin, o + begin, end - begin);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FineserveSwiglu, SwigluImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
