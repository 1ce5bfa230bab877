// The fused decode step: every layer of a Llama-family model in one C++ call, for T <= 16 query positions of one
// stream (T = 1: a decode step; T > 1: a speculative verify pass), or for a batch of decode rows, one token each at its
// own position in its own cache slot (step_rows: the engine's batched decode; no gather, no mask).
//
// Per layer: RMSNorm, the fused QKV matmul (+ bias), optional per-head q/k RMSNorm (qk_norm families), RoPE from the
// runner's tables (x * cos + rotate_half(x) * sin with the sign folded into sin), the keys and values written into the
// engine's KV cache slot, attention of the T queries over the cached positions (GQA, causal, sliding window per
// layer), o-proj + residual, RMSNorm, gate+up, SiLU(gate) * up, down + residual; then the final norm and the head.
// What it does not implement (Gemma's norms and GELU, embedding scale, logit soft-capping, bf16 activations) stays on
// the Python path (ModelRunner decides once at init).
//
// Matmuls take weights in float32, q8 or q4 (qmatmul.cpp's formats and numerics: int16 activations against q8, int8
// against q4) and read each weight row once for all T rows: a tile of R weight rows times MT activation rows keeps
// R * MT accumulators in registers.  Every output is summed in the same order whatever T and the tiling are (one
// accumulator per output, blocks in order), so a verify pass gives bit for bit the logits of the decode steps it
// replaces, and a row of a batch the logits of that stream's step alone.
//
// q8 and q4 weights come in two layouts: qmatmul.cpp's row-major one, and a row-interleaved one ("x8", what the runner
// stores when the row count is a multiple of 8; lmforge.serve.kernels.pack_x8 says how) that multiplies 8 output rows
// per pass with one output per vector lane: no horizontal sums, the 8 rows' scales read as one vector, and the int4
// products as int8 x uint8 (maddubs) instead of int16 x int16.  The row-major tiles are kept for other row counts.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "qkernels.h"

namespace {

using lmq::QK;
using lmq::hsum;

// -- one linear layer ----------------------------------------------------------------------------------------------
struct Linear {
  enum Kind { F32, Q8, Q4, Q8X8, Q4X8 } kind = F32;
  // w: float32 [N, K]; q8: q int8 [N, K]; q4: q uint8 [N, K/2], m; d float16 [N, K/32];
  // x8 layouts: q8x8: q int8 [N/8, K/32, 256], q4x8: q uint8 [N/8, K/32, 128], m; d float16 [N/8, K/32, 8]
  torch::Tensor w, q, d, m, bias;
  int64_t N = 0, K = 0;
};

Linear make_linear(const std::vector<c10::optional<torch::Tensor>>& t, const char* what) {
  TORCH_CHECK(t.size() == 5, what, ": a linear is (weight, q, d, m, bias)");
  Linear L;
  auto f32 = [&](const torch::Tensor& x) {
    TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous(), what, ": float32 contiguous tensors only");
    return x;
  };
  if (t[1].has_value() && t[1]->dim() == 3) {  // the x8 layouts
    L.q = *t[1];
    L.d = *t[2];
    const bool q4 = t[3].has_value();
    const int64_t G = L.q.size(0), B = L.q.size(1);
    TORCH_CHECK(L.q.is_contiguous() && L.q.size(2) == (q4 ? 128 : 256) &&
                    L.q.scalar_type() == (q4 ? torch::kUInt8 : torch::kInt8),
                what, ": bad x8 weights");
    auto scales = [&](const torch::Tensor& x) {
      TORCH_CHECK(x.is_contiguous() && x.scalar_type() == torch::kFloat16 && x.dim() == 3 && x.size(0) == G &&
                      x.size(1) == B && x.size(2) == 8,
                  what, ": bad x8 scales");
    };
    scales(L.d);
    if (q4) L.m = *t[3], scales(L.m);
    L.kind = q4 ? Linear::Q4X8 : Linear::Q8X8, L.N = 8 * G, L.K = QK * B;
  } else if (t[1].has_value()) {
    L.q = *t[1];
    L.d = *t[2];
    TORCH_CHECK(L.q.is_contiguous() && L.d.is_contiguous() && L.d.scalar_type() == torch::kFloat16, what, ": bad scales");
    L.N = L.q.size(0);
    if (t[3].has_value()) {
      L.kind = Linear::Q4, L.m = *t[3], L.K = 2 * L.q.size(1);
      TORCH_CHECK(L.q.scalar_type() == torch::kUInt8 && L.m.scalar_type() == torch::kFloat16, what, ": bad q4 weights");
    } else {
      L.kind = Linear::Q8, L.K = L.q.size(1);
      TORCH_CHECK(L.q.scalar_type() == torch::kInt8, what, ": bad q8 weights");
    }
    TORCH_CHECK(L.K % QK == 0 && L.d.size(0) == L.N && L.d.size(1) == L.K / QK, what, ": bad block shapes");
  } else {
    TORCH_CHECK(t[0].has_value(), what, ": no weight");
    L.w = f32(*t[0]), L.N = L.w.size(0), L.K = L.w.size(1);
  }
  if (t[4].has_value()) {
    L.bias = f32(*t[4]);
    TORCH_CHECK(L.bias.numel() == L.N, what, ": bias size");
  }
  return L;
}

