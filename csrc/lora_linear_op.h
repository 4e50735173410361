// lora_linear, lora_linear_backward: input checks (TORCH_CHECK, the only place they are
// written: dafast/ops/lora_linear.py's reference calls them through dafast._C) and the
// device-independent body, shared by the CPU registration (ops.cpp) and the CUDA registration
// (ops_cuda.cpp).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "dafast/lora_linear.h"
#include "ops_common.h"

namespace dafast {

inline void check_lora_device(const at::Tensor& x, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device() == x.device(), "dafast.lora_linear: ", name,
                    " must be on x's device ", x.device(), ", got ", t.device());
}

// Also the reference's checks (dafast/ops/lora_linear.py, through dafast._C): both take float64.
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

}  // namespace dafast
