// One CPU op for the glue between a decoder layer's fused QKV product and attention: RoPE on the
// query and key heads, both cast to the KV cache's dtype, keys and values stored in their cache slots.
// In PyTorch ops this is about 20 dispatches per layer, a large share of a one-token step's time on a
// CPU. The arithmetic is PyTorch's, in its order (separate multiply and subtract: built with
// -ffp-contract=off; bf16 rounded to nearest even), so results are bit-identical to llama.py's
// apply_rope followed by .to(cache dtype).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <cstring>

namespace {

inline uint16_t to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7FC0;   // NaN, as c10::BFloat16
  return static_cast<uint16_t>((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

template <class T>
inline T cast(float f);
template <>
inline float cast<float>(float f) { return f; }
template <>
inline uint16_t cast<uint16_t>(float f) { return to_bf16(f); }

// heads [n, D] of one token: rotated (rope) or copied into out (n heads x D).
template <class T>
void heads(const float* x, const float* cos, const float* sin, T* out, int64_t n, int64_t D, bool rope) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < n; ++h) {
    const float* x1 = x + h * D;
    const float* x2 = x1 + half;
    T* o = out + h * D;
    if (!rope) {
      for (int64_t i = 0; i < D; ++i) o[i] = cast<T>(x1[i]);
      continue;
    }
    for (int64_t i = 0; i < half; ++i) {
      const float a = x1[i] * cos[i], b = x2[i] * sin[i], c = x2[i] * cos[i], d = x1[i] * sin[i];
      o[i] = cast<T>(a - b);
      o[i + half] = cast<T>(c + d);
    }
  }
}

template <class T>
void run(const float* qkv, const float* cos, const float* sin, const int64_t* slots, T* q, T* k, T* v, T* kc, T* vc,
         int64_t tokens, int64_t H, int64_t KV, int64_t D) {
  const int64_t width = (H + 2 * KV) * D, half = D / 2, kv = KV * D;
  at::parallel_for(0, tokens, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* row = qkv + t * width;
      heads(row, cos + t * half, sin + t * half, q + t * H * D, H, D, true);
      heads(row + H * D, cos + t * half, sin + t * half, k + t * kv, KV, D, true);
      heads(row + (H + KV) * D, cos, sin, v + t * kv, KV, D, false);
      std::memcpy(kc + slots[t] * kv, k + t * kv, kv * sizeof(T));
      std::memcpy(vc + slots[t] * kv, v + t * kv, kv * sizeof(T));
    }
  });
}

}  // namespace

// qkv: fp32 [T, (H + 2 KV) * D]; cos, sin: fp32 [T, D / 2]; k_cache, v_cache: [..., KV, D] contiguous,
// fp32 or bf16; slots: int64 [T]. Returns q [T, H, D], k and v [T, KV, D] in the cache's dtype (k rotated).
std::vector<torch::Tensor> rope_store_kv(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                                         torch::Tensor k_cache, torch::Tensor v_cache, const torch::Tensor& slots,
                                         int64_t H, int64_t KV, int64_t D) {
  const int64_t T = qkv.size(0);
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && qkv.is_contiguous() && qkv.dim() == 2 && qkv.size(1) == (H + 2 * KV) * D,
              "qkv must be contiguous fp32 [T, (H + 2 KV) * D]");
  TORCH_CHECK(D % 2 == 0 && cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
              sin.is_contiguous() && cos.numel() == T * D / 2 && sin.numel() == T * D / 2, "cos, sin: fp32 [T, D / 2]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == T, "slots: int64 [T]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.scalar_type() == v_cache.scalar_type() &&
              k_cache.numel() == v_cache.numel() && k_cache.numel() % (KV * D) == 0, "bad KV cache");
  const int64_t capacity = k_cache.numel() / (KV * D);
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(sp[t] >= 0 && sp[t] < capacity, "slot out of range");
  const auto opts = qkv.options().dtype(k_cache.scalar_type());
  torch::Tensor q = torch::empty({T, H, D}, opts), k = torch::empty({T, KV, D}, opts), v = torch::empty({T, KV, D}, opts);
  if (k_cache.scalar_type() == at::kFloat) {
    run<float>(qkv.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), sp, q.data_ptr<float>(),
               k.data_ptr<float>(), v.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), T, H, KV, D);
  } else {
    TORCH_CHECK(k_cache.scalar_type() == at::kBFloat16, "the KV cache must be fp32 or bf16");
    auto u16 = [](torch::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); };
    run<uint16_t>(qkv.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), sp, u16(q), u16(k), u16(v),
                  u16(k_cache), u16(v_cache), T, H, KV, D);
  }
  return {q, k, v};
}

// RMSNorm of fp32 rows x [T, H]: w * (x * (1 / sqrt(mean(x^2) + eps))), as transformers' Llama and
// Qwen2 norms in fp32; the mean of squares is summed in double (PyTorch's reduction order is its own).
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2, "x must be contiguous fp32 [T, H]");
  const int64_t T = x.size(0), H = x.size(1);
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == H, "w must be fp32 [H]");
  torch::Tensor out = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* r = xp + t * H;
      double sum = 0.0;
      for (int64_t i = 0; i < H; ++i) sum += static_cast<double>(r[i]) * r[i];
      const float inv = 1.0f / std::sqrt(static_cast<float>(sum / H) + static_cast<float>(eps));
      for (int64_t i = 0; i < H; ++i) op[t * H + i] = wp[i] * (r[i] * inv);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm of fp32 rows");
  m.def("rope_store_kv", &rope_store_kv, "RoPE on q and k, cast to the cache dtype, k and v stored in their slots");
}
