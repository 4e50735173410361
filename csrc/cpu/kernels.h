// CPU kernels, called by ops.cpp after the inputs were checked and made contiguous.
#pragma once

#include <ATen/ATen.h>

#include "dafast/linear_logprobs.h"
#include "dafast/slerp.h"

namespace dafast {

// a, b, out: contiguous, same shape and floating dtype (fp32, fp16, bf16), on the CPU.
// The reduction pass: |a|^2, |b|^2 and a.b.
SlerpSums slerp_sums_cpu(const at::Tensor& a, const at::Tensor& b);
// The write pass: out = ca * a + cb * b with the coefficients from `sums` (of these or of
// larger tensors that a, b are chunks of).
void slerp_cpu(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, const SlerpSums& sums,
               const SlerpParams& params);

// Fold one fp32 logits tile (see dafast/linear_logprobs.h); rows run on ATen's thread pool.
void linear_logprobs_forward_fold_cpu(const LogprobsForwardTile& tile);
void linear_logprobs_backward_fold_cpu(const LogprobsBackwardTile& tile);

}  // namespace dafast
