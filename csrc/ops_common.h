// Input checks and the device-independent body of each op, shared by the CPU registration
// (ops.cpp) and the CUDA registration (ops_cuda.cpp). Every check is a TORCH_CHECK, so bad
// input becomes a Python exception naming the argument, never a crash.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <array>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "dafast/lora.h"
#include "dafast/slerp.h"
#include "dafast/swiglu.h"

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

// ---- lora_linear --------------------------------------------------------------------------

inline bool is_half(at::ScalarType type) { return type == at::kHalf || type == at::kBFloat16; }

inline void check_lora_device(const at::Tensor& x, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device() == x.device(), "dafast.lora_linear: ", name,
                    " must be on x's device ", x.device(), ", got ", t.device());
}

// The same checks, in the same order and with the same messages, as dafast/ops/lora.py.
inline LoraShapes check_lora_inputs(const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias,
                                    const at::Tensor& lora_a, const at::Tensor& lora_b,
                                    double scale) {
  const at::ScalarType type = x.scalar_type();
  TORCH_CHECK_TYPE(type == at::kFloat || is_half(type) || type == at::kDouble,
                   "dafast.lora_linear: x must be float32, float16, bfloat16 or float64, got ",
                   dtype_name(type));
  TORCH_CHECK_VALUE(x.dim() >= 1, "dafast.lora_linear: x must be [..., in_features], got a scalar");
  TORCH_CHECK_VALUE(weight.dim() == 2, "dafast.lora_linear: weight must be 2-D [out_features, "
                    "in_features], got shape ", weight.sizes());
  const int64_t out = weight.size(0), in = weight.size(1);
  TORCH_CHECK_VALUE(x.size(-1) == in, "dafast.lora_linear: in_features mismatch: x has shape ",
                    x.sizes(), " but weight has shape ", weight.sizes());
  TORCH_CHECK_VALUE(lora_a.dim() == 2 && lora_a.size(1) == in && lora_a.size(0) >= 1,
                    "dafast.lora_linear: lora_a must be [r, in_features=", in, "], got shape ",
                    lora_a.sizes());
  const int64_t rank = lora_a.size(0);
  TORCH_CHECK_VALUE(lora_b.dim() == 2, "dafast.lora_linear: lora_b must be 2-D [out_features, r], "
                    "got shape ", lora_b.sizes());
  TORCH_CHECK_VALUE(lora_b.size(1) == rank, "dafast.lora_linear: rank mismatch: lora_a has shape ",
                    lora_a.sizes(), " (r=", rank, ") but lora_b has shape ", lora_b.sizes(),
                    " (r=", lora_b.size(1), ")");
  TORCH_CHECK_VALUE(lora_b.size(0) == out, "dafast.lora_linear: lora_b must be [out_features=",
                    out, ", r], got shape ", lora_b.sizes());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out,
                      "dafast.lora_linear: bias must be [out_features=", out, "], got shape ",
                      bias->sizes());
  }
  TORCH_CHECK_TYPE(weight.scalar_type() == type, "dafast.lora_linear: weight must have x's dtype ",
                   dtype_name(type), ", got ", dtype_name(weight.scalar_type()));
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == type, "dafast.lora_linear: bias must have x's dtype ",
                     dtype_name(type), ", got ", dtype_name(bias->scalar_type()));
  }
  const at::ScalarType lora_type = lora_a.scalar_type();
  TORCH_CHECK_TYPE(lora_b.scalar_type() == lora_type,
                   "dafast.lora_linear: lora_a and lora_b must have the same dtype, got ",
                   dtype_name(lora_type), " and ", dtype_name(lora_b.scalar_type()));
  TORCH_CHECK_TYPE(lora_type == type || (lora_type == at::kFloat && is_half(type)),
                   "dafast.lora_linear: lora_a and lora_b must have x's dtype ", dtype_name(type),
                   " (or torch.float32 when x is bfloat16 or float16), got ",
                   dtype_name(lora_type));
  check_lora_device(x, weight, "weight");
  if (bias.has_value()) check_lora_device(x, *bias, "bias");
  check_lora_device(x, lora_a, "lora_a");
  check_lora_device(x, lora_b, "lora_b");
  TORCH_CHECK_VALUE(std::isfinite(scale), "dafast.lora_linear: scale must be finite, got ", scale);
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  return {rows, in, out, rank};
}

