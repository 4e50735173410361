// CPU kernels, called by ops.cpp after the inputs were checked and made contiguous.
#pragma once

#include <ATen/ATen.h>

#include "dafast/slerp.h"

namespace dafast {

// a, b, out: contiguous, same shape and floating dtype (fp32, fp16, bf16), on the CPU.
void slerp_cpu(const at::Tensor& a, const at::Tensor& b, at::Tensor& out,
               const SlerpParams& params);

}  // namespace dafast
