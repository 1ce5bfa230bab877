// Block-quantised matmuls for CPU decoding: llama.cpp's weight layouts (q8_0, q4_1), activations quantised per block.
//
// Weights come in blocks of 32 inputs per output row:
//   q8: int8 q [N, K] and one float16 scale d [N, K/32]:           w = d * q            (q in -127..127)
//   q4: uint8 nibbles [N, K/2] (byte j of a block holds elements j and j+16, low / high nibble), float16 scale d and
//       minimum m [N, K/32]:                                         w = d * q + m        (q in 0..15)
// The activation rows x [M, K] (float32) are quantised at the start of the call, per block of 32, to integers in
// -A..A: A = 32767 (int16) against q8 weights, A = 127 (int8, as llama.cpp) against q4 weights (int8 activations
// with int8 weights gave SmolLM2 +0.59 % perplexity, over issue 21's 0.5 %; int4 weights have a 1 % budget):
//   xd = max|x| / A, xq = round(x * (1 / xd)) (round half to even), xs = xd * sum(xq) (what the q4 minimum
//   multiplies).
// Each output is a float sum over blocks of (integer dot product of the block) * (weight scale * activation scale):
//   q8: y[m, n] = sum_b wd[n, b] * xd[m, b] * <wq[n, b], xq[m, b]>
//   q4: y[m, n] = sum_b wd[n, b] * xd[m, b] * <q[n, b], xq[m, b]> + wm[n, b] * xs[m, b]
// The integer dot products are exact (AVX2 madd_epi16 on weights widened to int16), so the only difference to the
// pure-PyTorch reference (lmforge.serve.kernels) is the order of float additions.  Every output row is computed the
// same way whatever M is (batch-invariant).  Threads: at::parallel_for over output rows, 4 rows per pass.
// These kernels take the row-major layouts; the runner stores weights whose row count is a multiple of 8 in the
// row-interleaved layouts of fused_step.cpp (faster), and multiplies them there.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "qkernels.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

using lmq::QK;
using lmq::hsum;
using lmq::quantize_row;
using lmq::dot_s16;

inline __m256i unpack_nibbles(const uint8_t* p) {
  const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i hi = _mm_srli_epi16(lo, 4);
  return _mm256_and_si256(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(0x0f));
}

struct Acts {
  std::vector<int16_t> q;
  std::vector<float> d, s;
};

Acts quantize_acts(const float* x, int64_t M, int64_t K, float qmax) {
  const int64_t B = K / QK;
  Acts a{std::vector<int16_t>(M * K), std::vector<float>(M * B), std::vector<float>(M * B)};
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      quantize_row(x + m * K, K, a.q.data() + m * K, a.d.data() + m * B, a.s.data() + m * B, qmax);
  });
  return a;
}

void check_inputs(const torch::Tensor& x, int64_t K, const torch::Tensor& d, int64_t N) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(),
              "x must be a contiguous float32 CPU matrix [M, K]");
  TORCH_CHECK(x.size(1) == K && K % QK == 0, "x has ", x.size(1), " columns, the weights ", K, " (a multiple of 32)");
  TORCH_CHECK(d.scalar_type() == torch::kFloat16 && d.is_contiguous() && d.size(0) == N && d.size(1) == K / QK,
              "scales must be contiguous float16 [N, K/32]");
}

// rows per parallel task: a few hundred KB of weights each, so small matrices do not pay for waking threads
constexpr int64_t GRAIN = 64;

template <int R>
inline void q8_rows(const int8_t* W, const at::Half* D, int64_t n, int64_t K, const Acts& a, int64_t M, int64_t N,
                    float* Y) {
  const int64_t B = K / QK;
  for (int64_t m = 0; m < M; ++m) {
    const int16_t* xq = a.q.data() + m * K;
    const float* xd = a.d.data() + m * B;
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < B; ++b) {
      for (int r = 0; r < R; ++r) {
        const int8_t* w = W + (n + r) * K + b * QK;
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16)));
        const float d = _cvtsh_ss(D[(n + r) * B + b].x) * xd[b];
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(dot_s16(w0, w1, xq + b * QK)), acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) Y[m * N + n + r] = hsum(acc[r]);
  }
}

