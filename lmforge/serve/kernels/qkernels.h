// Shared by qmatmul.cpp (the int8/int4 matmuls) and fused_step.cpp (the fused single-stream decode step): the block
// size, a horizontal sum, the activation quantisation of one row (to int16 values in -qmax..qmax: qmax 32767 for the
// int8 weights, 127 for the int4 weights) and the exact int16 block dot product.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace lmq {

constexpr int64_t QK = 32;
// the activation range against q8 weights (int16) and against q4 weights (int8)
constexpr float QMAX_Q8 = 32767.0f, QMAX_Q4 = 127.0f;

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// one activation row: K floats -> K int16 in -qmax..qmax, K/32 scales and scaled sums; with q8 (optional) the same
// values as int8 too (qmax <= 127)
inline void quantize_row(const float* x, int64_t K, int16_t* q, float* d, float* s, float qmax = 32767.0f,
                         int8_t* q8 = nullptr) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t b = 0; b < K / QK; ++b) {
    const float* xb = x + b * QK;
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      v[j] = _mm256_loadu_ps(xb + 8 * j);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float dm = _mm_cvtss_f32(m4) / qmax;
    const float id = dm != 0.0f ? 1.0f / dm : 0.0f;
    const __m256 mul = _mm256_set1_ps(id);
    __m256i i[4];
    for (int j = 0; j < 4; ++j)
      i[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], mul), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const __m256i sum32 = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(sum32), _mm256_extracti128_si256(sum32, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
    // int32 -> int16 packs work per 128-bit lane; the permute puts each 16 values back in order
    __m256i p[2];
    for (int j = 0; j < 2; ++j) {
      p[j] = _mm256_permute4x64_epi64(_mm256_packs_epi32(i[2 * j], i[2 * j + 1]), 0xd8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * QK + 16 * j), p[j]);
    }
    if (q8 != nullptr)  // int16 -> int8 per 128-bit lane, the permute puts the 32 values back in order
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q8 + b * QK),
                          _mm256_permute4x64_epi64(_mm256_packs_epi16(p[0], p[1]), 0xd8));
    d[b] = dm;
    s[b] = dm * static_cast<float>(_mm_cvtsi128_si32(t));
  }
}

// 8 int32 partial sums of <w, x> for 32 weights widened to int16 (w0: elements 0-15, w1: 16-31) and 32 int16
// activations at x: two madd_epi16 (|sums| < 2^25: exact, and exact in float32 too)
inline __m256i dot_s16(__m256i w0, __m256i w1, const int16_t* x) {
  const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16));
  return _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
}

}  // namespace lmq
