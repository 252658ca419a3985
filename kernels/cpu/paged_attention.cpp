// Paged attention for one query token per row, reading keys and values straight from the block
// pool (no gather copy). Each row attends to the first seq_lens[row] tokens of its block table, or
// with a sliding window W > 0 to the last W of them; a soft cap c > 0 maps scores s to c*tanh(s/c).
// The cache holds float32 or bfloat16 (the CPU bfloat16 mode); queries, scores and outputs are float32.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "thread_pool.h"
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "fast_exp.h"
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#define KVLOOM_SIMD_ATTENTION 1
#endif

namespace {

// Blocks sit at random places in the cache, so the hardware prefetcher cannot run ahead across
// them; request the next block's bytes while the current one is being used.
template <typename T>
inline void prefetch_bytes(const T* p, int64_t count) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < count * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(c + off, 0, 1);
}

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }

template <typename T>
inline void axpy(float alpha, const T* __restrict x, float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * to_float(x[i]);
}


#if defined(__AVX2__)
// Eight cache numbers as float32 (bfloat16 is float32's upper half).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
#endif

#if defined(__AVX512F__)
// Scores of 16 tokens (one block, keys stored [head_size][16]) for G query heads: every FMA is
// vertical, with no horizontal reductions.
template <int G>
inline void block_scores_avx512(const float* q, const float* kblock, int64_t d, int64_t n, float scale,
                                float* s, int64_t s_stride) {
  __m512 acc[G];
  for (int g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
  for (int64_t i = 0; i < d; ++i) {
    const __m512 k = _mm512_loadu_ps(kblock + i * 16);
    for (int g = 0; g < G; ++g) acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(q[g * d + i]), k, acc[g]);
  }
  const __mmask16 mask = n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
  const __m512 sc = _mm512_set1_ps(scale);
  for (int g = 0; g < G; ++g) _mm512_mask_storeu_ps(s + g * s_stride, mask, _mm512_mul_ps(acc[g], sc));
}

// Weighted sum of values for one query head with head_size = 16 * NC, accumulator in registers.
template <int NC>
inline void weighted_values_avx512(const float* p, const float* vc, const int64_t* table, int64_t start,
                                   int64_t ctx, int64_t block_size, int64_t block_stride, float inv_sum,
                                   float* out) {
  __m512 o[NC];
  for (int c = 0; c < NC; ++c) o[c] = _mm512_setzero_ps();
  for (int64_t b = start / block_size, t = start; t < ctx; ++b) {
    const float* vp = vc + table[b] * block_stride + (t - b * block_size) * 16 * NC;
    const int64_t stop = std::min(ctx, (b + 1) * block_size);
    if (stop < ctx) prefetch_bytes(vc + table[b + 1] * block_stride, block_size * 16 * NC);
    for (; t < stop; ++t, vp += 16 * NC) {
      const __m512 w = _mm512_set1_ps(p[t]);
      for (int c = 0; c < NC; ++c) o[c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(vp + 16 * c), o[c]);
    }
  }
  const __m512 inv = _mm512_set1_ps(inv_sum);
  for (int c = 0; c < NC; ++c) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(o[c], inv));
}

inline bool block_scores_fast(int64_t group, const float* q, const float* kblock, int64_t d, int64_t n,
                              float scale, float* s, int64_t s_stride) {
  switch (group) {
    case 1: block_scores_avx512<1>(q, kblock, d, n, scale, s, s_stride); return true;
    case 2: block_scores_avx512<2>(q, kblock, d, n, scale, s, s_stride); return true;
    case 3: block_scores_avx512<3>(q, kblock, d, n, scale, s, s_stride); return true;
    case 4: block_scores_avx512<4>(q, kblock, d, n, scale, s, s_stride); return true;
    case 5: block_scores_avx512<5>(q, kblock, d, n, scale, s, s_stride); return true;
    case 6: block_scores_avx512<6>(q, kblock, d, n, scale, s, s_stride); return true;
    case 7: block_scores_avx512<7>(q, kblock, d, n, scale, s, s_stride); return true;
    case 8: block_scores_avx512<8>(q, kblock, d, n, scale, s, s_stride); return true;
    default: return false;
  }
}

