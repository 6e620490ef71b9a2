// AVX-512 VNNI: quantized weights times activations quantized to 8 bits per block of 32 (llama.cpp's
// scheme, with fp32 scales). Each vpdpbusd multiplies 64 unsigned weight integers by 64 signed
// activation integers, summing each 4 into one of 16 int32 lanes; lane l covers weights 4l..4l+3 of
// the 64, which share one weight scale and one activation scale. Per lane:
//   sum (q - off) xq = dpbusd(-off * sum xq, q, xq)      (off: the type's integer offset)
//   result += float(that) * (weight scale * activation scale) [+ weight minimum * dx * sum xq]
// so the only error beyond fp32 rounding is the activations' rounding to 8 bits (at most dx / 2 each).
#include <immintrin.h>

#include <utility>

#pragma GCC target("avx512f,avx512bw,avx512vnni,avx2,fma,f16c")

#include "quant.h"
#include "quant_types.h"

namespace conveyor {
namespace {

using I = __m512i;
using F = __m512;

I load2x256(const uint8_t* a, const uint8_t* b) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a))),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)), 1);
}
// [a, a >> 4, b, b >> 4] & 15 for 16 bytes a and b: the 64 weights of two 32-element nibble blocks
I nibbles2(const uint8_t* a, const uint8_t* b) {
  const __m256i ab = _mm256_inserti128_si256(
      _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a))),
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(b)), 1);
  const I dup = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 1, 0, 1, 2, 3, 2, 3), _mm512_castsi256_si512(ab));
  return _mm512_and_si512(_mm512_srlv_epi64(dup, _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4)), _mm512_set1_epi8(15));
}
// lanes 0-7: a, 8-15: b
F halves(float a, float b) { return _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(a), _mm512_set1_ps(b)); }
uint64_t bits64(const uint8_t* a, const uint8_t* b) { return u32(a) | (static_cast<uint64_t>(u32(b)) << 32); }
I add16(I q, uint64_t bits) { return _mm512_mask_add_epi8(q, bits, q, _mm512_set1_epi8(16)); }
F zero() { return _mm512_setzero_ps(); }

// The 32-element types: one step is two blocks (b1 == b0 at the tail of a row of 32 mod 64).
struct Pair {
  F scale, min;
};
struct V8_0 {
  static constexpr int kElems = 32, kBytes = 34, kOff = 128, kChunks = 1;
  static constexpr bool kMin = false;
  static Pair scales(const uint8_t* a, const uint8_t* b) { return {halves(fp16(a), fp16(b)), zero()}; }
  static I quants(const uint8_t* a, const uint8_t* b, int) {
    return _mm512_xor_si512(load2x256(a + 2, b + 2), _mm512_set1_epi8(static_cast<char>(0x80)));
  }
};
struct V4_0 {
  static constexpr int kElems = 32, kBytes = 18, kOff = 8, kChunks = 1;
  static constexpr bool kMin = false;
  static Pair scales(const uint8_t* a, const uint8_t* b) { return {halves(fp16(a), fp16(b)), zero()}; }
  static I quants(const uint8_t* a, const uint8_t* b, int) { return nibbles2(a + 2, b + 2); }
};
struct V4_1 {
  static constexpr int kElems = 32, kBytes = 20, kOff = 0, kChunks = 1;
  static constexpr bool kMin = true;
  static Pair scales(const uint8_t* a, const uint8_t* b) {
    return {halves(fp16(a), fp16(b)), halves(fp16(a + 2), fp16(b + 2))};
  }
  static I quants(const uint8_t* a, const uint8_t* b, int) { return nibbles2(a + 4, b + 4); }
};
struct V5_0 {
  static constexpr int kElems = 32, kBytes = 22, kOff = 16, kChunks = 1;
  static constexpr bool kMin = false;
  static Pair scales(const uint8_t* a, const uint8_t* b) { return {halves(fp16(a), fp16(b)), zero()}; }
  static I quants(const uint8_t* a, const uint8_t* b, int) { return add16(nibbles2(a + 6, b + 6), bits64(a + 2, b + 2)); }
};
struct V5_1 {
  static constexpr int kElems = 32, kBytes = 24, kOff = 0, kChunks = 1;
  static constexpr bool kMin = true;
  static Pair scales(const uint8_t* a, const uint8_t* b) {
    return {halves(fp16(a), fp16(b)), halves(fp16(a + 2), fp16(b + 2))};
  }
  static I quants(const uint8_t* a, const uint8_t* b, int) { return add16(nibbles2(a + 8, b + 8), bits64(a + 4, b + 4)); }
};

