// The torch-facing side of the bf16 kernels: shape checks, the activation layout each instruction
// set wants, and the parallel loop over weight rows. Compiled for baseline x86-64; each kernel's
// instructions live in its own file (gemv_avx2.cpp, gemv_avx512.cpp, gemv_avx512bf16.cpp).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "gemv.h"

namespace {

void check(const torch::Tensor& x, const torch::Tensor& w, int64_t block, const char* isa, bool supported) {
  TORCH_CHECK(supported, "this CPU lacks ", isa);
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.dim() == 2, "w must be contiguous bf16 [N, K]");
  TORCH_CHECK(x.dim() == 2 && w.size(1) == x.size(1) && x.size(1) % block == 0 && x.size(0) >= 1,
              "unsupported shape");
}

// Activations as fp32, each block of `block` values reordered to its even-indexed half, then its odd one.
torch::Tensor deinterleaved(const torch::Tensor& x, int64_t block) {
  const int64_t M = x.size(0), K = x.size(1);
  return x.to(at::kFloat).reshape({M, K / block, block / 2, 2}).transpose(2, 3).contiguous();
}

template <typename F>
torch::Tensor run(const torch::Tensor& x, const torch::Tensor& w, F rows) {
  const int64_t M = x.size(0), N = w.size(0);
  torch::Tensor out = torch::empty({M, N}, x.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) { rows(op, M, n0, n1); });
  return out;
}

const uint16_t* bits(const torch::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); }

}  // namespace

// Each: x [M, K] (any float dtype, M >= 1), w [N, K] contiguous bf16. Returns fp32 [M, N].
torch::Tensor gemv_avx2(torch::Tensor x, torch::Tensor w) {
  check(x, w, 16, "AVX2/FMA", __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"));
  torch::Tensor xf = deinterleaved(x, 16);
  const float* xp = xf.data_ptr<float>();
  const int64_t K = x.size(1), N = w.size(0);
  return run(x, w, [&](float* out, int64_t M, int64_t n0, int64_t n1) {
    conveyor::rows_avx2(xp, bits(w), out, M, K, N, n0, n1);
  });
}

torch::Tensor gemv_avx512(torch::Tensor x, torch::Tensor w) {
  check(x, w, 32, "AVX512F/BW", __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"));
  torch::Tensor xf = deinterleaved(x, 32);
  const float* xp = xf.data_ptr<float>();
  const int64_t K = x.size(1), N = w.size(0);
  return run(x, w, [&](float* out, int64_t M, int64_t n0, int64_t n1) {
    conveyor::rows_avx512(xp, bits(w), out, M, K, N, n0, n1);
  });
}

torch::Tensor gemv_avx512bf16(torch::Tensor x, torch::Tensor w) {
  check(x, w, 32, "AVX512_BF16", __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw"));
  torch::Tensor xf = x.to(at::kFloat), hi = xf.to(at::kBFloat16);
  torch::Tensor xb = torch::stack({hi, (xf - hi.to(at::kFloat)).to(at::kBFloat16)}, 1).contiguous();
  const uint16_t* xp = bits(xb);
  const int64_t K = x.size(1), N = w.size(0);
  return run(x, w, [&](float* out, int64_t M, int64_t n0, int64_t n1) {
    conveyor::rows_avx512bf16(xp, bits(w), out, M, K, N, n0, n1);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_avx2", &gemv_avx2, "bf16 weights x fp32 rows (AVX2, widen and FMA)");
  m.def("gemv_avx512", &gemv_avx512, "bf16 weights x fp32 rows (AVX-512F, widen and FMA)");
  m.def("gemv_avx512bf16", &gemv_avx512bf16, "bf16 weights x fp32 rows split in two bf16 rows (vdpbf16ps)");
}
