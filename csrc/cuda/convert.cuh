// Device helpers the CUDA kernels share: fp32 from and to each storage dtype, and 16-byte
// vector packs. Raw CUDA only: nvcc compiles this without torch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <initializer_list>

namespace dafast {

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float(float x) { return x; }
template <> __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float(float x) { return x; }
template <> __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }

// 16 bytes of T: one vector load or store.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// How many leading elements of T to handle one by one so that the packs start 16-byte aligned
// in every operand: possible when all pointers are equally far from a boundary (a view that
// starts a few elements into its storage, as every operand of one op usually is). -1 when they
// differ: scalar throughout. Capped at n.
template <typename T>
inline int64_t common_head(std::initializer_list<const void*> ptrs, int64_t n) {
  const uintptr_t offset = reinterpret_cast<uintptr_t>(*ptrs.begin()) & 15;
  for (const void* p : ptrs) {
    if ((reinterpret_cast<uintptr_t>(p) & 15) != offset) return -1;
  }
  if (offset % sizeof(T) != 0) return -1;
  const int64_t head = static_cast<int64_t>((16 - offset) & 15) / static_cast<int64_t>(sizeof(T));
  return head < n ? head : n;
}

// Element ranges of an elementwise kernel given common_head's `head`: packs over
// [pack_start, pack_end), one element at a time over the rest (the head, then the tail).
struct PackedRange {
  int64_t pack_start, n_packs, pack_end, n_scalar;

  __host__ __device__ PackedRange(int64_t n, int64_t head, int pack_size) {
    pack_start = head > 0 ? head : 0;
    n_packs = head >= 0 ? (n - pack_start) / pack_size : 0;
    pack_end = pack_start + n_packs * pack_size;
    n_scalar = pack_start + (n - pack_end);
  }
  // The j-th element handled one at a time, j in [0, n_scalar).
  __host__ __device__ int64_t scalar_index(int64_t j) const {
    return j < pack_start ? j : pack_end + (j - pack_start);
  }
};

}  // namespace dafast
