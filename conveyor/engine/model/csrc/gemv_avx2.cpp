// AVX2 + FMA: for CPUs without native bf16 dot products. Weights are read from memory once per
// call and widened to fp32 in registers; up to 8 activation rows share each weight load, so decode
// steps stay bound by memory bandwidth, not by conversion. Up to 32 rows run as groups of 8 over
// the same small tile of weight rows, which the second and later groups read from cache.
//
// One 32-byte load holds 16 bf16 weights as 8 (even, odd) pairs of 16-bit halves: shifting each
// 32-bit lane left by 16 gives the even weights as fp32, masking off the low half gives the odd
// ones. The activations come de-interleaved to match, so the weights need no other widening.
#include <immintrin.h>

#include "gemv.h"

#pragma GCC target("avx2,fma")

namespace conveyor {
namespace {

constexpr int kGroup = 8;     // rows sharing one register load of weights
constexpr int64_t kTile = 8;  // weight rows per tile (at most 78 KB for this project's models: in L2)

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// U independent accumulators per activation row: with few rows a single FMA dependency chain
// would cap a core below its share of memory bandwidth.
template <int M, int U>
void rows(const float* x, const uint16_t* w, float* out, int64_t n0, int64_t n1, int64_t K, int64_t N) {
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc[U][M];
    for (int u = 0; u < U; ++u)
      for (int m = 0; m < M; ++m) acc[u][m] = _mm256_setzero_ps();
    const uint16_t* row = w + n * K;
    int64_t k = 0;
    for (; k + 16 * U <= K; k += 16 * U) {
      for (int u = 0; u < U; ++u) {
        __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k + 16 * u));
        __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
        __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(raw, high));
        for (int m = 0; m < M; ++m) {
          const float* xk = x + m * K + k + 16 * u;
          acc[u][m] = _mm256_fmadd_ps(even, _mm256_loadu_ps(xk), acc[u][m]);
          acc[u][m] = _mm256_fmadd_ps(odd, _mm256_loadu_ps(xk + 8), acc[u][m]);
        }
      }
    }
    for (; k < K; k += 16) {
      __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k));
      __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
      __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(raw, high));
      for (int m = 0; m < M; ++m) {
        acc[0][m] = _mm256_fmadd_ps(even, _mm256_loadu_ps(x + m * K + k), acc[0][m]);
        acc[0][m] = _mm256_fmadd_ps(odd, _mm256_loadu_ps(x + m * K + k + 8), acc[0][m]);
      }
    }
    for (int m = 0; m < M; ++m) {
      __m256 sum = acc[0][m];
      for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[u][m]);
      out[m * N + n] = hsum(sum);
    }
  }
}

using Kernel = void (*)(const float*, const uint16_t*, float*, int64_t, int64_t, int64_t, int64_t);

template <int M>
constexpr Kernel kernel_for() {
  return rows<M, (M == 1 ? 4 : M <= 4 ? 2 : 1)>;
}

constexpr Kernel kKernels[kGroup + 1] = {nullptr,          kernel_for<1>(), kernel_for<2>(),
                                         kernel_for<3>(), kernel_for<4>(), kernel_for<5>(),
                                         kernel_for<6>(), kernel_for<7>(), kernel_for<8>()};

}  // namespace

void rows_avx2(const float* x, const uint16_t* w, float* out, int64_t M, int64_t K, int64_t N, int64_t n0,
               int64_t n1) {
  for (int64_t n = n0; n < n1; n += kTile) {
    const int64_t end = n + kTile < n1 ? n + kTile : n1;
    for (int64_t m = 0; m < M; m += kGroup) {
      const int64_t num = M - m < kGroup ? M - m : kGroup;
      kKernels[num](x + m * K, w, out + m * N, n, end, K, N);
    }
  }
}

}  // namespace conveyor
