// Float32 vector math for the CPU kernels: one register type per instruction set (AVX-512,
// AVX2 + FMA, or one scalar lane), and an exp that loops vectorize (libm's expf is a call
// per element).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace fineserve {

#if defined(__AVX512F__)
constexpr int kVec = 16;
typedef __m512 Vec;
inline Vec Load(const float* p) { return _mm512_loadu_ps(p); }
inline void Store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec Broadcast(const float* p) { return _mm512_set1_ps(*p); }
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec Zero() { return _mm512_setzero_ps(); }
inline float ReduceAdd(Vec v) { return _mm512_reduce_add_ps(v); }
// kVec bf16 values (the high halves of float32s) -> float32.
inline Vec LoadBf16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
// p[0, kVec) = v (whole numbers held exactly in float32) as int32, plus p's values unless
// `first`.
inline void AccumulateInt(int32_t* p, Vec v, bool first) {
  __m512i i = _mm512_cvtps_epi32(v);
  if (!first) i = _mm512_add_epi32(i, _mm512_loadu_si512(p));
  _mm512_storeu_si512(p, i);
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kVec = 8;
typedef __m256 Vec;
inline Vec Load(const float* p) { return _mm256_loadu_ps(p); }
inline void Store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec Broadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec Zero() { return _mm256_setzero_ps(); }
inline float ReduceAdd(Vec v) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}
inline Vec LoadBf16(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline void AccumulateInt(int32_t* p, Vec v, bool first) {
  __m256i i = _mm256_cvtps_epi32(v);
  if (!first) i = _mm256_add_epi32(i, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), i);
}
#else
// Portable fallback (one lane): the same loop structures, the compiler vectorizes what it can.
constexpr int kVec = 1;
typedef float Vec;
inline Vec Load(const float* p) { return *p; }
inline void Store(float* p, Vec v) { *p = v; }
inline Vec Broadcast(const float* p) { return *p; }
inline Vec Fma(Vec a, Vec b, Vec c) { return __builtin_fmaf(a, b, c); }
inline Vec Zero() { return 0.0f; }
inline float ReduceAdd(Vec v) { return v; }
inline Vec LoadBf16(const uint16_t* p) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(*p) << 16);
}
inline void AccumulateInt(int32_t* p, Vec v, bool first) {
  *p = static_cast<int32_t>(std::nearbyint(v)) + (first ? 0 : *p);
}
#endif

// exp(x), within 2 ulp of expf for normal results; inf above ln(FLT_MAX), NaN for NaN.
// Branch-free: n = round(x / ln 2); the remainder r = x - n ln 2 is exact in two fmas
// (Cody-Waite: n * hi has no rounding error); exp(r) for |r| <= ln2 / 2 is a degree-7
// Taylor polynomial; 2^n goes into exponent bits in two halves, so that n from -150 to 128
// (subnormal results, and x near ln FLT_MAX) needs no special case. Every step is an fma or
// a single operation, so -fassociative-math cannot undo the split.
inline float Exp(float x) {
  constexpr float kLogFltMax = 88.72283f;
  // Comparisons with NaN are false: NaN passes the clamp and comes out NaN.
  const float c = x < -104.0f ? -104.0f : (x > kLogFltMax ? kLogFltMax : x);
  const float n = std::nearbyint(c * 1.44269504088896341f);
  float r = std::fma(n, -0.693145751953125f, c);   // ln 2, high part
  r = std::fma(n, -1.428606765330187045e-06f, r);  // ln 2, low part
  float p = 1.0f / 5040.0f;
  p = std::fma(p, r, 1.0f / 720.0f);
  p = std::fma(p, r, 1.0f / 120.0f);
  p = std::fma(p, r, 1.0f / 24.0f);
  p = std::fma(p, r, 1.0f / 6.0f);
  p = std::fma(p, r, 0.5f);
  p = std::fma(p, r, 1.0f);
  p = std::fma(p, r, 1.0f);
  const int32_t ni = static_cast<int32_t>(n), half = ni >> 1;
  const float s1 = __builtin_bit_cast(float, (half + 127) << 23);
  const float s2 = __builtin_bit_cast(float, (ni - half + 127) << 23);
  return x > kLogFltMax ? INFINITY : p * s1 * s2;
}

}  // namespace fineserve
