// Plain definitions shared by the CPU kernels, the CUDA kernels and the torch glue.
// No torch header may be included here: csrc/cuda/*.cu include this file and must
// compile with nvcc on machines whose torch is CPU-only.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DAFAST_HOST_DEVICE __host__ __device__
#else
#define DAFAST_HOST_DEVICE
#endif

namespace dafast {

// The element types the kernels are instantiated for. The glue maps torch dtypes onto it.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace dafast
