// CUDA kernels for the rank-r products of the LoRA linear layer (see dafast/lora_linear.h for the math
// and dafast/lora_linear_cuda.h for the contracts). The big GEMMs are cuBLAS calls made by ops_cuda.cpp.
//
//   thin_products_kernel: one read of Y [rows, cols] in 16 x 64 shared-memory tiles feeds two
//     products: per column (sum over rows, e.g. dB = dY^T xa) and per row (sum over columns,
//     e.g. dXA = dY B). A block owns a column group x a split of the rows x a rank pass of up
//     to 64 rank columns; every tile it loads serves all the rank chunks of 16 in its pass, so
//     Y is read once for r <= 64. Both sums are per-block partials; lora_sum_partials adds
//     them in a fixed order (no atomics, deterministic).
//   sum_partials_kernel: finishes those sums, scales, stores in the output dtype.
//   expand_kernel: out = bias + scale * Z Bm^T (r-wide inner dimension), one write per element.
//
// Deliberately plain: fp32 accumulation, every bound checked, 16-byte loads of Y where a tile
// row allows them. Not tuned on hardware (it was compiled, not run, when written): see the
// notes in ops_cuda.cpp.
// Raw pointers and cudaStream_t only: nvcc compiles this file without torch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <type_traits>

#include "convert.cuh"
#include "dafast/lora_linear_cuda.h"