// Runs tile<R, MT>(n, m0) over all N output rows and M activation rows: one row of activations (a decode step) in
// tiles of R1 weight rows, several rows in tiles of K::RM weight rows x K::MTM activation rows (f32: 4 x 3, q8/q4:
// 2 x 4, the fastest of 2x4 / 4x2 / 4x3 / 8x1 measured on SmolLM2's shapes at 2-9 rows with AVX2 code (docs/benchmarks.md).
template <class K, int R1>
void drive(const K& k, int64_t N, int64_t M) {
  constexpr int RM = K::RM, MTM = K::MTM;
  const int64_t R = M == 1 ? R1 : RM;
  const int64_t tiles = (N + R - 1) / R;
  const int64_t grain = std::max<int64_t>(1, 32 / R);
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t * R;
      if (M == 1) {
        if (n + R1 <= N) k.template tile<R1, 1>(n, 0);
        else for (int64_t r = n; r < N; ++r) k.template tile<1, 1>(r, 0);
        continue;
      }
      for (int64_t m0 = 0, mt; m0 < M; m0 += mt) {
        // MTM rows at a time; MTM + 1 left (f32: 4 of 16) go as two pairs, not MTM and a lone row, whose tile has too
        // few accumulators to hide the FMA latency
        mt = M - m0 == MTM + 1 && MTM > 2 ? 2 : std::min<int64_t>(MTM, M - m0);
        for (int64_t r = n; r < std::min(N, n + RM); r += (n + RM <= N ? RM : 1)) {
          const bool full = n + RM <= N;
          switch (mt) {
            case 4: if constexpr (MTM >= 4) { full ? k.template tile<RM, 4>(r, m0) : k.template tile<1, 4>(r, m0); } break;
            case 3:
              if constexpr (MTM >= 3) {
                if constexpr (K::PF) {
                  // the full activation tiles after the first fetch the next weight tile's rows from memory, each a
                  // share of the inputs, while the current weights (already in cache) do the arithmetic
                  const int64_t shares = M / MTM - 1, j = m0 / MTM;
                  if (full && j >= 1 && shares >= 1 && n + 2 * RM <= N) {
                    const int64_t step = (k.K / shares + 31) / 32 * 32;
                    k.template tile<RM, 3>(r, m0, k.W + (n + RM) * k.K, (j - 1) * step, std::min(k.K, j * step));
                    break;
                  }
                }
                full ? k.template tile<RM, 3>(r, m0) : k.template tile<1, 3>(r, m0);
              }
              break;
            case 2: full ? k.template tile<RM, 2>(r, m0) : k.template tile<1, 2>(r, m0); break;
            default: full ? k.template tile<RM, 1>(r, m0) : k.template tile<1, 1>(r, m0); break;
          }
        }
      }
    }
  });
}

// hsum of four vectors at once: [hsum(a), hsum(b), hsum(c), hsum(d)], each by the same pairwise adds as hsum (lanes
// i + (i+4), then (0+2) + (1+3)), so bit for bit hsum's results, in 8 vector ops instead of 4 x 6
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
  const __m256 cd = _mm256_add_ps(_mm256_permute2f128_ps(c, d, 0x20), _mm256_permute2f128_ps(c, d, 0x31));
  const __m256 s = _mm256_add_ps(_mm256_shuffle_ps(ab, cd, 0x44), _mm256_shuffle_ps(ab, cd, 0xee));
  const __m256 h = _mm256_hadd_ps(s, s);  // [a c a c | b d b d]
  return _mm_unpacklo_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

