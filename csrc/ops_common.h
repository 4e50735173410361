// Input checks and the device-independent body of each op, shared by the CPU registration
// (ops.cpp) and the CUDA registration (ops_cuda.cpp). Every check is a TORCH_CHECK, so bad
// input becomes a Python exception naming the argument, never a crash.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include "dafast/slerp.h"

namespace dafast {

// dtypes named as Python users know them, e.g. "torch.bfloat16" rather than ATen's "BFloat16".
inline std::string dtype_name(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return "torch.float32";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kDouble: return "torch.float64";
    default: return std::string("torch.") + c10::toString(type);
  }
}

inline void check_slerp_inputs(const at::Tensor& a, const at::Tensor& b, double t,
                               double dot_threshold, double eps) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(),
                   "dafast.slerp: a and b must have the same dtype, got ",
                   dtype_name(a.scalar_type()), " and ", dtype_name(b.scalar_type()));
  TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat || a.scalar_type() == at::kHalf ||
                       a.scalar_type() == at::kBFloat16,
                   "dafast.slerp: dtype must be float32, float16 or bfloat16, got ",
                   dtype_name(a.scalar_type()));
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), "dafast.slerp: a and b must have the same shape, got ",
                    a.sizes(), " and ", b.sizes());
  TORCH_CHECK_VALUE(a.device() == b.device(), "dafast.slerp: a and b must be on the same device, got ",
                    a.device(), " and ", b.device());
  // Written so that NaN fails every check.
  TORCH_CHECK_VALUE(t >= 0.0 && t <= 1.0, "dafast.slerp: t must be in [0, 1], got ", t);
  TORCH_CHECK_VALUE(dot_threshold >= 0.0 && dot_threshold < 1.0,
                    "dafast.slerp: dot_threshold must be in [0, 1), got ", dot_threshold);
  TORCH_CHECK_VALUE(eps >= 0.0 && eps < 1.0, "dafast.slerp: eps must be in [0, 1), got ", eps);
}

inline void check_slerp_out(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out) {
  TORCH_CHECK_TYPE(out.scalar_type() == a.scalar_type(), "dafast.slerp: out must have dtype ",
                   dtype_name(a.scalar_type()), ", got ", dtype_name(out.scalar_type()));
  TORCH_CHECK_VALUE(out.sizes() == a.sizes(), "dafast.slerp: out must have shape ", a.sizes(),
                    ", got ", out.sizes());
  TORCH_CHECK_VALUE(out.device() == a.device(), "dafast.slerp: out must be on ", a.device(),
                    ", got ", out.device());
  for (const at::Tensor* input : {&a, &b}) {
    const auto overlap = at::get_overlap_status(out, *input);
    TORCH_CHECK_VALUE(overlap != at::MemOverlapStatus::Full &&
                          overlap != at::MemOverlapStatus::Partial,
                      "dafast.slerp: out must not overlap a or b (the write pass would read "
                      "values it has already overwritten)");
  }
}

inline SlerpParams slerp_params(double t, double dot_threshold, double eps) {
  return {static_cast<float>(t), static_cast<float>(dot_threshold), static_cast<float>(eps)};
}

// The kernel contract is contiguous memory; the ops accept any strides and copy only if needed.
using SlerpKernel = void (*)(const at::Tensor&, const at::Tensor&, at::Tensor&,
                             const SlerpParams&);

template <SlerpKernel kernel>
at::Tensor slerp_op(const at::Tensor& a, const at::Tensor& b, double t, double dot_threshold,
                    double eps) {
  check_slerp_inputs(a, b, t, dot_threshold, eps);
  const at::Tensor a_c = a.contiguous();
  const at::Tensor b_c = b.contiguous();
  at::Tensor out = at::empty_like(a_c, at::MemoryFormat::Contiguous);
  kernel(a_c, b_c, out, slerp_params(t, dot_threshold, eps));
  return out;
}

template <SlerpKernel kernel>
void slerp_out_op(const at::Tensor& a, const at::Tensor& b, double t, double dot_threshold,
                  double eps, const at::Tensor& out) {
  check_slerp_inputs(a, b, t, dot_threshold, eps);
  check_slerp_out(a, b, out);
  const at::Tensor a_c = a.contiguous();
  const at::Tensor b_c = b.contiguous();
  if (out.is_contiguous()) {
    at::Tensor target = out;
    kernel(a_c, b_c, target, slerp_params(t, dot_threshold, eps));
  } else {
    at::Tensor target = at::empty_like(a_c, at::MemoryFormat::Contiguous);
    kernel(a_c, b_c, target, slerp_params(t, dot_threshold, eps));
    out.copy_(target);
  }
}

}  // namespace dafast
