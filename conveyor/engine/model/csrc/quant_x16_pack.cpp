// The x16 layout (quant_x16.h) written from the file's blocks, and the activations' 8-bit rounding:
// plain C++ for any x86-64, shared by the instruction sets' kernels.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "quant.h"

namespace conveyor {
namespace {

constexpr int kRows = 16;

// One row's super-block of a K-quant as unsigned values u (Q4_K: q; Q6_K: q + 32) with its scales.
void unpack_q4k(const uint8_t* blk, uint8_t* u, uint8_t* sc, uint8_t* mn) {
  for (int j = 0; j < 8; ++j) {
    const uint8_t* q = blk + 4;
    if (j < 4) {
      sc[j] = q[j] & 63;
      mn[j] = q[j + 4] & 63;
    } else {
      sc[j] = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
      mn[j] = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
  }
  for (int i = 0; i < 4; ++i)
    for (int l = 0; l < 32; ++l) {
      u[64 * i + l] = blk[16 + 32 * i + l] & 0xF;
      u[64 * i + 32 + l] = blk[16 + 32 * i + l] >> 4;
    }
}
void unpack_q6k(const uint8_t* blk, uint8_t* u) {
  for (int h = 0; h < 2; ++h) {
    const uint8_t *ql = blk + 64 * h, *qh = blk + 128 + 32 * h;
    for (int l = 0; l < 32; ++l) {
      u[128 * h + l] = (ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4);
      u[128 * h + 32 + l] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
      u[128 * h + 64 + l] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
      u[128 * h + 96 + l] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
    }
  }
}

// Row r's super-block into the group's layout at p (q4k_super / q6k_super describe it).
void repack_super(int qtype, const uint8_t* blk, int r, uint8_t* p) {
  uint8_t u[256], sc[8], mn[8];
  if (qtype == kQ4_K) {
    unpack_q4k(blk, u, sc, mn);
    std::memcpy(p + 2 * r, blk, 2);
    std::memcpy(p + 32 + 2 * r, blk + 2, 2);
    for (int j = 0; j < 8; ++j) {
      p[64 + 16 * j + r] = sc[j];
      p[192 + 16 * j + r] = mn[j];
    }
  } else {
    unpack_q6k(blk, u);
    std::memcpy(p + 2 * r, blk + 208, 2);
    for (int g = 0; g < 16; ++g) p[32 + 16 * g + r] = blk[192 + g];
  }
  uint8_t* quants = p + (qtype == kQ4_K ? 320 : 288);
  for (int i = 0; i < 4; ++i)
    for (int c = 0; c < 8; ++c)
      for (int j = 0; j < 4; ++j) {
        const uint8_t lo = u[64 * i + 4 * c + j], hi = u[64 * i + 32 + 4 * c + j];
        quants[64 * (8 * i + c) + 4 * r + j] = (lo & 0xF) | ((hi & 0xF) << 4);
        if (qtype == kQ6_K)
          p[2336 + 64 * (4 * i + c / 2) + 4 * r + j] |= static_cast<uint8_t>(((lo >> 4) | ((hi >> 4) << 2)) << (4 * (c & 1)));
      }
}

// Row r's block of a 32-element type into the group's layout at p.
void repack_block32(int qtype, const uint8_t* blk, int r, uint8_t* p, uint64_t* masks) {
  const int64_t bytes = qtype == kQ8_0 ? 34 : qtype == kQ5_0 ? 22 : 18;
  std::memcpy(p + 2 * r, blk, 2);
  const uint8_t* qs = blk + bytes - (qtype == kQ8_0 ? 32 : 16);
  uint8_t* quants = p + 32 + (qtype == kQ5_0 ? 64 : 0);
  for (int c = 0; c < (qtype == kQ8_0 ? 8 : 4); ++c)
    for (int j = 0; j < 4; ++j)
      quants[64 * c + 4 * r + j] = qtype == kQ8_0 ? static_cast<uint8_t>(qs[4 * c + j] ^ 0x80) : qs[4 * c + j];
  if (qtype == kQ5_0) {
    uint32_t qh;
    std::memcpy(&qh, blk + 2, 4);
    for (int h = 0; h < 2; ++h)
      for (int c = 0; c < 4; ++c)
        for (int j = 0; j < 4; ++j)
          masks[4 * h + c] |= static_cast<uint64_t>((qh >> (16 * h + 4 * c + j)) & 1) << (4 * r + j);
  }
}

}  // namespace

int64_t x16_group_bytes(int qtype) {   // 32-element types: per block of 32; K-quants: per super-block of 256
  switch (qtype) {
    case kQ4_0: return 32 + 256;
    case kQ5_0: return 32 + 64 + 256;
    case kQ8_0: return 32 + 512;
    case kQ4_K: return 320 + 2048;
    case kQ6_K: return 288 + 2048 + 1024;
    default: return 0;
  }
}

// Rows of x [M, K] to 8 bits per block of 32: dx = max |x| / 127, q = round(x / dx) to nearest even (K
// a multiple of 32); s16: the sum of each 16 q. The same values on every instruction set.
void quantize_acts_x16(const float* x, int64_t M, int64_t K, int8_t* q, int32_t* s16, float* dx) {
  const int64_t nb = K / 32;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + m * K + 32 * b;
      float amax = 0.0f;
      bool finite = true;
      for (int i = 0; i < 32; ++i) {
        amax = std::max(amax, std::fabs(xb[i]));
        finite = finite && std::isfinite(xb[i]);
      }
      const float inv = finite && amax > 0.0f ? 127.0f / amax : 0.0f;
      int8_t* dst = q + m * K + 32 * b;
      int32_t sums[2] = {0, 0};
      for (int i = 0; i < 32; ++i) {
        dst[i] = finite ? static_cast<int8_t>(std::nearbyint(xb[i] * inv)) : 0;
        sums[i / 16] += dst[i];
      }
      // a NaN or infinity makes the block's products NaN, as the fp32 kernels' would be
      dx[m * nb + b] = finite ? amax / 127.0f : std::numeric_limits<float>::quiet_NaN();
      s16[m * 2 * nb + 2 * b] = sums[0];
      s16[m * 2 * nb + 2 * b + 1] = sums[1];
    }
  }
}

// Rows [16 g0, 16 g1) of the file's blocks w [N, row bytes] into the layout above (rows past N: zero
// scales and weights).
void repack_x16(int qtype, const uint8_t* w, uint8_t* out, int64_t N, int64_t K, int64_t g0, int64_t g1) {
  const bool kq = qtype == kQ4_K || qtype == kQ6_K;
  const int64_t elems = kq ? 256 : 32, nb = K / elems, S = x16_group_bytes(qtype);
  const int64_t bytes = qtype == kQ8_0 ? 34 : qtype == kQ5_0 ? 22 : qtype == kQ4_0 ? 18 : qtype == kQ4_K ? 144 : 210;
  for (int64_t g = g0; g < g1; ++g) {
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* p = out + (g * nb + b) * S;
      std::memset(p, 0, S);
      uint64_t masks[8] = {};
      for (int r = 0; r < kRows && g * kRows + r < N; ++r) {
        const uint8_t* blk = w + (g * kRows + r) * nb * bytes + b * bytes;
        if (kq) repack_super(qtype, blk, r, p);
        else repack_block32(qtype, blk, r, p, masks);
      }
      if (qtype == kQ5_0) std::memcpy(p + 32, masks, 64);
    }
  }
}

}  // namespace conveyor