inline bool weighted_values_fast(const float* p, const float* vc, const int64_t* table, int64_t start, int64_t ctx,
                                 int64_t block_size, int64_t block_stride, int64_t d, float inv_sum, float* out) {
  if (d == 64) weighted_values_avx512<4>(p, vc, table, start, ctx, block_size, block_stride, inv_sum, out);
  else if (d == 128) weighted_values_avx512<8>(p, vc, table, start, ctx, block_size, block_stride, inv_sum, out);
  else return false;
  return true;
}

#endif

#if defined(__AVX2__) && defined(__FMA__)
// AVX2 (e.g. AMD Zen 2/3): the same two loops with 8-wide registers. AVX-512 builds compile them too,
// for bfloat16 caches (the AVX-512 loops above read float32 only).

// Scores of 16 tokens for G query heads: a key dimension of the block is two 8-wide loads. The
// score buffer is padded to whole blocks, so full stores are safe (positions past ctx are never read).
template <int G, typename T>
inline void block_scores_avx2(const float* q, const T* kblock, int64_t d, float scale, float* s,
                              int64_t s_stride) {
  __m256 lo[G], hi[G];
  for (int g = 0; g < G; ++g) lo[g] = hi[g] = _mm256_setzero_ps();
  for (int64_t i = 0; i < d; ++i) {
    const __m256 k0 = load8(kblock + i * 16), k1 = load8(kblock + i * 16 + 8);
    for (int g = 0; g < G; ++g) {
      const __m256 qv = _mm256_broadcast_ss(q + g * d + i);
      lo[g] = _mm256_fmadd_ps(qv, k0, lo[g]);
      hi[g] = _mm256_fmadd_ps(qv, k1, hi[g]);
    }
  }
  const __m256 sc = _mm256_set1_ps(scale);
  for (int g = 0; g < G; ++g) {
    _mm256_storeu_ps(s + g * s_stride, _mm256_mul_ps(lo[g], sc));
    _mm256_storeu_ps(s + g * s_stride + 8, _mm256_mul_ps(hi[g], sc));
  }
}

template <typename T>
inline bool block_scores_fast_avx2(int64_t group, const float* q, const T* kblock, int64_t d, float scale, float* s,
                                   int64_t s_stride) {
  switch (group) {
    case 1: block_scores_avx2<1, T>(q, kblock, d, scale, s, s_stride); return true;
    case 2: block_scores_avx2<2, T>(q, kblock, d, scale, s, s_stride); return true;
    case 3: block_scores_avx2<3, T>(q, kblock, d, scale, s, s_stride); return true;
    case 4: block_scores_avx2<4, T>(q, kblock, d, scale, s, s_stride); return true;
    case 5: block_scores_avx2<5, T>(q, kblock, d, scale, s, s_stride); return true;
    case 6: block_scores_avx2<6, T>(q, kblock, d, scale, s, s_stride); return true;
    default: return false;
  }
}

