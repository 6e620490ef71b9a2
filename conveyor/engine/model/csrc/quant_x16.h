// The x16 kernels (weights repacked 16 rows at a time, activations quantized to 8 bits per block of
// 32), written once over an instruction set's vector type V (quant_x16_avx512vnni.cpp,
// quant_x16_avx2.cpp define V and include this after their target pragma; internal linkage).
//
// One 64-byte chunk of the layout holds 4 consecutive weights of each of 16 rows (row r in bytes
// 4r..4r+3), so V::dot with 4 activation bytes broadcast adds those 4 products into row r's int32
// lane: no horizontal sums, no per-weight conversion to float. Per block of 32 (16 weights for Q6_K's
// scales) the 16 rows' sums are converted once and scaled by the rows' weight scales times the
// block's activation scale. A type's integer offset (q - 8, q - 16, q - 32) starts the sum at -offset x
// (the sum of those activation integers), so the weights stay unsigned, as the dot products want.
//
// The layout, per group of 16 rows (quant_x16_pack.cpp writes it; as many bytes as 16 rows of the
// file's blocks, Q4_K 2.8 % more), per block of 32 columns:
//   Q4_0, Q5_0, Q8_0: 16 x fp16 d; Q5_0: 8 x 64-bit masks, mask 4h + c bit 4r + j = the 5th bit of
//     row r's weight 16h + 4c + j; Q4_0 / Q5_0: 4 chunks, chunk c byte 4r + j = row r's byte 4c + j of
//     the file (low nibble weight 4c + j, high nibble 16 + 4c + j); Q8_0: 8 chunks, chunk c byte
//     4r + j = row r's weight 4c + j plus 128.
// per super-block of 256 columns (activation blocks 2i and 2i + 1 form pair i; chunk c of pair i
// holds weights 4c..4c+3 of block 2i in its low nibbles and of block 2i + 1 in its high ones):
//   Q4_K: 16 x fp16 d, 16 x fp16 dmin, 8 x 16 6-bit scales, 8 x 16 6-bit minima, 32 chunks;
//   Q6_K: 16 x fp16 d, 16 x 16 int8 scales (one per 16 weights), 32 chunks of the low 4 bits, 16
//     chunks of the high 2 bits (chunk 4i + c / 2, from bit 4 (c & 1): low then high chunk c).
#pragma once
#include <cstdint>
#include <cstring>

#include "quant.h"

