// Float32 linear layers: y[M, N] = x[M, K] @ w[N, K]^T (+ bias), for decode batches and prefill chunks.
//
// With few rows (M <= kDotRows) a linear layer is a stream over its weight matrix; BLAS sgemm,
// tuned for large products, reaches about half of the memory bandwidth there. That path reads
// each weight row once per call: threads split the output features into blocks of 4 weight rows;
// each block computes every row of x against those 4 weight rows (they stay in L1 while x's rows
// stream past), with 8-wide FMA accumulators over K.
//
// With more rows the product is compute-bound and the dot-product form's horizontal sums and
// loads cap it near half the FMA peak. There the kernel works as BLIS does: 16 weight rows at a
// time are transposed into a panel [K slice][16] that stays in L1, and a 6 x 16 register tile
// (12 accumulators) runs outer products over it, one broadcast row element and two panel loads
// per 12 FMAs. BLAS (MKL) packs the same way but per call at every size; measured on a 2-core
// Zen 3, 16-128 rows reach 65-80 GFLOP/s a core here against MKL's 45-70.
//
// The engine's own weights skip the per-call transposition: `pack_linear_weight` lays a weight out
// once, at load, as panels [N / 16][K][16] (the layout the register tile reads), and
// `linear_packed` multiplies by it at any row count, with a few-rows path that streams each panel
// once for all rows of x. Measured (2-core Zen 3, SmolLM2-135M shapes): 16 rows 67-88 -> 93-104
// GFLOP/s, 64 rows 111-129 -> 128-141, one row 9-12 -> 11-16 except down (K = 1536: 16.1 -> 13.5).
// Panels may also hold bfloat16 weights (half the bytes to stream; the engine's CPU bfloat16 mode):
// each row of 16 widens to float32 in registers, so x, the accumulation and y stay float32.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "thread_pool.h"
#include <algorithm>
#include <memory>
#include <type_traits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KVLOOM_AVX2 1
#endif

namespace {

constexpr int64_t kRows = 4;     // weight rows per block of the few-rows path
constexpr int64_t kDotRows = 4;  // up to this many rows of x: the few-rows path

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

#ifdef KVLOOM_AVX2
constexpr int64_t kPanel = 16;     // weight rows per packed panel: two 8-wide registers
constexpr int64_t kTileRows = 6;   // x rows per register tile: 6 x 16 outputs in 12 accumulators
constexpr int64_t kDepth = 256;    // longest K slice per panel: 16 x 256 floats = 16 KB, half of L1

// One row of a panel (16 weights) as two 8-wide float registers: outputs 0-7 and 8-15.
inline void load_panel_row(const float* b, __m256& lo, __m256& hi) {
  lo = _mm256_load_ps(b);
  hi = _mm256_load_ps(b + 8);
}

// bfloat16 panels (float32's upper 16 bits) store a row's 16 weights in the order 0-3, 8-11, 4-7,
// 12-15 (kvloom.kernels.pack_linear_weight lays them out so), so that interleaving each 128-bit
// lane's words with zeros yields outputs 0-7 and then 8-15 as floats: one load and two unpacks per
// row, no cross-lane shuffle.
inline void load_panel_row(const uint16_t* b, __m256& lo, __m256& hi) {
  const __m256i raw = _mm256_load_si256(reinterpret_cast<const __m256i*>(b));
  const __m256i zero = _mm256_setzero_si256();
  lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, raw));
  hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, raw));
}

