// The quantized products and de-quantization, written once over an instruction set's vectors V of 16
// lanes (included after quant_types.h; internal linkage). Activations are fp32: each group of 16
// weights is de-quantized in registers (bit-exact, see quant_types.h) and multiplied into every
// activation row of the pass with FMAs. R weight rows go together so that each activation load feeds
// R of them; a tile of kTile weight rows is revisited by each group of V::kGroup activation rows, so
// later groups read its blocks from cache.
#pragma once
#include <cstdint>
#include <utility>

#include "quant.h"
#include "quant_types.h"

namespace conveyor {
namespace {

constexpr int64_t kTile = 8;
// How far ahead of each weight row's block to prefetch, as in quant_avx512vnni.cpp (past a row's end:
// the rows the next tiles read; a prefetch never faults).
constexpr int64_t kAhead = 2048;

template <class T>
constexpr int64_t row_bytes(int64_t K) { return K / T::kElems * T::kBytes; }

template <class V, class T>
inline typename V::F weights(const uint8_t* block, int g, const float* s, const float* o) {
  const typename V::F v = V::mul(V::cvt(T::quants(block, g)), s[g]);
  if constexpr (T::kOffset) return V::add(v, o[g]);
  return v;
}

template <class V, class T, int G, int R>
void tile(const float* x, const uint8_t* w, float* out, int64_t n, int64_t K, int64_t N) {
  const int64_t rb = row_bytes<T>(K);
  typename V::F acc[R][G];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < G; ++m) acc[r][m] = V::zero();
  for (int64_t b = 0; b < K / T::kElems; ++b) {
    float s[R][T::kGroups], o[R][T::kGroups];
    for (int r = 0; r < R; ++r) {
      const uint8_t* block = w + (n + r) * rb + b * T::kBytes;
      T::scales(block, s[r], o[r]);
      for (int l = 0; l < T::kBytes; l += 64) _mm_prefetch(reinterpret_cast<const char*>(block + kAhead + l), _MM_HINT_T0);
    }
    for (int g = 0; g < T::kGroups; ++g) {
      const int64_t k = b * T::kElems + 16 * g;
      typename V::F wv[R];
      for (int r = 0; r < R; ++r) wv[r] = weights<V, T>(w + (n + r) * rb + b * T::kBytes, g, s[r], o[r]);
      for (int m = 0; m < G; ++m) {
        const typename V::F xv = V::load(x + m * K + k);
        for (int r = 0; r < R; ++r) acc[r][m] = V::fma(wv[r], xv, acc[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < G; ++m) out[m * N + n + r] = V::sum(acc[r][m]);
}

using Tile = void (*)(const float*, const uint8_t*, float*, int64_t, int64_t, int64_t);

template <class V, class T, int R, int... G>
Tile pick(int g, std::integer_sequence<int, G...>) {
  Tile t = nullptr;
  ((g == G + 1 ? (t = tile<V, T, G + 1, (R ? R : V::width(G + 1))>) : t), ...);
  return t;
}

// R = 0: V::width(G) weight rows per call; R = 1: one.
template <class V, class T, int R>
Tile tile_for(int g) { return pick<V, T, R>(g, std::make_integer_sequence<int, V::kGroup>{}); }

template <class V, class T>
void rows(const float* x, const uint8_t* w, float* out, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t t = n0; t < n1; t += kTile) {
    const int64_t end = t + kTile < n1 ? t + kTile : n1;
    for (int64_t m = 0; m < M; m += V::kGroup) {
      const int num = static_cast<int>(M - m < V::kGroup ? M - m : V::kGroup);
      const Tile wide = tile_for<V, T, 0>(num), one = tile_for<V, T, 1>(num);
      int64_t n = t;
      for (; n + V::width(num) <= end; n += V::width(num)) wide(x + m * K, w, out + m * N, n, K, N);
      for (; n < end; ++n) one(x + m * K, w, out + m * N, n, K, N);
    }
  }
}

template <class V, class T, bool BF16>
void dequantize_rows(const uint8_t* w, void* out, int64_t K, int64_t n0, int64_t n1) {
  const int64_t rb = row_bytes<T>(K);
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t b = 0; b < K / T::kElems; ++b) {
      const uint8_t* block = w + n * rb + b * T::kBytes;
      float s[T::kGroups], o[T::kGroups];
      T::scales(block, s, o);
      for (int g = 0; g < T::kGroups; ++g) {
        const int64_t at = n * K + b * T::kElems + 16 * g;
        const typename V::F v = weights<V, T>(block, g, s, o);
        if constexpr (BF16) V::store_bf16(static_cast<uint16_t*>(out) + at, v);
        else V::store(static_cast<float*>(out) + at, v);
      }
    }
  }
}

template <class V, class F>
void with_type(int qtype, F&& f) {
  switch (qtype) {
    case kQ4_0: return f(Q4_0<V>{});
    case kQ4_1: return f(Q4_1<V>{});
    case kQ5_0: return f(Q5_0<V>{});
    case kQ5_1: return f(Q5_1<V>{});
    case kQ8_0: return f(Q8_0<V>{});
    case kQ4_K: return f(Q4_K<V>{});
    case kQ5_K: return f(Q5_K<V>{});
    case kQ6_K: return f(Q6_K<V>{});
    default: return;
  }
}

template <class V>
void qrows(int qtype, const float* x, const uint8_t* w, float* out, int64_t M, int64_t K, int64_t N, int64_t n0,
           int64_t n1) {
  with_type<V>(qtype, [&](auto t) { rows<V, decltype(t)>(x, w, out, M, K, N, n0, n1); });
}

template <class V>
void dequantize(int qtype, const uint8_t* w, void* out, bool bf16, int64_t K, int64_t n0, int64_t n1) {
  with_type<V>(qtype, [&](auto t) {
    if (bf16) dequantize_rows<V, decltype(t), true>(w, out, K, n0, n1);
    else dequantize_rows<V, decltype(t), false>(w, out, K, n0, n1);
  });
}

}  // namespace
}  // namespace conveyor
