// AVX512_BF16: vdpbf16ps multiplies 32 bf16 weights by 32 bf16 activations and adds pairs into
// 16 fp32 accumulators in one instruction, so the weights need no widening. Each activation row
// comes as two bf16 rows, hi = bf16(x) and lo = bf16(x - hi), and both are multiplied: x is then
// carried to about 16 bits (activations rounded to plain bf16 failed the bf16 exactness test).
// Same tiling as gemv_avx512.cpp.
#include <immintrin.h>

#include "gemv.h"

#pragma GCC target("avx512f,avx512bw,avx512bf16")

namespace conveyor {
namespace {

constexpr int kGroup = 8;
constexpr int64_t kTile = 8;

inline __m512bh load_bf16(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }

template <int M, int R>
void rows(const uint16_t* x, const uint16_t* w, float* out, int64_t n, int64_t K, int64_t N) {
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512bh wr[R];
    for (int r = 0; r < R; ++r) wr[r] = load_bf16(w + (n + r) * K + k);
    for (int m = 0; m < M; ++m) {
      const __m512bh hi = load_bf16(x + 2 * m * K + k), lo = load_bf16(x + (2 * m + 1) * K + k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc[r][m], hi, wr[r]), lo, wr[r]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) out[m * N + n + r] = _mm512_reduce_add_ps(acc[r][m]);
}

using Kernel = void (*)(const uint16_t*, const uint16_t*, float*, int64_t, int64_t, int64_t);

template <int M>
constexpr Kernel wide() { return rows<M, (M <= 4 ? 4 : 2)>; }
constexpr int width(int M) { return M <= 4 ? 4 : 2; }

constexpr Kernel kWide[kGroup + 1] = {nullptr, wide<1>(), wide<2>(), wide<3>(), wide<4>(),
                                      wide<5>(), wide<6>(), wide<7>(), wide<8>()};
constexpr Kernel kOne[kGroup + 1] = {nullptr,       rows<1, 1>, rows<2, 1>, rows<3, 1>, rows<4, 1>,
                                     rows<5, 1>, rows<6, 1>, rows<7, 1>, rows<8, 1>};

}  // namespace

void rows_avx512bf16(const uint16_t* x, const uint16_t* w, float* out, int64_t M, int64_t K, int64_t N,
                     int64_t n0, int64_t n1) {
  for (int64_t t = n0; t < n1; t += kTile) {
    const int64_t end = t + kTile < n1 ? t + kTile : n1;
    for (int64_t m = 0; m < M; m += kGroup) {
      const int num = static_cast<int>(M - m < kGroup ? M - m : kGroup);
      int64_t n = t;
      for (; n + width(num) <= end; n += width(num)) kWide[num](x + 2 * m * K, w, out + m * N, n, K, N);
      for (; n < end; ++n) kOne[num](x + 2 * m * K, w, out + m * N, n, K, N);
    }
  }
}

}  // namespace conveyor
