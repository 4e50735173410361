// Host-side entry points of csrc/cuda/slerp.cu: raw device pointers and a stream, no torch.
#pragma once

#include <cstddef>
#include <cuda_runtime_api.h>

#include "dafast/slerp.h"

namespace dafast {

// Bytes of zero-initialised device workspace slerp_cuda() needs for `max_blocks` reduction blocks.
size_t slerp_cuda_workspace_bytes(int max_blocks);

// out[i] = ca * a[i] + cb * b[i] over n contiguous elements of `dtype`, all on `stream`, with no
// host synchronisation: the coefficients are computed on the device by the last reduction block.
// `workspace` must hold slerp_cuda_workspace_bytes(max_blocks) zeroed bytes.
cudaError_t slerp_cuda(DType dtype, const void* a, const void* b, void* out, int64_t n,
                       SlerpParams params, void* workspace, int max_blocks, cudaStream_t stream);

}  // namespace dafast
