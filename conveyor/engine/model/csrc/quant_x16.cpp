// AVX-512 VNNI over weights repacked 16 rows at a time ("x16"), activations quantized to 8 bits per
// block of 32 as llama.cpp's q8_0. One 64-byte register holds 4 consecutive weights of each of 16
// rows (row r in bytes 4r..4r+3), so one vpdpbusd with 4 activation bytes broadcast adds those 4
// products into row r's lane: no horizontal sums, no per-weight conversion to float. Per block of
// 32 the int32 sums of 16 rows are converted once and scaled by (16 weight scales) x (the block's
// activation scale). The integer offset of a type (q - 8, q - 16, u - 128) starts the block's sum
// at -offset x (sum of its 32 activation integers), so the weights stay unsigned as vpdpbusd wants.
//
// Repacked layout, per group of 16 rows, per block b of 32 columns (`kGroupBytes` bytes, the same
// as 16 blocks of the file, so nothing grows):
//   16 x fp16 scales d of the rows' block b;
//   Q5_0 only: 8 x 64-bit masks, mask h*4+c bit 4r+j = the 5th bit of row r's weight 16h + 4c + j;
//   Q4_0 / Q5_0: 4 chunks of 64 bytes, chunk c byte 4r+j = row r's byte 4c+j of the file (low
//     nibble weight 4c+j, high nibble weight 16+4c+j);
//   Q8_0: 8 chunks of 64 bytes, chunk c byte 4r+j = row r's int8 weight 4c+j, plus 128.
// The ISA code includes no torch header (see gemv.h).
#include <immintrin.h>

#include <cstring>

#pragma GCC target("avx512f,avx512bw,avx512vnni,avx2,fma,f16c")

#include "quant.h"

namespace conveyor {
namespace {

using I = __m512i;
using F = __m512;

constexpr int kRows = 16;

struct Acts {         // quantized activation rows: q [M, K] int8; per 16 values the sum of q; per 32 the scale
  const int8_t* q;
  const int32_t* s16;
  const float* dx;
  int64_t K, nb;      // nb: blocks of 32 per row
};

inline I bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}
inline int32_t sum32(const Acts& a, int m, int64_t b) { return a.s16[m * 2 * a.nb + 2 * b] + a.s16[m * 2 * a.nb + 2 * b + 1]; }
inline F scale8(const uint8_t* p, F d) {   // 16 unsigned bytes times d
  return _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
}
inline F scale8s(const uint8_t* p, F d) {  // 16 signed bytes times d
  return _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
}
inline F fp16x16(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

// 32-element types, one block b: 4-bit chunks c give weights 4c..4c+3 (low nibbles) and 16+4c.. (high).
template <int T, int G>
inline void block32(const uint8_t* p, const Acts& a, int64_t b, I* acc) {
  const I low4 = _mm512_set1_epi8(15), five = _mm512_set1_epi8(16);
  if constexpr (T == kQ8_0) {
    for (int c = 0; c < 8; ++c) {
      const I v = _mm512_loadu_si512(p + 32 + 64 * c);
      for (int m = 0; m < G; ++m) acc[m] = _mm512_dpbusd_epi32(acc[m], v, bcast4(a.q + m * a.K + 32 * b + 4 * c));
    }
    return;
  }
  const uint8_t* quants = p + 32 + (T == kQ5_0 ? 64 : 0);
  for (int c = 0; c < 4; ++c) {
    const I v = _mm512_loadu_si512(quants + 64 * c);
    I lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
    if constexpr (T == kQ5_0) {
      uint64_t mlo, mhi;
      std::memcpy(&mlo, p + 32 + 8 * c, 8);
      std::memcpy(&mhi, p + 32 + 8 * (4 + c), 8);
      lo = _mm512_mask_add_epi8(lo, mlo, lo, five);
      hi = _mm512_mask_add_epi8(hi, mhi, hi, five);
    }
    for (int m = 0; m < G; ++m) {
      const int8_t* x = a.q + m * a.K + 32 * b + 4 * c;
      acc[m] = _mm512_dpbusd_epi32(acc[m], lo, bcast4(x));
      acc[m] = _mm512_dpbusd_epi32(acc[m], hi, bcast4(x + 16));
    }
  }
}

#ifndef X16_AHEAD
#define X16_AHEAD 8
#endif
constexpr int64_t kAhead32 = X16_AHEAD;   // blocks ahead to prefetch, every line of them

template <int T, int G>
void group32(const Acts& a, const uint8_t* w, F* facc) {
  const int64_t S = x16_group_bytes(T);
  const int off = T == kQ8_0 ? 128 : T == kQ5_0 ? 16 : 8;
  for (int64_t b = 0; b < a.nb; ++b) {
    const uint8_t* p = w + b * S;
    for (int64_t l = 0; l < S; l += 64) _mm_prefetch(reinterpret_cast<const char*>(p + kAhead32 * S + l), _MM_HINT_T0);
    const F ws = fp16x16(p);
    I acc[G];
    for (int m = 0; m < G; ++m) acc[m] = _mm512_set1_epi32(-off * sum32(a, m, b));
    block32<T, G>(p, a, b, acc);
    for (int m = 0; m < G; ++m)
      facc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m]), _mm512_mul_ps(ws, _mm512_set1_ps(a.dx[m * a.nb + b])),
                                facc[m]);
  }
}

