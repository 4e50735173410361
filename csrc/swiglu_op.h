// swiglu, swiglu_backward: input checks (TORCH_CHECK, the only place they are written:
// dafast/ops/swiglu.py's reference calls them through dafast._C) and the device-independent
// body, shared by the CPU registration (ops.cpp) and the CUDA registration (ops_cuda.cpp).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "dafast/swiglu.h"
#include "ops_common.h"

namespace dafast {

inline void check_swiglu_pair(const at::Tensor& gate, const at::Tensor& other, const char* name) {
  TORCH_CHECK_TYPE(other.scalar_type() == gate.scalar_type(), "dafast.swiglu: ", name,
                   " must have gate's dtype ", dtype_name(gate.scalar_type()), ", got ",
                   dtype_name(other.scalar_type()));
  TORCH_CHECK_VALUE(other.sizes() == gate.sizes(), "dafast.swiglu: ", name,
                    " must have gate's shape ", gate.sizes(), ", got ", other.sizes());
  TORCH_CHECK_VALUE(other.device() == gate.device(), "dafast.swiglu: ", name,
                    " must be on gate's device ", gate.device(), ", got ", other.device());
}

// allow_float64: what the reference also takes (gradcheck); the kernels never do. The reference
// (dafast/ops/swiglu.py) runs these checks through dafast._C.
inline void check_swiglu_inputs(const at::Tensor& gate, const at::Tensor& up,
                                bool allow_float64 = false) {
  const at::ScalarType type = gate.scalar_type();
  TORCH_CHECK_TYPE(type == at::kFloat || is_half(type) || (allow_float64 && type == at::kDouble),
                   "dafast.swiglu: gate must be float32, float16 or bfloat16, got ",
                   dtype_name(type));
  check_swiglu_pair(gate, up, "up");
}

// The kernels see contiguous tensors of one shape and dtype.
using SwigluForwardKernel = void (*)(const at::Tensor& gate, const at::Tensor& up, at::Tensor& out);
using SwigluBackwardKernel = void (*)(const at::Tensor& grad_out, const at::Tensor& gate,
                                      const at::Tensor& up, at::Tensor& grad_gate,
                                      at::Tensor& grad_up);

template <SwigluForwardKernel kernel>
at::Tensor swiglu_op(const at::Tensor& gate, const at::Tensor& up) {
  check_swiglu_inputs(gate, up);
  const at::Tensor g = gate.contiguous(), u = up.contiguous();
  at::Tensor out = at::empty_like(g, at::MemoryFormat::Contiguous);
  if (g.numel() > 0) kernel(g, u, out);
  return out;
}

template <SwigluBackwardKernel kernel>
std::tuple<at::Tensor, at::Tensor> swiglu_backward_op(const at::Tensor& grad_out,
                                                      const at::Tensor& gate,
                                                      const at::Tensor& up) {
  check_swiglu_inputs(gate, up);
  check_swiglu_pair(gate, grad_out, "grad_out");
  const at::Tensor dh = grad_out.contiguous(), g = gate.contiguous(), u = up.contiguous();
  at::Tensor grad_gate = at::empty_like(g, at::MemoryFormat::Contiguous);
  at::Tensor grad_up = at::empty_like(g, at::MemoryFormat::Contiguous);
  if (g.numel() > 0) kernel(dh, g, u, grad_gate, grad_up);
  return {grad_gate, grad_up};
}

}  // namespace dafast
