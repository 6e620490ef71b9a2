// AVX-512 VNNI: the x16 kernels of quant_x16.h, one 64-byte chunk per register, vpdpbusd for the dots.
#include <immintrin.h>

#pragma GCC target("avx512f,avx512bw,avx512vnni,avx2,fma,f16c")

#include "quant_x16.h"

namespace conveyor {
namespace {

struct V512 {
  using I = __m512i;
  using F = __m512;
  static constexpr int kGroup = 8;     // activation rows per pass: 8 int32 and 8 fp32 accumulators
  static constexpr int kOffset8 = 128;  // Q8_0 chunks hold q + 128 and vpdpbusd takes them as they are

  static I load(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static I set1(int32_t v) { return _mm512_set1_epi32(v); }
  static I low4(I v) { return _mm512_and_si512(v, _mm512_set1_epi8(15)); }
  static I high4(I v) { return low4(_mm512_srli_epi16(v, 4)); }
  // v + 16 in each byte whose bit is set in the 64-bit mask at p
  static I add16_where(I v, const uint8_t* p) {
    uint64_t bits;
    std::memcpy(&bits, p, 8);
    return _mm512_mask_add_epi8(v, bits, v, _mm512_set1_epi8(16));
  }
  // v | ((h >> shift) & 3) << 4 in each byte
  static I with_high2(I v, I h, int shift) {
    const I two = _mm512_and_si512(_mm512_srl_epi16(h, _mm_cvtsi32_si128(shift)), _mm512_set1_epi8(3));
    return _mm512_or_si512(v, _mm512_slli_epi16(two, 4));
  }
  static I bcast4(const int8_t* x) {
    int32_t v;
    std::memcpy(&v, x, 4);
    return _mm512_set1_epi32(v);
  }
  // acc + per row lane: the 4 unsigned weights times the 4 signed activations at x
  static I dot(I acc, I w, const int8_t* x) { return _mm512_dpbusd_epi32(acc, w, bcast4(x)); }
  static I dot8(I acc, I w, const int8_t* x) { return dot(acc, w, x); }

  static F cvt(I v) { return _mm512_cvtepi32_ps(v); }
  static F set1f(float f) { return _mm512_set1_ps(f); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F fnma(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F fp16x16(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static F u8x16(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static F s8x16(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
};

}  // namespace

void qgroups_x16_avx512vnni(int qtype, const int8_t* q, const int32_t* s16, const float* dx, const uint8_t* w,
                            float* out, int64_t M, int64_t K, int64_t N, int64_t g0, int64_t g1) {
  qgroups<V512>(qtype, q, s16, dx, w, out, M, K, N, g0, g1);
}

}  // namespace conveyor
