// Host-side entry points of csrc/cuda/slerp.cu: raw device pointers and a stream, no torch.
#pragma once

#include <cstddef>
#include <cuda_runtime_api.h>

#include "dafast/slerp.h"

namespace dafast {

// Bytes of zero-initialised device workspace slerp_cuda_sums() needs for `max_blocks` blocks.
size_t slerp_cuda_workspace_bytes(int max_blocks);

// The reduction pass: sums[0..2] = |a|^2, |b|^2, a.b over n contiguous elements of `dtype`,
// written on the device by the last block to finish. `workspace` must hold
// slerp_cuda_workspace_bytes(max_blocks) zeroed bytes; the kernel leaves them zeroed.
cudaError_t slerp_cuda_sums(DType dtype, const void* a, const void* b, int64_t n, double* sums,
                            void* workspace, int max_blocks, cudaStream_t stream);

// The write pass: out[i] = ca * a[i] + cb * b[i], the coefficients derived on the device from
// `sums` (device memory). Both passes are asynchronous on `stream`: no host synchronisation.
cudaError_t slerp_cuda_write(DType dtype, const void* a, const void* b, void* out, int64_t n,
                             const double* sums, SlerpParams params, int max_blocks,
                             cudaStream_t stream);

}  // namespace dafast