// Transposes rows [0, valid) of w (row stride k), columns [k0, k0 + kc), into bp[kc][16]; rows
// past `valid` are zero.
inline void pack_panel(const float* w, int64_t k, int64_t valid, int64_t k0, int64_t kc, float* bp) {
  int64_t i = 0;
  if (valid == kPanel) {
    for (; i + 8 <= kc; i += 8)
      for (int64_t h = 0; h < 2; ++h) {
        __m256 r[8];
        for (int j = 0; j < 8; ++j) r[j] = _mm256_loadu_ps(w + (h * 8 + j) * k + k0 + i);
        const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
        const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
        const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
        const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
        const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
        const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
        const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
        const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
        float* out = bp + i * kPanel + h * 8;
        _mm256_store_ps(out + 0 * kPanel, _mm256_permute2f128_ps(s0, s4, 0x20));
        _mm256_store_ps(out + 1 * kPanel, _mm256_permute2f128_ps(s1, s5, 0x20));
        _mm256_store_ps(out + 2 * kPanel, _mm256_permute2f128_ps(s2, s6, 0x20));
        _mm256_store_ps(out + 3 * kPanel, _mm256_permute2f128_ps(s3, s7, 0x20));
        _mm256_store_ps(out + 4 * kPanel, _mm256_permute2f128_ps(s0, s4, 0x31));
        _mm256_store_ps(out + 5 * kPanel, _mm256_permute2f128_ps(s1, s5, 0x31));
        _mm256_store_ps(out + 6 * kPanel, _mm256_permute2f128_ps(s2, s6, 0x31));
        _mm256_store_ps(out + 7 * kPanel, _mm256_permute2f128_ps(s3, s7, 0x31));
      }
  }
  for (; i < kc; ++i)
    for (int64_t r = 0; r < kPanel; ++r) bp[i * kPanel + r] = r < valid ? w[r * k + k0 + i] : 0.f;
}

// A bfloat16 panel slice [kc][16] as float32 rows in natural order (bp, 32-byte aligned).
inline void widen_panel_slice(const uint16_t* panel, int64_t kc, float* bp) {
  for (int64_t i = 0; i < kc; ++i) {
    __m256 lo, hi;
    load_panel_row(panel + i * kPanel, lo, hi);
    _mm256_store_ps(bp + i * kPanel, lo);
    _mm256_store_ps(bp + i * kPanel + 8, hi);
  }
}

// From this many 6-row tiles per block on, a bfloat16 slice is widened once into L1 (two unpacks
// and two stores a row) instead of in each tile's loop.
constexpr int64_t kWidenTiles = 4;

// Copies rows [0, valid) of x (row stride k), columns [k0, k0 + kc), into ap[kc][6] (rows past
// `valid` zero), so the register tile broadcasts from one sequential stream.
inline void pack_tile_rows(const float* x, int64_t k, int64_t valid, int64_t k0, int64_t kc, float* ap) {
  for (int64_t i = 0; i < kc; ++i)
    for (int64_t m = 0; m < kTileRows; ++m) ap[i * kTileRows + m] = m < valid ? x[m * k + k0 + i] : 0.f;
}

// c[MR][16] (row stride ldc) = (accumulate ? c : 0) + a[kc][6] (first MR of each 6) @ bp[kc][16].
// The unroll pragmas make GCC unroll before scalar replacement, so the accumulators live in
// registers (without them it stored all twelve to the stack every step: half the speed).
// With `prefetch` set, each step also requests the cache line of the next panel slice's row there
// (a float32 row is one 64-byte line; two bfloat16 rows share one, requested twice).
template <int MR, typename W>
inline void panel_tile(const float* __restrict a, const W* __restrict bp, int64_t kc, float* __restrict c,
                       int64_t ldc, bool accumulate, const W* prefetch) {
  __m256 lo[MR], hi[MR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    lo[m] = accumulate ? _mm256_loadu_ps(c + m * ldc) : _mm256_setzero_ps();
    hi[m] = accumulate ? _mm256_loadu_ps(c + m * ldc + 8) : _mm256_setzero_ps();
  }
#pragma GCC unroll 2
  for (int64_t i = 0; i < kc; ++i) {
    if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(prefetch + i * kPanel), _MM_HINT_T0);
    __m256 b0, b1;
    load_panel_row(bp + i * kPanel, b0, b1);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m256 av = _mm256_broadcast_ss(a + i * kTileRows + m);
      lo[m] = _mm256_fmadd_ps(av, b0, lo[m]);
      hi[m] = _mm256_fmadd_ps(av, b1, hi[m]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    _mm256_storeu_ps(c + m * ldc, lo[m]);
    _mm256_storeu_ps(c + m * ldc + 8, hi[m]);
  }
}

template <int MR, typename W>
inline void panel_tile_into(const float* a, const W* bp, int64_t kc, float* y, int64_t ldy, int64_t valid,
                            bool accumulate, const W* prefetch) {
  if (valid == kPanel) return panel_tile<MR>(a, bp, kc, y, ldy, accumulate, prefetch);
  // The last panel of a layer whose width is not a multiple of 16: through a scratch tile.
  alignas(32) float tmp[MR * kPanel];
  for (int m = 0; m < MR; ++m)
    for (int64_t r = 0; r < kPanel; ++r) tmp[m * kPanel + r] = accumulate && r < valid ? y[m * ldy + r] : 0.f;
  panel_tile<MR>(a, bp, kc, tmp, kPanel, accumulate, prefetch);
  for (int m = 0; m < MR; ++m)
    for (int64_t r = 0; r < valid; ++r) y[m * ldy + r] = tmp[m * kPanel + r];
}

