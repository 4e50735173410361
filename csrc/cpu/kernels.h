// CPU kernels, called by ops.cpp after the inputs were checked and made contiguous.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "dafast/lora_linear.h"
#include "dafast/linear_logprobs.h"
#include "dafast/slerp.h"
#include "dafast/swiglu.h"

namespace dafast {

// a, b, out: contiguous, same shape and floating dtype (fp32, fp16, bf16), on the CPU.
// The reduction pass: |a|^2, |b|^2 and a.b.
SlerpSums slerp_sums_cpu(const at::Tensor& a, const at::Tensor& b);
// The write pass: out = ca * a + cb * b with the coefficients from `sums` (of these or of
// larger tensors that a, b are chunks of).
void slerp_cpu(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, const SlerpSums& sums,
               const SlerpParams& params);

// x [M, in], y [M, out], xa [M, r] (x's or lora_a's dtype), all contiguous, on the CPU; the
// inputs were checked by check_lora_inputs. Writes y and xa.
void lora_linear_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                             const at::Tensor& lora_b, double scale, const LoraShapes& shapes,
                             at::Tensor& y, at::Tensor& xa);

// grad_y [M, out]; x [M, in] is read only for grad_a, xa [M, r] only for grad_b. Writes the
// gradients that are defined (allocated by the caller, contiguous) and skips the others.
void lora_linear_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                              const at::Tensor& weight, const at::Tensor& lora_a,
                              const at::Tensor& lora_b, const at::Tensor& xa, double scale,
                              const LoraShapes& shapes, at::Tensor& grad_x, at::Tensor& grad_a,
                              at::Tensor& grad_b);
// Fold one fp32 logits tile (see dafast/linear_logprobs.h); rows run on ATen's thread pool.
void linear_logprobs_forward_fold_cpu(const LogprobsForwardTile& tile);
void linear_logprobs_backward_fold_cpu(const LogprobsBackwardTile& tile);

// gate, up, out (and grad_out, grad_gate, grad_up): contiguous, one shape and dtype (fp32, fp16,
// bf16), on the CPU. out = silu(gate) * up; the backward writes both input gradients.
void swiglu_forward_cpu(const at::Tensor& gate, const at::Tensor& up, at::Tensor& out);
void swiglu_backward_cpu(const at::Tensor& grad_out, const at::Tensor& gate, const at::Tensor& up,
                         at::Tensor& grad_gate, at::Tensor& grad_up);

}  // namespace dafast
