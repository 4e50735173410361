// slerp, slerp_out, slerp_sums: input checks (TORCH_CHECK, the only place they are written:
// dafast/ops/slerp.py's reference calls them through dafast._C) and the device-independent body,
// shared by the CPU registration (ops.cpp) and the CUDA registration (ops_cuda.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <optional>

#include "dafast/slerp.h"
#include "ops_common.h"

namespace dafast {

// allow_float64: what the references also take (golden values); the kernels never do.
inline void check_slerp_pair(const at::Tensor& a, const at::Tensor& b, bool allow_float64 = false) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(),
                   "dafast.slerp: a and b must have the same dtype, got ",
                   dtype_name(a.scalar_type()), " and ", dtype_name(b.scalar_type()));
  TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat || a.scalar_type() == at::kHalf ||
                       a.scalar_type() == at::kBFloat16 ||
                       (allow_float64 && a.scalar_type() == at::kDouble),
                   "dafast.slerp: dtype must be float32, float16 or bfloat16, got ",
                   dtype_name(a.scalar_type()));
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), "dafast.slerp: a and b must have the same shape, got ",
                    a.sizes(), " and ", b.sizes());
  TORCH_CHECK_VALUE(a.device() == b.device(), "dafast.slerp: a and b must be on the same device, got ",
                    a.device(), " and ", b.device());
}

inline void check_slerp_inputs(const at::Tensor& a, const at::Tensor& b, double t,
                               double dot_threshold, double eps, bool allow_float64 = false) {
  check_slerp_pair(a, b, allow_float64);
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

// Every check of one call, for dafast/ops/slerp.py's reference path (through dafast._C), so
// that it refuses what the kernels refuse, with their messages. sums and out where given.
inline void check_slerp_call(const at::Tensor& a, const at::Tensor& b, double t,
                             double dot_threshold, double eps, const std::optional<at::Tensor>& sums,
                             const std::optional<at::Tensor>& out, bool allow_float64) {
  check_slerp_inputs(a, b, t, dot_threshold, eps, allow_float64);
  if (out.has_value()) check_slerp_out(a, b, *out);
  if (sums.has_value()) check_slerp_sums(a, *sums);
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