// K-quants, one super-block of 256 (8 activation blocks): pair i = activation blocks 2i (low nibbles) and
// 2i + 1 (high), chunk c = their weights 4c..4c+3. Q4_K: d, dmin, 8 x 16 scales, 8 x 16 minima, quants.
template <int G>
void q4k_super(const uint8_t* p, const Acts& a, int64_t sb, F* facc) {
  const I low4 = _mm512_set1_epi8(15);
  const F d = fp16x16(p), dmin = fp16x16(p + 32);
  for (int i = 0; i < 4; ++i) {
    I lo[G], hi[G];
    for (int m = 0; m < G; ++m) lo[m] = hi[m] = _mm512_setzero_si512();
    for (int c = 0; c < 8; ++c) {
      const I v = _mm512_loadu_si512(p + 320 + 64 * (8 * i + c));
      const I wl = _mm512_and_si512(v, low4), wh = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      for (int m = 0; m < G; ++m) {
        const int8_t* x = a.q + m * a.K + 256 * sb + 64 * i + 4 * c;
        lo[m] = _mm512_dpbusd_epi32(lo[m], wl, bcast4(x));
        hi[m] = _mm512_dpbusd_epi32(hi[m], wh, bcast4(x + 32));
      }
    }
    for (int h = 0; h < 2; ++h) {
      const int j = 2 * i + h;
      const F sc = scale8(p + 64 + 16 * j, d), mn = scale8(p + 192 + 16 * j, dmin);
      for (int m = 0; m < G; ++m) {
        const int64_t b = 8 * sb + j;
        const float dx = a.dx[m * a.nb + b];
        const F dot = _mm512_cvtepi32_ps(h ? hi[m] : lo[m]);
        facc[m] = _mm512_fmadd_ps(dot, _mm512_mul_ps(sc, _mm512_set1_ps(dx)), facc[m]);
        facc[m] = _mm512_fnmadd_ps(mn, _mm512_set1_ps(dx * static_cast<float>(sum32(a, m, b))), facc[m]);
      }
    }
  }
}

