// CUDA SLERP (see dafast/slerp.h for the math). Two launches on one stream, no host sync:
//   1. slerp_reduce_kernel: each block folds |a|^2, |b|^2 and a.b over a grid-stride range
//      in fp32 (scaled against overflow, see ScaledSums) and stores its partial sums; the last
//      block to finish adds the partials in block order in double (deterministic for a given
//      grid) and writes the three sums.
//   2. slerp_write_kernel: each block derives the coefficients from the sums, then
//      out = ca * a + cb * b with 16-byte vector loads and stores (from the first 16-byte
//      boundary common to a, b and out; the sums pass still needs a and b aligned).
// Raw pointers and cudaStream_t only: nvcc compiles this file without torch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>

#include "convert.cuh"
#include "dafast/slerp_cuda.h"

namespace dafast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Sum over the block; the total is valid in thread 0. `scratch` holds kWarps values.
template <typename Acc>
__device__ Acc block_sum(Acc value, Acc* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < kWarps ? scratch[lane] : Acc(0);
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  return value;
}

// The squares of fp32 values above ~1.8e19 overflow fp32 (and double is slow on most GPUs), so
// each thread accumulates (x * 2^-e)^2 with a power-of-two scale e that is raised only when a
// value exceeds kScaleLimit: ordinary weights never pay more than a compare. Power-of-two
// scaling is exact; values that underflow after a rescale are negligible next to the new
// maximum. Non-finite values are not rescaled, so they still reach the sums (the NaN policy).
constexpr float kScaleLimit = 0x1p40f;  // squares <= 2^80: room for 2^48 terms below FLT_MAX

struct ScaledSums {
  float aa = 0.f, bb = 0.f, ab = 0.f;
  int e = 0;

  __device__ void add(float x, float y) {
    if (e != 0) {
      x = ldexpf(x, -e);
      y = ldexpf(y, -e);
    }
    const float m = fmaxf(fabsf(x), fabsf(y));
    if (m > kScaleLimit && m <= FLT_MAX) {
      int k;
      frexpf(m, &k);  // m < 2^k: the rescaled values are below 1
      e += k;
      x = ldexpf(x, -k);
      y = ldexpf(y, -k);
      aa = ldexpf(aa, -2 * k);
      bb = ldexpf(bb, -2 * k);
      ab = ldexpf(ab, -2 * k);
    }
    aa = fmaf(x, x, aa);
    bb = fmaf(y, y, bb);
    ab = fmaf(x, y, ab);
  }

  __device__ double unscaled(float acc) const { return ldexp(static_cast<double>(acc), 2 * e); }
};

// Workspace layout: [3 * max_blocks doubles of partial sums][uint counter of finished blocks].
struct Workspace {
  double* partial;
  unsigned int* blocks_done;
};