// The weighted sums of G heads of a GQA group (G <= 3) in one pass over the values, 32 value
// dimensions at a time in G x 4 accumulators: each value row is loaded once per 32 dimensions instead
// of once per head. p holds head g's probabilities at p + g * p_stride; out rows are out_stride apart.
template <int G, typename T>
inline void group_values_avx2(const float* p, int64_t p_stride, const T* vc, const int64_t* table, int64_t start,
                              int64_t ctx, int64_t block_size, int64_t block_stride, int64_t d, const float* inv_sum,
                              float* out, int64_t out_stride) {
  for (int64_t c0 = 0; c0 < d; c0 += 32) {
    __m256 acc[G][4];
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g)
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) acc[g][c] = _mm256_setzero_ps();
    for (int64_t b = start / block_size, t = start; t < ctx; ++b) {
      const T* vp = vc + table[b] * block_stride + (t - b * block_size) * d + c0;
      const int64_t stop = std::min(ctx, (b + 1) * block_size);
      if (c0 == 0 && stop < ctx) prefetch_bytes(vc + table[b + 1] * block_stride, block_size * d);
      for (; t < stop; ++t, vp += d) {
        const __m256 v0 = load8(vp), v1 = load8(vp + 8);
        const __m256 v2 = load8(vp + 16), v3 = load8(vp + 24);
#pragma GCC unroll 4
        for (int g = 0; g < G; ++g) {
          const __m256 w = _mm256_broadcast_ss(p + g * p_stride + t);
          acc[g][0] = _mm256_fmadd_ps(w, v0, acc[g][0]);
          acc[g][1] = _mm256_fmadd_ps(w, v1, acc[g][1]);
          acc[g][2] = _mm256_fmadd_ps(w, v2, acc[g][2]);
          acc[g][3] = _mm256_fmadd_ps(w, v3, acc[g][3]);
        }
      }
    }
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) {
      const __m256 inv = _mm256_set1_ps(inv_sum[g]);
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) _mm256_storeu_ps(out + g * out_stride + c0 + 8 * c, _mm256_mul_ps(acc[g][c], inv));
    }
  }
}

// All heads of a group, three at a time (3 x 4 accumulators fit the 16 registers).
#define KVLOOM_GROUP_VALUES 1
template <typename T>
inline bool group_values_fast(int64_t group, const float* p, int64_t p_stride, const T* vc, const int64_t* table,
                              int64_t start, int64_t ctx, int64_t block_size, int64_t block_stride, int64_t d,
                              const float* inv_sum, float* out, int64_t out_stride) {
  if (d % 32 != 0) return false;
  for (int64_t g0 = 0; g0 < group; g0 += 3) {
    const float* pg = p + g0 * p_stride;
    float* og = out + g0 * out_stride;
    switch (std::min<int64_t>(3, group - g0)) {
      case 1:
        group_values_avx2<1, T>(pg, p_stride, vc, table, start, ctx, block_size, block_stride, d, inv_sum + g0, og,
                                out_stride);
        break;
      case 2:
        group_values_avx2<2, T>(pg, p_stride, vc, table, start, ctx, block_size, block_stride, d, inv_sum + g0, og,
                                out_stride);
        break;
      default:
        group_values_avx2<3, T>(pg, p_stride, vc, table, start, ctx, block_size, block_stride, d, inv_sum + g0, og,
                                out_stride);
    }
  }
  return true;
}
#endif

#if defined(KVLOOM_SIMD_ATTENTION)
// The scores of one block of 16 tokens through the widest loop that reads this cache type.
template <typename T>
inline bool block_scores_simd(int64_t group, const float* q, const T* kblock, int64_t d, int64_t n, float scale,
                              float* s, int64_t s_stride) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) return block_scores_fast(group, q, kblock, d, n, scale, s, s_stride);
#endif
#if defined(__AVX2__) && defined(__FMA__)
  return block_scores_fast_avx2(group, q, kblock, d, scale, s, s_stride);
#else
  (void)n;
  return false;
#endif
}
#endif

}  // namespace

