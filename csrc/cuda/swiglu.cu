// CUDA SwiGLU (see dafast/swiglu.h): elementwise, memory-bound. Each thread of a grid-stride
// loop handles one 16-byte pack of every operand (4 fp32 or 8 bf16/fp16 values); a scalar loop
// covers the elements before the first common 16-byte boundary and the tail (and everything
// when the operands are not equally misaligned, see common_head).
// Raw pointers and cudaStream_t only: nvcc compiles this file without torch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "convert.cuh"
#include "dafast/swiglu_cuda.h"

namespace dafast {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float sigmoid(float g) { return 1.0f / (1.0f + __expf(-g)); }

__device__ __forceinline__ int64_t first_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_stride() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

template <typename T>
__device__ __forceinline__ T forward_value(T g, T u) {
  const float gi = to_float(g);
  return from_float<T>(swiglu_value(gi, to_float(u), sigmoid(gi)));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
swiglu_forward_kernel(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ h,
                      int64_t n, int64_t head) {
  constexpr int V = Pack<T>::kSize;
  const PackedRange r(n, head, V);
  const int64_t s = r.pack_start;
  for (int64_t p = first_index(); p < r.n_packs; p += grid_stride()) {
    const Pack<T> gp = reinterpret_cast<const Pack<T>*>(g + s)[p];
    const Pack<T> up = reinterpret_cast<const Pack<T>*>(u + s)[p];
    Pack<T> hp;
#pragma unroll
    for (int k = 0; k < V; ++k) hp.v[k] = forward_value(gp.v[k], up.v[k]);
    reinterpret_cast<Pack<T>*>(h + s)[p] = hp;
  }
  for (int64_t j = first_index(); j < r.n_scalar; j += grid_stride()) {
    const int64_t i = r.scalar_index(j);
    h[i] = forward_value(g[i], u[i]);
  }
}

template <typename T>
__device__ __forceinline__ void backward_values(T dh, T g, T u, T* dg, T* du) {
  const float gi = to_float(g);
  float dgi, dui;
  swiglu_grads(to_float(dh), gi, to_float(u), sigmoid(gi), &dgi, &dui);
  *dg = from_float<T>(dgi);
  *du = from_float<T>(dui);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
swiglu_backward_kernel(const T* __restrict__ dh, const T* __restrict__ g,
                       const T* __restrict__ u, T* __restrict__ dg, T* __restrict__ du,
                       int64_t n, int64_t head) {
  constexpr int V = Pack<T>::kSize;
  const PackedRange r(n, head, V);
  const int64_t s = r.pack_start;
  for (int64_t p = first_index(); p < r.n_packs; p += grid_stride()) {
    const Pack<T> dhp = reinterpret_cast<const Pack<T>*>(dh + s)[p];
    const Pack<T> gp = reinterpret_cast<const Pack<T>*>(g + s)[p];
    const Pack<T> up = reinterpret_cast<const Pack<T>*>(u + s)[p];
    Pack<T> dgp, dup;
#pragma unroll
    for (int k = 0; k < V; ++k) backward_values(dhp.v[k], gp.v[k], up.v[k], &dgp.v[k], &dup.v[k]);
    reinterpret_cast<Pack<T>*>(dg + s)[p] = dgp;
    reinterpret_cast<Pack<T>*>(du + s)[p] = dup;
  }
  for (int64_t j = first_index(); j < r.n_scalar; j += grid_stride()) {
    const int64_t i = r.scalar_index(j);
    backward_values(dh[i], g[i], u[i], dg + i, du + i);
  }
}

int grid_size(int64_t n, int per_thread, int max_blocks) {
  const int64_t per_block = int64_t(kThreads) * per_thread;
  const int64_t wanted = (n + per_block - 1) / per_block;
  return static_cast<int>(wanted < max_blocks ? wanted : max_blocks);
}

template <typename T>
cudaError_t launch_forward(const void* g, const void* u, void* h, int64_t n, int max_blocks,
                           cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t head = common_head<T>({g, u, h}, n);
  swiglu_forward_kernel<T><<<grid_size(n, Pack<T>::kSize, max_blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(g), static_cast<const T*>(u), static_cast<T*>(h), n, head);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const void* dh, const void* g, const void* u, void* dg, void* du,
                            int64_t n, int max_blocks, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t head = common_head<T>({dh, g, u, dg, du}, n);
  swiglu_backward_kernel<T><<<grid_size(n, Pack<T>::kSize, max_blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(dh), static_cast<const T*>(g), static_cast<const T*>(u),
      static_cast<T*>(dg), static_cast<T*>(du), n, head);
  return cudaGetLastError();
}

}  // namespace

cudaError_t swiglu_cuda_forward(DType dtype, const void* gate, const void* up, void* out,
                                int64_t n, int max_blocks, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_forward<float>(gate, up, out, n, max_blocks, stream);
    case DType::kFloat16: return launch_forward<__half>(gate, up, out, n, max_blocks, stream);
    case DType::kBFloat16:
      return launch_forward<__nv_bfloat16>(gate, up, out, n, max_blocks, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t swiglu_cuda_backward(DType dtype, const void* grad_out, const void* gate,
                                 const void* up, void* grad_gate, void* grad_up, int64_t n,
                                 int max_blocks, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_backward<float>(grad_out, gate, up, grad_gate, grad_up, n, max_blocks, stream);
    case DType::kFloat16:
      return launch_backward<__half>(grad_out, gate, up, grad_gate, grad_up, n, max_blocks, stream);
    case DType::kBFloat16:
      return launch_backward<__nv_bfloat16>(grad_out, gate, up, grad_gate, grad_up, n, max_blocks,
                                            stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace dafast