template <typename W>
inline void any_tile_into(int64_t mr, const float* a, const W* bp, int64_t kc, float* y, int64_t ldy,
                          int64_t valid, bool accumulate, const W* prefetch) {
  switch (mr) {
    case 1: return panel_tile_into<1, W>(a, bp, kc, y, ldy, valid, accumulate, prefetch);
    case 2: return panel_tile_into<2, W>(a, bp, kc, y, ldy, valid, accumulate, prefetch);
    case 3: return panel_tile_into<3, W>(a, bp, kc, y, ldy, valid, accumulate, prefetch);
    case 4: return panel_tile_into<4, W>(a, bp, kc, y, ldy, valid, accumulate, prefetch);
    case 5: return panel_tile_into<5, W>(a, bp, kc, y, ldy, valid, accumulate, prefetch);
    default: return panel_tile_into<6, W>(a, bp, kc, y, ldy, valid, accumulate, prefetch);
  }
}

// y = x @ w^T through packed panels. x is first packed per K slice and 6-row tile (ap holds slice
// after slice; slice k0 of tile t starts at ap + k0 * tiles * 6 + t * 6 * kc). Threads split the
// weight panels; each walks x in blocks of kBlockRows rows that stay in L2, and for every block
// packs each of its panels' K slices into L1 (or, prepacked, reads them in place) and runs the
// block's tiles over it.
constexpr int64_t kBlockRows = 48 * kTileRows;  // 288 rows: an x slice of 295 KB stays in L2

// wp: the weight [N, K] row-major, or with `prepacked` its panels [N / 16][K][16] (pack_linear_weight;
// bfloat16 panels, W = uint16_t, are always prepacked).
template <typename W>
inline void packed_linear(const float* xp, const W* wp, float* yp, int64_t rows, int64_t k, int64_t n,
                          bool prepacked) {
  if (k == 0) {  // an empty sum (and no K slices to cut)
    std::fill(yp, yp + rows * n, 0.f);
    return;
  }
  const int64_t tiles = (rows + kTileRows - 1) / kTileRows;
  // K in slices of equal depth (a multiple of 8, at most kDepth): K = 576 runs as 3 x 192 rather
  // than 256 + 256 + 64, whose short last slice paid a tile's accumulator load and store for a
  // quarter of the arithmetic.
  const int64_t slices = (k + kDepth - 1) / kDepth;
  const int64_t depth = std::min(kDepth, ((k + slices - 1) / slices + 7) / 8 * 8);
  // Every element is written by the packing below: no zero-fill first.
  std::unique_ptr<float[]> packed(new float[tiles * kTileRows * k]);
  float* ap = packed.get();
  kvloom::parallel_for(0, tiles, std::max<int64_t>(1, 4096 / k), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t k0 = 0; k0 < k; k0 += depth) {
        const int64_t kc = std::min(depth, k - k0);
        pack_tile_rows(xp + t * kTileRows * k, k, std::min(kTileRows, rows - t * kTileRows), k0, kc,
                       ap + k0 * tiles * kTileRows + t * kTileRows * kc);
      }
  });
  const int64_t panels = (n + kPanel - 1) / kPanel;
  const W* weights_end = wp + panels * kPanel * k;
  // Enough panels per task for ~2 MFLOP of work.
  const int64_t grain = std::max<int64_t>(1, (1 << 20) / std::max<int64_t>(rows * k * kPanel, 1));
  kvloom::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
    alignas(64) static thread_local float bp[kDepth * kPanel];  // a transposed or widened panel slice
    for (int64_t m0 = 0; m0 < rows; m0 += kBlockRows) {
      const int64_t t0 = m0 / kTileRows, t1 = std::min(tiles, (m0 + kBlockRows) / kTileRows);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t n0 = p * kPanel, valid = std::min(kPanel, n - n0);
        for (int64_t k0 = 0; k0 < k; k0 += depth) {
          const int64_t kc = std::min(depth, k - k0);
          // Panel p starts at p * 16 * K in either layout; its K slice k0 at + k0 * 16 when prepacked.
          const W* panel = wp + n0 * k + k0 * kPanel;
          if constexpr (std::is_same_v<W, float>) {
            if (!prepacked) {
              pack_panel(wp + n0 * k, k, valid, k0, kc, bp);
              panel = bp;
            }
          } else if (t1 - t0 >= kWidenTiles) {
            // Many tiles share this slice: widen it to float32 in L1 once rather than in every tile.
            widen_panel_slice(panel, kc, bp);
            const float* slice = ap + k0 * tiles * kTileRows;
            for (int64_t t = t0; t < t1; ++t)
              any_tile_into<float>(std::min(kTileRows, rows - t * kTileRows), slice + t * kTileRows * kc, bp, kc,
                                   yp + t * kTileRows * n + n0, n, valid, k0 > 0, nullptr);
            continue;
          }
          // Prepacked, the weights are one stream (slice after slice, panel after panel): the block's
          // first tile requests the next kc rows of it while it runs. At 16 rows, where the tiles
          // are too few to hide the stream's latency, this measured +2-30% in two A/B runs (64 rows: -4..+4%).
          const W* next = prepacked && panel + 2 * kc * kPanel <= weights_end ? panel + kc * kPanel : nullptr;
          const float* slice = ap + k0 * tiles * kTileRows;
          for (int64_t t = t0; t < t1; ++t)
            any_tile_into(std::min(kTileRows, rows - t * kTileRows), slice + t * kTileRows * kc, panel, kc,
                          yp + t * kTileRows * n + n0, n, valid, k0 > 0, t == t0 ? next : nullptr);
        }
      }
    }
  });
}

