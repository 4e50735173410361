// Helpers every op's header (<op>_op.h) shares: dtype names for messages, the kernels' dtype
// enum. Each op's input checks and device-independent body live in its own header.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "dafast/common.h"

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

inline bool is_half(at::ScalarType type) { return type == at::kHalf || type == at::kBFloat16; }

// The kernels' dtype (dafast/common.h) for a tensor the op's checks have already accepted.
inline DType to_kernel_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "dafast: unsupported dtype ", dtype_name(type));
  }
}

}  // namespace dafast