namespace {

// Checks that k_cache and v_cache are both float32 or both bfloat16 and calls f with their typed
// data pointers (float* or at::BFloat16*).
template <typename F>
void with_cache_data(torch::Tensor& k_cache, torch::Tensor& v_cache, F&& f) {
  const auto type = k_cache.scalar_type();
  TORCH_CHECK((type == at::kFloat || type == at::kBFloat16) && v_cache.scalar_type() == type,
              "float32 or bfloat16 caches, both the same");
  if (type == at::kFloat)
    f(k_cache.data_ptr<float>(), v_cache.data_ptr<float>());
  else
    f(k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>());
}

// One query token per row over a float32 or bfloat16 (T) cache; see paged_attention_decode.
template <typename T>
void decode_rows(const float* q, int64_t qstride, const T* kc, const T* vc, const int64_t* tb, const int64_t* sl,
                 float* o, int64_t n, int64_t heads, int64_t kv_heads, int64_t d, int64_t max_blocks, int64_t block_size, float fscale,
                 int64_t sliding_window, float cap) {
  const int64_t group = heads / kv_heads;
  const int64_t block_stride = kv_heads * d * block_size;
  kvloom::parallel_for(0, n * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, inv;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / kv_heads, h = task % kv_heads;
      const int64_t ctx = sl[row];
      // Scores keep absolute token indices; blocks wholly before the window are skipped.
      const int64_t start = sliding_window > 0 ? std::max<int64_t>(0, ctx - sliding_window) : 0;
      const int64_t* table = tb + row * max_blocks;
      // Room for a whole last block so vector stores never run past the buffer.
      const int64_t padded = ((ctx + block_size - 1) / block_size) * block_size;
      scores.resize(group * padded);
      float* s = scores.data();
      const float* qg = q + row * qstride + h * group * d;
      for (int64_t b = start / block_size; b * block_size < ctx; ++b) {
        const T* kblock = kc + table[b] * block_stride + h * d * block_size;
        const int64_t valid = std::min(block_size, ctx - b * block_size);
        if ((b + 1) * block_size < ctx) {
          // Values are fetched during the score pass too, so the weighted sum finds them in cache.
          const int64_t next = table[b + 1] * block_stride + h * d * block_size;
          prefetch_bytes(kc + next, d * block_size);
          prefetch_bytes(vc + next, d * block_size);
        }
        bool done = false;
#if defined(KVLOOM_SIMD_ATTENTION)
        if (block_size == 16) done = block_scores_simd(group, qg, kblock, d, valid, fscale, s + b * 16, padded);
#endif
        if (!done) {
          for (int64_t g = 0; g < group; ++g)
            for (int64_t j = 0; j < valid; ++j) {
              float acc = 0.f;
              for (int64_t i = 0; i < d; ++i) acc += qg[g * d + i] * to_float(kblock[i * block_size + j]);
              s[g * padded + b * block_size + j] = acc * fscale;
            }
        }
      }
      inv.resize(group);
      for (int64_t g = 0; g < group; ++g) {
        float* sg = s + g * padded;
        if (cap > 0.f)
          for (int64_t t = start; t < ctx; ++t) sg[t] = cap * std::tanh(sg[t] / cap);
        float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
        for (int64_t t = start; t < ctx; ++t) mx = sg[t] > mx ? sg[t] : mx;
        float sum = 0.f;
        int64_t t = start;
#if defined(__AVX2__) && defined(__FMA__)
        __m256 sum8 = _mm256_setzero_ps();
        for (const __m256 mx8 = _mm256_set1_ps(mx); t + 8 <= ctx; t += 8) {
          const __m256 e = kvloom::fast_exp8(_mm256_sub_ps(_mm256_loadu_ps(sg + t), mx8));
          _mm256_storeu_ps(sg + t, e);
          sum8 = _mm256_add_ps(sum8, e);
        }
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, sum8);
        for (float lane : lanes) sum += lane;
#endif
        for (; t < ctx; ++t) {
          sg[t] = kvloom::fast_exp(sg[t] - mx);
          sum += sg[t];
        }
        inv[g] = 1.f / sum;
      }
      float* out_rows = o + (row * heads + h * group) * d;
      const T* vh = vc + h * block_size * d;
#if defined(KVLOOM_GROUP_VALUES)
#if defined(__AVX512F__)
      // AVX-512 builds: float32 caches take the per-head AVX-512 loop below.
      if constexpr (!std::is_same_v<T, float>)
#endif
      if (group_values_fast(group, s, padded, vh, table, start, ctx, block_size, block_stride, d, inv.data(), out_rows,
                            d))
        continue;
#endif
      for (int64_t g = 0; g < group; ++g) {
        const float* sg = s + g * padded;
        float* out_row = out_rows + g * d;
#if defined(__AVX512F__)
        if constexpr (std::is_same_v<T, float>)  // the AVX-512 loops read float32 caches only
          if (weighted_values_fast(sg, vh, table, start, ctx, block_size, block_stride, d, inv[g], out_row)) continue;
#endif
        for (int64_t i = 0; i < d; ++i) out_row[i] = 0.f;
        for (int64_t t = start; t < ctx; ++t) {
          const T* vp = vh + table[t / block_size] * block_stride + (t % block_size) * d;
          axpy(sg[t] * inv[g], vp, out_row, d);
        }
      }
    }
  });
}

}  // namespace