// y[m, 0..valid) = x[m] @ panel for MR <= kDotRows rows of x against one panel [K][16]: the panel
// streams once for all rows; two K steps per iteration keep four accumulators a row in flight.
template <int MR, typename W>
inline void few_rows_panel(const float* __restrict x, const W* __restrict bp, int64_t k, float* __restrict y,
                           int64_t ldy, int64_t valid) {
  __m256 lo[MR], hi[MR], lo2[MR], hi2[MR];
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m) lo[m] = hi[m] = lo2[m] = hi2[m] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 2 <= k; i += 2) {
    __m256 b0, b1, b2, b3;
    load_panel_row(bp + i * kPanel, b0, b1);
    load_panel_row(bp + (i + 1) * kPanel, b2, b3);
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      const __m256 a0 = _mm256_broadcast_ss(x + m * k + i), a1 = _mm256_broadcast_ss(x + m * k + i + 1);
      lo[m] = _mm256_fmadd_ps(a0, b0, lo[m]);
      hi[m] = _mm256_fmadd_ps(a0, b1, hi[m]);
      lo2[m] = _mm256_fmadd_ps(a1, b2, lo2[m]);
      hi2[m] = _mm256_fmadd_ps(a1, b3, hi2[m]);
    }
  }
  if (i < k) {
    __m256 b0, b1;
    load_panel_row(bp + i * kPanel, b0, b1);
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      const __m256 a0 = _mm256_broadcast_ss(x + m * k + i);
      lo[m] = _mm256_fmadd_ps(a0, b0, lo[m]);
      hi[m] = _mm256_fmadd_ps(a0, b1, hi[m]);
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m) {
    alignas(32) float out[kPanel];
    _mm256_store_ps(out, _mm256_add_ps(lo[m], lo2[m]));
    _mm256_store_ps(out + 8, _mm256_add_ps(hi[m], hi2[m]));
    for (int64_t r = 0; r < valid; ++r) y[m * ldy + r] = out[r];
  }
}

template <typename W>
inline void few_rows_packed(const float* xp, const W* wp, float* yp, int64_t rows, int64_t k, int64_t n) {
  const int64_t panels = (n + kPanel - 1) / kPanel;
  // Enough panels per task that a task streams at least ~64 KB of weights.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(k * kPanel * int64_t(sizeof(W)), 1));
  kvloom::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t valid = std::min(kPanel, n - p * kPanel);
      const W* bp = wp + p * kPanel * k;
      float* y = yp + p * kPanel;
      switch (rows) {
        case 1: few_rows_panel<1, W>(xp, bp, k, y, n, valid); break;
        case 2: few_rows_panel<2, W>(xp, bp, k, y, n, valid); break;
        case 3: few_rows_panel<3, W>(xp, bp, k, y, n, valid); break;
        default: few_rows_panel<4, W>(xp, bp, k, y, n, valid); break;
      }
    }
  });
}
#endif