template <int R>
inline void q4_rows(const uint8_t* W, const at::Half* D, const at::Half* Mn, int64_t n, int64_t K, const Acts& a,
                    int64_t M, int64_t N, float* Y) {
  const int64_t B = K / QK;
  for (int64_t m = 0; m < M; ++m) {
    const int16_t* xq = a.q.data() + m * K;
    const float* xd = a.d.data() + m * B;
    const float* xs = a.s.data() + m * B;
    __m256 acc[R];
    float mins[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps(), mins[r] = 0.0f;
    for (int64_t b = 0; b < B; ++b) {
      for (int r = 0; r < R; ++r) {
        const __m128i p = _mm_loadu_si128(reinterpret_cast<const __m128i*>(W + (n + r) * (K / 2) + b * (QK / 2)));
        const __m128i low4 = _mm_set1_epi8(0x0f);
        const __m256i w0 = _mm256_cvtepu8_epi16(_mm_and_si128(p, low4));
        const __m256i w1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(p, 4), low4));
        const float d = _cvtsh_ss(D[(n + r) * B + b].x) * xd[b];
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(dot_s16(w0, w1, xq + b * QK)), acc[r]);
        mins[r] += _cvtsh_ss(Mn[(n + r) * B + b].x) * xs[b];
      }
    }
    for (int r = 0; r < R; ++r) Y[m * N + n + r] = hsum(acc[r]) + mins[r];
  }
}

template <typename Rows>
torch::Tensor run_rows(const torch::Tensor& x, int64_t N, int64_t K, float qmax, Rows rows) {
  const int64_t M = x.size(0);
  const Acts a = quantize_acts(x.data_ptr<float>(), M, K, qmax);
  auto y = torch::empty({M, N}, torch::kFloat32);
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, (N + 3) / 4, GRAIN / 4, [&](int64_t t0, int64_t t1) {
    for (int64_t n = 4 * t0; n < std::min(N, 4 * t1); n += 4) {
      if (n + 4 <= N) rows(std::integral_constant<int, 4>{}, n, a, M, Y);
      else for (int64_t r = n; r < N; ++r) rows(std::integral_constant<int, 1>{}, r, a, M, Y);
    }
  });
  return y;
}

}  // namespace

std::vector<torch::Tensor> quantize_activations(const torch::Tensor& x, int64_t qmax) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous() && x.size(1) % QK == 0,
              "x must be a contiguous float32 matrix [M, K] with K a multiple of 32");
  TORCH_CHECK(qmax == 127 || qmax == 32767, "qmax: 127 or 32767");
  const int64_t M = x.size(0), K = x.size(1), B = K / QK;
  auto q = torch::empty({M, K}, torch::kInt16);
  auto d = torch::empty({M, B}, torch::kFloat32), s = torch::empty({M, B}, torch::kFloat32);
  for (int64_t m = 0; m < M; ++m)
    quantize_row(x.data_ptr<float>() + m * K, K, q.data_ptr<int16_t>() + m * K, d.data_ptr<float>() + m * B,
                 s.data_ptr<float>() + m * B, static_cast<float>(qmax));
  return {q, d, s};
}

torch::Tensor q8_matmul(const torch::Tensor& x, const torch::Tensor& wq, const torch::Tensor& wd) {
  TORCH_CHECK(wq.scalar_type() == torch::kInt8 && wq.dim() == 2 && wq.is_contiguous(), "q8 weights: int8 [N, K]");
  const int64_t N = wq.size(0), K = wq.size(1);
  check_inputs(x, K, wd, N);
  const int8_t* W = wq.data_ptr<int8_t>();
  const at::Half* D = wd.data_ptr<at::Half>();
  return run_rows(x, N, K, lmq::QMAX_Q8, [&](auto R, int64_t n, const Acts& a, int64_t M, float* Y) {
    q8_rows<decltype(R)::value>(W, D, n, K, a, M, N, Y);
  });
}

