// Causal attention of a prefill chunk over its context (keys cached before it, if any, and its own),
// float32, grouped-query heads. torch's scaled_dot_product_attention (flash path) ran at 44-50
// GFLOP/s on 2 cores here, a quarter of what the GEMM reaches; this kernel works as the packed GEMM
// does: a 6-row tile of one head's queries is multiplied against 16-key panels of transposed keys
// (6 x 16 scores in 12 registers), 64 keys at a time, with an online softmax (running max and sum
// per row, vLLM/FlashAttention's rescaling) and a 6 x 16 register tile for probabilities x values.
#include <torch/extension.h>

#include "fast_exp.h"
#include "thread_pool.h"
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KVLOOM_PREFILL_ATTENTION 1
#endif

namespace {

#ifdef KVLOOM_PREFILL_ATTENTION
constexpr int64_t kQ = 6;      // query rows per tile
constexpr int64_t kP = 16;     // keys per panel
constexpr int64_t kKeys = 64;  // keys per softmax step: 4 panels
constexpr int64_t kMaxHead = 256;

inline float hmax8(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_shuffle_ps(x, x, 1)));
}

inline float hsum8(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_shuffle_ps(x, x, 1)));
}

// c[m][0..16) (+)= sum_i a[i * AK + m * AM] * b[i * bstride][0..16) for the 6 rows of a tile, over kc
// steps, in 12 registers (c rows ldc apart, 32-byte aligned). Scores: a the packed queries [d][6] and b
// a key panel [d][16] (aligned); values: a the probabilities [6][64] and b value rows at their stride.
template <int64_t AK, int64_t AM, bool kAccumulate>
inline void tile6x16(const float* __restrict a, const float* __restrict b, int64_t bstride, int64_t kc,
                     float* __restrict c, int64_t ldc) {
  __m256 lo[kQ], hi[kQ];
#pragma GCC unroll 6
  for (int m = 0; m < kQ; ++m) {
    lo[m] = kAccumulate ? _mm256_load_ps(c + m * ldc) : _mm256_setzero_ps();
    hi[m] = kAccumulate ? _mm256_load_ps(c + m * ldc + 8) : _mm256_setzero_ps();
  }
#pragma GCC unroll 2
  for (int64_t i = 0; i < kc; ++i) {
    const __m256 b0 = _mm256_loadu_ps(b + i * bstride), b1 = _mm256_loadu_ps(b + i * bstride + 8);
#pragma GCC unroll 6
    for (int m = 0; m < kQ; ++m) {
      const __m256 av = _mm256_broadcast_ss(a + i * AK + m * AM);
      lo[m] = _mm256_fmadd_ps(av, b0, lo[m]);
      hi[m] = _mm256_fmadd_ps(av, b1, hi[m]);
    }
  }
#pragma GCC unroll 6
  for (int m = 0; m < kQ; ++m) {
    _mm256_store_ps(c + m * ldc, lo[m]);
    _mm256_store_ps(c + m * ldc + 8, hi[m]);
  }
}

// One tile: query rows [r0, r0 + rows) of head h (rows <= 6), at positions offset + r0.., against keys
// [0, offset + r0 + rows), causal. kp: this head's key panels [ceil(keys / 16)][d][16]; v: its first
// value row.
void attend_tile(const float* q, int64_t qstride, const float* kp, const float* v, int64_t vstride, float* out,
                 int64_t ostride, int64_t r0, int64_t rows, int64_t offset, int64_t d, float scale) {
  alignas(32) float a[kMaxHead * kQ];
  alignas(32) float s[kQ * kKeys];
  alignas(32) float o[kQ * kMaxHead];
  float row_max[kQ], row_sum[kQ];
  for (int64_t i = 0; i < d; ++i)
    for (int64_t m = 0; m < kQ; ++m) a[i * kQ + m] = m < rows ? q[(r0 + m) * qstride + i] * scale : 0.f;
  std::fill(o, o + kQ * d, 0.f);
  for (int64_t m = 0; m < kQ; ++m) row_max[m] = -std::numeric_limits<float>::infinity(), row_sum[m] = 0.f;
  const int64_t n = offset + r0 + rows;  // keys any row of the tile sees
  for (int64_t j0 = 0; j0 < n; j0 += kKeys) {
    const int64_t nk = std::min(kKeys, n - j0);
    for (int64_t jj = 0; jj < nk; jj += kP) tile6x16<kQ, 1, false>(a, kp + (j0 + jj) * d, kP, d, s + jj, kKeys);
    const int64_t lanes = (nk + 7) / 8 * 8;
    for (int64_t m = 0; m < kQ; ++m) {
      float* sm = s + m * kKeys;
      // Row r0 + m sees keys j <= offset + r0 + m (padding rows, m >= rows, see every key of the tile).
      const int64_t limit = std::min(nk, m < rows ? offset + r0 + m + 1 - j0 : nk);
      __m256 mx = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
      const __m256 lim = _mm256_set1_ps(static_cast<float>(limit));
      __m256 idx = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
      for (int64_t jj = 0; jj < lanes; jj += 8) {
        const __m256 keep = _mm256_cmp_ps(idx, lim, _CMP_LT_OQ);
        const __m256 sv = _mm256_blendv_ps(_mm256_set1_ps(-std::numeric_limits<float>::infinity()),
                                           _mm256_load_ps(sm + jj), keep);
        _mm256_store_ps(sm + jj, sv);
        mx = _mm256_max_ps(mx, sv);
        idx = _mm256_add_ps(idx, _mm256_set1_ps(8.f));
      }
      const float new_max = std::max(row_max[m], hmax8(mx));  // finite: key j0 <= r0 + m is always seen
      const float alpha = row_max[m] == -std::numeric_limits<float>::infinity()
                              ? 0.f
                              : kvloom::fast_exp(row_max[m] - new_max);
      row_max[m] = new_max;
      const __m256 nm = _mm256_set1_ps(new_max);
      __m256 sum = _mm256_setzero_ps();
      for (int64_t jj = 0; jj < lanes; jj += 8) {
        const __m256 sv = _mm256_load_ps(sm + jj);
        // Masked scores (-inf) give exactly 0, not fast_exp's clamped minimum.
        const __m256 pv = _mm256_and_ps(kvloom::fast_exp8(_mm256_sub_ps(sv, nm)),
                                        _mm256_cmp_ps(sv, _mm256_set1_ps(-std::numeric_limits<float>::infinity()),
                                                      _CMP_NEQ_OQ));
        _mm256_store_ps(sm + jj, pv);
        sum = _mm256_add_ps(sum, pv);
      }
      row_sum[m] = row_sum[m] * alpha + hsum8(sum);
      if (alpha != 1.f) {
        const __m256 al = _mm256_set1_ps(alpha);
        for (int64_t c = 0; c < d; c += 8) _mm256_store_ps(o + m * d + c, _mm256_mul_ps(al, _mm256_load_ps(o + m * d + c)));
      }
    }
    for (int64_t c = 0; c < d; c += 16) tile6x16<1, kKeys, true>(s, v + j0 * vstride + c, vstride, nk, o + c, d);
  }
  for (int64_t m = 0; m < rows; ++m) {
    const float inv = 1.f / row_sum[m];
    float* dst = out + (r0 + m) * ostride;
    for (int64_t c = 0; c < d; ++c) dst[c] = o[m * d + c] * inv;
  }
}
#endif

}  // namespace