// Q6_K: d, 16 x 16 signed scales (one per 16 weights), low nibbles as Q4_K's, 2-bit high parts: byte
// 4r + j of qh vector 4i + c / 2 holds, from bit 4 (c & 1), the parts of low then high chunk c.
template <int G>
void q6k_super(const uint8_t* p, const Acts& a, int64_t sb, F* facc) {
  const I low4 = _mm512_set1_epi8(15), two = _mm512_set1_epi8(3);
  const F d = fp16x16(p);
  for (int i = 0; i < 4; ++i) {
    for (int half = 0; half < 2; ++half) {   // weights 0-15 and 16-31 of both blocks: one scale each
      I lo[G], hi[G];
      for (int m = 0; m < G; ++m) {
        const int32_t* s16 = a.s16 + m * 2 * a.nb + 16 * sb + 4 * i + half;
        lo[m] = _mm512_set1_epi32(-32 * s16[0]);
        hi[m] = _mm512_set1_epi32(-32 * s16[2]);
      }
      for (int c = 4 * half; c < 4 * half + 4; ++c) {
        const I v = _mm512_loadu_si512(p + 288 + 64 * (8 * i + c));
        const I h = _mm512_srli_epi16(_mm512_loadu_si512(p + 2336 + 64 * (4 * i + c / 2)), 4 * (c & 1));
        const I wl = _mm512_or_si512(_mm512_and_si512(v, low4), _mm512_slli_epi16(_mm512_and_si512(h, two), 4));
        const I wh = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 4), low4),
                                     _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(h, 2), two), 4));
        for (int m = 0; m < G; ++m) {
          const int8_t* x = a.q + m * a.K + 256 * sb + 64 * i + 4 * c;
          lo[m] = _mm512_dpbusd_epi32(lo[m], wl, bcast4(x));
          hi[m] = _mm512_dpbusd_epi32(hi[m], wh, bcast4(x + 32));
        }
      }
      const F sl = scale8s(p + 32 + 16 * (4 * i + half), d), sh = scale8s(p + 32 + 16 * (4 * i + 2 + half), d);
      for (int m = 0; m < G; ++m) {
        const float dxl = a.dx[m * a.nb + 8 * sb + 2 * i], dxh = a.dx[m * a.nb + 8 * sb + 2 * i + 1];
        facc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo[m]), _mm512_mul_ps(sl, _mm512_set1_ps(dxl)), facc[m]);
        facc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi[m]), _mm512_mul_ps(sh, _mm512_set1_ps(dxh)), facc[m]);
      }
    }
  }
}

template <int T, int G>
void groupK(const Acts& a, const uint8_t* w, F* facc) {
  const int64_t S = x16_group_bytes(T);
  for (int64_t sb = 0; sb < a.nb / 8; ++sb) {
    const uint8_t* p = w + sb * S;
    for (int64_t l = 0; l < S; l += 64) _mm_prefetch(reinterpret_cast<const char*>(p + 2 * S + l), _MM_HINT_T0);
    if constexpr (T == kQ4_K) q4k_super<G>(p, a, sb, facc);
    else q6k_super<G>(p, a, sb, facc);
  }
}

// out[m, n..n+15] for activation rows 0..G-1 of `a`, over the group at w (all of its columns).
template <int T, int G>
void group(const Acts& a, const uint8_t* w, float* out, int64_t N) {
  F facc[G];
  for (int m = 0; m < G; ++m) facc[m] = _mm512_setzero_ps();
  if constexpr (T == kQ4_K || T == kQ6_K) groupK<T, G>(a, w, facc);
  else group32<T, G>(a, w, facc);
  for (int m = 0; m < G; ++m) _mm512_storeu_ps(out + m * N, facc[m]);
}

constexpr int kGroup = 8;   // activation rows per pass

template <int T>
void groups(const Acts& a, const uint8_t* w, float* out, int64_t M, int64_t N, int64_t g0, int64_t g1) {
  const int64_t S = x16_group_bytes(T) / (T == kQ4_K || T == kQ6_K ? 8 : 1);   // per 32 columns
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* wg = w + g * a.nb * S;
    for (int64_t m = 0; m < M; m += kGroup) {
      const Acts am{a.q + m * a.K, a.s16 + m * 2 * a.nb, a.dx + m * a.nb, a.K, a.nb};
      float* o = out + m * N + g * kRows;
      switch (M - m < kGroup ? M - m : kGroup) {
        case 1: group<T, 1>(am, wg, o, N); break;
        case 2: group<T, 2>(am, wg, o, N); break;
        case 3: group<T, 3>(am, wg, o, N); break;
        case 4: group<T, 4>(am, wg, o, N); break;
        case 5: group<T, 5>(am, wg, o, N); break;
        case 6: group<T, 6>(am, wg, o, N); break;
        case 7: group<T, 7>(am, wg, o, N); break;
        default: group<T, 8>(am, wg, o, N); break;
      }
    }
  }
}

