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
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(type);
  }
}

inline void check_slerp_pair(const at::Tensor& a, const at::Tensor& b) {
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
}

inline void check_slerp_inputs(const at::Tensor& a, const at::Tensor& b, double t,
                               double dot_threshold, double eps) {
  check_slerp_pair(a, b);
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

inline void check_slerp_sums(const at::Tensor& a, const at::Tensor& sums) {
  TORCH_CHECK_TYPE(sums.scalar_type() == at::kDouble,
                   "dafast.slerp: sums must be float64 (from slerp_sums), got ",
                   dtype_name(sums.scalar_type()));
  TORCH_CHECK_VALUE(sums.dim() == 1 && sums.size(0) == 3,
                    "dafast.slerp: sums must have shape [3] (|a|^2, |b|^2, a.b), got ", sums.sizes());
  TORCH_CHECK_VALUE(sums.device() == a.device(), "dafast.slerp: sums must be on ", a.device(),
                    ", got ", sums.device());
}

// A device's two SLERP passes, on contiguous tensors: the reduction into float64 [3] sums on
// the tensors' device, and the write of out from such sums.
using SlerpSumsKernel = void (*)(const at::Tensor& a, const at::Tensor& b, at::Tensor& sums);
using SlerpWriteKernel = void (*)(const at::Tensor& a, const at::Tensor& b, const at::Tensor& sums,
                                  at::Tensor& out, const SlerpParams& params);

// The ops' bodies, shared by the devices: checks, any strides in (copied only if needed),
// then the device's two passes.
template <SlerpSumsKernel sums_kernel, SlerpWriteKernel write_kernel>
struct SlerpOps {
  static at::Tensor sums(const at::Tensor& a, const at::Tensor& b) {
    check_slerp_pair(a, b);
    at::Tensor result = at::empty({3}, a.options().dtype(at::kDouble));
    sums_kernel(a.contiguous(), b.contiguous(), result);
    return result;
  }

  static at::Tensor slerp(const at::Tensor& a, const at::Tensor& b, double t,
                          double dot_threshold, double eps) {
    check_slerp_inputs(a, b, t, dot_threshold, eps);
    const at::Tensor a_c = a.contiguous();
    const at::Tensor b_c = b.contiguous();
    at::Tensor sums = at::empty({3}, a.options().dtype(at::kDouble));
    sums_kernel(a_c, b_c, sums);
    at::Tensor out = at::empty_like(a_c, at::MemoryFormat::Contiguous);
    write_kernel(a_c, b_c, sums, out, slerp_params(t, dot_threshold, eps));
    return out;
  }

  static void slerp_out(const at::Tensor& a, const at::Tensor& b, double t, double dot_threshold,
                        double eps, const std::optional<at::Tensor>& given_sums,
                        const at::Tensor& out) {
    check_slerp_inputs(a, b, t, dot_threshold, eps);
    check_slerp_out(a, b, out);
    const at::Tensor a_c = a.contiguous();
    const at::Tensor b_c = b.contiguous();
    at::Tensor sums;
    if (given_sums.has_value()) {
      check_slerp_sums(a, *given_sums);
      sums = given_sums->contiguous();
    } else {
      sums = at::empty({3}, a.options().dtype(at::kDouble));
      sums_kernel(a_c, b_c, sums);
    }
    at::Tensor target = out.is_contiguous() ? out : at::empty_like(a_c, at::MemoryFormat::Contiguous);
    write_kernel(a_c, b_c, sums, target, slerp_params(t, dot_threshold, eps));
    if (!target.is_same(out)) out.copy_(target);
  }
};

}  // namespace dafast
