// The vector the CPU ops' hot loops are written in (cpu_layer_ops.cpp, cpu_paged_decode.cpp):
// 16 floats in AVX-512's 32 registers where the CPU has them (built with -mavx512f), else 8
// floats in AVX2's 16 (-mavx2 -mfma), else none (kVectorized false: those loops fall back to
// plain C++ the compiler vectorizes as it can). engine/kernels/cpu_paged_decode.py picks the
// flags from /proc/cpuinfo of the machine that builds, and hashes this file into the build.

#pragma once

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
#else
constexpr bool kVectorized = false;
constexpr bool kAvx512 = false;
constexpr int kLanes = 8;
constexpr int kRegisters = 16;
#endif

}  // namespace pdserve_vec

#if defined(__AVX2__) && defined(__FMA__)
#define PDSERVE_UNROLLED _Pragma("GCC unroll 16")
#endif
