// AVX2/FMA: the quantized kernels of quant_kernel.h, each group of 16 weights in two 32-byte registers.
#include <immintrin.h>

#pragma GCC target("avx2,fma,f16c")

#include "quant_kernel.h"

namespace conveyor {
namespace {

struct V256 {
  struct I {
    __m256i lo, hi;
  };
  struct F {
    __m256 lo, hi;
  };
  static constexpr int kGroup = 4;   // 16 registers: 2 per accumulator
  static constexpr int width(int g) { return g == 1 ? 4 : g == 2 ? 2 : 1; }

  static __m256i widen8(const uint8_t* p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  static I u8(const uint8_t* p) { return {widen8(p), widen8(p + 8)}; }
  static I s8(const uint8_t* p) {
    return {_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))),
            _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)))};
  }
  static __m256i and_srl(__m256i v, int shift, int mask) {
    return _mm256_and_si256(_mm256_srl_epi32(v, _mm_cvtsi32_si128(shift)), _mm256_set1_epi32(mask));
  }
  static I nibbles(const uint8_t* p, int shift) {
    const I v = u8(p);
    return {and_srl(v.lo, shift, 15), and_srl(v.hi, shift, 15)};
  }
  static I field(const uint8_t* p, int shift, int mask) {
    const I v = u8(p);
    return {_mm256_slli_epi32(and_srl(v.lo, shift, mask), 4), _mm256_slli_epi32(and_srl(v.hi, shift, mask), 4)};
  }
  static __m256i bits8(uint32_t bits) {
    const __m256i pow2 = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), pow2), pow2);
    return _mm256_and_si256(set, _mm256_set1_epi32(16));
  }
  static I bits16(uint32_t bits) { return {bits8(bits), bits8(bits >> 8)}; }
  static I or_(I a, I b) { return {_mm256_or_si256(a.lo, b.lo), _mm256_or_si256(a.hi, b.hi)}; }
  static I sub(I a, int c) {
    const __m256i v = _mm256_set1_epi32(c);
    return {_mm256_sub_epi32(a.lo, v), _mm256_sub_epi32(a.hi, v)};
  }

  static F cvt(I q) { return {_mm256_cvtepi32_ps(q.lo), _mm256_cvtepi32_ps(q.hi)}; }
  static F mul(F a, float s) {
    const __m256 v = _mm256_set1_ps(s);
    return {_mm256_mul_ps(a.lo, v), _mm256_mul_ps(a.hi, v)};
  }
  static F add(F a, float o) {
    const __m256 v = _mm256_set1_ps(o);
    return {_mm256_add_ps(a.lo, v), _mm256_add_ps(a.hi, v)};
  }
  static F zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static F load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static F fma(F a, F b, F c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
  static float sum(F a) {
    const __m256 v = _mm256_add_ps(a.lo, a.hi);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static void store(float* p, F v) {
    _mm256_storeu_ps(p, v.lo);
    _mm256_storeu_ps(p + 8, v.hi);
  }
  static __m256i bf16_bits(__m256 v) {   // round to nearest even, in the low 16 bits of each lane
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  }
  static void store_bf16(uint16_t* p, F v) {
    const __m256i packed = _mm256_packus_epi32(bf16_bits(v.lo), bf16_bits(v.hi));   // per 128-bit lane
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(packed, 0xD8));
  }
};

}  // namespace

void qrows_avx2(int qtype, const float* x, const uint8_t* w, float* out, int64_t M, int64_t K, int64_t N,
                int64_t n0, int64_t n1) {
  qrows<V256>(qtype, x, w, out, M, K, N, n0, n1);
}

void dequantize_avx2(int qtype, const uint8_t* w, void* out, bool bf16, int64_t K, int64_t n0, int64_t n1) {
  dequantize<V256>(qtype, w, out, bf16, K, n0, n1);
}

}  // namespace conveyor