// query [N, H, D] (rows any stride apart, heads and numbers contiguous); k_cache [num_blocks, KVH, D, block_size] (keys of a block stored dimension-major so
// one vector load covers a dimension of every token of the block); v_cache [num_blocks, KVH, block_size, D].
torch::Tensor paged_attention_decode(torch::Tensor query, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor seq_lens, int64_t block_size,
                                     double scale, int64_t sliding_window, double soft_cap) {
  TORCH_CHECK(query.scalar_type() == at::kFloat, "float32 queries");
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1 && query.stride(1) == query.size(2),
              "each query row's heads and numbers must be contiguous");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous caches");
  const int64_t n = query.size(0), heads = query.size(1), d = query.size(2);
  const int64_t kv_heads = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == d && k_cache.size(3) == block_size, "k_cache must be [blocks, kv_heads, d, bs]");
  auto tables = block_tables.contiguous();
  auto lens = seq_lens.contiguous();
  auto out = torch::empty({n, heads, d}, query.options());
  with_cache_data(k_cache, v_cache, [&](const auto* kc, const auto* vc) {
    decode_rows(query.data_ptr<float>(), query.stride(0), kc, vc, tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(),
                out.data_ptr<float>(), n, heads, kv_heads, d, tables.size(1), block_size, static_cast<float>(scale),
                sliding_window, static_cast<float>(soft_cap));
  });
  return out;
}

// Stores each token's key and value ([T, kv_heads, head_size], float32, any strides) at its slot of
// the paged caches (float32, or bfloat16 rounded to nearest even): k_cache [blocks, kv_heads,
// head_size, block_size], v_cache [blocks, kv_heads, block_size, head_size]. (torch's
// advanced-indexing assignment into the transposed key layout took ~0.6 ms a layer for a 2048-token
// prefill chunk.)
void write_kv(torch::Tensor key, torch::Tensor value, torch::Tensor k_cache, torch::Tensor v_cache,
              torch::Tensor slot_mapping) {
  TORCH_CHECK(key.scalar_type() == at::kFloat && value.scalar_type() == at::kFloat, "float32 keys and values");
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes(), "key and value [T, kv_heads, head_size]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous caches");
  const int64_t t = key.size(0), heads = key.size(1), d = key.size(2);
  const int64_t blocks = k_cache.size(0), bs = k_cache.size(3);
  TORCH_CHECK(k_cache.size(1) == heads && k_cache.size(2) == d, "k_cache [blocks, kv_heads, head_size, block_size]");
  TORCH_CHECK(v_cache.size(0) == blocks && v_cache.size(1) == heads && v_cache.size(2) == bs && v_cache.size(3) == d,
              "v_cache [blocks, kv_heads, block_size, head_size]");
  auto slots = slot_mapping.to(at::kLong).contiguous();
  TORCH_CHECK(slots.numel() == t, "one slot per token");
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < t; ++i) TORCH_CHECK(sp[i] >= 0 && sp[i] < blocks * bs, "slot out of range: ", sp[i]);
  const float* kp = key.data_ptr<float>();
  const float* vp = value.data_ptr<float>();
  const int64_t ks0 = key.stride(0), ks1 = key.stride(1), ks2 = key.stride(2);
  const int64_t vs0 = value.stride(0), vs1 = value.stride(1), vs2 = value.stride(2);
  with_cache_data(k_cache, v_cache, [&](auto* kc, auto* vc) {
    using T = std::remove_pointer_t<decltype(kc)>;
    kvloom::parallel_for(0, t, 64, [&](int64_t begin, int64_t end) {
      for (int64_t tok = begin; tok < end; ++tok) {
        const int64_t block = sp[tok] / bs, offset = sp[tok] % bs;
        for (int64_t h = 0; h < heads; ++h) {
          const float* kr = kp + tok * ks0 + h * ks1;
          T* kd = kc + (block * heads + h) * d * bs + offset;
          for (int64_t j = 0; j < d; ++j) kd[j * bs] = static_cast<T>(kr[j * ks2]);
          const float* vr = vp + tok * vs0 + h * vs1;
          T* vd = vc + ((block * heads + h) * bs + offset) * d;
          for (int64_t j = 0; j < d; ++j) vd[j] = static_cast<T>(vr[j * vs2]);
        }
      }
    });
  });
}

