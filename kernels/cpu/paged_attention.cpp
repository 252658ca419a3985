// Paged attention for one query token per row, reading keys and values straight from the block
// pool (no gather copy). Each row attends to the first seq_lens[row] tokens of its block table.
// Cache layout: [num_blocks * block_size, num_kv_heads, head_size], float32.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <limits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

inline void axpy(float alpha, const float* __restrict x, float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// exp(x) for x <= 0 (softmax after subtracting the max): Cody-Waite range reduction and a degree-6
// polynomial, accurate to a few ulp, written so the compiler vectorizes the loop calling it.
inline float fast_exp(float x) {
  x = x < -87.f ? -87.f : x;
  const float t = x * 1.44269504088896341f;
  const float fi = __builtin_floorf(t);
  const float f = x - fi * 0.693359375f + fi * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * f * f + f + 1.f;
  int32_t bits = (static_cast<int32_t>(fi) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

#if defined(__AVX512F__)
// Scores and weighted values for one query head with head_size = 16 * NC, keeping the query and
// the output accumulator in registers across the whole context.
template <int NC>
void attend_head_avx512(const float* q, const float* kc, const float* vc, const int64_t* table, int64_t ctx,
                        int64_t block_size, int64_t token_stride, float scale, float* s, float* out) {
  __m512 qv[NC];
  for (int c = 0; c < NC; ++c) qv[c] = _mm512_loadu_ps(q + 16 * c);
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < ctx; ++t) {
    const float* kp = kc + (table[t / block_size] * block_size + t % block_size) * token_stride;
    __m512 acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kp));
    for (int c = 1; c < NC; ++c) acc = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(kp + 16 * c), acc);
    const float v = _mm512_reduce_add_ps(acc) * scale;
    s[t] = v;
    mx = v > mx ? v : mx;
  }
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < ctx; ++t) {
    s[t] = fast_exp(s[t] - mx);
    sum += s[t];
  }
  __m512 o[NC];
  for (int c = 0; c < NC; ++c) o[c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < ctx; ++t) {
    const float* vp = vc + (table[t / block_size] * block_size + t % block_size) * token_stride;
    const __m512 p = _mm512_set1_ps(s[t]);
    for (int c = 0; c < NC; ++c) o[c] = _mm512_fmadd_ps(p, _mm512_loadu_ps(vp + 16 * c), o[c]);
  }
  const __m512 inv = _mm512_set1_ps(1.f / sum);
  for (int c = 0; c < NC; ++c) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(o[c], inv));
}
#endif

}  // namespace

torch::Tensor paged_attention_decode(torch::Tensor query,        // [N, H, D]
                                     torch::Tensor k_cache,      // [S, KVH, D]
                                     torch::Tensor v_cache,      // [S, KVH, D]
                                     torch::Tensor block_tables, // [N, max_blocks] int64
                                     torch::Tensor seq_lens,     // [N] int64
                                     int64_t block_size, double scale) {
  TORCH_CHECK(query.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat, "float32 only");
  TORCH_CHECK(query.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous inputs");
  const int64_t n = query.size(0), heads = query.size(1), d = query.size(2);
  const int64_t kv_heads = k_cache.size(1);
  const int64_t group = heads / kv_heads;
  auto tables = block_tables.contiguous();
  auto lens = seq_lens.contiguous();
  auto out = torch::empty_like(query);
  const float* q = query.data_ptr<float>();
  const float* kc = k_cache.data_ptr<float>();
  const float* vc = v_cache.data_ptr<float>();
  const int64_t* tb = tables.data_ptr<int64_t>();
  const int64_t* sl = lens.data_ptr<int64_t>();
  const int64_t max_blocks = tables.size(1);
  float* o = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, n * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / kv_heads, h = task % kv_heads;
      const int64_t ctx = sl[row];
      const int64_t* table = tb + row * max_blocks;
      scores.assign(group * ctx, 0.f);
      const float* qg = q + (row * heads + h * group) * d;
#if defined(__AVX512F__)
      if (d == 64 || d == 128) {
        for (int64_t g = 0; g < group; ++g) {
          const float* qh = qg + g * d;
          float* oh = o + (row * heads + h * group + g) * d;
          if (d == 64)
            attend_head_avx512<4>(qh, kc + h * d, vc + h * d, table, ctx, block_size, kv_heads * d, fscale,
                                  scores.data(), oh);
          else
            attend_head_avx512<8>(qh, kc + h * d, vc + h * d, table, ctx, block_size, kv_heads * d, fscale,
                                  scores.data(), oh);
        }
        continue;
      }
#endif
      for (int64_t t = 0; t < ctx; ++t) {
        const int64_t slot = table[t / block_size] * block_size + t % block_size;
        const float* kp = kc + (slot * kv_heads + h) * d;
        for (int64_t g = 0; g < group; ++g) scores[g * ctx + t] = dot(qg + g * d, kp, d) * fscale;
      }
      float* og = o + (row * heads + h * group) * d;
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * ctx;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < ctx; ++t) mx = s[t] > mx ? s[t] : mx;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < ctx; ++t) {
          s[t] = fast_exp(s[t] - mx);
          sum += s[t];
        }
        const float inv = 1.f / sum;
        float* out_row = og + g * d;
        for (int64_t i = 0; i < d; ++i) out_row[i] = 0.f;
        for (int64_t t = 0; t < ctx; ++t) {
          const int64_t slot = table[t / block_size] * block_size + t % block_size;
          axpy(s[t] * inv, vc + (slot * kv_heads + h) * d, out_row, d);
        }
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention_decode", &paged_attention_decode, "paged attention, one query token per row");
}