struct F32Kernel {
  static constexpr int RM = 4, MTM = 3;
  static constexpr bool PF = true;
  const float* W;
  const float* X;
  float* Y;
  int64_t N, K;
  // pf: weights to prefetch meanwhile (inputs p0 .. p1 of RM rows from there; two cache lines per row every other step)
  template <int R, int MT>
  void tile(int64_t n, int64_t m0, const float* pf = nullptr, int64_t p0 = 0, int64_t p1 = 0) const {
    __m256 acc[MT][R];
    for (int m = 0; m < MT; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      if (pf != nullptr && (k & 15) == 0) {
        const int64_t at = p0 + 2 * k;  // twice as fast as k: a tile fetches twice its share of the inputs
        if (at < p1)
          for (int r = 0; r < RM; ++r) {
            _mm_prefetch(reinterpret_cast<const char*>(pf + r * K + at), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(pf + r * K + at + 16), _MM_HINT_T0);
          }
      }
      __m256 x[MT];
      for (int m = 0; m < MT; ++m) x[m] = _mm256_loadu_ps(X + (m0 + m) * K + k);
      for (int r = 0; r < R; ++r) {
        const __m256 w = _mm256_loadu_ps(W + (n + r) * K + k);
        for (int m = 0; m < MT; ++m) acc[m][r] = _mm256_fmadd_ps(w, x[m], acc[m][r]);
      }
    }
    if (R % 4 == 0 && k == K) {  // four outputs' sums at once (the same adds as hsum), one store
      for (int m = 0; m < MT; ++m)
        for (int r = 0; r < R; r += 4)
          _mm_storeu_ps(Y + (m0 + m) * N + n + r, hsum4(acc[m][r], acc[m][r + 1], acc[m][r + 2], acc[m][r + 3]));
      return;
    }
    for (int m = 0; m < MT; ++m)
      for (int r = 0; r < R; ++r) {
        float s = hsum(acc[m][r]);
        for (int64_t j = k; j < K; ++j) s += X[(m0 + m) * K + j] * W[(n + r) * K + j];
        Y[(m0 + m) * N + n + r] = s;
      }
  }
};

// the activation rows quantised per block (lmq::quantize_row) to int16 values in -qmax..qmax, and for qmax 127 also
// as int8 (q8)
struct Acts {
  std::vector<int16_t> q;
  std::vector<int8_t> q8;
  std::vector<float> d, s;
  void quantize(const float* x, int64_t M, int64_t K, float qmax) {
    const int64_t B = K / QK;
    const bool i8 = qmax <= 127.0f;
    q.resize(M * K), d.resize(M * B), s.resize(M * B);
    if (i8) q8.resize(M * K);
    for (int64_t m = 0; m < M; ++m)
      lmq::quantize_row(x + m * K, K, q.data() + m * K, d.data() + m * B, s.data() + m * B, qmax,
                        i8 ? q8.data() + m * K : nullptr);
  }
};

struct Q8Kernel {
  static constexpr int RM = 2, MTM = 4;
  static constexpr bool PF = false;
  const int8_t* W;
  const at::Half* D;
  const Acts* a;
  float* Y;
  int64_t N, K;
  template <int R, int MT>
  void tile(int64_t n, int64_t m0) const {
    const int64_t B = K / QK;
    __m256 acc[MT][R];
    for (int m = 0; m < MT; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < B; ++b) {
      for (int r = 0; r < R; ++r) {
        const int8_t* w = W + (n + r) * K + b * QK;
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16)));
        const float wd = _cvtsh_ss(D[(n + r) * B + b].x);
        for (int m = 0; m < MT; ++m) {
          const int64_t row = m0 + m;
          const float d = wd * a->d[row * B + b];
          acc[m][r] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(lmq::dot_s16(w0, w1, a->q.data() + row * K + b * QK)),
                                      acc[m][r]);
        }
      }
    }
    for (int m = 0; m < MT; ++m)
      for (int r = 0; r < R; ++r) Y[(m0 + m) * N + n + r] = hsum(acc[m][r]);
  }
};

struct Q4Kernel {
  static constexpr int RM = 2, MTM = 4;
  static constexpr bool PF = false;
  const uint8_t* W;
  const at::Half* D;
  const at::Half* Mn;
  const Acts* a;
  float* Y;
  int64_t N, K;
  template <int R, int MT>
  void tile(int64_t n, int64_t m0) const {
    const int64_t B = K / QK;
    __m256 acc[MT][R];
    float mins[MT][R];
    for (int m = 0; m < MT; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps(), mins[m][r] = 0.0f;
    const __m128i low4 = _mm_set1_epi8(0x0f);
    for (int64_t b = 0; b < B; ++b) {
      for (int r = 0; r < R; ++r) {
        const __m128i p = _mm_loadu_si128(reinterpret_cast<const __m128i*>(W + (n + r) * (K / 2) + b * (QK / 2)));
        const __m256i w0 = _mm256_cvtepu8_epi16(_mm_and_si128(p, low4));
        const __m256i w1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(p, 4), low4));
        const float wd = _cvtsh_ss(D[(n + r) * B + b].x), wm = _cvtsh_ss(Mn[(n + r) * B + b].x);
        for (int m = 0; m < MT; ++m) {
          const int64_t row = m0 + m;
          const float d = wd * a->d[row * B + b];
          acc[m][r] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(lmq::dot_s16(w0, w1, a->q.data() + row * K + b * QK)),
                                      acc[m][r]);
          mins[m][r] += wm * a->s[row * B + b];
        }
      }
    }
    for (int m = 0; m < MT; ++m)
      for (int r = 0; r < R; ++r) Y[(m0 + m) * N + n + r] = hsum(acc[m][r]) + mins[m][r];
  }
};