namespace dafast {
namespace {

constexpr int kThreads = 256;
constexpr int kTileRows = 16;   // rows of a shared tile
constexpr int kTileCols = 64;   // columns of a shared tile
constexpr int kGroupTiles = 8;  // tiles a thin_products block holds at once at one rank chunk
constexpr int kGroupCols = kTileCols * kGroupTiles;  // and the narrowest column group
constexpr int kRankChunk = 16;  // rank columns of one chunk
constexpr int kMaxChunks = 4;   // rank chunks per block (per rank pass) at most
static_assert(kTileRows * kRankChunk == kThreads, "one z element per thread");
static_assert(kThreads == kTileCols * 4, "four rank columns (or rows) per thread");

// Y[m0 .. m0 + 15][n0 .. n0 + 63] as fp32 into ys, zero outside rows < m_end and columns < cols.
// A thread takes 16 bytes of a tile row: one vector load where they lie inside the matrix and
// start on a 16-byte boundary (row starts are aligned only when cols * sizeof(TY) is a multiple
// of 16 and y is aligned; n0 + c always is a multiple of the pack), one element at a time else.
template <typename TY>
__device__ __forceinline__ void load_y_tile(const TY* __restrict__ y, int64_t cols, int64_t m0,
                                            int64_t m_end, int64_t n0,
                                            float (&ys)[kTileRows][kTileCols + 1]) {
  constexpr int kPack = Pack<TY>::kSize;
  constexpr int kPacksPerRow = kTileCols / kPack;
  static_assert(kTileCols % kPack == 0, "a tile row is whole packs");
  for (int idx = threadIdx.x; idx < kTileRows * kPacksPerRow; idx += kThreads) {
    const int i = idx / kPacksPerRow, c = (idx % kPacksPerRow) * kPack;
    const int64_t m = m0 + i, n = n0 + c;
    float* dst = &ys[i][c];
    if (m < m_end && n + kPack <= cols && aligned16(y + (m * cols + n))) {
      const Pack<TY> p = *reinterpret_cast<const Pack<TY>*>(y + (m * cols + n));
#pragma unroll
      for (int e = 0; e < kPack; ++e) dst[e] = to_float(p.v[e]);
    } else {
#pragma unroll
      for (int e = 0; e < kPack; ++e) {
        dst[e] = (m < m_end && n + e < cols) ? to_float(y[m * cols + n + e]) : 0.f;
      }
    }
  }
}

// kChunks rank chunks per block. The accumulators a thread holds (kSteps tiles x kChunks x 4
// column sums) and the shared slice of Bm (kStepCols x kPassRank) stay the same size for every
// kChunks: a block with more rank columns holds fewer columns at once (a "step") and walks its
// column group step by step. The row sums of a step are partial over the group's columns, so
// a step after the first adds onto the values this same thread stored for the previous step:
// the block owns its rows of row_partial for its group and pass, so no other block touches them.
template <typename TY, typename TZ, typename TB, int kChunks>
__global__ void __launch_bounds__(kThreads)
thin_products_kernel(const TY* __restrict__ y, int64_t rows, int64_t cols, int64_t rank,
                     int64_t rows_per_split, int64_t group_cols, const TZ* __restrict__ z,
                     float* __restrict__ col_partial, const TB* __restrict__ bm,
                     float* __restrict__ row_partial) {
  constexpr int kPassRank = kChunks * kRankChunk;
  constexpr int kSteps = kGroupTiles / kChunks;  // tiles per step
  constexpr int kStepCols = kSteps * kTileCols;
  static_assert(kGroupTiles % kChunks == 0 && kChunks <= kMaxChunks, "whole tiles per step");
  // 4160 + 4 * 16 * kPassRank + 32768 bytes: at most 41 KB of the 48 KB of static shared memory.
  __shared__ float ys[kTileRows][kTileCols + 1];  // +1: rows of a warp fall in distinct banks
  __shared__ __align__(16) float zs[kTileRows][kPassRank];
  __shared__ float bs[kStepCols][kPassRank];

  const bool want_col = col_partial != nullptr;
  const bool want_row = row_partial != nullptr;
  const int t = threadIdx.x;
  const int64_t group = blockIdx.x, split = blockIdx.y;
  const int64_t j_pass = static_cast<int64_t>(blockIdx.z) * kPassRank;
  const int64_t group_begin = group * group_cols;
  const int64_t group_end = group_begin + group_cols < cols ? group_begin + group_cols : cols;
  const int64_t m_begin = split * rows_per_split;
  const int64_t m_end = m_begin + rows_per_split < rows ? m_begin + rows_per_split : rows;

  // Column product: this thread's column of every tile, rank columns 4 * quad .. 4 * quad + 3
  // of every chunk. quad is the same across a warp, so the zs reads are broadcasts.
  const int col = t % kTileCols, quad = t / kTileCols;
  // Row product: this thread's row of the 16-row step and rank column rj of every chunk.
  const int row = t / kRankChunk, rj = t % kRankChunk;

  // Every bound below (group, split, step, tile) is the same for all threads of the block, so
  // each __syncthreads() is reached by all of them.
  for (int64_t s0 = group_begin; s0 < group_end; s0 += kStepCols) {
    const bool first_step = s0 == group_begin;
    __syncthreads();  // the previous step's readers of bs are done
    if (want_row) {  // this step's kStepCols x kPassRank slice of Bm, zero outside the matrix
      for (int idx = t; idx < kStepCols * kPassRank; idx += kThreads) {
        const int c = idx / kPassRank, j = idx % kPassRank;
        const int64_t n = s0 + c, jj = j_pass + j;
        bs[c][j] = (n < cols && jj < rank) ? to_float(bm[n * rank + jj]) : 0.f;
      }
    }

    float acc[kSteps][kChunks][4];
#pragma unroll
    for (int tile = 0; tile < kSteps; ++tile) {
#pragma unroll
      for (int ch = 0; ch < kChunks; ++ch) {
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[tile][ch][q] = 0.f;
      }
    }

    for (int64_t m0 = m_begin; m0 < m_end; m0 += kTileRows) {
      float row_sum[kChunks];
#pragma unroll
      for (int ch = 0; ch < kChunks; ++ch) row_sum[ch] = 0.f;
#pragma unroll
      for (int tile = 0; tile < kSteps; ++tile) {
        const int64_t n0 = s0 + tile * kTileCols;
        if (n0 < cols) {  // tile 0 always passes (s0 < group_end <= cols): zs and bs are ready
          __syncthreads();  // the readers of the previous tile (and of zs) are done
          load_y_tile(y, cols, m0, m_end, n0, ys);
          if (want_col && tile == 0) {
            for (int idx = t; idx < kTileRows * kPassRank; idx += kThreads) {
              const int i = idx / kPassRank, j = idx % kPassRank;
              const int64_t m = m0 + i, jj = j_pass + j;
              zs[i][j] = (m < m_end && jj < rank) ? to_float(z[m * rank + jj]) : 0.f;
            }
          }
          __syncthreads();
          if (want_col) {
#pragma unroll
            for (int i = 0; i < kTileRows; ++i) {
              const float v = ys[i][col];
#pragma unroll
              for (int ch = 0; ch < kChunks; ++ch) {
                const float4 zq =
                    *reinterpret_cast<const float4*>(&zs[i][ch * kRankChunk + 4 * quad]);
                acc[tile][ch][0] = fmaf(v, zq.x, acc[tile][ch][0]);
                acc[tile][ch][1] = fmaf(v, zq.y, acc[tile][ch][1]);
                acc[tile][ch][2] = fmaf(v, zq.z, acc[tile][ch][2]);
                acc[tile][ch][3] = fmaf(v, zq.w, acc[tile][ch][3]);
              }
            }
          }
          if (want_row) {
#pragma unroll 16
            for (int c = 0; c < kTileCols; ++c) {
              const float v = ys[row][c];
#pragma unroll
              for (int ch = 0; ch < kChunks; ++ch) {
                row_sum[ch] = fmaf(v, bs[tile * kTileCols + c][ch * kRankChunk + rj], row_sum[ch]);
              }
            }
          }
        }
      }
      const int64_t m = m0 + row;
      if (want_row && m < m_end) {
#pragma unroll
        for (int ch = 0; ch < kChunks; ++ch) {
          const int64_t jj = j_pass + ch * kRankChunk + rj;
          if (jj < rank) {
            float& out = row_partial[(group * rows + m) * rank + jj];
            out = first_step ? row_sum[ch] : out + row_sum[ch];
          }
        }
      }
    }

    if (want_col) {  // also for an empty split: its partials are zeros, and they are read
#pragma unroll
      for (int tile = 0; tile < kSteps; ++tile) {
        const int64_t n = s0 + tile * kTileCols + col;  // < group_end when < cols
#pragma unroll
        for (int ch = 0; ch < kChunks; ++ch) {
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const int64_t jj = j_pass + ch * kRankChunk + 4 * quad + q;
            if (n < cols && jj < rank) {
              col_partial[(split * cols + n) * rank + jj] = acc[tile][ch][q];
            }
          }
        }
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

// Calls f(std::integral_constant<int, chunks>{}) for the kernel's rank chunks per block.
template <typename F>
cudaError_t with_chunks(int chunks, F&& f) {
  switch (chunks) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case kMaxChunks: return f(std::integral_constant<int, kMaxChunks>{});
  }
  return cudaErrorInvalidValue;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr int64_t kMaxGridY = 65535;

}  // namespace

// The partial buffers: a block finishes its column group's row sums and its split's column
// sums, so row_partial holds col_groups x rows x rank floats and col_partial splits x cols x
// rank. B blocks per rank pass (four per SM) make col_groups x splits ~ B, and the two buffers
// together are smallest at col_groups ~ sqrt(B cols / rows). Groups are never narrower than 512
// columns, whatever the rank, and more rows never give more groups: col_groups is at most
// ceil(cols / 512) and largest at rows = 1, the bound ops_cuda.cpp sizes its row blocks by.
// Splits fill the device while col_partial stays under kColPartialBytes, and give at least B / 2
// blocks beyond it.
// Example, a 128256-entry head at 8192 rows, r = 16, 132 SMs, in one launch: 84 groups of 1536
// columns and 4 splits, row_partial 44 MB and col_partial 33 MB (512-column groups, as before
// this plan: 131 MB and 25 MB).
constexpr int64_t kColPartialBytes = int64_t(32) << 20;

LoraThinPlan lora_thin_plan(int64_t rows, int64_t cols, int64_t rank, int num_sms) {
  rows = rows > 0 ? rows : 1;
  cols = cols > 0 ? cols : 1;
  rank = rank > 0 ? rank : 1;
  const int64_t chunks = ceil_div(rank, kRankChunk);
  LoraThinPlan plan;
  plan.chunks_per_pass = chunks <= 1 ? 1 : chunks <= 2 ? 2 : kMaxChunks;
  plan.rank_passes = ceil_div(chunks, plan.chunks_per_pass);
  const int64_t step_cols = kGroupCols / plan.chunks_per_pass;
  const int64_t steps = ceil_div(cols, step_cols);
  const int64_t max_groups = ceil_div(cols, kGroupCols);
  const int64_t row_tiles = ceil_div(rows, kTileRows);
  const int64_t blocks = ceil_div(4 * static_cast<int64_t>(num_sms > 0 ? num_sms : 1),
                                  plan.rank_passes);

  const double balanced = std::ceil(std::sqrt(static_cast<double>(blocks) *
                                              static_cast<double>(cols) /
                                              static_cast<double>(rows)));
  const int64_t groups =
      balanced < static_cast<double>(max_groups) ? static_cast<int64_t>(balanced) : max_groups;
  const int64_t steps_per_group = ceil_div(steps, groups > 0 ? groups : 1);
  plan.group_cols = steps_per_group * step_cols;
  plan.col_groups = ceil_div(steps, steps_per_group);  // no group is empty

  const int64_t fill = ceil_div(blocks, plan.col_groups);
  const int64_t in_budget = kColPartialBytes / (cols * rank * int64_t(sizeof(float)));
  const int64_t at_least = ceil_div(fill, 2);
  int64_t splits = in_budget > at_least ? in_budget : at_least;
  splits = splits < fill ? splits : fill;
  splits = splits < row_tiles ? splits : row_tiles;
  splits = splits < kMaxGridY ? splits : kMaxGridY;
  plan.rows_per_split = ceil_div(row_tiles, splits) * kTileRows;
  plan.splits = ceil_div(rows, plan.rows_per_split);  // no split is empty
  return plan;
}

cudaError_t lora_thin_products(const LoraThinPlan& plan, DType y_dtype, const void* y,
                               int64_t rows, int64_t cols, int64_t rank, DType z_dtype,
                               const void* z, float* col_partial, DType b_dtype, const void* bm,
                               float* row_partial, cudaStream_t stream) {
  if (rows == 0 || cols == 0 || rank == 0) return cudaErrorInvalidValue;  // callers skip these
  // A plan from lora_thin_plan for these sizes passes; another one could leave partials unwritten.
  const int c = plan.chunks_per_pass;
  const bool covers = (c == 1 || c == 2 || c == kMaxChunks) && plan.group_cols > 0 &&
                      plan.group_cols % (kGroupCols / c) == 0 &&
                      plan.col_groups * plan.group_cols >= cols &&
                      (plan.col_groups - 1) * plan.group_cols < cols &&  // no empty group
                      plan.splits * plan.rows_per_split >= rows &&
                      plan.rank_passes * c * kRankChunk >= rank &&
                      plan.splits <= kMaxGridY && plan.rank_passes <= kMaxGridY;
  if (!covers) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(plan.col_groups), static_cast<unsigned>(plan.splits),
                  static_cast<unsigned>(plan.rank_passes));
  return with_type(y_dtype, [&](auto ty) {
    using TY = typename decltype(ty)::type;
    return with_type_or_float<TY>(z_dtype, [&](auto tz) {
      using TZ = typename decltype(tz)::type;
      return with_type_or_float<TY>(b_dtype, [&](auto tb) {
        using TB = typename decltype(tb)::type;
        return with_chunks(plan.chunks_per_pass, [&](auto chunks) {
          thin_products_kernel<TY, TZ, TB, decltype(chunks)::value><<<grid, kThreads, 0, stream>>>(
              static_cast<const TY*>(y), rows, cols, rank, plan.rows_per_split, plan.group_cols,
              static_cast<const TZ*>(z), col_partial, static_cast<const TB*>(bm), row_partial);
          return cudaGetLastError();
        });
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
