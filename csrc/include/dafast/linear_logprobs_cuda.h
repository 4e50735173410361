// Host-side entry points of csrc/cuda/linear_logprobs.cu: raw device pointers and a stream, no torch.
#pragma once

#include <cuda_runtime_api.h>

#include "dafast/linear_logprobs.h"

namespace dafast {

// Folds one fp32 logits tile into the running per-row statistics (see LogprobsForwardTile).
cudaError_t linear_logprobs_forward_fold_cuda(const LogprobsForwardTile& tile, cudaStream_t stream);

// Writes the logits gradient of one tile (see LogprobsBackwardTile), in fp32, fp16 or bf16.
cudaError_t linear_logprobs_backward_fold_cuda(const LogprobsBackwardTile& tile,
                                               cudaStream_t stream);

}  // namespace dafast
