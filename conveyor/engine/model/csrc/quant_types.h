// The GGUF block formats, written once over an instruction set's vector type V (quant_avx2.cpp,
// quant_avx512.cpp define V and include this after their target pragma; everything here has internal
// linkage, so no function compiled for one instruction set is shared with another file).
//
// Every type is split into groups of 16 consecutive weights that share one scale s and, for the
// types with a minimum, one offset o: weight = float(q) * s (+ o), q the group's integers. This is
// the arithmetic of gguf.quants (and ggml), in the same order, so that de-quantized values are
// bit-exact (the files build with -ffp-contract=off).
#pragma once
#include <cstdint>
#include <cstring>

namespace conveyor {
namespace {

inline float fp16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline uint32_t u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// The 6-bit scale and minimum of sub-block j of a Q4_K / Q5_K block (ggml's get_scale_min_k4).
inline void scale_min_k4(int j, const uint8_t* q, int* sc, int* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// 32 weights: fp16 d, 16 bytes of nibbles (weights 0-15 low, 16-31 high); q - 8.
template <class V>
struct Q4_0 {
  static constexpr int kElems = 32, kBytes = 18, kGroups = 2;
  static constexpr bool kOffset = false;
  static void scales(const uint8_t* b, float* s, float*) { s[0] = s[1] = fp16(b); }
  static typename V::I quants(const uint8_t* b, int g) { return V::sub(V::nibbles(b + 2, 4 * g), 8); }
};

// 32 weights: fp16 d, fp16 m, nibbles; q * d + m.
template <class V>
struct Q4_1 {
  static constexpr int kElems = 32, kBytes = 20, kGroups = 2;
  static constexpr bool kOffset = true;
  static void scales(const uint8_t* b, float* s, float* o) {
    s[0] = s[1] = fp16(b);
    o[0] = o[1] = fp16(b + 2);
  }
  static typename V::I quants(const uint8_t* b, int g) { return V::nibbles(b + 4, 4 * g); }
};

// 32 weights: fp16 d, 32 high bits, nibbles; q - 16.
template <class V>
struct Q5_0 {
  static constexpr int kElems = 32, kBytes = 22, kGroups = 2;
  static constexpr bool kOffset = false;
  static void scales(const uint8_t* b, float* s, float*) { s[0] = s[1] = fp16(b); }
  static typename V::I quants(const uint8_t* b, int g) {
    return V::sub(V::or_(V::nibbles(b + 6, 4 * g), V::bits16(u32(b + 2) >> (16 * g))), 16);
  }
};

// 32 weights: fp16 d, fp16 m, 32 high bits, nibbles; q * d + m.
template <class V>
struct Q5_1 {
  static constexpr int kElems = 32, kBytes = 24, kGroups = 2;
  static constexpr bool kOffset = true;
  static void scales(const uint8_t* b, float* s, float* o) {
    s[0] = s[1] = fp16(b);
    o[0] = o[1] = fp16(b + 2);
  }
  static typename V::I quants(const uint8_t* b, int g) {
    return V::or_(V::nibbles(b + 8, 4 * g), V::bits16(u32(b + 4) >> (16 * g)));
  }
};

// 32 weights: fp16 d, 32 int8.
template <class V>
struct Q8_0 {
  static constexpr int kElems = 32, kBytes = 34, kGroups = 2;
  static constexpr bool kOffset = false;
  static void scales(const uint8_t* b, float* s, float*) { s[0] = s[1] = fp16(b); }
  static typename V::I quants(const uint8_t* b, int g) { return V::s8(b + 2 + 16 * g); }
};

// 256 weights: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and minima for 8 sub-blocks of 32, then
// 128 bytes of nibbles: 64 weights per 32 bytes (sub-block 2c low nibbles, 2c + 1 high).
// Q5_K adds 32 bytes of high bits before the nibbles (bit j of byte l: sub-block j, weight l).
inline void k_scales(const uint8_t* b, float* s, float* o) {
  const float d = fp16(b), dmin = fp16(b + 2);
  for (int j = 0; j < 8; ++j) {
    int sc, m;
    scale_min_k4(j, b + 4, &sc, &m);
    s[2 * j] = s[2 * j + 1] = d * static_cast<float>(sc);
    o[2 * j] = o[2 * j + 1] = -(dmin * static_cast<float>(m));
  }
}

template <class V>
struct Q4_K {
  static constexpr int kElems = 256, kBytes = 144, kGroups = 16;
  static constexpr bool kOffset = true;
  static void scales(const uint8_t* b, float* s, float* o) { k_scales(b, s, o); }
  static typename V::I quants(const uint8_t* b, int g) {
    const int j = g >> 1;
    return V::nibbles(b + 16 + 32 * (j >> 1) + 16 * (g & 1), 4 * (j & 1));
  }
};

template <class V>
struct Q5_K {
  static constexpr int kElems = 256, kBytes = 176, kGroups = 16;
  static constexpr bool kOffset = true;
  static void scales(const uint8_t* b, float* s, float* o) { k_scales(b, s, o); }
  static typename V::I quants(const uint8_t* b, int g) {
    const int j = g >> 1;
    const typename V::I low = V::nibbles(b + 48 + 32 * (j >> 1) + 16 * (g & 1), 4 * (j & 1));
    return V::or_(low, V::field(b + 16 + 16 * (g & 1), j, 1));
  }
};

// 256 weights: 128 bytes of low nibbles, 64 of 2-bit high parts, 16 int8 scales (one per 16
// weights), fp16 d; q - 32. Each half of 128 weights: 64 low-nibble bytes, 32 high-part bytes.
template <class V>
struct Q6_K {
  static constexpr int kElems = 256, kBytes = 210, kGroups = 16;
  static constexpr bool kOffset = false;
  static void scales(const uint8_t* b, float* s, float*) {
    const float d = fp16(b + 208);
    for (int g = 0; g < 16; ++g) s[g] = d * static_cast<float>(static_cast<int8_t>(b[192 + g]));
  }
  static typename V::I quants(const uint8_t* b, int g) {
    const int h = g >> 3, quarter = (g & 7) >> 1, l = 16 * (g & 1);
    const typename V::I low = V::nibbles(b + 64 * h + 32 * (quarter & 1) + l, 4 * (quarter >> 1));
    return V::sub(V::or_(low, V::field(b + 128 + 32 * h + l, 2 * quarter, 3)), 32);
  }
};

}  // namespace
}  // namespace conveyor