// x8 layouts: output rows in groups of 8, each group's block b stored as one run of bytes in which every 32-bit lane
// holds one row's weights (lane r: row 8g + r), so an integer dot product against activations broadcast to all lanes
// leaves row r's partial sum in lane r.  tile<MT>(g, m0): the 8 outputs of group g for activation rows m0 .. m0+MT-1.

// q8x8: block b of group g is 256 int8: 16 runs of 16 bytes, run i = (row 0: elements 2i, 2i+1; row 1: 2i, 2i+1;
// ... row 7), widened to int16 and multiplied with the pair (x[2i], x[2i+1]) of int16 activations (madd_epi16).
// Per lane: 32 products of |w| <= 127 and |x| <= 32767, |sum| < 2^28: exact in int32.
struct Q8X8Kernel {
  static constexpr int MTM = 4;
  const int8_t* W;
  const at::Half* D;
  const Acts* a;
  float* Y;
  int64_t N, K;
  template <int MT>
  void tile(int64_t g, int64_t m0) const {
    const int64_t B = K / QK;
    const int8_t* Wg = W + g * B * 256;
    const at::Half* Dg = D + g * B * 8;
    __m256 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
    const int16_t* xr[MT];
    for (int m = 0; m < MT; ++m) xr[m] = a->q.data() + (m0 + m) * K;
    for (int64_t b = 0; b < B; ++b) {
      // one int32 accumulator per row, both products of a pair of runs added before it (integer sums: exact in any
      // order); the inner loop stays rolled, so the compiler keeps everything in registers (no spills)
      __m256i s[MT];
      for (int m = 0; m < MT; ++m) s[m] = _mm256_setzero_si256();
      const int8_t* wb = Wg + b * 256;
#pragma GCC unroll 1
      for (int i = 0; i < 16; i += 2) {
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 16 * i)));
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 16 * i + 16)));
        for (int m = 0; m < MT; ++m) {
          const int16_t* x = xr[m] + b * QK + 2 * i;
          int32_t x0, x1;
          std::memcpy(&x0, x, 4), std::memcpy(&x1, x + 2, 4);
          s[m] = _mm256_add_epi32(s[m], _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_set1_epi32(x0)),
                                                         _mm256_madd_epi16(w1, _mm256_set1_epi32(x1))));
        }
      }
      const __m256 wd = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(Dg + b * 8)));
      for (int m = 0; m < MT; ++m) {
        const __m256 d = _mm256_mul_ps(wd, _mm256_set1_ps(a->d[(m0 + m) * B + b]));
        acc[m] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s[m]), acc[m]);
      }
    }
    for (int m = 0; m < MT; ++m) _mm256_storeu_ps(Y + (m0 + m) * N + 8 * g, acc[m]);
  }
};

// q4x8: block b of group g is 128 bytes: 4 runs of 32 bytes, run j = (row 0: bytes 4j .. 4j+3 of its row-major block;
// row 1: ...; row 7), i.e. lane r holds row r's elements 4j..4j+3 (low nibbles) and 16+4j..16+4j+3 (high nibbles).
// Products as uint8 weights (0..15) x int8 activations (-127..127) with maddubs_epi16: 8 of them summed in int16 per
// lane pair (16 products of at most 15 * 127: |sum| <= 30480, no saturation), then madd with ones to int32: exact.
struct Q4X8Kernel {
  static constexpr int MTM = 4;
  const uint8_t* W;
  const at::Half* D;
  const at::Half* Mn;
  const Acts* a;
  float* Y;
  int64_t N, K;
  template <int MT>
  void tile(int64_t g, int64_t m0) const {
    const int64_t B = K / QK;
    const uint8_t* Wg = W + g * B * 128;
    const at::Half* Dg = D + g * B * 8;
    const at::Half* Mg = Mn + g * B * 8;
    const __m256i low4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    __m256 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < B; ++b) {
      __m256i s[MT];
      for (int m = 0; m < MT; ++m) s[m] = _mm256_setzero_si256();
      const uint8_t* wb = Wg + b * 128;
#pragma GCC unroll 1
      for (int j = 0; j < 4; ++j) {  // rolled, as in q8x8: no spills (int16 sums without overflow: exact in any order)
        const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 32 * j));
        const __m256i lo = _mm256_and_si256(p, low4), hi = _mm256_and_si256(_mm256_srli_epi16(p, 4), low4);
        for (int m = 0; m < MT; ++m) {
          const int8_t* x = a->q8.data() + (m0 + m) * K + b * QK + 4 * j;
          int32_t xl, xh;
          std::memcpy(&xl, x, 4), std::memcpy(&xh, x + 16, 4);
          s[m] = _mm256_add_epi16(s[m], _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(xl)),
                                                         _mm256_maddubs_epi16(hi, _mm256_set1_epi32(xh))));
        }
      }
      const __m256 wd = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(Dg + b * 8)));
      const __m256 wm = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(Mg + b * 8)));
      for (int m = 0; m < MT; ++m) {
        const int64_t row = m0 + m;
        const __m256 d = _mm256_mul_ps(wd, _mm256_set1_ps(a->d[row * B + b]));
        acc[m] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_madd_epi16(s[m], ones)), acc[m]);
        acc[m] = _mm256_fmadd_ps(wm, _mm256_set1_ps(a->s[row * B + b]), acc[m]);
      }
    }
    for (int m = 0; m < MT; ++m) _mm256_storeu_ps(Y + (m0 + m) * N + 8 * g, acc[m]);
  }
};