torch::Tensor q4_matmul(const torch::Tensor& x, const torch::Tensor& wq, const torch::Tensor& wd,
                        const torch::Tensor& wm) {
  TORCH_CHECK(wq.scalar_type() == torch::kUInt8 && wq.dim() == 2 && wq.is_contiguous(), "q4 weights: uint8 [N, K/2]");
  const int64_t N = wq.size(0), K = 2 * wq.size(1);
  check_inputs(x, K, wd, N);
  check_inputs(x, K, wm, N);
  const uint8_t* W = wq.data_ptr<uint8_t>();
  const at::Half* D = wd.data_ptr<at::Half>();
  const at::Half* Mn = wm.data_ptr<at::Half>();
  return run_rows(x, N, K, lmq::QMAX_Q4, [&](auto R, int64_t n, const Acts& a, int64_t M, float* Y) {
    q4_rows<decltype(R)::value>(W, D, Mn, n, K, a, M, N, Y);
  });
}

// float32 weights [N, K] (what a matmul of many rows, a prefill, multiplies by with a dense float32 kernel instead)
torch::Tensor dequantize(const torch::Tensor& wq, const torch::Tensor& wd, const c10::optional<torch::Tensor>& wm) {
  const bool q4 = wm.has_value();
  const int64_t N = wq.size(0), K = q4 ? 2 * wq.size(1) : wq.size(1), B = K / QK;
  TORCH_CHECK(wq.is_contiguous() && wq.scalar_type() == (q4 ? torch::kUInt8 : torch::kInt8), "bad weights");
  check_inputs(torch::empty({0, K}, torch::kFloat32), K, wd, N);
  if (q4) check_inputs(torch::empty({0, K}, torch::kFloat32), K, *wm, N);
  auto w = torch::empty({N, K}, torch::kFloat32);
  float* out = w.data_ptr<float>();
  const at::Half* D = wd.data_ptr<at::Half>();
  const at::Half* Mn = q4 ? wm->data_ptr<at::Half>() : nullptr;
  at::parallel_for(0, N * B, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {  // block i = row i / B, block i % B
      const __m256 d = _mm256_set1_ps(_cvtsh_ss(D[i].x));
      const __m256 mn = _mm256_set1_ps(q4 ? _cvtsh_ss(Mn[i].x) : 0.0f);
      alignas(32) int8_t q[QK];
      if (q4) {
        const __m256i v = unpack_nibbles(wq.data_ptr<uint8_t>() + i * (QK / 2));
        _mm256_store_si256(reinterpret_cast<__m256i*>(q), v);
      } else {
        std::copy(wq.data_ptr<int8_t>() + i * QK, wq.data_ptr<int8_t>() + (i + 1) * QK, q);
      }
      for (int j = 0; j < QK; j += 8) {
        const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j))));
        _mm256_storeu_ps(out + i * QK + j, _mm256_fmadd_ps(f, d, mn));
      }
    }
  });
  return w;
}

void register_fused(pybind11::module& m);  // fused_step.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize_activations", &quantize_activations,
        "x [M, K] float32 -> (int16 [M, K] in -qmax..qmax, scales, scaled sums [M, K/32])", py::arg("x"),
        py::arg("qmax") = 32767);
  m.def("q8_matmul", &q8_matmul, "x [M, K] float32 @ q8 weights [N, K] -> [M, N] float32");
  m.def("q4_matmul", &q4_matmul, "x [M, K] float32 @ q4 weights [N, K/2] -> [M, N] float32");
  m.def("dequantize", &dequantize, "q8 (q, d, None) or q4 (packed, d, m) weights -> float32 [N, K]",
        py::arg("q"), py::arg("d"), py::arg("m") = py::none());
  register_fused(m);
}
