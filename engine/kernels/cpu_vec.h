// The vector the CPU ops' hot loops are written in (cpu_layer_ops.cpp, cpu_paged_decode.cpp):
// 16 floats in AVX-512's 32 registers where the CPU has them (built with -mavx512f), else 8
// floats in AVX2's 16 (-mavx2 -mfma), else none (kVectorized false: those loops fall back to
// plain C++ the compiler vectorizes as it can). engine/kernels/cpu_paged_decode.py picks the
// flags from /proc/cpuinfo of the machine that builds, and hashes this file into the build.

#pragma once

#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace pdserve_vec {

#if defined(__AVX512F__)
constexpr bool kVectorized = true;
constexpr bool kAvx512 = true;
constexpr int kLanes = 16;
constexpr int kRegisters = 32;
using Vec = __m512;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec vbroadcast(float x) { return _mm512_set1_ps(x); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float sum_lanes(Vec v) { return _mm512_reduce_add_ps(v); }
inline Vec vsub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
inline Vec vmul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec vmax(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline Vec vround(Vec x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT); }
inline Vec vscale2(Vec x, Vec n) { return _mm512_scalef_ps(x, n); }  // x * 2^n, n integral
#elif defined(__AVX2__) && defined(__FMA__)
constexpr bool kVectorized = true;
constexpr bool kAvx512 = false;
constexpr int kLanes = 8;
constexpr int kRegisters = 16;
using Vec = __m256;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vbroadcast(float x) { return _mm256_set1_ps(x); }
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float sum_lanes(Vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}
inline Vec vsub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
inline Vec vmul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec vmax(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline Vec vround(Vec x) {
  return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline Vec vscale2(Vec x, Vec n) {  // x * 2^n, n integral in [-126, 127]
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                          _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(x, _mm256_castsi256_ps(bits));
}
#else
constexpr bool kVectorized = false;
constexpr bool kAvx512 = false;
constexpr int kLanes = 8;
constexpr int kRegisters = 16;
#endif

#if defined(__AVX2__) && defined(__FMA__)
// e^x in every lane, for x <= 0 (a softmax's shifted scores; below -87.3 it gives 2^-126
// rather than a denormal or 0): x = n ln2 + r with |r| <= ln2 / 2, e^r by Cephes' degree-6
// polynomial, then scaled by 2^n. Within 2 ulp of std::exp over that range.
inline Vec vexp_nonpositive(Vec x) {
  x = vmax(x, vbroadcast(-87.3f));
  const Vec n = vround(vmul(x, vbroadcast(1.44269504088896341f)));
  Vec r = vfma(n, vbroadcast(-0.693359375f), x);  // ln2 in two parts: exact products
  r = vfma(n, vbroadcast(2.12194440e-4f), r);
  Vec p = vbroadcast(1.9875691500e-4f);
  p = vfma(p, r, vbroadcast(1.3981999507e-3f));
  p = vfma(p, r, vbroadcast(8.3334519073e-3f));
  p = vfma(p, r, vbroadcast(4.1665795894e-2f));
  p = vfma(p, r, vbroadcast(1.6666665459e-1f));
  p = vfma(p, r, vbroadcast(5.0000001201e-1f));
  p = vfma(p, vmul(r, r), vadd(r, vbroadcast(1.0f)));
  return vscale2(p, n);
}
#endif

// Fetch floats [begin, end) of `p` into L1 ahead of their use, a cache line at a time (a
// prefetch never faults; callers keep the range inside the tensor anyway).
inline void prefetch(const float* p, int64_t begin, int64_t end) {
  constexpr int64_t kLineFloats = 64 / sizeof(float);
  for (int64_t i = begin; i < end; i += kLineFloats) __builtin_prefetch(p + i, 0, 3);
}

}  // namespace pdserve_vec

#if defined(__AVX2__) && defined(__FMA__)
#define PDSERVE_UNROLLED _Pragma("GCC unroll 16")
#endif