#if defined(KVLOOM_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define KVLOOM_BF16_DOT 1
// bfloat16 panels on CPUs with AVX512_BF16 (`vdpbf16ps`: 32 bfloat16 products summed pairwise into
// 16 float32 lanes, twice the FLOP rate of float32 FMA; measured 2-core Zen 4, register-bound loops:
// 455 against 228 GFLOP/s). Both operands must be bfloat16, so the rows of x are rounded to bfloat16
// (nearest even) as they are read, as bfloat16 GEMMs on AMX or oneDNN do; products are exact and the
// sums float32. The panels hold K in pairs: [N / 16][K / 2][16][2], one 64-byte row a pair
// (kvloom.kernels.pack_linear_weight lays them out so for even K; an odd K keeps the widening layout).
constexpr int64_t kDotTileRows = 12;    // rows of x per register tile
constexpr int64_t kDotPanels = 2;       // panels per tile: 12 x 32 outputs in 24 accumulators
constexpr int64_t kDotDepth = 128;      // longest K slice in pairs: two panels' slice is 16 KB, half of L1
constexpr int64_t kDotBlockRows = 24 * kDotTileRows;  // rows of x per block (an x slice of 147 KB stays in L2)

// x [rows, k] float32 -> out [rows, k2] bfloat16 pairs (k2 = ceil(k / 2); an odd k's last high half 0).
inline void to_bf16_pairs(const float* x, int64_t rows, int64_t k, int64_t k2, uint32_t* out) {
  kvloom::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = x + r * k;
      uint16_t* o = reinterpret_cast<uint16_t*>(out + r * k2);
      for (int64_t i = 0; i < 2 * k2; i += 32) {
        const int64_t left = k - i;
        const __mmask16 lo = left >= 16 ? 0xFFFF : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
        const __mmask16 hi = left >= 32 ? 0xFFFF : left > 16 ? (__mmask16)((1u << (left - 16)) - 1) : 0;
        const __m512 a = _mm512_maskz_loadu_ps(lo, xr + i), b = _mm512_maskz_loadu_ps(hi, xr + i + 16);
        const __m512i packed = (__m512i)_mm512_cvtne2ps_pbh(b, a);  // a's 16 in the low half
        const int64_t store = std::min<int64_t>(32, 2 * k2 - i);
        _mm512_mask_storeu_epi16(o + i, store >= 32 ? ~__mmask32(0) : (__mmask32)((1u << store) - 1), packed);
      }
    }
  });
}

// c[m, 16 p + j] (m < MR, p < NP, j in mask[p]; row stride ldc) = (accumulate ? c : 0)
//   + sum over pairs i < kc of a[m * lda + i] . panel p's pair row i (panel p at bp + p * pstride).
// Under 4 rows the pairs alternate between two sets of accumulators, so that enough independent
// sums are in flight to cover vdpbf16ps's latency.
template <int MR, int NP>
inline void dot_tile(const uint32_t* __restrict a, int64_t lda, const uint16_t* __restrict bp, int64_t pstride,
                     int64_t kc, float* __restrict c, int64_t ldc, const __mmask16* mask, bool accumulate) {
  constexpr int S = MR < 4 ? 2 : 1;
  __m512 acc[S][MR][NP];
#pragma GCC unroll 12
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 2
    for (int p = 0; p < NP; ++p) {
      acc[0][m][p] = accumulate ? _mm512_maskz_loadu_ps(mask[p], c + m * ldc + p * 16) : _mm512_setzero_ps();
      if constexpr (S == 2) acc[S - 1][m][p] = _mm512_setzero_ps();
    }
  auto step = [&](int s, int64_t i) __attribute__((always_inline)) {
    __m512bh b[NP];
#pragma GCC unroll 2
    for (int p = 0; p < NP; ++p) b[p] = (__m512bh)_mm512_loadu_si512(bp + p * pstride + i * 32);
#pragma GCC unroll 12
    for (int m = 0; m < MR; ++m) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[m * lda + i]));