// tile<MT>(g, m0) over the N / 8 groups and M activation rows in tiles of up to K::MTM rows; many rows (a prefill) in
// chunks of 16 groups x 64 rows, so the weights and activations a chunk reads (~74 KB each at K = 576) stay in cache
template <class K>
void drive_x8(const K& k, int64_t N, int64_t M) {
  constexpr int64_t GC = 16, MC = 64;
  const int64_t G = N / 8;
  at::parallel_for(0, G, 4, [&](int64_t g0, int64_t g1) {
    for (int64_t gc = g0; gc < g1; gc += GC)
      for (int64_t mc = 0; mc < M; mc += MC)
        for (int64_t g = gc; g < std::min(g1, gc + GC); ++g)
          for (int64_t m0 = mc; m0 < std::min(M, mc + MC); m0 += K::MTM) {
            switch (std::min<int64_t>(K::MTM, M - m0)) {
              case 4: k.template tile<4>(g, m0); break;
              case 3: k.template tile<3>(g, m0); break;
              case 2: k.template tile<2>(g, m0); break;
              default: k.template tile<1>(g, m0); break;
            }
          }
  });
}

// y [M, N] = x [M, K] @ W.T (+ bias)
void linear(const Linear& L, const float* x, int64_t M, float* y, Acts& acts) {
  if (L.kind == Linear::F32) {
    drive<F32Kernel, 8>(F32Kernel{L.w.data_ptr<float>(), x, y, L.N, L.K}, L.N, M);
  } else {
    const bool q8 = L.kind == Linear::Q8 || L.kind == Linear::Q8X8;
    acts.quantize(x, M, L.K, q8 ? lmq::QMAX_Q8 : lmq::QMAX_Q4);
    const at::Half* D = L.d.data_ptr<at::Half>();
    switch (L.kind) {
      case Linear::Q8: drive<Q8Kernel, 4>(Q8Kernel{L.q.data_ptr<int8_t>(), D, &acts, y, L.N, L.K}, L.N, M); break;
      case Linear::Q4:
        drive<Q4Kernel, 4>(Q4Kernel{L.q.data_ptr<uint8_t>(), D, L.m.data_ptr<at::Half>(), &acts, y, L.N, L.K}, L.N, M);
        break;
      case Linear::Q8X8: drive_x8(Q8X8Kernel{L.q.data_ptr<int8_t>(), D, &acts, y, L.N, L.K}, L.N, M); break;
      default:
        drive_x8(Q4X8Kernel{L.q.data_ptr<uint8_t>(), D, L.m.data_ptr<at::Half>(), &acts, y, L.N, L.K}, L.N, M);
    }
  }
  if (L.bias.defined()) {
    const float* b = L.bias.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < L.N; ++n) y[m * L.N + n] += b[n];
  }
}

// e^x for 8 floats (Cephes' expf: range reduction by ln 2 in two parts, a degree-5 polynomial, 2^n by exponent bits;
// within 2 ulp of std::exp, -inf -> 0); the same function for every element, so the result never depends on where an
// element sits in its row
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-88.3762626647949f));
  const __m256 n = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                                 _mm256_set1_ps(0.5f)));  // -88.38: n = -127, 2^n -> 0
  x = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f)));
  x = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(-2.12194440e-4f)));
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// f(8 floats) over p[0..n), the tail through a padded copy
template <class F>
inline void map8(float* p, int64_t n, F f) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(p + i, f(_mm256_loadu_ps(p + i)));
  if (i < n) {
    alignas(32) float t[8] = {0};
    std::copy(p + i, p + n, t);
    _mm256_store_ps(t, f(_mm256_load_ps(t)));
    std::copy(t, t + (n - i), p + i);
  }
}

// out = x * rsqrt(mean(x^2) + eps) * w, one row of n
inline void rms_norm(const float* x, const float* w, int64_t n, float eps, float* out) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  float ss = hsum(acc);
  for (; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (i = 0; i < n; ++i) out[i] = x[i] * r * w[i];
}

struct Layer {
  torch::Tensor ln1, ln2, q_norm, k_norm, cos, sin;
  Linear qkv, o, gate_up, down;
  bool sliding = false;
};

}  // namespace