Workspace carve(void* base, int max_blocks) {
  char* p = static_cast<char*>(base);
  return Workspace{reinterpret_cast<double*>(p),
                   reinterpret_cast<unsigned int*>(p + sizeof(double) * 3 * max_blocks)};
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
slerp_reduce_kernel(const T* __restrict__ a, const T* __restrict__ b, int64_t n, Workspace ws,
                    double* __restrict__ sums_out) {
  ScaledSums acc;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;

  constexpr int V = Pack<T>::kSize;
  const int64_t n_vec = (aligned16(a) && aligned16(b)) ? n / V : 0;
  for (int64_t i = first; i < n_vec; i += stride) {
    const Pack<T> pa = reinterpret_cast<const Pack<T>*>(a)[i];
    const Pack<T> pb = reinterpret_cast<const Pack<T>*>(b)[i];
#pragma unroll
    for (int j = 0; j < V; ++j) acc.add(to_float(pa.v[j]), to_float(pb.v[j]));
  }
  for (int64_t i = n_vec * V + first; i < n; i += stride) acc.add(to_float(a[i]), to_float(b[i]));

  // Threads hold different scales: the block adds their sums in double, unscaled.
  __shared__ double scratch_d[kWarps];
  __shared__ bool is_last_block;
  const double aa = block_sum(acc.unscaled(acc.aa), scratch_d);
  const double bb = block_sum(acc.unscaled(acc.bb), scratch_d);
  const double ab = block_sum(acc.unscaled(acc.ab), scratch_d);
  if (threadIdx.x == 0) {
    ws.partial[3 * blockIdx.x + 0] = aa;
    ws.partial[3 * blockIdx.x + 1] = bb;
    ws.partial[3 * blockIdx.x + 2] = ab;
    __threadfence();  // make the partials visible before counting this block as done
    is_last_block = atomicAdd(ws.blocks_done, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last_block) return;

  // The last block: fold the partials in a fixed order. volatile: bypass stale L1 lines.
  const volatile double* partial = ws.partial;
  double sums[3] = {0.0, 0.0, 0.0};
  for (int blk = threadIdx.x; blk < gridDim.x; blk += blockDim.x) {
    for (int k = 0; k < 3; ++k) sums[k] += partial[3 * blk + k];
  }
  for (int k = 0; k < 3; ++k) sums[k] = block_sum(sums[k], scratch_d);
  if (threadIdx.x == 0) {
    for (int k = 0; k < 3; ++k) sums_out[k] = sums[k];
    *ws.blocks_done = 0;  // leave the workspace reusable
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
slerp_write_kernel(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out,
                   int64_t n, int64_t head, const double* __restrict__ sums,
                   SlerpParams params) {
  __shared__ float coef[2];
  if (threadIdx.x == 0) {
    slerp_coefficients(SlerpSums{sums[0], sums[1], sums[2]}, params, &coef[0], &coef[1]);
  }
  __syncthreads();
  const float ca = coef[0], cb = coef[1];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;

  // Packs from the first common 16-byte boundary (see common_head), single elements around.
  constexpr int V = Pack<T>::kSize;
  const PackedRange r(n, head, V);
  const int64_t s = r.pack_start;
  for (int64_t i = first; i < r.n_packs; i += stride) {
    const Pack<T> pa = reinterpret_cast<const Pack<T>*>(a + s)[i];
    const Pack<T> pb = reinterpret_cast<const Pack<T>*>(b + s)[i];
    Pack<T> po;
#pragma unroll
    for (int j = 0; j < V; ++j) po.v[j] = from_float<T>(fmaf(ca, to_float(pa.v[j]), cb * to_float(pb.v[j])));
    reinterpret_cast<Pack<T>*>(out + s)[i] = po;
  }
  for (int64_t j = first; j < r.n_scalar; j += stride) {
    const int64_t i = r.scalar_index(j);
    out[i] = from_float<T>(fmaf(ca, to_float(a[i]), cb * to_float(b[i])));
  }
}

int grid_size(int64_t n, int elements_per_thread, int max_blocks) {
  const int64_t wanted = (n + int64_t(kThreads) * elements_per_thread - 1) /
                         (int64_t(kThreads) * elements_per_thread);
  return static_cast<int>(wanted < max_blocks ? wanted : max_blocks);
}

template <typename T>
cudaError_t launch_sums(const void* a, const void* b, int64_t n, double* sums, void* workspace,
                        int max_blocks, cudaStream_t stream) {
  if (n == 0) return cudaMemsetAsync(sums, 0, 3 * sizeof(double), stream);
  slerp_reduce_kernel<T><<<grid_size(n, Pack<T>::kSize, max_blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(a), static_cast<const T*>(b), n, carve(workspace, max_blocks), sums);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_write(const void* a, const void* b, void* out, int64_t n, const double* sums,
                         SlerpParams params, int max_blocks, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  slerp_write_kernel<T><<<grid_size(n, Pack<T>::kSize, max_blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(a), static_cast<const T*>(b), static_cast<T*>(out), n,
      common_head<T>({a, b, out}, n), sums, params);
  return cudaGetLastError();
}

}  // namespace

size_t slerp_cuda_workspace_bytes(int max_blocks) {
  return sizeof(double) * 3 * static_cast<size_t>(max_blocks) + sizeof(unsigned int);
}

cudaError_t slerp_cuda_sums(DType dtype, const void* a, const void* b, int64_t n, double* sums,
                            void* workspace, int max_blocks, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_sums<float>(a, b, n, sums, workspace, max_blocks, stream);
    case DType::kFloat16: return launch_sums<__half>(a, b, n, sums, workspace, max_blocks, stream);
    case DType::kBFloat16:
      return launch_sums<__nv_bfloat16>(a, b, n, sums, workspace, max_blocks, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t slerp_cuda_write(DType dtype, const void* a, const void* b, void* out, int64_t n,
                             const double* sums, SlerpParams params, int max_blocks,
                             cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_write<float>(a, b, out, n, sums, params, max_blocks, stream);
    case DType::kFloat16:
      return launch_write<__half>(a, b, out, n, sums, params, max_blocks, stream);
    case DType::kBFloat16:
      return launch_write<__nv_bfloat16>(a, b, out, n, sums, params, max_blocks, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace dafast