// lora_linear_backward is internal (called by the autograd formula), so its checks guard
// against misuse rather than explain: shapes and dtypes must be those the forward produced.
inline LoraShapes check_lora_backward_inputs(const at::Tensor& grad_y,
                                             const std::optional<at::Tensor>& x,
                                             const at::Tensor& weight, const at::Tensor& lora_a,
                                             const at::Tensor& lora_b,
                                             const std::optional<at::Tensor>& xa,
                                             std::array<bool, 3> mask) {
  TORCH_CHECK_VALUE(weight.dim() == 2 && lora_a.dim() == 2 && lora_b.dim() == 2,
                    "dafast.lora_linear_backward: weight, lora_a and lora_b must be 2-D");
  const int64_t out = weight.size(0), in = weight.size(1), rank = lora_a.size(0);
  TORCH_CHECK_VALUE(lora_a.size(1) == in && lora_b.size(0) == out && lora_b.size(1) == rank,
                    "dafast.lora_linear_backward: lora_a ", lora_a.sizes(), " and lora_b ",
                    lora_b.sizes(), " do not match weight ", weight.sizes());
  TORCH_CHECK_VALUE(grad_y.dim() >= 1 && grad_y.size(-1) == out,
                    "dafast.lora_linear_backward: grad_y must be [..., out_features=", out,
                    "], got shape ", grad_y.sizes());
  TORCH_CHECK_TYPE(grad_y.scalar_type() == weight.scalar_type() &&
                       lora_b.scalar_type() == lora_a.scalar_type(),
                   "dafast.lora_linear_backward: grad_y must have weight's dtype and lora_b "
                   "lora_a's, got ", dtype_name(grad_y.scalar_type()), ", ",
                   dtype_name(weight.scalar_type()), ", ", dtype_name(lora_a.scalar_type()), ", ",
                   dtype_name(lora_b.scalar_type()));
  check_lora_device(grad_y, weight, "weight");
  check_lora_device(grad_y, lora_a, "lora_a");
  check_lora_device(grad_y, lora_b, "lora_b");
  std::vector<int64_t> lead(grad_y.sizes().begin(), grad_y.sizes().end() - 1);
  if (mask[1]) {
    TORCH_CHECK_VALUE(x.has_value(), "dafast.lora_linear_backward: x is needed for lora_a's grad");
    std::vector<int64_t> want = lead;
    want.push_back(in);
    TORCH_CHECK_VALUE(x->sizes() == at::IntArrayRef(want), "dafast.lora_linear_backward: x must "
                      "have shape ", want, ", got ", x->sizes());
    TORCH_CHECK_TYPE(x->scalar_type() == grad_y.scalar_type(),
                     "dafast.lora_linear_backward: x must have grad_y's dtype");
    check_lora_device(grad_y, *x, "x");
  }
  if (mask[2]) {
    TORCH_CHECK_VALUE(xa.has_value(), "dafast.lora_linear_backward: xa is needed for lora_b's grad");
    std::vector<int64_t> want = lead;
    want.push_back(rank);
    TORCH_CHECK_VALUE(xa->sizes() == at::IntArrayRef(want), "dafast.lora_linear_backward: xa "
                      "must have shape ", want, ", got ", xa->sizes());
    TORCH_CHECK_TYPE(xa->scalar_type() == lora_a.scalar_type(),
                     "dafast.lora_linear_backward: xa must have lora_a's dtype");
    check_lora_device(grad_y, *xa, "xa");
  }
  int64_t rows = 1;
  for (const int64_t d : lead) rows *= d;
  return {rows, in, out, rank};
}

inline std::vector<int64_t> with_last_dim(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> result(sizes.begin(), sizes.end());
  result.back() = last;
  return result;
}

// The kernels see 2-D contiguous tensors: x [M, in], y [M, out], xa [M, r].
using LoraForwardKernel = void (*)(const at::Tensor& x, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias,
                                   const at::Tensor& lora_a, const at::Tensor& lora_b,
                                   double scale, const LoraShapes& shapes, at::Tensor& y,
                                   at::Tensor& xa);