class FusedStep {
 public:
  // layers: per layer [ln1, ln2, q_norm, k_norm, cos, sin, then qkv, o, gate_up, down as (weight, q, d, m, bias)];
  // window: the sliding layers' window (0: none)
  FusedStep(torch::Tensor embed, const std::vector<std::vector<c10::optional<torch::Tensor>>>& layers,
            const std::vector<bool>& sliding, torch::Tensor norm, const std::vector<c10::optional<torch::Tensor>>& head,
            int64_t n_head, int64_t n_kv, int64_t head_dim, double eps, double scale, int64_t window)
      : embed_(embed), norm_(norm), nh_(n_head), nkv_(n_kv), hd_(head_dim), eps_(eps), scale_(scale), window_(window) {
    TORCH_CHECK(embed.scalar_type() == torch::kFloat32 && embed.is_contiguous() && embed.dim() == 2, "embed: float32");
    TORCH_CHECK(layers.size() == sliding.size(), "one sliding flag per layer");
    TORCH_CHECK(nh_ % nkv_ == 0 && hd_ % 2 == 0, "bad head counts");
    h_ = embed.size(1);
    for (size_t i = 0; i < layers.size(); ++i) {
      const auto& t = layers[i];
      TORCH_CHECK(t.size() == 26, "a layer is 6 tensors and 4 linears of 5");
      Layer L;
      L.ln1 = *t[0], L.ln2 = *t[1];
      if (t[2].has_value()) L.q_norm = *t[2], L.k_norm = *t[3];
      L.cos = *t[4], L.sin = *t[5];
      for (const auto& x : {L.ln1, L.ln2, L.cos, L.sin})
        TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "norms and rope tables: float32");
      TORCH_CHECK(L.cos.size(1) == hd_, "rope tables: [positions, head_dim]");
      auto lin = [&](int j, const char* what) {
        return make_linear(std::vector<c10::optional<torch::Tensor>>(t.begin() + j, t.begin() + j + 5), what);
      };
      L.qkv = lin(6, "qkv"), L.o = lin(11, "o"), L.gate_up = lin(16, "gate_up"), L.down = lin(21, "down");
      TORCH_CHECK(L.qkv.K == h_ && L.qkv.N == (nh_ + 2 * nkv_) * hd_ && L.o.K == nh_ * hd_ && L.o.N == h_ &&
                      L.gate_up.K == h_ && L.gate_up.N % 2 == 0 && L.down.K == L.gate_up.N / 2 && L.down.N == h_,
                  "layer ", i, ": shapes do not match the model");
      L.sliding = sliding[i];
      layers_.push_back(std::move(L));
    }
    head_ = make_linear(head, "head");
    TORCH_CHECK(head_.K == h_, "head: shape");
  }

  // logits [T or 1, vocab] for tokens ids [T] at positions start .. start + T - 1 of cache slot `slot` (keys and values
  // written there); all_logits: every position's logits, else the last one's
  torch::Tensor step(const torch::Tensor& ids, int64_t start, int64_t slot, const std::vector<torch::Tensor>& ks,
                     const std::vector<torch::Tensor>& vs, bool all_logits) {
    TORCH_CHECK(ids.dim() == 1, "ids: int64 [T]");
    TORCH_CHECK(start >= 0, "at least one token");
    const int64_t T = ids.size(0);
    std::vector<int64_t> pos(T), slots(T, slot);
    for (int64_t t = 0; t < T; ++t) pos[t] = start + t;
    return run(ids, pos, slots, ks, vs, all_logits);
  }

  // logits [B, vocab] for a batch of decode rows: token ids[b] at position pos[b] of cache slot slots[b] (each row its
  // own stream; slots need not be consecutive).  Every row's logits are bit for bit what step() gives that stream
  // alone: the matmuls sum each output in the same order whatever the rows, attention and norms are per row.
  torch::Tensor step_rows(const torch::Tensor& ids, const torch::Tensor& pos, const torch::Tensor& slots,
                          const std::vector<torch::Tensor>& ks, const std::vector<torch::Tensor>& vs) {
    TORCH_CHECK(ids.dim() == 1 && pos.scalar_type() == torch::kInt64 && slots.scalar_type() == torch::kInt64 &&
                    pos.numel() == ids.size(0) && slots.numel() == ids.size(0) && pos.is_contiguous() &&
                    slots.is_contiguous(),
                "ids, pos, slots: int64 [B]");
    const int64_t* p = pos.data_ptr<int64_t>();
    const int64_t* s = slots.data_ptr<int64_t>();
    const int64_t B = ids.size(0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < b; ++c)
        TORCH_CHECK(s[b] != s[c], "rows ", c, " and ", b, " share cache slot ", s[b]);
    return run(ids, std::vector<int64_t>(p, p + B), std::vector<int64_t>(s, s + B), ks, vs, true);
  }

 private:
  // row t: token ids[t] at position pos[t] of cache slot slots[t]; a row sees the keys of its slot up to its position
  // (rows of one slot: a verify pass, consecutive positions)
  torch::Tensor run(const torch::Tensor& ids, const std::vector<int64_t>& pos, const std::vector<int64_t>& slots,
                    const std::vector<torch::Tensor>& ks, const std::vector<torch::Tensor>& vs, bool all_logits) {
    TORCH_CHECK(ids.scalar_type() == torch::kInt64 && ids.dim() == 1 && ids.is_contiguous(), "ids: int64 [T]");
    const int64_t T = ids.size(0), h = h_, nh = nh_, nkv = nkv_, hd = hd_;
    TORCH_CHECK(T >= 1, "at least one token");
    TORCH_CHECK(ks.size() == layers_.size() && vs.size() == layers_.size(), "one cache tensor per layer");
    int64_t S = 0;  // one past the furthest position
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK(pos[t] >= 0, "negative position");
      S = std::max(S, pos[t] + 1);
    }
    const int64_t nq = (nh + 2 * nkv) * hd, inter = layers_.empty() ? 0 : layers_[0].down.K;
    std::vector<float> x(T * h), xn(T * h), qkv(T * nq), att(T * nh * hd), tmp(T * h), gu(T * 2 * inter), act(T * inter);
    std::vector<float*> Ks(T), Vs(T);
    Acts acts;
    const int64_t* id = ids.data_ptr<int64_t>();
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK(id[t] >= 0 && id[t] < embed_.size(0), "token id out of range");
      std::copy_n(embed_.data_ptr<float>() + id[t] * h, h, x.data() + t * h);
    }
    const float eps = static_cast<float>(eps_);
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& L = layers_[i];
      const torch::Tensor &ck = ks[i], &cv = vs[i];
      TORCH_CHECK(ck.scalar_type() == torch::kFloat32 && ck.is_contiguous() && cv.is_contiguous() && ck.dim() == 4 &&
                      ck.size(1) == nkv && ck.size(3) == hd && S <= ck.size(2) && cv.sizes() == ck.sizes() &&
                      cv.scalar_type() == torch::kFloat32,
                  "KV cache: float32 [slots, n_kv, max_len, head_dim] with room for position ", S - 1);
      TORCH_CHECK(S <= L.cos.size(0), "position beyond the RoPE tables");
      const int64_t maxlen = ck.size(2);
      for (int64_t t = 0; t < T; ++t) {
        TORCH_CHECK(slots[t] >= 0 && slots[t] < ck.size(0), "cache slot ", slots[t], " out of range");
        Ks[t] = ck.data_ptr<float>() + slots[t] * nkv * maxlen * hd;
        Vs[t] = cv.data_ptr<float>() + slots[t] * nkv * maxlen * hd;
      }
      for (int64_t t = 0; t < T; ++t) rms_norm(x.data() + t * h, L.ln1.data_ptr<float>(), h, eps, xn.data() + t * h);
      linear(L.qkv, xn.data(), T, qkv.data(), acts);
      for (int64_t t = 0; t < T; ++t) {
        const float* cs = L.cos.data_ptr<float>() + pos[t] * hd;
        const float* sn = L.sin.data_ptr<float>() + pos[t] * hd;
        float rot[512];
        TORCH_CHECK(hd <= 512, "head_dim above 512");
        for (int64_t j = 0; j < nh + nkv; ++j) {
          float* v = qkv.data() + t * nq + j * hd;
          if (L.q_norm.defined())
            rms_norm(v, (j < nh ? L.q_norm : L.k_norm).data_ptr<float>(), hd, eps, v);
          const int64_t half = hd / 2;
          for (int64_t e = 0; e < hd; ++e) rot[e] = v[e] * cs[e] + v[e < half ? e + half : e - half] * sn[e];
          std::copy_n(rot, hd, v);
        }
        for (int64_t j = 0; j < nkv; ++j) {
          std::copy_n(qkv.data() + t * nq + (nh + j) * hd, hd, Ks[t] + (j * maxlen + pos[t]) * hd);
          std::copy_n(qkv.data() + t * nq + (nh + nkv + j) * hd, hd, Vs[t] + (j * maxlen + pos[t]) * hd);
        }
      }
      attention(L, qkv.data(), nq, T, pos.data(), S, Ks.data(), Vs.data(), maxlen, att.data());
      linear(L.o, att.data(), T, tmp.data(), acts);
      for (int64_t j = 0; j < T * h; ++j) x[j] += tmp[j];
      for (int64_t t = 0; t < T; ++t) rms_norm(x.data() + t * h, L.ln2.data_ptr<float>(), h, eps, xn.data() + t * h);
      linear(L.gate_up, xn.data(), T, gu.data(), acts);
      const int64_t I = L.down.K;
      for (int64_t t = 0; t < T; ++t) {  // SiLU(gate) * up
        float* g = act.data() + t * I;
        std::copy_n(gu.data() + t * 2 * I, I, g);
        map8(g, I, [](__m256 v) {
          const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), v));
          return _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
        });
        const float* u = gu.data() + t * 2 * I + I;
        for (int64_t j = 0; j < I; ++j) g[j] *= u[j];
      }
      linear(L.down, act.data(), T, tmp.data(), acts);
      for (int64_t j = 0; j < T * h; ++j) x[j] += tmp[j];
    }
    const int64_t first = all_logits ? 0 : T - 1, rows = T - first;
    for (int64_t t = first; t < T; ++t)
      rms_norm(x.data() + t * h, norm_.data_ptr<float>(), h, eps, xn.data() + (t - first) * h);
    auto logits = torch::empty({rows, head_.N}, torch::kFloat32);
    linear(head_, xn.data(), rows, logits.data_ptr<float>(), acts);
    return logits;
  }

  // att [T, nh * hd]: query t (position pos[t]) of head j over its kv head's keys lo .. pos[t] in its row's slot
  void attention(const Layer& L, const float* qkv, int64_t nq, int64_t T, const int64_t* pos, int64_t S,
                 float* const* Ks, float* const* Vs, int64_t maxlen, float* att) const {
    const int64_t nh = nh_, hd = hd_, group = nh_ / nkv_;
    const float scale = static_cast<float>(scale_);
    at::parallel_for(0, nh * T, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> p(S);
      std::vector<float> out(hd);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t j = i % nh, t = i / nh, kv = j / group, last = pos[t];
        const int64_t lo = L.sliding && window_ > 0 ? std::max<int64_t>(0, last - window_ + 1) : 0;
        const float* q = qkv + t * nq + j * hd;
        const float* Kh = Ks[t] + kv * maxlen * hd;
        const float* Vh = Vs[t] + kv * maxlen * hd;
        float mx = -INFINITY;
        for (int64_t s = lo; s <= last; ++s) {
          const float* k = Kh + s * hd;
          __m256 acc = _mm256_setzero_ps();
          int64_t e = 0;
          for (; e + 8 <= hd; e += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + e), _mm256_loadu_ps(k + e), acc);
          float dot = hsum(acc);
          for (; e < hd; ++e) dot += q[e] * k[e];
          p[s] = dot * scale;
          mx = std::max(mx, p[s]);
        }
        const __m256 vmx = _mm256_set1_ps(mx);
        map8(p.data() + lo, last + 1 - lo, [&](__m256 v) { return exp8(_mm256_sub_ps(v, vmx)); });
        float sum = 0.0f;
        for (int64_t s = lo; s <= last; ++s) sum += p[s];
        std::fill(out.begin(), out.end(), 0.0f);
        for (int64_t s = lo; s <= last; ++s) {
          const float* v = Vh + s * hd;
          const __m256 w = _mm256_set1_ps(p[s]);
          int64_t e = 0;
          for (; e + 8 <= hd; e += 8)
            _mm256_storeu_ps(out.data() + e, _mm256_fmadd_ps(w, _mm256_loadu_ps(v + e), _mm256_loadu_ps(out.data() + e)));
          for (; e < hd; ++e) out[e] += p[s] * v[e];
        }
        const float inv = 1.0f / sum;
        for (int64_t e = 0; e < hd; ++e) att[t * nh * hd + j * hd + e] = out[e] * inv;
      }
    });
  }

  torch::Tensor embed_, norm_;
  std::vector<Layer> layers_;
  Linear head_;
  int64_t nh_, nkv_, hd_, h_ = 0;
  double eps_, scale_;
  int64_t window_;
};

// a matmul through the fused step's kernels (tests and bench/decode_kernels.py): x [M, K] float32 @ W.T
torch::Tensor fused_linear(const torch::Tensor& x, const std::vector<c10::optional<torch::Tensor>>& lin) {
  const Linear L = make_linear(lin, "linear");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous() && x.size(1) == L.K,
              "x must be a contiguous float32 matrix [M, K]");
  auto y = torch::empty({x.size(0), L.N}, torch::kFloat32);
  Acts acts;
  linear(L, x.data_ptr<float>(), x.size(0), y.data_ptr<float>(), acts);
  return y;
}

void register_fused(pybind11::module& m) {
  pybind11::class_<FusedStep>(m, "FusedStep")
      .def(pybind11::init<torch::Tensor, const std::vector<std::vector<c10::optional<torch::Tensor>>>&,
                          const std::vector<bool>&, torch::Tensor, const std::vector<c10::optional<torch::Tensor>>&,
                          int64_t, int64_t, int64_t, double, double, int64_t>())
      .def("step", &FusedStep::step, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("step_rows", &FusedStep::step_rows, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("fused_linear", &fused_linear, "x [M, K] @ (weight, q, d, m, bias).T with the fused step's kernels");
}