namespace conveyor {
namespace {

constexpr int kRows = 16;

struct Acts {         // quantized activation rows: q [M, K] int8; per 16 values the sum of q; per 32 the scale
  const int8_t* q;
  const int32_t* s16;
  const float* dx;
  int64_t K, nb;      // nb: blocks of 32 per row
};

inline int32_t sum32(const Acts& a, int m, int64_t b) { return a.s16[m * 2 * a.nb + 2 * b] + a.s16[m * 2 * a.nb + 2 * b + 1]; }

// 32-element types, one block b of every row of the group into acc.
template <class V, int T, int G>
inline void block32(const uint8_t* p, const Acts& a, int64_t b, typename V::I* acc) {
  using I = typename V::I;
  if constexpr (T == kQ8_0) {
    for (int c = 0; c < 8; ++c) {
      const I v = V::load(p + 32 + 64 * c);
      for (int m = 0; m < G; ++m) acc[m] = V::dot8(acc[m], v, a.q + m * a.K + 32 * b + 4 * c);
    }
    return;
  }
  const uint8_t* quants = p + 32 + (T == kQ5_0 ? 64 : 0);
  for (int c = 0; c < 4; ++c) {
    const I v = V::load(quants + 64 * c);
    I lo = V::low4(v), hi = V::high4(v);
    if constexpr (T == kQ5_0) {
      lo = V::add16_where(lo, p + 32 + 8 * c);
      hi = V::add16_where(hi, p + 32 + 8 * (4 + c));
    }
    for (int m = 0; m < G; ++m) {
      const int8_t* x = a.q + m * a.K + 32 * b + 4 * c;
      acc[m] = V::dot(acc[m], lo, x);
      acc[m] = V::dot(acc[m], hi, x + 16);
    }
  }
}

template <class V, int T, int G>
void group32(const Acts& a, const uint8_t* w, typename V::F* facc) {
  const int64_t S = x16_group_bytes(T);
  const int off = T == kQ8_0 ? V::kOffset8 : T == kQ5_0 ? 16 : 8;
  for (int64_t b = 0; b < a.nb; ++b) {
    const uint8_t* p = w + b * S;
    for (int64_t l = 0; l < S; l += 64) _mm_prefetch(reinterpret_cast<const char*>(p + 8 * S + l), _MM_HINT_T0);
    const typename V::F ws = V::fp16x16(p);
    typename V::I acc[G];
    for (int m = 0; m < G; ++m) acc[m] = V::set1(-off * sum32(a, m, b));
    block32<V, T, G>(p, a, b, acc);
    for (int m = 0; m < G; ++m) facc[m] = V::fma(V::cvt(acc[m]), V::mul(ws, V::set1f(a.dx[m * a.nb + b])), facc[m]);
  }
}

template <class V, int G>
void q4k_super(const uint8_t* p, const Acts& a, int64_t sb, typename V::F* facc) {
  using I = typename V::I;
  using F = typename V::F;
  const F d = V::fp16x16(p), dmin = V::fp16x16(p + 32);
  for (int i = 0; i < 4; ++i) {
    I lo[G], hi[G];
    for (int m = 0; m < G; ++m) lo[m] = hi[m] = V::set1(0);
    for (int c = 0; c < 8; ++c) {
      const I v = V::load(p + 320 + 64 * (8 * i + c));
      const I wl = V::low4(v), wh = V::high4(v);
      for (int m = 0; m < G; ++m) {
        const int8_t* x = a.q + m * a.K + 256 * sb + 64 * i + 4 * c;
        lo[m] = V::dot(lo[m], wl, x);
        hi[m] = V::dot(hi[m], wh, x + 32);
      }
    }
    for (int h = 0; h < 2; ++h) {
      const int j = 2 * i + h;
      const F sc = V::mul(d, V::u8x16(p + 64 + 16 * j)), mn = V::mul(dmin, V::u8x16(p + 192 + 16 * j));
      for (int m = 0; m < G; ++m) {
        const int64_t b = 8 * sb + j;
        const float dx = a.dx[m * a.nb + b];
        facc[m] = V::fma(V::cvt(h ? hi[m] : lo[m]), V::mul(sc, V::set1f(dx)), facc[m]);
        facc[m] = V::fnma(mn, V::set1f(dx * static_cast<float>(sum32(a, m, b))), facc[m]);
      }
    }
  }
}

template <class V, int G>
void q6k_super(const uint8_t* p, const Acts& a, int64_t sb, typename V::F* facc) {
  using I = typename V::I;
  using F = typename V::F;
  const F d = V::fp16x16(p);
  for (int i = 0; i < 4; ++i) {
    for (int half = 0; half < 2; ++half) {   // weights 0-15 and 16-31 of both blocks: one scale each
      I lo[G], hi[G];
      for (int m = 0; m < G; ++m) {
        const int32_t* s16 = a.s16 + m * 2 * a.nb + 16 * sb + 4 * i + half;
        lo[m] = V::set1(-32 * s16[0]);
        hi[m] = V::set1(-32 * s16[2]);
      }
      for (int c = 4 * half; c < 4 * half + 4; ++c) {
        const I v = V::load(p + 288 + 64 * (8 * i + c));
        const I h = V::load(p + 2336 + 64 * (4 * i + c / 2));
        const I wl = V::with_high2(V::low4(v), h, 4 * (c & 1)), wh = V::with_high2(V::high4(v), h, 4 * (c & 1) + 2);
        for (int m = 0; m < G; ++m) {
          const int8_t* x = a.q + m * a.K + 256 * sb + 64 * i + 4 * c;
          lo[m] = V::dot(lo[m], wl, x);
          hi[m] = V::dot(hi[m], wh, x + 32);
        }
      }
      const F sl = V::mul(d, V::s8x16(p + 32 + 16 * (4 * i + half)));
      const F sh = V::mul(d, V::s8x16(p + 32 + 16 * (4 * i + 2 + half)));
      for (int m = 0; m < G; ++m) {
        const float dxl = a.dx[m * a.nb + 8 * sb + 2 * i], dxh = a.dx[m * a.nb + 8 * sb + 2 * i + 1];
        facc[m] = V::fma(V::cvt(lo[m]), V::mul(sl, V::set1f(dxl)), facc[m]);
        facc[m] = V::fma(V::cvt(hi[m]), V::mul(sh, V::set1f(dxh)), facc[m]);
      }
    }
  }
}

// out[m, n..n+15] for activation rows 0..G-1 of `a`, over the group at w (all of its columns).
template <class V, int T, int G>
void group(const Acts& a, const uint8_t* w, float* out, int64_t N) {
  typename V::F facc[G];
  for (int m = 0; m < G; ++m) facc[m] = V::set1f(0.0f);
  if constexpr (T == kQ4_K || T == kQ6_K) {
    const int64_t S = x16_group_bytes(T);
    for (int64_t sb = 0; sb < a.nb / 8; ++sb) {
      const uint8_t* p = w + sb * S;
      for (int64_t l = 0; l < S; l += 64) _mm_prefetch(reinterpret_cast<const char*>(p + 2 * S + l), _MM_HINT_T0);
      if constexpr (T == kQ4_K) q4k_super<V, G>(p, a, sb, facc);
      else q6k_super<V, G>(p, a, sb, facc);
    }
  } else {
    group32<V, T, G>(a, w, facc);
  }
  for (int m = 0; m < G; ++m) V::store(out + m * N, facc[m]);
}

// group<V, T, n> for a run-time n in 1..G
template <class V, int T, int G = V::kGroup>
void group_of(int n, const Acts& a, const uint8_t* w, float* out, int64_t N) {
  if constexpr (G > 1) {
    if (n < G) return group_of<V, T, G - 1>(n, a, w, out, N);
  }
  group<V, T, G>(a, w, out, N);
}

template <class V, int T>
void groups(const Acts& a, const uint8_t* w, float* out, int64_t M, int64_t N, int64_t g0, int64_t g1) {
  const int64_t S = x16_group_bytes(T) / (T == kQ4_K || T == kQ6_K ? 8 : 1);   // per 32 columns
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* wg = w + g * a.nb * S;
    for (int64_t m = 0; m < M; m += V::kGroup) {
      const Acts am{a.q + m * a.K, a.s16 + m * 2 * a.nb, a.dx + m * a.nb, a.K, a.nb};
      float* o = out + m * N + g * kRows;
      group_of<V, T>(static_cast<int>(M - m < V::kGroup ? M - m : V::kGroup), am, wg, o, N);
    }
  }
}

template <class V>
void qgroups(int qtype, const int8_t* q, const int32_t* s16, const float* dx, const uint8_t* w, float* out, int64_t M,
             int64_t K, int64_t N, int64_t g0, int64_t g1) {
  const Acts a{q, s16, dx, K, K / 32};
  switch (qtype) {
    case kQ4_0: return groups<V, kQ4_0>(a, w, out, M, N, g0, g1);
    case kQ5_0: return groups<V, kQ5_0>(a, w, out, M, N, g0, g1);
    case kQ8_0: return groups<V, kQ8_0>(a, w, out, M, N, g0, g1);
    case kQ4_K: return groups<V, kQ4_K>(a, w, out, M, N, g0, g1);
    case kQ6_K: return groups<V, kQ6_K>(a, w, out, M, N, g0, g1);
    default: return;
  }
}

}  // namespace
}  // namespace conveyor