// The K-quants: one step is one block of 4 chunks of 64. Scales: lanes 0-7 the sub-block scales
// d * sc, 8-15 the minima -(dmin * m) (Q4_K, Q5_K); Q6_K: its 16 scales d * sc.
F k_scales(const uint8_t* b) {
  uint32_t u[4];
  std::memcpy(u, b + 4, 12);   // ggml's unpacking of the 6-bit scales (bytes 0-7) and minima (8-15)
  u[3] = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4);
  const uint32_t m = u[1] & 0x3f3f3f3f;
  u[1] = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);
  u[2] = m;
  u[0] &= 0x3f3f3f3f;
  const F v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u))));
  return _mm512_mul_ps(v, halves(fp16(b), -fp16(b + 2)));   // -(dmin * m) == dmin * m negated: exact
}
// lanes of chunk j: sub-blocks 2j (lanes 0-7) and 2j + 1 (8-15), from 8 values at `base` of v
F pick_pair(F v, int j, int base) {
  const I idx = _mm512_add_epi32(_mm512_set1_epi32(base + 2 * j),
                                 _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1));
  return _mm512_permutexvar_ps(idx, v);
}
struct VK4 {
  static constexpr int kElems = 256, kOff = 0, kChunks = 4;
  static constexpr bool kMin = true;
  static Pair scales(const uint8_t* b, const uint8_t*) {
    const F v = k_scales(b);
    return {v, v};
  }
  static F scale(const Pair& p, int j) { return pick_pair(p.scale, j, 0); }
  static F min(const Pair& p, int j) { return pick_pair(p.min, j, 8); }
};
struct V4_K : VK4 {
  static constexpr int kBytes = 144;
  static I quants(const uint8_t* b, const uint8_t*, int j) {
    const uint8_t* q = b + 16 + 32 * j;
    return _mm512_and_si512(_mm512_srlv_epi64(load2x256(q, q), _mm512_setr_epi64(0, 0, 0, 0, 4, 4, 4, 4)),
                            _mm512_set1_epi8(15));
  }
};
struct V5_K : VK4 {
  static constexpr int kBytes = 176;
  static I quants(const uint8_t* b, const uint8_t*, int j) {
    const uint8_t* q = b + 48 + 32 * j;
    const I low = _mm512_and_si512(_mm512_srlv_epi64(load2x256(q, q), _mm512_setr_epi64(0, 0, 0, 0, 4, 4, 4, 4)),
                                   _mm512_set1_epi8(15));
    const int64_t s = 2 * j;
    const I high = _mm512_srlv_epi64(load2x256(b + 16, b + 16), _mm512_setr_epi64(s, s, s, s, s + 1, s + 1, s + 1, s + 1));
    return _mm512_or_si512(low, _mm512_slli_epi16(_mm512_and_si512(high, _mm512_set1_epi8(1)), 4));
  }
};
struct V6_K {
  static constexpr int kElems = 256, kBytes = 210, kOff = 32, kChunks = 4;
  static constexpr bool kMin = false;
  static Pair scales(const uint8_t* b, const uint8_t*) {
    const I sc = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192)));
    return {_mm512_mul_ps(_mm512_cvtepi32_ps(sc), _mm512_set1_ps(fp16(b + 208))), zero()};
  }
  // lanes of chunk j: its 4 groups of 16, scales 4j .. 4j + 3
  static F scale(const Pair& p, int j) {
    const I idx = _mm512_add_epi32(_mm512_set1_epi32(4 * j), _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), 2));
    return _mm512_permutexvar_ps(idx, p.scale);
  }
  static F min(const Pair&, int) { return zero(); }
  // chunk j = 2h + u of half h: low (u = 0) or high nibbles of its 64 ql bytes, 2-bit fields of its 32 qh bytes
  static I quants(const uint8_t* b, const uint8_t*, int j) {
    const int h = j >> 1, u = j & 1;
    const I ql = _mm512_loadu_si512(b + 64 * h);
    const I low = _mm512_and_si512(u ? _mm512_srli_epi16(ql, 4) : ql, _mm512_set1_epi8(15));
    const int64_t s = 4 * u;
    const I qh = _mm512_srlv_epi64(load2x256(b + 128 + 32 * h, b + 128 + 32 * h),
                                   _mm512_setr_epi64(s, s, s, s, s + 2, s + 2, s + 2, s + 2));
    return _mm512_or_si512(low, _mm512_slli_epi16(_mm512_and_si512(qh, _mm512_set1_epi8(3)), 4));
  }
};

