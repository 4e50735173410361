// Host-side entry points of csrc/cuda/lora_linear.cu: the thin (rank-r) products of the LoRA linear
// layer on raw device pointers and a stream, no torch. The big GEMMs (x W^T, dY W) are cuBLAS
// calls made through ATen by ops_cuda.cpp; these kernels do everything of width r around them.
//
// All matrices are row-major and contiguous. Every kernel reads its inputs in their storage
// dtype (fp32, fp16 or bf16; the r-wide operands may be fp32 while the wide ones are half),
// computes in fp32 and runs on `stream` without host synchronisation. None uses atomics: sums
// are combined in a fixed order, so results are deterministic for a given device.
#pragma once

#include <cstddef>
#include <cuda_runtime_api.h>

#include "dafast/common.h"

namespace dafast {

// How lora_thin_products splits its work. A block covers `group_cols` columns (a "column
// group") of `rows_per_split` rows (a "split") for up to 16 * chunks_per_pass of the r rank
// columns (a "rank pass"): it reads its rectangle of Y once and computes every rank column of
// its pass from each loaded tile. Only r > 64 takes more than one pass (and reads Y again).
struct LoraThinPlan {
  int64_t col_groups;
  int64_t group_cols;  // a multiple of 512 / chunks_per_pass, the columns a block holds at once
  int64_t splits;
  int64_t rows_per_split;
  int64_t rank_passes;
  int chunks_per_pass;  // 1, 2 or 4 rank chunks of 16: the smallest that holds r, 4 at most
};

// A plan that gives two to four blocks per SM and rank pass (four while col_partial stays under
// 32 MiB). Partial buffers it implies:
//   col_partial: splits * cols * rank floats;  row_partial: col_groups * rows * rank floats.
// col_groups never exceeds ceil(cols / 512) and never grows with rows, so
// lora_thin_plan(1, cols, rank, sms).col_groups * rank floats bounds the row partials per row
// of any plan for the same cols and rank.
LoraThinPlan lora_thin_plan(int64_t rows, int64_t cols, int64_t rank, int num_sms);

// One pass over Y [rows, cols] for two thin products, each optional (pass nullptr to skip):
//   col_partial[s][n][j] = sum over rows m of split s of   Y[m, n] * Z[m, j]   (Z [rows, rank])
//   row_partial[g][m][j] = sum over columns n of group g of Y[m, n] * Bm[n, j] (Bm [cols, rank])
// Backward uses both on dY (Z = xa, Bm = B: dB and dXA from one read of dY), dA uses the column
// product on x (Z = dXA), the forward's xa = x A^T uses the row product (Bm = A^T).
// Every element of a requested partial buffer is written; lora_sum_partials finishes the sums.
cudaError_t lora_thin_products(const LoraThinPlan& plan, DType y_dtype, const void* y,
                               int64_t rows, int64_t cols, int64_t rank, DType z_dtype,
                               const void* z, float* col_partial, DType b_dtype, const void* bm,
                               float* row_partial, cudaStream_t stream);

// out[e] = scale * sum_{p < parts} partial[p * n + e] for e < n, summed in p order, stored as
// `out_dtype`.
cudaError_t lora_sum_partials(const float* partial, int64_t parts, int64_t n, float scale,
                              DType out_dtype, void* out, cudaStream_t stream);

// out[m, n] = bias[n] + scale * sum_j Z[m, j] * Bm[n, j]: Z [rows, rank], Bm [cols, rank],
// bias [cols] of out_dtype or nullptr, out [rows, cols] of out_dtype. The forward's LoRA term
// (then the base GEMM accumulates onto it) and dXA A in backward (Bm = A^T).
cudaError_t lora_expand(DType z_dtype, const void* z, DType b_dtype, const void* bm,
                        int64_t rows, int64_t cols, int64_t rank, float scale, DType out_dtype,
                        const void* bias, void* out, cudaStream_t stream);

}  // namespace dafast