#pragma GCC unroll 2
      for (int p = 0; p < NP; ++p) acc[s][m][p] = _mm512_dpbf16_ps(acc[s][m][p], av, b[p]);
    }
  };
  int64_t i = 0;
#pragma GCC unroll 2
  for (; i + S <= kc; i += S)
#pragma GCC unroll 2
    for (int s = 0; s < S; ++s) step(s, i + s);
  if (i < kc) step(0, i);
#pragma GCC unroll 12
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 2
    for (int p = 0; p < NP; ++p) {
      if constexpr (S == 2) acc[0][m][p] = _mm512_add_ps(acc[0][m][p], acc[S - 1][m][p]);
      _mm512_mask_storeu_ps(c + m * ldc + p * 16, mask[p], acc[0][m][p]);
    }
}

template <int NP>
inline void any_dot_tile(int64_t mr, const uint32_t* a, int64_t lda, const uint16_t* bp, int64_t pstride, int64_t kc,
                         float* c, int64_t ldc, const __mmask16* mask, bool accumulate) {
  switch (mr) {
#define KVLOOM_DOT_CASE(R) \
  case R: return dot_tile<R, NP>(a, lda, bp, pstride, kc, c, ldc, mask, accumulate);
    KVLOOM_DOT_CASE(1) KVLOOM_DOT_CASE(2) KVLOOM_DOT_CASE(3) KVLOOM_DOT_CASE(4) KVLOOM_DOT_CASE(5)
    KVLOOM_DOT_CASE(6) KVLOOM_DOT_CASE(7) KVLOOM_DOT_CASE(8) KVLOOM_DOT_CASE(9) KVLOOM_DOT_CASE(10)
    KVLOOM_DOT_CASE(11)
#undef KVLOOM_DOT_CASE
    default: return dot_tile<kDotTileRows, NP>(a, lda, bp, pstride, kc, c, ldc, mask, accumulate);
  }
}

// y [rows, n] = x [rows, k] @ w^T over pair panels wp: x rounded to bfloat16 pairs once, then threads
// split the panels two by two; each walks x in blocks of kDotBlockRows rows, and per K slice runs the
// block's 12-row tiles against the two panels' slice, read in place.
inline void dot_linear(const float* xp, const uint16_t* wp, float* yp, int64_t rows, int64_t k, int64_t n) {
  if (k == 0) {  // an empty sum (and no K slices to cut)
    std::fill(yp, yp + rows * n, 0.f);
    return;
  }
  const int64_t k2 = (k + 1) / 2;
  std::unique_ptr<uint32_t[]> xb(new uint32_t[rows * k2]);
  to_bf16_pairs(xp, rows, k, k2, xb.get());
  const int64_t slices = (k2 + kDotDepth - 1) / kDotDepth;
  const int64_t depth = (k2 + slices - 1) / slices;
  const int64_t panels = (n + kPanel - 1) / kPanel, pairs = (panels + kDotPanels - 1) / kDotPanels;
  const int64_t pstride = k2 * 2 * kPanel;  // one panel, in bfloat16 elements
  // Enough panel pairs per task for ~2 MFLOP of work, and (few rows) ~64 KB of weights to stream.
  const int64_t grain = std::max<int64_t>(
      {int64_t(1), (1 << 20) / std::max<int64_t>(rows * k * 2 * kPanel, 1), 65536 / std::max<int64_t>(k * 4 * kPanel, 1)});
  kvloom::parallel_for(0, pairs, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < rows; m0 += kDotBlockRows) {
      const int64_t m1 = std::min(rows, m0 + kDotBlockRows);
      for (int64_t q = begin; q < end; ++q) {
        const int64_t p0 = q * kDotPanels, np = std::min(kDotPanels, panels - p0);
        __mmask16 mask[kDotPanels];
        for (int64_t p = 0; p < kDotPanels; ++p) {
          const int64_t valid = std::clamp<int64_t>(n - (p0 + p) * kPanel, 0, kPanel);
          mask[p] = valid == kPanel ? __mmask16(0xFFFF) : __mmask16((1u << valid) - 1);
        }
        for (int64_t k0 = 0; k0 < k2; k0 += depth) {
          const int64_t kc = std::min(depth, k2 - k0);
          const uint16_t* bp = wp + p0 * pstride + k0 * 2 * kPanel;
          for (int64_t m = m0; m < m1; m += kDotTileRows) {
            const int64_t mr = std::min(kDotTileRows, m1 - m);
            const uint32_t* a = xb.get() + m * k2 + k0;
            float* c = yp + m * n + p0 * kPanel;
            if (np == 2)
              any_dot_tile<2>(mr, a, k2, bp, pstride, kc, c, n, mask, k0 > 0);
            else
              any_dot_tile<1>(mr, a, k2, bp, pstride, kc, c, n, mask, k0 > 0);
          }
        }
      }
    }
  });
}
#endif

}  // namespace