// One row's super-block of a K-quant as unsigned values u (Q4_K: q; Q6_K: q + 32) with its scales.
void unpack_q4k(const uint8_t* blk, uint8_t* u, uint8_t* sc, uint8_t* mn) {
  for (int j = 0; j < 8; ++j) {
    const uint8_t* q = blk + 4;
    if (j < 4) {
      sc[j] = q[j] & 63;
      mn[j] = q[j + 4] & 63;
    } else {
      sc[j] = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
      mn[j] = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
  }
  for (int i = 0; i < 4; ++i)
    for (int l = 0; l < 32; ++l) {
      u[64 * i + l] = blk[16 + 32 * i + l] & 0xF;
      u[64 * i + 32 + l] = blk[16 + 32 * i + l] >> 4;
    }
}
void unpack_q6k(const uint8_t* blk, uint8_t* u) {
  for (int h = 0; h < 2; ++h) {
    const uint8_t *ql = blk + 64 * h, *qh = blk + 128 + 32 * h;
    for (int l = 0; l < 32; ++l) {
      u[128 * h + l] = (ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4);
      u[128 * h + 32 + l] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
      u[128 * h + 64 + l] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
      u[128 * h + 96 + l] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
    }
  }
}

// Row r's super-block into the group's layout at p (q4k_super / q6k_super describe it).
void repack_super(int qtype, const uint8_t* blk, int r, uint8_t* p) {
  uint8_t u[256], sc[8], mn[8];
  if (qtype == kQ4_K) {
    unpack_q4k(blk, u, sc, mn);
    std::memcpy(p + 2 * r, blk, 2);
    std::memcpy(p + 32 + 2 * r, blk + 2, 2);
    for (int j = 0; j < 8; ++j) {
      p[64 + 16 * j + r] = sc[j];
      p[192 + 16 * j + r] = mn[j];
    }
  } else {
    unpack_q6k(blk, u);
    std::memcpy(p + 2 * r, blk + 208, 2);
    for (int g = 0; g < 16; ++g) p[32 + 16 * g + r] = blk[192 + g];
  }
  uint8_t* quants = p + (qtype == kQ4_K ? 320 : 288);
  for (int i = 0; i < 4; ++i)
    for (int c = 0; c < 8; ++c)
      for (int j = 0; j < 4; ++j) {
        const uint8_t lo = u[64 * i + 4 * c + j], hi = u[64 * i + 32 + 4 * c + j];
        quants[64 * (8 * i + c) + 4 * r + j] = (lo & 0xF) | ((hi & 0xF) << 4);
        if (qtype == kQ6_K)
          p[2336 + 64 * (4 * i + c / 2) + 4 * r + j] |= static_cast<uint8_t>(((lo >> 4) | ((hi >> 4) << 2)) << (4 * (c & 1)));
      }
}

// Row r's block of a 32-element type into the group's layout at p.
void repack_block32(int qtype, const uint8_t* blk, int r, uint8_t* p, uint64_t* masks) {
  const int64_t bytes = qtype == kQ8_0 ? 34 : qtype == kQ5_0 ? 22 : 18;
  std::memcpy(p + 2 * r, blk, 2);
  const uint8_t* qs = blk + bytes - (qtype == kQ8_0 ? 32 : 16);
  uint8_t* quants = p + 32 + (qtype == kQ5_0 ? 64 : 0);
  for (int c = 0; c < (qtype == kQ8_0 ? 8 : 4); ++c)
    for (int j = 0; j < 4; ++j)
      quants[64 * c + 4 * r + j] = qtype == kQ8_0 ? static_cast<uint8_t>(qs[4 * c + j] ^ 0x80) : qs[4 * c + j];
  if (qtype == kQ5_0) {
    uint32_t qh;
    std::memcpy(&qh, blk + 2, 4);
    for (int h = 0; h < 2; ++h)
      for (int c = 0; c < 4; ++c)
        for (int j = 0; j < 4; ++j)
          masks[4 * h + c] |= static_cast<uint64_t>((qh >> (16 * h + 4 * c + j)) & 1) << (4 * r + j);
  }
}

}  // namespace

