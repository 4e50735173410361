// CUDA kernels for the rank-r products of the LoRA linear layer (see dafast/lora.h for the math
// and dafast/lora_cuda.h for the contracts). The big GEMMs are cuBLAS calls made by ops_cuda.cpp.
//
//   thin_products_kernel: one read of Y [rows, cols] in 16 x 64 shared-memory tiles feeds two
//     products: per column (sum over rows, e.g. dB = dY^T xa) and per row (sum over columns,
//     e.g. dXA = dY B). A block owns 512 columns x a split of the rows x 16 rank columns, so
//     both sums are per-block partials, written once each; lora_sum_partials adds them in a
//     fixed order (no atomics, deterministic).
//   sum_partials_kernel: finishes those sums, scales, stores in the output dtype.
//   expand_kernel: out = bias + scale * Z Bm^T (r-wide inner dimension), one write per element.
//
// Deliberately plain: scalar shared-memory loops, fp32 accumulation, every bound checked. Not
// tuned on hardware (it was compiled, not run, when written): see the notes in ops_cuda.cpp.
// Raw pointers and cudaStream_t only: nvcc compiles this file without torch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "convert.cuh"
#include "dafast/lora_cuda.h"

namespace dafast {
namespace {

constexpr int kThreads = 256;
constexpr int kTileRows = 16;   // rows of a shared tile
constexpr int kTileCols = 64;   // columns of a shared tile
constexpr int kGroupTiles = 8;  // tiles per block in thin_products_kernel
constexpr int kGroupCols = kTileCols * kGroupTiles;
constexpr int kRankChunk = 16;  // rank columns per block
static_assert(kTileRows * kRankChunk == kThreads, "one z element per thread");
static_assert(kThreads == kTileCols * 4, "four rank columns (or rows) per thread");

template <typename TY, typename TZ, typename TB>
__global__ void __launch_bounds__(kThreads)
thin_products_kernel(const TY* __restrict__ y, int64_t rows, int64_t cols, int64_t rank,
                     int64_t rows_per_split, const TZ* __restrict__ z,
                     float* __restrict__ col_partial, const TB* __restrict__ bm,
                     float* __restrict__ row_partial) {
  __shared__ float ys[kTileRows][kTileCols + 1];  // +1: rows of a warp fall in distinct banks
  __shared__ float zs[kTileRows][kRankChunk];
  __shared__ float bs[kGroupTiles][kTileCols][kRankChunk];

  const bool want_col = col_partial != nullptr;
  const bool want_row = row_partial != nullptr;
  const int t = threadIdx.x;
  const int64_t group = blockIdx.x, split = blockIdx.y;
  const int64_t group_begin = group * kGroupCols;
  const int64_t j0 = static_cast<int64_t>(blockIdx.z) * kRankChunk;
  const int64_t m_begin = split * rows_per_split;
  const int64_t m_end = m_begin + rows_per_split < rows ? m_begin + rows_per_split : rows;

  if (want_row) {  // this block's 512 x 16 slice of Bm, zero outside the matrix
    for (int idx = t; idx < kGroupCols * kRankChunk; idx += kThreads) {
      const int c = idx / kRankChunk, j = idx % kRankChunk;
      const int64_t n = group_begin + c, jj = j0 + j;
      bs[c / kTileCols][c % kTileCols][j] = (n < cols && jj < rank) ? to_float(bm[n * rank + jj]) : 0.f;
    }
  }

  // Column product: this thread's column of every tile, rank columns 4 * quad .. 4 * quad + 3.
  const int col = t % kTileCols, quad = t / kTileCols;
  // Row product: this thread's row of the 16-row step and one rank column.
  const int row = t / kRankChunk, rj = t % kRankChunk;

  float acc[kGroupTiles][4];
#pragma unroll
  for (int tile = 0; tile < kGroupTiles; ++tile) {
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[tile][q] = 0.f;
  }

  for (int64_t m0 = m_begin; m0 < m_end; m0 += kTileRows) {
    float row_sum = 0.f;
#pragma unroll
    for (int tile = 0; tile < kGroupTiles; ++tile) {
      const int64_t n0 = group_begin + tile * kTileCols;
      if (n0 < cols) {  // the same for every thread of the block: the barriers below are safe
        __syncthreads();  // the readers of the previous tile (and of zs, bs) are done
        for (int idx = t; idx < kTileRows * kTileCols; idx += kThreads) {
          const int i = idx / kTileCols, c = idx % kTileCols;
          const int64_t m = m0 + i, n = n0 + c;
          ys[i][c] = (m < m_end && n < cols) ? to_float(y[m * cols + n]) : 0.f;
        }
        if (want_col && tile == 0) {
          const int i = t / kRankChunk, j = t % kRankChunk;
          const int64_t m = m0 + i, jj = j0 + j;
          zs[i][j] = (m < m_end && jj < rank) ? to_float(z[m * rank + jj]) : 0.f;
        }
        __syncthreads();
        if (want_col) {
#pragma unroll
          for (int i = 0; i < kTileRows; ++i) {
            const float v = ys[i][col];
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[tile][q] = fmaf(v, zs[i][4 * quad + q], acc[tile][q]);
          }
        }
        if (want_row) {
#pragma unroll 16
          for (int c = 0; c < kTileCols; ++c) row_sum = fmaf(ys[row][c], bs[tile][c][rj], row_sum);
        }
      }
    }
    const int64_t m = m0 + row, jj = j0 + rj;
    if (want_row && m < m_end && jj < rank) row_partial[(group * rows + m) * rank + jj] = row_sum;
  }

  if (want_col) {  // also for an empty split: its partials are zeros, and they are read
#pragma unroll
    for (int tile = 0; tile < kGroupTiles; ++tile) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t n = group_begin + tile * kTileCols + col, jj = j0 + 4 * quad + q;
        if (n < cols && jj < rank) col_partial[(split * cols + n) * rank + jj] = acc[tile][q];
      }
    }
  }
}