bool bf16_dot_available() {
#ifdef KVLOOM_BF16_DOT
  return true;
#else
  return false;
#endif
}

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
#ifdef KVLOOM_AVX2
  if (rows > kDotRows) {
    packed_linear<float>(xp, wp, yp, rows, k, n, false);
    if (bias.has_value()) y.add_(*bias);
    return y;
  }
#endif
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

bool packed_linear_available() {
#ifdef KVLOOM_AVX2
  return true;
#else
  return false;
#endif
}

torch::Tensor pack_linear_weight(torch::Tensor w) {
  TORCH_CHECK(packed_linear_available(), "packed linear weights need AVX2 and FMA");
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 2, "w must be float32 [N, K]");
  w = w.contiguous();
  const int64_t n = w.size(0), k = w.size(1);
  auto out = torch::empty({(n + 15) / 16, k, 16}, w.options());
#ifdef KVLOOM_AVX2
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  kvloom::parallel_for(0, out.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      for (int64_t k0 = 0; k0 < k; k0 += kDepth)
        pack_panel(wp + p * kPanel * k, k, std::min(kPanel, n - p * kPanel), k0, std::min(kDepth, k - k0),
                   op + p * kPanel * k + k0 * kPanel);
  });
#endif
  return out;
}

torch::Tensor linear_packed(torch::Tensor x, torch::Tensor packed, int64_t n, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(packed_linear_available(), "packed linear weights need AVX2 and FMA");
  const bool bf16 = packed.scalar_type() == at::kBFloat16;
  TORCH_CHECK(x.scalar_type() == at::kFloat && (packed.scalar_type() == at::kFloat || bf16),
              "x float32, packed float32 or bfloat16 only");
  // bfloat16 panels in pairs ([N / 16, K / 2, 32], even K) where the CPU has AVX512_BF16 (bf16_dot_available).
  const bool pairs = bf16 && packed.dim() == 3 && packed.size(2) == 32;
  TORCH_CHECK(!pairs || bf16_dot_available(), "bfloat16 pair panels need AVX512_BF16");
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 3 &&
                  (pairs ? 2 * packed.size(1) == x.size(1) : packed.size(2) == 16 && packed.size(1) == x.size(1)),
              "x [M, K], packed [N / 16, K, 16] (or bfloat16 pairs [N / 16, K / 2, 32])");
  TORCH_CHECK(packed.is_contiguous(), "packed must be contiguous");
  // The kernels read panel rows with aligned loads (pack_linear_weight's tensors start on 64 bytes).
  TORCH_CHECK(reinterpret_cast<uintptr_t>(packed.data_ptr()) % 32 == 0, "packed must start on a 32-byte boundary");
  TORCH_CHECK(n > (packed.size(0) - 1) * 16 && n <= packed.size(0) * 16, "n does not match the packed panels");
  x = x.contiguous();
  const int64_t rows = x.size(0), k = x.size(1);
  auto y = torch::empty({rows, n}, x.options());
#ifdef KVLOOM_AVX2
  auto run = [&](auto* wp) {
    if (rows > kDotRows)
      packed_linear(x.data_ptr<float>(), wp, y.data_ptr<float>(), rows, k, n, true);
    else if (rows > 0)
      few_rows_packed(x.data_ptr<float>(), wp, y.data_ptr<float>(), rows, k, n);
  };
#ifdef KVLOOM_BF16_DOT
  if (pairs) {
    if (rows > 0)
      dot_linear(x.data_ptr<float>(), reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>()),
                 y.data_ptr<float>(), rows, k, n);
  } else
#endif
  if (bf16)
    run(reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>()));
  else
    run(static_cast<const float*>(packed.data_ptr<float>()));
#endif
  if (bias.has_value()) y.add_(*bias);
  return y;
}
