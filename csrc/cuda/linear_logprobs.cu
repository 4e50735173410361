// CUDA folds of fused linear log-probabilities (see dafast/linear_logprobs.h). The GEMMs that
// produce each fp32 logits tile and consume each gradient tile are cuBLAS calls made through
// ATen in ops_cuda.cpp; these kernels are the one pass over a tile in between.
//   forward:  one block per row: the row's max, then sum exp(z - max) (and the statistics),
//             block reductions, and thread 0 folds them into the running state. Two reads of a
//             row of at most a few tens of KiB, the second from L1/L2.
//   backward: one block per row: grad = upstream * (onehot(target) - exp(z - lse)), written in
//             the GEMM dtype (fp32 in place, or fp16/bf16 into a separate tile).
// Raw pointers and cudaStream_t only: nvcc compiles this file without torch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>

#include "convert.cuh"
#include "dafast/linear_logprobs_cuda.h"

namespace dafast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Reduce over the block; every thread gets the result. `scratch` holds kWarps floats.
template <typename Op>
__device__ float block_reduce(float value, Op op, float* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) value = op(value, __shfl_xor_sync(0xffffffffu, value, offset));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  value = scratch[0];
  for (int w = 1; w < kWarps; ++w) value = op(value, scratch[w]);
  return value;
}

template <bool kStats>
__global__ void __launch_bounds__(kThreads) forward_fold_kernel(LogprobsForwardTile t) {
  __shared__ float scratch[kWarps];
  const int64_t r = blockIdx.x;
  const float* z = t.logits + r * t.ld;
  const int64_t local = t.targets[r] - t.vocab_start;
  const int64_t before = local < 0 ? 0 : (local > t.cols ? t.cols : local);

  float m = -INFINITY, m_before = -INFINITY;
  for (int64_t c = threadIdx.x; c < t.cols; c += blockDim.x) {
    const float v = z[c];
    m = fmaxf(m, v);  // fmaxf skips NaN here; the exp-sum below turns it into a NaN result
    if (kStats && c < before) m_before = fmaxf(m_before, v);
  }
  m = block_reduce(m, MaxOp(), scratch);
  const float m_old = t.row_max[r];
  const float m_new = fmaxf(m_old, m);

  float s = 0.f, sz = 0.f, zsum = 0.f;
  for (int64_t c = threadIdx.x; c < t.cols; c += blockDim.x) {
    const float v = z[c];
    const float e = expf(v - m_new);
    s += e;
    if (kStats) {
      sz = fmaf(e, v, sz);
      zsum += v;
    }
  }
  s = block_reduce(s, SumOp(), scratch);
  if (kStats) {
    sz = block_reduce(sz, SumOp(), scratch);
    zsum = block_reduce(zsum, SumOp(), scratch);
    m_before = block_reduce(m_before, MaxOp(), scratch);
  }
  if (threadIdx.x == 0) {
    const float rescale = expf(m_old - m_new);  // 0 for the first tile, where m_old = -inf
    t.sum_exp[r] = t.sum_exp[r] * rescale + s;
    if (kStats) {
      t.sum_exp_z[r] = t.sum_exp_z[r] * rescale + sz;
      t.sum_z[r] += zsum;
      t.max_before_target[r] = fmaxf(t.max_before_target[r], m_before);
    }
    t.row_max[r] = m_new;
    if (local >= 0 && local < t.cols) t.target_logit[r] = z[local];
  }
}

// grad may alias logits (fp32, in place): each element is read, then written, by one thread.
template <typename T>
__global__ void __launch_bounds__(kThreads) backward_fold_kernel(LogprobsBackwardTile t) {
  const int64_t r = blockIdx.x;
  const float* z = t.logits + r * t.ld;
  T* grad = static_cast<T*>(t.grad) + r * t.ld;
  const float g = t.upstream[r];
  const float lse = t.lse[r];
  const int64_t local = t.targets[r] - t.vocab_start;
  for (int64_t c = threadIdx.x; c < t.cols; c += blockDim.x) {
    const float p = expf(z[c] - lse);
    grad[c] = from_float<T>(c == local ? g * (1.f - p) : -g * p);
  }
}

bool launchable(int64_t rows) { return rows > 0 && rows <= INT_MAX; }

}  // namespace

cudaError_t linear_logprobs_forward_fold_cuda(const LogprobsForwardTile& tile, cudaStream_t stream) {
  if (tile.rows == 0 || tile.cols == 0) return cudaSuccess;
  if (!launchable(tile.rows)) return cudaErrorInvalidValue;
  const unsigned int blocks = static_cast<unsigned int>(tile.rows);
  if (tile.sum_exp_z != nullptr) {
    forward_fold_kernel<true><<<blocks, kThreads, 0, stream>>>(tile);
  } else {
    forward_fold_kernel<false><<<blocks, kThreads, 0, stream>>>(tile);
  }
  return cudaGetLastError();
}

cudaError_t linear_logprobs_backward_fold_cuda(const LogprobsBackwardTile& tile,
                                               cudaStream_t stream) {
  if (tile.rows == 0 || tile.cols == 0) return cudaSuccess;
  if (!launchable(tile.rows)) return cudaErrorInvalidValue;
  const unsigned int blocks = static_cast<unsigned int>(tile.rows);
  switch (tile.grad_dtype) {
    case DType::kFloat32: backward_fold_kernel<float><<<blocks, kThreads, 0, stream>>>(tile); break;
    case DType::kFloat16: backward_fold_kernel<__half><<<blocks, kThreads, 0, stream>>>(tile); break;
    case DType::kBFloat16:
      backward_fold_kernel<__nv_bfloat16><<<blocks, kThreads, 0, stream>>>(tile);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace dafast