// Per-type lane vectors of one step's chunk j: the 32-element types have one chunk, lanes as built.
template <class T>
F scale_of(const Pair& p, int j) {
  if constexpr (T::kChunks == 1) return p.scale;
  else return T::scale(p, j);
}
template <class T>
F min_of(const Pair& p, int j) {
  if constexpr (T::kChunks == 1) return p.min;
  else return T::min(p, j);
}

struct Acts {           // quantized activation rows (quantize_acts_avx512vnni), row strides K64 and K64 / 4
  const int8_t* q;
  const int32_t* off;   // -kOff * (sum of each 4 q)
  const float* dx;      // each lane's activation scale
  const float* sums;    // dx * (sum of each 4 q), for the minima
  int64_t K64;
};

// Bytes of one weight row per step, and how far ahead of each row's step to prefetch (past a row's
// end: the rows after it, which the next tiles read; a prefetch never faults). The R rows of a tile
// are R streams the hardware prefetcher alone kept too close: 2048 beat none, 512 and 1024 from memory
// (scripts/quant_bench.py --threads 1), most at 8 rows (+30-40%).
template <class T>
constexpr int64_t kStepBytes = T::kChunks == 1 ? 2 * T::kBytes : T::kBytes;
constexpr int64_t kAhead = 2048;

template <class T, int G, int R>
void tile(const Acts& a, const uint8_t* w, float* out, int64_t n, int64_t K, int64_t N) {
  const int64_t rb = K / T::kElems * T::kBytes, lanes = a.K64 / 4;
  const int64_t step_elems = T::kChunks == 1 ? 64 : 256;
  F acc[R][G];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < G; ++m) acc[r][m] = zero();
  for (int64_t e = 0; e < K; e += step_elems) {
    const uint8_t* b0[R];
    const uint8_t* b1[R];
    Pair sc[R];
    for (int r = 0; r < R; ++r) {
      b0[r] = w + (n + r) * rb + e / T::kElems * T::kBytes;
      b1[r] = T::kChunks == 1 && e + 32 < K ? b0[r] + T::kBytes : b0[r];
      sc[r] = T::scales(b0[r], b1[r]);
      for (int64_t l = 0; l < kStepBytes<T>; l += 64)
        _mm_prefetch(reinterpret_cast<const char*>(b0[r] + kAhead + l), _MM_HINT_T0);
    }
    for (int j = 0; j < T::kChunks; ++j) {
      const int64_t c = e / 64 + j;
      I wq[R];
      F ws[R], wo[R];
      for (int r = 0; r < R; ++r) {
        wq[r] = T::quants(b0[r], b1[r], j);
        ws[r] = scale_of<T>(sc[r], j);
        if constexpr (T::kMin) wo[r] = min_of<T>(sc[r], j);
      }
      for (int m = 0; m < G; ++m) {
        const I xq = _mm512_loadu_si512(a.q + m * a.K64 + 64 * c);
        const I xo = T::kOff ? _mm512_loadu_si512(a.off + m * lanes + 16 * c) : _mm512_setzero_si512();
        const F dx = _mm512_loadu_ps(a.dx + m * lanes + 16 * c);
        for (int r = 0; r < R; ++r) {
          const F dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(xo, wq[r], xq));
          acc[r][m] = _mm512_fmadd_ps(dot, _mm512_mul_ps(ws[r], dx), acc[r][m]);
          if constexpr (T::kMin) acc[r][m] = _mm512_fmadd_ps(wo[r], _mm512_loadu_ps(a.sums + m * lanes + 16 * c), acc[r][m]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < G; ++m) out[m * N + n + r] = _mm512_reduce_add_ps(acc[r][m]);
}

constexpr int kGroup = 8;
constexpr int64_t kTile = 8;
constexpr int width(int g) { return g <= 2 ? 4 : 2; }
using Tile = void (*)(const Acts&, const uint8_t*, float*, int64_t, int64_t, int64_t);

template <class T, int R, int... G>
Tile pick(int g, std::integer_sequence<int, G...>) {
  Tile t = nullptr;
  ((g == G + 1 ? (t = tile<T, G + 1, (R ? R : width(G + 1))>) : t), ...);
  return t;
}

template <class T>
void rows(const Acts& a, const uint8_t* w, float* out, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t t = n0; t < n1; t += kTile) {
    const int64_t end = t + kTile < n1 ? t + kTile : n1;
    for (int64_t m = 0; m < M; m += kGroup) {
      const int num = static_cast<int>(M - m < kGroup ? M - m : kGroup);
      const Tile wide = pick<T, 0>(num, std::make_integer_sequence<int, kGroup>{});
      const Tile one = pick<T, 1>(num, std::make_integer_sequence<int, kGroup>{});
      const Acts am{a.q + m * a.K64, a.off + m * a.K64 / 4, a.dx + m * a.K64 / 4, a.sums + m * a.K64 / 4, a.K64};
      int64_t n = t;
      for (; n + width(num) <= end; n += width(num)) wide(am, w, out + m * N, n, K, N);
      for (; n < end; ++n) one(am, w, out + m * N, n, K, N);
    }
  }
}

int offset_of(int qtype) {
  switch (qtype) {
    case kQ8_0: return V8_0::kOff;
    case kQ4_0: return V4_0::kOff;
    case kQ5_0: return V5_0::kOff;
    case kQ6_K: return V6_K::kOff;
    default: return 0;
  }
}

}  // namespace