bool prefill_attention_supported(int64_t head_size) {
#ifdef KVLOOM_PREFILL_ATTENTION
  return head_size > 0 && head_size % 16 == 0 && head_size <= kMaxHead;
#else
  return false;
#endif
}

// out[Lq, H, D] = causal softmax(q k^T * scale) v for q [Lq, H, D] at positions Lk - Lq .. Lk - 1 and
// k, v [Lk, kvH, D] at positions 0 .. Lk - 1 (Lk >= Lq; H a multiple of kvH; each of a [L, heads, D]
// view's rows may be any stride apart, heads and numbers contiguous).
void prefill_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor out, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
                  out.scalar_type() == at::kFloat,
              "float32 only");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && out.dim() == 3, "q, k, v, out: [L, heads, D]");
  const int64_t len = q.size(0), keys = k.size(0), heads = q.size(1), d = q.size(2), kv_heads = k.size(1);
  TORCH_CHECK(prefill_attention_supported(d), "head size must be a multiple of 16, at most 256");
  TORCH_CHECK(k.sizes() == v.sizes() && keys >= len && k.size(2) == d && out.sizes() == q.sizes(),
              "shapes of q, k, v, out do not match (k and v may be longer than q: its cached context)");
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "query heads must be a multiple of key/value heads");
  for (const auto& t : {q, k, v, out})
    TORCH_CHECK(t.stride(2) == 1 && t.stride(1) == d, "each row's heads and numbers must be contiguous");
#ifdef KVLOOM_PREFILL_ATTENTION
  if (len == 0) return;
  const int64_t panels = (keys + kP - 1) / kP, group = heads / kv_heads;
  const int64_t qs = q.stride(0), ks = k.stride(0), vs = v.stride(0), os = out.stride(0);
  const float* qp = q.data_ptr<float>();
  const float* kptr = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // Keys transposed once into 16-key panels per key/value head: [kvH][panels][d][16], zero past Lk.
  std::unique_ptr<float[], decltype(&std::free)> kpack(
      static_cast<float*>(std::aligned_alloc(64, kv_heads * panels * d * kP * sizeof(float))), &std::free);
  TORCH_CHECK(kpack != nullptr, "out of memory");
  float* kpp = kpack.get();
  kvloom::parallel_for(0, kv_heads * panels, 4, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item / panels, p = item % panels;
      float* dst = kpp + item * d * kP;
      for (int64_t i = 0; i < d; ++i)
        for (int64_t j = 0; j < kP; ++j) {
          const int64_t key = p * kP + j;
          dst[i * kP + j] = key < keys ? kptr[key * ks + g * d + i] : 0.f;
        }
    }
  });
  // Work items pair the longest tile left with the shortest (causal tiles grow with their row), so
  // any contiguous range of items, as threads take them, holds about the same arithmetic.
  const int64_t tiles = (len + kQ - 1) / kQ, items = tiles * heads;
  kvloom::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item % heads, rank = item / heads;
      const int64_t t = rank % 2 == 0 ? tiles - 1 - rank / 2 : rank / 2;
      const int64_t g = h / group, r0 = t * kQ;
      attend_tile(qp + h * d, qs, kpp + g * panels * d * kP, vp + g * d, vs, op + h * d, os, r0,
                  std::min(kQ, len - r0), keys - len, d, static_cast<float>(scale));
    }
  });
#endif
}
