// Float32 linear layer for few rows (decode batches): y[M, N] = x[M, K] @ w[N, K]^T (+ bias).
//
// With few rows a linear layer is a stream over its weight matrix; BLAS sgemm, tuned for large
// products, reaches about half of the memory bandwidth there. This kernel reads each weight row
// once per call: threads split the output features into blocks of 4 weight rows; each block
// computes every row of x against those 4 weight rows (they stay in L1 while x's rows stream past),
// with 8-wide FMA accumulators over K.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "thread_pool.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KVLOOM_AVX2 1
#endif

namespace {

constexpr int64_t kRows = 4;  // weight rows per block

#ifdef KVLOOM_AVX2
inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}
#endif

// Dot products of MB rows of x with R rows of w (R <= kRows), written to y[m, n0 + r].
template <int MB, int R>
inline void tile(const float* __restrict x, const float* __restrict w, float* __restrict y, int64_t k, int64_t n,
                 int64_t n0) {
  float out[MB][R];
  int64_t i = 0;
#ifdef KVLOOM_AVX2
  __m256 acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  for (; i + 8 <= k; i += 8) {
    __m256 xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_ps(x + m * k + i);
    for (int r = 0; r < R; ++r) {
      const __m256 wv = _mm256_loadu_ps(w + r * k + i);
      for (int m = 0; m < MB; ++m) acc[m][r] = _mm256_fmadd_ps(wv, xv[m], acc[m][r]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) out[m][r] = hsum(acc[m][r]);
#else
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) out[m][r] = 0.f;
#endif
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) {
      float s = out[m][r];
      const float* xr = x + m * k;
      const float* wr = w + r * k;
#pragma omp simd reduction(+ : s)
      for (int64_t j = i; j < k; ++j) s += xr[j] * wr[j];
      y[m * n + n0 + r] = s;
    }
}

template <int R>
inline void block(const float* x, const float* w, float* y, int64_t rows, int64_t k, int64_t n, int64_t n0) {
  int64_t m = 0;
  for (; m + 3 <= rows; m += 3) tile<3, R>(x + m * k, w, y + m * n, k, n, n0);
  if (rows - m == 2) tile<2, R>(x + m * k, w, y + m * n, k, n, n0);
  if (rows - m == 1) tile<1, R>(x + m * k, w, y + m * n, k, n, n0);
}

}  // namespace

torch::Tensor linear_small_m(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "float32 only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x [M, K], w [N, K]");
  x = x.contiguous();
  TORCH_CHECK(w.is_contiguous(), "w must be contiguous");
  const int64_t rows = x.size(0), k = x.size(1), n = w.size(0);
  auto y = torch::empty({rows, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t full = n / kRows;
  // Enough blocks per task that a task streams at least ~64 KB of weights.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(k * kRows, 1));
  kvloom::parallel_for(0, full, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) block<kRows>(xp, wp + b * kRows * k, yp, rows, k, n, b * kRows);
  });
  for (int64_t r = full * kRows; r < n; ++r) block<1>(xp, wp + r * k, yp, rows, k, n, r);
  if (bias.has_value()) y.add_(*bias);
  return y;
}
