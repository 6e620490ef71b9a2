// AVX-512F: the quantized kernels of quant_kernel.h on 64-byte registers, one per group of 16 weights.
#include <immintrin.h>

#pragma GCC target("avx512f,avx512bw,avx2,fma,f16c")

#include "quant_kernel.h"

namespace conveyor {
namespace {

struct V512 {
  using I = __m512i;
  using F = __m512;
  static constexpr int kGroup = 8;   // activation rows per pass: 8 x width accumulators fit 32 registers
  static constexpr int width(int g) { return g <= 2 ? 4 : 2; }

  static I u8(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static I s8(const uint8_t* p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static I nibbles(const uint8_t* p, int shift) {
    return _mm512_and_si512(_mm512_srl_epi32(u8(p), _mm_cvtsi32_si128(shift)), _mm512_set1_epi32(15));
  }
  // ((byte >> shift) & mask) << 4 for 16 bytes
  static I field(const uint8_t* p, int shift, int mask) {
    const I v = _mm512_and_si512(_mm512_srl_epi32(u8(p), _mm_cvtsi32_si128(shift)), _mm512_set1_epi32(mask));
    return _mm512_slli_epi32(v, 4);
  }
  // lane i: 16 if bit i of bits is set
  static I bits16(uint32_t bits) { return _mm512_maskz_mov_epi32(static_cast<__mmask16>(bits), _mm512_set1_epi32(16)); }
  static I or_(I a, I b) { return _mm512_or_si512(a, b); }
  static I sub(I a, int c) { return _mm512_sub_epi32(a, _mm512_set1_epi32(c)); }

  static F cvt(I q) { return _mm512_cvtepi32_ps(q); }
  static F mul(F a, float s) { return _mm512_mul_ps(a, _mm512_set1_ps(s)); }
  static F add(F a, float o) { return _mm512_add_ps(a, _mm512_set1_ps(o)); }
  static F zero() { return _mm512_setzero_ps(); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(F a) { return _mm512_reduce_add_ps(a); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  // round to nearest even, as torch's float -> bfloat16 (the weights are finite)
  static void store_bf16(uint16_t* p, F v) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
  }
};

}  // namespace

void qrows_avx512(int qtype, const float* x, const uint8_t* w, float* out, int64_t M, int64_t K, int64_t N,
                  int64_t n0, int64_t n1) {
  qrows<V512>(qtype, x, w, out, M, K, N, n0, n1);
}

void dequantize_avx512(int qtype, const uint8_t* w, void* out, bool bf16, int64_t K, int64_t n0, int64_t n1) {
  dequantize<V512>(qtype, w, out, bf16, K, n0, n1);
}

}  // namespace conveyor
