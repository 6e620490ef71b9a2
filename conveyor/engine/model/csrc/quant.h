// Quantized GGUF weights: one function per instruction set, each over weight rows [n0, n1).
// A weight row is K / block_elems blocks of its type, exactly as in the file (row_bytes bytes).
// The ISA files include no torch header (see gemv.h for why).
#pragma once
#include <cstdint>

namespace conveyor {

// The block formats, in the order of QTYPE_IDS in quant.py.
enum QType : int { kQ4_0, kQ4_1, kQ5_0, kQ5_1, kQ8_0, kQ4_K, kQ5_K, kQ6_K, kNumQTypes };

// out [M, N] fp32 = x [M, K] fp32 times w [N, K] transposed, for the weight rows [n0, n1).
void qrows_avx2(int qtype, const float* x, const uint8_t* w, float* out, int64_t M, int64_t K, int64_t N,
                int64_t n0, int64_t n1);
void qrows_avx512(int qtype, const float* x, const uint8_t* w, float* out, int64_t M, int64_t K, int64_t N,
                  int64_t n0, int64_t n1);

// Activations quantized to 8 bits per block of 32 (VNNI): x [M, K] -> q [M, K64] int8 (K64: K rounded up
// to 64), and per 4 values [M, K64 / 4]: off (int32), dx, sums (fp32); see quant_avx512vnni.cpp.
void quantize_acts_avx512vnni(int qtype, const float* x, int64_t M, int64_t K, int8_t* q, int32_t* off, float* dx,
                              float* sums);
void qrows_avx512vnni(int qtype, const int8_t* q, const int32_t* off, const float* dx, const float* sums,
                      const uint8_t* w, float* out, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1);

// Weights repacked 16 rows at a time (Q4_0, Q5_0, Q8_0, Q4_K, Q6_K; layout in quant_x16.h, written by
// quant_x16_pack.cpp) times activations quantized to 8 bits per block of 32: q [M, K] int8, s16
// [M, K / 16] (int32 sums), dx [M, K / 32] (fp32).
int64_t x16_group_bytes(int qtype);   // bytes of one group of 16 rows per block (K-quants: per 256); 0: none
void repack_x16(int qtype, const uint8_t* w, uint8_t* out, int64_t N, int64_t K, int64_t g0, int64_t g1);
void quantize_acts_x16(const float* x, int64_t M, int64_t K, int8_t* q, int32_t* s16, float* dx);
// out [M, N16] fp32 (N16: N rounded up to 16), the columns of groups [g0, g1)
void qgroups_x16_avx512vnni(int qtype, const int8_t* q, const int32_t* s16, const float* dx, const uint8_t* w,
                            float* out, int64_t M, int64_t K, int64_t N16, int64_t g0, int64_t g1);
void qgroups_x16_avx2(int qtype, const int8_t* q, const int32_t* s16, const float* dx, const uint8_t* w, float* out,
                      int64_t M, int64_t K, int64_t N16, int64_t g0, int64_t g1);

// Rows [n0, n1) of w de-quantized into out [N, K]: fp32, or bf16 (round to nearest even) if bf16.
void dequantize_avx2(int qtype, const uint8_t* w, void* out, bool bf16, int64_t K, int64_t n0, int64_t n1);
void dequantize_avx512(int qtype, const uint8_t* w, void* out, bool bf16, int64_t K, int64_t n0, int64_t n1);

}  // namespace conveyor
