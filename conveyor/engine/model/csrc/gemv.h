// One function per instruction set: bf16 weights w [N, K] times M activation rows, for the
// weight rows [n0, n1), written to out [M, N] in fp32. The ISA files include no torch header, so
// that no inline function they instantiate is compiled for an instruction set the CPU may lack.
#pragma once
#include <cstdint>

namespace conveyor {

// x: fp32, each block of 16 de-interleaved (8 even-indexed values, then the 8 odd ones). K % 16 == 0.
void rows_avx2(const float* x, const uint16_t* w, float* out, int64_t M, int64_t K, int64_t N, int64_t n0,
               int64_t n1);
// x: fp32, each block of 32 de-interleaved (16 even-indexed values, then the 16 odd ones). K % 32 == 0.
void rows_avx512(const float* x, const uint16_t* w, float* out, int64_t M, int64_t K, int64_t N, int64_t n0,
                 int64_t n1);
// x: [M, 2, K] bf16 in natural order, per row hi = bf16(x) then lo = bf16(x - hi) (vdpbf16ps). K % 32 == 0.
void rows_avx512bf16(const uint16_t* x, const uint16_t* w, float* out, int64_t M, int64_t K, int64_t N,
                     int64_t n0, int64_t n1);

}  // namespace conveyor
