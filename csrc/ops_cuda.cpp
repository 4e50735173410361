// CUDA implementations of the dafast ops: tensors -> raw pointers, the current stream, a
// launch, and the error check. Compiled only in CUDA builds; the kernels are in csrc/cuda/.
// Only c10's CUDA headers: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers, which
// CI's toolkit lacks, and CI syntax-checks this file against the CPU wheel's headers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "dafast/slerp_cuda.h"
#include "ops_common.h"

namespace dafast {
namespace {

DType kernel_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "dafast: unsupported dtype ", type);
  }
}

// Enough blocks of 256 threads to fill every SM (8 resident per SM); reductions store one
// partial per block.
int blocks_to_fill_device(int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms * 8;
}

void slerp_cuda_kernel(const at::Tensor& a, const at::Tensor& b, at::Tensor& out,
                       const SlerpParams& params) {
  TORCH_CHECK_VALUE(a.is_cuda(), "dafast.slerp: expected CUDA tensors, got ", a.device());
  const c10::cuda::CUDAGuard guard(a.device());
  const int max_blocks = blocks_to_fill_device(a.get_device());
  at::Tensor workspace = at::zeros({static_cast<int64_t>(slerp_cuda_workspace_bytes(max_blocks))},
                                   a.options().dtype(at::kByte));
  const cudaError_t err =
      slerp_cuda(kernel_dtype(a.scalar_type()), a.const_data_ptr(), b.const_data_ptr(),
                 out.mutable_data_ptr(), a.numel(), params, workspace.mutable_data_ptr(),
                 max_blocks, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "dafast.slerp: CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace

int cuda_runtime_version_built() { return CUDART_VERSION; }

}  // namespace dafast

TORCH_LIBRARY_IMPL(dafast, CUDA, m) {
  m.impl("slerp", &dafast::slerp_op<dafast::slerp_cuda_kernel>);
  m.impl("slerp_out", &dafast::slerp_out_op<dafast::slerp_cuda_kernel>);
}