// Rows of x [M, K] to 8 bits per block of 32: dx = max |x| / 127, q = round(x / dx); K64 = K rounded
// up to 64 (the tail is zeros). Per lane of 4: q's sum times -offset (off), dx, and dx times the sum.
void quantize_acts_avx512vnni(int qtype, const float* x, int64_t M, int64_t K, int8_t* q, int32_t* off, float* dx,
                              float* sums) {
  const int64_t K64 = (K + 63) / 64 * 64;
  const __m512i neg_off = _mm512_set1_epi32(-offset_of(qtype));
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t c = 0; c < K64; c += 64) {
      float d[2];
      for (int h = 0; h < 2; ++h) {
        const int64_t k = c + 32 * h;
        int8_t* dst = q + m * K64 + k;
        if (k >= K) {
          std::memset(dst, 0, 32);
          d[h] = 0.0f;
          continue;
        }
        const F x0 = _mm512_loadu_ps(x + m * K + k), x1 = _mm512_loadu_ps(x + m * K + k + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
        d[h] = amax / 127.0f;
        const F inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(x0, inv))));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16),
                         _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(x1, inv))));
      }
      const I sum4 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(1), _mm512_loadu_si512(q + m * K64 + c));
      const F dl = halves(d[0], d[1]);
      const int64_t at = m * K64 / 4 + c / 4;
      _mm512_storeu_si512(off + at, _mm512_mullo_epi32(sum4, neg_off));
      _mm512_storeu_ps(dx + at, dl);
      _mm512_storeu_ps(sums + at, _mm512_mul_ps(_mm512_cvtepi32_ps(sum4), dl));
    }
  }
}

void qrows_avx512vnni(int qtype, const int8_t* q, const int32_t* off, const float* dx, const float* sums,
                      const uint8_t* w, float* out, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  const Acts a{q, off, dx, sums, (K + 63) / 64 * 64};
  switch (qtype) {
    case kQ4_0: return rows<V4_0>(a, w, out, M, K, N, n0, n1);
    case kQ4_1: return rows<V4_1>(a, w, out, M, K, N, n0, n1);
    case kQ5_0: return rows<V5_0>(a, w, out, M, K, N, n0, n1);
    case kQ5_1: return rows<V5_1>(a, w, out, M, K, N, n0, n1);
    case kQ8_0: return rows<V8_0>(a, w, out, M, K, N, n0, n1);
    case kQ4_K: return rows<V4_K>(a, w, out, M, K, N, n0, n1);
    case kQ5_K: return rows<V5_K>(a, w, out, M, K, N, n0, n1);
    case kQ6_K: return rows<V6_K>(a, w, out, M, K, N, n0, n1);
    default: return;
  }
}

}  // namespace conveyor
