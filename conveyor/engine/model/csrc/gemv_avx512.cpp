// AVX-512F: the AVX2 kernel's widen-and-FMA scheme on 64-byte registers, with fp32 activations
// (exact fp32 accumulation of bf16 weights). One load holds 32 bf16 weights as 16 (even, odd)
// pairs: a shift and a mask give both halves as fp32; the activations come de-interleaved to match.
// R weight rows are computed together so that each activation load feeds R of them.
#include <immintrin.h>

#include "gemv.h"

#pragma GCC target("avx512f,avx512bw")

namespace conveyor {
namespace {

constexpr int kGroup = 8;     // activation rows per pass over a tile
constexpr int64_t kTile = 8;  // weight rows per tile: the later groups read them from cache

template <int M, int R>
void rows(const float* x, const uint16_t* w, float* out, int64_t n, int64_t K, int64_t N) {
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512 even[R], odd[R];
    for (int r = 0; r < R; ++r) {
      __m512i raw = _mm512_loadu_si512(w + (n + r) * K + k);
      even[r] = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
      odd[r] = _mm512_castsi512_ps(_mm512_and_si512(raw, high));
    }
    for (int m = 0; m < M; ++m) {
      const __m512 xe = _mm512_loadu_ps(x + m * K + k), xo = _mm512_loadu_ps(x + m * K + k + 16);
      for (int r = 0; r < R; ++r) {
        acc[r][m] = _mm512_fmadd_ps(even[r], xe, acc[r][m]);
        acc[r][m] = _mm512_fmadd_ps(odd[r], xo, acc[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) out[m * N + n + r] = _mm512_reduce_add_ps(acc[r][m]);
}

using Kernel = void (*)(const float*, const uint16_t*, float*, int64_t, int64_t, int64_t);

// Few rows: four weight rows at a time (independent FMA chains); more rows: two, to fit 32 registers.
template <int M>
constexpr Kernel wide() { return rows<M, (M <= 4 ? 4 : 2)>; }
constexpr int width(int M) { return M <= 4 ? 4 : 2; }

constexpr Kernel kWide[kGroup + 1] = {nullptr, wide<1>(), wide<2>(), wide<3>(), wide<4>(),
                                      wide<5>(), wide<6>(), wide<7>(), wide<8>()};
constexpr Kernel kOne[kGroup + 1] = {nullptr,       rows<1, 1>, rows<2, 1>, rows<3, 1>, rows<4, 1>,
                                     rows<5, 1>, rows<6, 1>, rows<7, 1>, rows<8, 1>};

}  // namespace

void rows_avx512(const float* x, const uint16_t* w, float* out, int64_t M, int64_t K, int64_t N, int64_t n0,
                 int64_t n1) {
  for (int64_t t = n0; t < n1; t += kTile) {
    const int64_t end = t + kTile < n1 ? t + kTile : n1;
    for (int64_t m = 0; m < M; m += kGroup) {
      const int num = static_cast<int>(M - m < kGroup ? M - m : kGroup);
      int64_t n = t;
      for (; n + width(num) <= end; n += width(num)) kWide[num](x + m * K, w, out + m * N, n, K, N);
      for (; n < end; ++n) kOne[num](x + m * K, w, out + m * N, n, K, N);
    }
  }
}

}  // namespace conveyor