template <typename TO>
__global__ void __launch_bounds__(kThreads)
sum_partials_kernel(const float* __restrict__ partial, int64_t parts, int64_t n, float scale,
                    TO* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride) {
    float sum = 0.f;
    for (int64_t p = 0; p < parts; ++p) sum += partial[p * n + e];
    out[e] = from_float<TO>(scale * sum);
  }
}

template <typename TZ, typename TB, typename TO>
__global__ void __launch_bounds__(kThreads)
expand_kernel(const TZ* __restrict__ z, const TB* __restrict__ bm, const TO* __restrict__ bias,
              TO* __restrict__ out, int64_t rows, int64_t cols, int64_t rank, float scale) {
  __shared__ float zs[kTileRows][kRankChunk];
  __shared__ float bs[kTileCols][kRankChunk + 1];  // +1: a warp reads 32 rows of it at once

  const int t = threadIdx.x;
  const int col = t % kTileCols, quad = t / kTileCols;  // rows quad, quad + 4, ..., quad + 12
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTileCols;
  const int64_t n = n0 + col;
  const float bias_n = (bias != nullptr && n < cols) ? to_float(bias[n]) : 0.f;

  for (int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileRows; m0 < rows;
       m0 += static_cast<int64_t>(gridDim.y) * kTileRows) {
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t j0 = 0; j0 < rank; j0 += kRankChunk) {
      __syncthreads();  // the readers of the previous chunk are done
      {
        const int i = t / kRankChunk, j = t % kRankChunk;
        const int64_t m = m0 + i, jj = j0 + j;
        zs[i][j] = (m < rows && jj < rank) ? to_float(z[m * rank + jj]) : 0.f;
      }
      for (int idx = t; idx < kTileCols * kRankChunk; idx += kThreads) {
        const int c = idx / kRankChunk, j = idx % kRankChunk;
        const int64_t nn = n0 + c, jj = j0 + j;
        bs[c][j] = (nn < cols && jj < rank) ? to_float(bm[nn * rank + jj]) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int j = 0; j < kRankChunk; ++j) {
        const float b = bs[col][j];
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[q] = fmaf(zs[quad + 4 * q][j], b, acc[q]);
      }
    }
    if (n < cols) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t m = m0 + quad + 4 * q;
        if (m < rows) out[m * cols + n] = from_float<TO>(fmaf(scale, acc[q], bias_n));
      }
    }
  }
}

// ---- host side: dtype dispatch ----------------------------------------------------------------

template <typename T> struct Tag { using type = T; };

template <typename T> struct DTypeOf;
template <> struct DTypeOf<float> { static constexpr DType value = DType::kFloat32; };
template <> struct DTypeOf<__half> { static constexpr DType value = DType::kFloat16; };
template <> struct DTypeOf<__nv_bfloat16> { static constexpr DType value = DType::kBFloat16; };