template <LoraForwardKernel kernel>
std::tuple<at::Tensor, at::Tensor> lora_linear_op(const at::Tensor& x, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias,
                                                  const at::Tensor& lora_a,
                                                  const at::Tensor& lora_b, double scale) {
  const LoraShapes s = check_lora_inputs(x, weight, bias, lora_a, lora_b, scale);
  const at::Tensor x2d = x.reshape({s.rows, s.in_features}).contiguous();
  std::optional<at::Tensor> bias_c;
  if (bias.has_value()) bias_c = bias->contiguous();
  at::Tensor y = at::empty({s.rows, s.out_features}, x.options());
  at::Tensor xa = at::empty({s.rows, s.rank}, x.options().dtype(lora_a.scalar_type()));
  kernel(x2d, weight.contiguous(), bias_c, lora_a.contiguous(), lora_b.contiguous(), scale, s, y,
         xa);
  return {y.view(with_last_dim(x.sizes(), s.out_features)),
          xa.view(with_last_dim(x.sizes(), s.rank))};
}

// grad_y [M, out]; x [M, in] and xa [M, r] are undefined when their gradient is not needed.
// The gradients to compute are allocated (contiguous) and the others left undefined.
using LoraBackwardKernel = void (*)(const at::Tensor& grad_y, const at::Tensor& x,
                                    const at::Tensor& weight, const at::Tensor& lora_a,
                                    const at::Tensor& lora_b, const at::Tensor& xa, double scale,
                                    const LoraShapes& shapes, at::Tensor& grad_x,
                                    at::Tensor& grad_a, at::Tensor& grad_b);

using OptionalGrads =
    std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>;

// mask: which of (x, lora_a, lora_b) get a gradient; the others are returned as None.
template <LoraBackwardKernel kernel>
OptionalGrads lora_linear_backward_op(const at::Tensor& grad_y, const std::optional<at::Tensor>& x,
                                      const at::Tensor& weight, const at::Tensor& lora_a,
                                      const at::Tensor& lora_b,
                                      const std::optional<at::Tensor>& xa, double scale,
                                      std::array<bool, 3> mask) {
  const LoraShapes s = check_lora_backward_inputs(grad_y, x, weight, lora_a, lora_b, xa, mask);
  const at::Tensor gy = grad_y.reshape({s.rows, s.out_features}).contiguous();
  const at::Tensor x2d = mask[1] ? x->reshape({s.rows, s.in_features}).contiguous() : at::Tensor();
  const at::Tensor xa2d = mask[2] ? xa->reshape({s.rows, s.rank}).contiguous() : at::Tensor();
  at::Tensor grad_x = mask[0] ? at::empty({s.rows, s.in_features}, grad_y.options()) : at::Tensor();
  at::Tensor grad_a = mask[1] ? at::empty({s.rank, s.in_features}, lora_a.options()) : at::Tensor();
  at::Tensor grad_b = mask[2] ? at::empty({s.out_features, s.rank}, lora_b.options()) : at::Tensor();
  if (mask[0] || mask[1] || mask[2]) {
    kernel(gy, x2d, weight.contiguous(), lora_a.contiguous(), lora_b.contiguous(), xa2d, scale, s,
           grad_x, grad_a, grad_b);
  }
  OptionalGrads result;
  if (mask[0]) std::get<0>(result) = grad_x.view(with_last_dim(grad_y.sizes(), s.in_features));
  if (mask[1]) std::get<1>(result) = grad_a;
  if (mask[2]) std::get<2>(result) = grad_b;
  return result;
}

// ---- swiglu ------------------------------------------------------------------------------

// The same checks, in the same order and with the same messages, as dafast/ops/swiglu.py.
inline void check_swiglu_pair(const at::Tensor& gate, const at::Tensor& other, const char* name) {
  TORCH_CHECK_TYPE(other.scalar_type() == gate.scalar_type(), "dafast.swiglu: ", name,
                   " must have gate's dtype ", dtype_name(gate.scalar_type()), ", got ",
                   dtype_name(other.scalar_type()));
  TORCH_CHECK_VALUE(other.sizes() == gate.sizes(), "dafast.swiglu: ", name,
                    " must have gate's shape ", gate.sizes(), ", got ", other.sizes());
  TORCH_CHECK_VALUE(other.device() == gate.device(), "dafast.swiglu: ", name,
                    " must be on gate's device ", gate.device(), ", got ", other.device());
}

inline void check_swiglu_inputs(const at::Tensor& gate, const at::Tensor& up) {
  const at::ScalarType type = gate.scalar_type();
  TORCH_CHECK_TYPE(type == at::kFloat || is_half(type),
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
