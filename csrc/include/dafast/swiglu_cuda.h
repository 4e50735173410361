// Host-side entry points of csrc/cuda/swiglu.cu (see dafast/swiglu.h for the math): raw device
// pointers to n contiguous elements of `dtype`, asynchronous on `stream`, no torch.
#pragma once

#include <cuda_runtime_api.h>

#include "dafast/swiglu.h"

namespace dafast {

// out = silu(gate) * up.
cudaError_t swiglu_cuda_forward(DType dtype, const void* gate, const void* up, void* out,
                                int64_t n, int max_blocks, cudaStream_t stream);

// grad_gate, grad_up from grad_out, gate and up, in one pass.
cudaError_t swiglu_cuda_backward(DType dtype, const void* grad_out, const void* gate,
                                 const void* up, void* grad_gate, void* grad_up, int64_t n,
                                 int max_blocks, cudaStream_t stream);

}  // namespace dafast
