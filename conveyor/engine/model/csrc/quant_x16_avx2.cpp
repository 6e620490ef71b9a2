// AVX2: the x16 kernels of quant_x16.h with each 64-byte chunk in two 32-byte registers (rows 0-7 and
// 8-15). A dot is vpmaddubsw (unsigned weights times signed activations, pairs summed to int16) then
// vpmaddwd by ones: the pair sums stay below 2^15 for weights of at most 6 bits (63 x 127 x 2); Q8_0's
// full bytes use the sign trick (|q| times x with q's sign) on q itself, so its offset is 0.
#include <immintrin.h>

#pragma GCC target("avx2,fma,f16c")

#include "quant_x16.h"

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
  static constexpr int kOffset8 = 0;

  template <class Op>
  static I each(I a, Op op) { return {op(a.lo), op(a.hi)}; }
  static I load(const uint8_t* p) {
    return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32))};
  }
  static I set1(int32_t v) { return {_mm256_set1_epi32(v), _mm256_set1_epi32(v)}; }
  static I low4(I v) { return each(v, [](__m256i x) { return _mm256_and_si256(x, _mm256_set1_epi8(15)); }); }
  static I high4(I v) { return low4(each(v, [](__m256i x) { return _mm256_srli_epi16(x, 4); })); }
  // 32 bits to 32 bytes: 0xFF where set
  static __m256i bytes_of(uint32_t bits) {
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)),
                                               _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303));
    const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201));
    return _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
  }
  static I add16_where(I v, const uint8_t* p) {
    uint32_t lo, hi;
    std::memcpy(&lo, p, 4);
    std::memcpy(&hi, p + 4, 4);
    const __m256i sixteen = _mm256_set1_epi8(16);
    return {_mm256_add_epi8(v.lo, _mm256_and_si256(bytes_of(lo), sixteen)),
            _mm256_add_epi8(v.hi, _mm256_and_si256(bytes_of(hi), sixteen))};
  }
  static I with_high2(I v, I h, int shift) {
    const __m128i n = _mm_cvtsi32_si128(shift);
    auto one = [&](__m256i x, __m256i y) {
      const __m256i two = _mm256_and_si256(_mm256_srl_epi16(y, n), _mm256_set1_epi8(3));
      return _mm256_or_si256(x, _mm256_slli_epi16(two, 4));
    };
    return {one(v.lo, h.lo), one(v.hi, h.hi)};
  }
  static __m256i bcast4(const int8_t* x) {
    int32_t v;
    std::memcpy(&v, x, 4);
    return _mm256_set1_epi32(v);
  }
  static I dot(I acc, I w, const int8_t* x) {
    const __m256i xv = bcast4(x), ones = _mm256_set1_epi16(1);
    return {_mm256_add_epi32(acc.lo, _mm256_madd_epi16(_mm256_maddubs_epi16(w.lo, xv), ones)),
            _mm256_add_epi32(acc.hi, _mm256_madd_epi16(_mm256_maddubs_epi16(w.hi, xv), ones))};
  }
  // Q8_0: w holds q + 128; |q| times x carrying q's sign
  static I dot8(I acc, I w, const int8_t* x) {
    const __m256i xv = bcast4(x), ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(static_cast<char>(0x80));
    auto one = [&](__m256i a, __m256i u) {
      const __m256i q = _mm256_xor_si256(u, flip);
      return _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(q), _mm256_sign_epi8(xv, q)), ones));
    };
    return {one(acc.lo, w.lo), one(acc.hi, w.hi)};
  }

  static F cvt(I v) { return {_mm256_cvtepi32_ps(v.lo), _mm256_cvtepi32_ps(v.hi)}; }
  static F set1f(float f) { return {_mm256_set1_ps(f), _mm256_set1_ps(f)}; }
  static F mul(F a, F b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
  static F fma(F a, F b, F c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
  static F fnma(F a, F b, F c) { return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)}; }
  static void store(float* p, F v) {
    _mm256_storeu_ps(p, v.lo);
    _mm256_storeu_ps(p + 8, v.hi);
  }
  static F fp16x16(const uint8_t* p) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)))};
  }
  static F u8x16(const uint8_t* p) {
    return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))),
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))))};
  }
  static F s8x16(const uint8_t* p) {
    return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))),
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))))};
  }
};

}  // namespace

void qgroups_x16_avx2(int qtype, const int8_t* q, const int32_t* s16, const float* dx, const uint8_t* w, float* out,
                      int64_t M, int64_t K, int64_t N, int64_t g0, int64_t g1) {
  qgroups<V256>(qtype, q, s16, dx, w, out, M, K, N, g0, g1);
}

}  // namespace conveyor