int64_t x16_group_bytes(int qtype) {   // 32-element types: per block of 32; K-quants: per super-block of 256
  switch (qtype) {
    case kQ4_0: return 32 + 256;
    case kQ5_0: return 32 + 64 + 256;
    case kQ8_0: return 32 + 512;
    case kQ4_K: return 320 + 2048;
    case kQ6_K: return 288 + 2048 + 1024;
    default: return 0;
  }
}

// Rows of x [M, K] to 8 bits per block of 32: dx = max |x| / 127, q = round(x / dx) (K a multiple of
// 32); s16: the sum of each 16 q.
void quantize_acts_x16(const float* x, int64_t M, int64_t K, int8_t* q, int32_t* s16, float* dx) {
  const int64_t nb = K / 32;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + m * K + 32 * b;
      const F x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
      const F inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
      const I q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, inv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, inv));
      int8_t* dst = q + m * K + 32 * b;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtsepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm512_cvtsepi32_epi8(q1));
      dx[m * nb + b] = amax / 127.0f;
      s16[m * 2 * nb + 2 * b] = _mm512_reduce_add_epi32(q0);
      s16[m * 2 * nb + 2 * b + 1] = _mm512_reduce_add_epi32(q1);
    }
  }
}

// Rows [16 g0, 16 g1) of the file's blocks w [N, row bytes] into the layout above (rows past N: zero
// scales and weights).
void repack_x16(int qtype, const uint8_t* w, uint8_t* out, int64_t N, int64_t K, int64_t g0, int64_t g1) {
  const bool kq = qtype == kQ4_K || qtype == kQ6_K;
  const int64_t elems = kq ? 256 : 32, nb = K / elems, S = x16_group_bytes(qtype);
  const int64_t bytes = qtype == kQ8_0 ? 34 : qtype == kQ5_0 ? 22 : qtype == kQ4_0 ? 18 : qtype == kQ4_K ? 144 : 210;
  for (int64_t g = g0; g < g1; ++g) {
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* p = out + (g * nb + b) * S;
      std::memset(p, 0, S);
      uint64_t masks[8] = {};
      for (int r = 0; r < kRows && g * kRows + r < N; ++r) {
        const uint8_t* blk = w + (g * kRows + r) * nb * bytes + b * bytes;
        if (kq) repack_super(qtype, blk, r, p);
        else repack_block32(qtype, blk, r, p, masks);
      }
      if (qtype == kQ5_0) std::memcpy(p + 32, masks, 64);
    }
  }
}

void qgroups_x16(int qtype, const int8_t* q, const int32_t* s16, const float* dx, const uint8_t* w, float* out,
                 int64_t M, int64_t K, int64_t N, int64_t g0, int64_t g1) {
  const Acts a{q, s16, dx, K, K / 32};
  switch (qtype) {
    case kQ4_0: return groups<kQ4_0>(a, w, out, M, N, g0, g1);
    case kQ5_0: return groups<kQ5_0>(a, w, out, M, N, g0, g1);
    case kQ8_0: return groups<kQ8_0>(a, w, out, M, N, g0, g1);
    case kQ4_K: return groups<kQ4_K>(a, w, out, M, N, g0, g1);
    case kQ6_K: return groups<kQ6_K>(a, w, out, M, N, g0, g1);
    default: return;
  }
}

}  // namespace conveyor