torch::Tensor rms_norm(torch::Tensor x, c10::optional<torch::Tensor> residual, torch::Tensor weight, double eps);
void rotary_embedding(torch::Tensor positions, torch::Tensor q, torch::Tensor k, torch::Tensor cos,
                      torch::Tensor sin);
torch::Tensor silu_and_mul(torch::Tensor x);
torch::Tensor argmax_rows(torch::Tensor x);
torch::Tensor linear_small_m(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias);
bool packed_linear_available();
bool bf16_dot_available();
torch::Tensor pack_linear_weight(torch::Tensor w);
torch::Tensor linear_packed(torch::Tensor x, torch::Tensor packed, int64_t n, c10::optional<torch::Tensor> bias);
bool prefill_attention_supported(int64_t head_size);
void prefill_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor out, double scale);

// The kernels release the GIL while they run (as torch's own ops do): the server's threads and other
// engines keep going meanwhile.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention_decode", &paged_attention_decode, "paged attention, one query token per row",
        py::arg("query"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"), py::arg("seq_lens"),
        py::arg("block_size"), py::arg("scale"), py::arg("sliding_window") = 0, py::arg("soft_cap") = 0.0,
        py::call_guard<py::gil_scoped_release>());
  m.def("rms_norm", &rms_norm, "RMSNorm with optional in-place residual add",
        py::call_guard<py::gil_scoped_release>());
  m.def("rotary_embedding", &rotary_embedding, "in-place NeoX rotary embedding of q and k",
        py::call_guard<py::gil_scoped_release>());
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up", py::call_guard<py::gil_scoped_release>());
  m.def("argmax_rows", &argmax_rows, "torch.argmax(x, dim=-1) of float32 [rows, n]",
        py::call_guard<py::gil_scoped_release>());
  m.def("write_kv", &write_kv, "store keys and values at their slots of the paged caches",
        py::call_guard<py::gil_scoped_release>());
  m.def("linear_small_m", &linear_small_m,
        "float32 x @ w^T (+ bias): a weight stream for 1-4 rows, packed register tiles above",
        py::call_guard<py::gil_scoped_release>());
  m.def("packed_linear_available", &packed_linear_available, "whether this build has the packed linear kernels");
  m.def("bf16_dot_available", &bf16_dot_available,
        "whether bfloat16 panels run as AVX512_BF16 dot products (pair layout [N / 16, ceil(K / 2), 32])");
  m.def("pack_linear_weight", &pack_linear_weight, "float32 w [N, K] as the kernel's panels [N / 16, K, 16]",
        py::call_guard<py::gil_scoped_release>());
  m.def("linear_packed", &linear_packed,
        "float32 x @ w^T (+ bias) with w given as float32 or bfloat16 panels (kvloom.kernels.pack_linear_weight)",
        py::arg("x"), py::arg("packed"), py::arg("n"), py::arg("bias") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("prefill_attention_supported", &prefill_attention_supported,
        "whether prefill_attention serves this head size in this build");
  m.def("prefill_attention", &prefill_attention,
        "causal attention of a prompt over its own keys into out: q [L, H, D], k and v [L, kvH, D]",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("scale"),
        py::call_guard<py::gil_scoped_release>());
}