// Calls f(Tag<T>{}) with the C++ type of `dtype`.
template <typename F>
cudaError_t with_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(Tag<float>{});
    case DType::kFloat16: return f(Tag<__half>{});
    case DType::kBFloat16: return f(Tag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

// The r-wide operands are float32 or the wide operand's type T: two instantiations, not three.
template <typename T, typename F>
cudaError_t with_type_or_float(DType dtype, F&& f) {
  if (dtype == DType::kFloat32) return f(Tag<float>{});
  if (dtype != DTypeOf<T>::value) return cudaErrorInvalidValue;
  return f(Tag<T>{});
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr int64_t kMaxGridY = 65535;

}  // namespace

LoraThinPlan lora_thin_plan(int64_t rows, int64_t cols, int64_t rank, int num_sms) {
  LoraThinPlan plan;
  plan.col_groups = ceil_div(cols > 0 ? cols : 1, kGroupCols);
  plan.rank_chunks = ceil_div(rank > 0 ? rank : 1, kRankChunk);
  const int64_t row_tiles = ceil_div(rows > 0 ? rows : 1, kTileRows);
  const int64_t wanted = ceil_div(4 * static_cast<int64_t>(num_sms > 0 ? num_sms : 1),
                                  plan.col_groups * plan.rank_chunks);
  int64_t splits = wanted < row_tiles ? wanted : row_tiles;
  splits = splits < kMaxGridY ? splits : kMaxGridY;
  plan.rows_per_split = ceil_div(row_tiles, splits) * kTileRows;
  plan.splits = ceil_div(rows > 0 ? rows : 1, plan.rows_per_split);
  return plan;
}

cudaError_t lora_thin_products(const LoraThinPlan& plan, DType y_dtype, const void* y,
                               int64_t rows, int64_t cols, int64_t rank, DType z_dtype,
                               const void* z, float* col_partial, DType b_dtype, const void* bm,
                               float* row_partial, cudaStream_t stream) {
  if (rows == 0 || cols == 0 || rank == 0) return cudaErrorInvalidValue;  // callers skip these
  const dim3 grid(static_cast<unsigned>(plan.col_groups), static_cast<unsigned>(plan.splits),
                  static_cast<unsigned>(plan.rank_chunks));
  return with_type(y_dtype, [&](auto ty) {
    using TY = typename decltype(ty)::type;
    return with_type_or_float<TY>(z_dtype, [&](auto tz) {
      using TZ = typename decltype(tz)::type;
      return with_type_or_float<TY>(b_dtype, [&](auto tb) {
        using TB = typename decltype(tb)::type;
        thin_products_kernel<TY, TZ, TB><<<grid, kThreads, 0, stream>>>(
            static_cast<const TY*>(y), rows, cols, rank, plan.rows_per_split,
            static_cast<const TZ*>(z), col_partial, static_cast<const TB*>(bm), row_partial);
        return cudaGetLastError();
      });
    });
  });
}

cudaError_t lora_sum_partials(const float* partial, int64_t parts, int64_t n, float scale,
                              DType out_dtype, void* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t wanted = ceil_div(n, kThreads);
  const unsigned blocks = static_cast<unsigned>(wanted < 65536 ? wanted : 65536);
  return with_type(out_dtype, [&](auto to) {
    using TO = typename decltype(to)::type;
    sum_partials_kernel<TO><<<blocks, kThreads, 0, stream>>>(partial, parts, n, scale,
                                                             static_cast<TO*>(out));
    return cudaGetLastError();
  });
}

cudaError_t lora_expand(DType z_dtype, const void* z, DType b_dtype, const void* bm,
                        int64_t rows, int64_t cols, int64_t rank, float scale, DType out_dtype,
                        const void* bias, void* out, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  const int64_t row_tiles = ceil_div(rows, kTileRows);
  const dim3 grid(static_cast<unsigned>(ceil_div(cols, kTileCols)),
                  static_cast<unsigned>(row_tiles < kMaxGridY ? row_tiles : kMaxGridY));
  return with_type(out_dtype, [&](auto to) {
    using TO = typename decltype(to)::type;
    return with_type_or_float<TO>(z_dtype, [&](auto tz) {
      using TZ = typename decltype(tz)::type;
      return with_type_or_float<TO>(b_dtype, [&](auto tb) {
        using TB = typename decltype(tb)::type;
        expand_kernel<TZ, TB, TO><<<grid, kThreads, 0, stream>>>(
            static_cast<const TZ*>(z), static_cast<const TB*>(bm), static_cast<const TO*>(bias),
            static_cast<TO*>(out), rows, cols, rank, scale);
        return cudaGetLastError();
      });
    });
  });
}

}  // namespace dafast
