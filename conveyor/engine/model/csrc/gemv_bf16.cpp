// bf16 weight x few-row activation products for AVX2 CPUs without native bf16 dot products.
// Weights are read once per call and widened to fp32 in registers; up to 8 activation rows
// share each weight load, so decode steps stay bound by memory bandwidth, not by conversion.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

namespace {

constexpr int kMaxRows = 8;
constexpr int kRowsPerTask = 4;

inline __m256 load_bf16(const at::BFloat16* p) {
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// U independent accumulators per activation row: with few rows a single FMA dependency chain
// (4 cycles per 8 weights) would cap a core near 12 GB/s, below its share of memory bandwidth.
template <int M, int U>
void rows_kernel(const float* x, const at::BFloat16* w, float* out, int64_t n0, int64_t n1, int64_t K,
                 int64_t N) {
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc[U][M];
    for (int u = 0; u < U; ++u)
      for (int m = 0; m < M; ++m) acc[u][m] = _mm256_setzero_ps();
    const at::BFloat16* row = w + n * K;
    int64_t k = 0;
    for (; k + 8 * U <= K; k += 8 * U) {
      for (int u = 0; u < U; ++u) {
        __m256 wf = load_bf16(row + k + 8 * u);
        for (int m = 0; m < M; ++m)
          acc[u][m] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(x + m * K + k + 8 * u), acc[u][m]);
      }
    }
    for (; k < K; k += 8) {
      __m256 wf = load_bf16(row + k);
      for (int m = 0; m < M; ++m) acc[0][m] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(x + m * K + k), acc[0][m]);
    }
    for (int m = 0; m < M; ++m) {
      __m256 sum = acc[0][m];
      for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[u][m]);
      out[m * N + n] = hsum(sum);
    }
  }
}

template <int M>
void run(const float* x, const at::BFloat16* w, float* out, int64_t K, int64_t N) {
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) { rows_kernel<M, (M == 1 ? 4 : M <= 4 ? 2 : 1)>(x, w, out, begin, end, K, N); });
}

}  // namespace

// x: [M, K] (any float dtype, M <= 8), w: [N, K] bf16, K a multiple of 8. Returns fp32 [M, N].
torch::Tensor gemv_bf16(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.dim() == 2, "w must be contiguous bf16 [N, K]");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K && K % 8 == 0 && M >= 1 && M <= kMaxRows, "unsupported shape");
  torch::Tensor xf = x.to(at::kFloat).contiguous();
  torch::Tensor out = torch::empty({M, N}, x.options().dtype(at::kFloat));
  const float* xp = xf.data_ptr<float>();
  const at::BFloat16* wp = w.data_ptr<at::BFloat16>();
  float* op = out.data_ptr<float>();
  switch (M) {
    case 1: run<1>(xp, wp, op, K, N); break;
    case 2: run<2>(xp, wp, op, K, N); break;
    case 3: run<3>(xp, wp, op, K, N); break;
    case 4: run<4>(xp, wp, op, K, N); break;
    case 5: run<5>(xp, wp, op, K, N); break;
    case 6: run<6>(xp, wp, op, K, N); break;
    case 7: run<7>(xp, wp, op, K, N); break;
    default: run<8>(xp, wp, op, K, N); break;
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("gemv_bf16", &gemv_bf16, "bf16 weights x few rows (AVX2)"); }
