// The torch-facing side of the quantized kernels: the parallel loops over weight rows and the check
// that the CPU has the instruction set asked for. Shapes are checked in quant.py (check_shape).
// Compiled for baseline x86-64; the kernels live in quant_avx2.cpp, quant_avx512.cpp (fp32 activations)
// and quant_avx512vnni.cpp (activations quantized to 8 bits).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "quant.h"

namespace {

using Rows = void (*)(int, const float*, const uint8_t*, float*, int64_t, int64_t, int64_t, int64_t, int64_t);
using Dequantize = void (*)(int, const uint8_t*, void*, bool, int64_t, int64_t, int64_t);

bool has(const std::string& isa) {
  if (isa == "x86-64") return true;
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == "avx512") return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  if (isa == "avx512vnni") return has("avx512") && __builtin_cpu_supports("avx512vnni");
  return false;
}

void check(const torch::Tensor& w, int64_t qtype, const std::string& isa) {
  TORCH_CHECK(has(isa), "this CPU lacks ", isa);
  TORCH_CHECK(qtype >= 0 && qtype < conveyor::kNumQTypes, "unknown quantization type ", qtype);
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.dim() == 2, "w must be contiguous uint8 [N, bytes]");
}

}  // namespace

// Activations to 8 bits per block, then the VNNI products.
torch::Tensor qmatmul_vnni(const torch::Tensor& x, const torch::Tensor& w, int64_t qtype) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), K64 = (K + 63) / 64 * 64;
  torch::Tensor q = torch::empty({M, K64}, x.options().dtype(at::kChar));
  torch::Tensor off = torch::empty({M, K64 / 4}, x.options().dtype(at::kInt));
  torch::Tensor dx = torch::empty({M, K64 / 4}, x.options()), sums = torch::empty({M, K64 / 4}, x.options());
  conveyor::quantize_acts_avx512vnni(static_cast<int>(qtype), x.data_ptr<float>(), M, K, q.data_ptr<int8_t>(),
                                     off.data_ptr<int32_t>(), dx.data_ptr<float>(), sums.data_ptr<float>());
  torch::Tensor out = torch::empty({M, N}, x.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    conveyor::qrows_avx512vnni(static_cast<int>(qtype), q.data_ptr<int8_t>(), off.data_ptr<int32_t>(),
                               dx.data_ptr<float>(), sums.data_ptr<float>(), wp, op, M, K, N, n0, n1);
  });
  return out;
}

// x: contiguous fp32 [M, K]; w: [N, row_bytes(K)] blocks. Returns fp32 [M, N].
torch::Tensor qmatmul(torch::Tensor x, torch::Tensor w, int64_t qtype, const std::string& isa) {
  check(w, qtype, isa);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2 && x.size(0) >= 1, "bad x");
  if (isa == "avx512vnni") return qmatmul_vnni(x, w, qtype);
  const Rows rows = isa == "avx2" ? conveyor::qrows_avx2 : conveyor::qrows_avx512;
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  torch::Tensor out = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) { rows(static_cast<int>(qtype), xp, wp, op, M, K, N, n0, n1); });
  return out;
}

// The file's rows of blocks w [N, row_bytes] repacked 16 rows at a time: uint8 [ceil(N / 16), K / 32 * group bytes].
torch::Tensor repack_x16(const torch::Tensor& w, int64_t qtype, int64_t K) {
  check(w, qtype, "x86-64");
  const int64_t S = conveyor::x16_group_bytes(static_cast<int>(qtype)), N = w.size(0), G = (N + 15) / 16;
  const int64_t elems = qtype == conveyor::kQ4_K || qtype == conveyor::kQ6_K ? 256 : 32;
  TORCH_CHECK(S > 0 && K % elems == 0, "no x16 layout for this type or column count");
  torch::Tensor out = torch::empty({G, K / elems * S}, w.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  uint8_t* op = out.data_ptr<uint8_t>();
  at::parallel_for(0, G, 16, [&](int64_t g0, int64_t g1) { conveyor::repack_x16(static_cast<int>(qtype), wp, op, N, K, g0, g1); });
  return out;
}

// x: contiguous fp32 [M, K]; packed: repack_x16's; returns fp32 [M, N].
torch::Tensor qmatmul_x16(const torch::Tensor& x, const torch::Tensor& packed, int64_t qtype, int64_t N,
                          const std::string& isa) {
  check(packed, qtype, isa);
  TORCH_CHECK(isa == "avx512vnni" || isa == "avx2", "no x16 kernel for ", isa);
  const auto groups = isa == "avx2" ? conveyor::qgroups_x16_avx2 : conveyor::qgroups_x16_avx512vnni;
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2 && x.size(0) >= 1, "bad x");
  const int64_t M = x.size(0), K = x.size(1), G = packed.size(0), N16 = 16 * G;
  const int64_t elems = qtype == conveyor::kQ4_K || qtype == conveyor::kQ6_K ? 256 : 32;
  TORCH_CHECK(K % elems == 0 && packed.size(1) == K / elems * conveyor::x16_group_bytes(static_cast<int>(qtype)) &&
              N <= N16 && N > N16 - 16, "packed weight does not match x");
  torch::Tensor q = torch::empty({M, K}, x.options().dtype(at::kChar));
  torch::Tensor s16 = torch::empty({M, K / 16}, x.options().dtype(at::kInt)), dx = torch::empty({M, K / 32}, x.options());
  conveyor::quantize_acts_x16(x.data_ptr<float>(), M, K, q.data_ptr<int8_t>(), s16.data_ptr<int32_t>(), dx.data_ptr<float>());
  torch::Tensor out = torch::empty({M, N16}, x.options());
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, G, 4, [&](int64_t g0, int64_t g1) {
    groups(static_cast<int>(qtype), q.data_ptr<int8_t>(), s16.data_ptr<int32_t>(), dx.data_ptr<float>(), wp, op, M, K,
           N16, g0, g1);
  });
  return N == N16 ? out : out.narrow(1, 0, N).contiguous();
}

// out: contiguous fp32 or bf16 [N, K], written in place.
void dequantize(torch::Tensor w, int64_t qtype, torch::Tensor out, const std::string& isa) {
  check(w, qtype, isa);
  const bool bf16 = out.scalar_type() == at::kBFloat16;
  TORCH_CHECK((bf16 || out.scalar_type() == at::kFloat) && out.is_contiguous() && out.dim() == 2 &&
              out.size(0) == w.size(0), "bad out");
  const Dequantize fn = isa == "avx2" ? conveyor::dequantize_avx2 : conveyor::dequantize_avx512;
  const int64_t K = out.size(1);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  void* op = out.data_ptr();
  at::parallel_for(0, w.size(0), 16, [&](int64_t n0, int64_t n1) { fn(static_cast<int>(qtype), wp, op, bf16, K, n0, n1); });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qmatmul", &qmatmul, "fp32 rows x quantized GGUF weight rows, de-quantized in registers");
  m.def("repack_x16", &repack_x16, "quantized GGUF weight rows repacked 16 rows at a time (VNNI)");
  m.def("qmatmul_x16", &qmatmul_x16, "fp32 rows (quantized to 8 bits) x x16-repacked weights");
  m.def("dequantize", &dequantize, "quantized GGUF weight rows to fp32 or bf16");
}
