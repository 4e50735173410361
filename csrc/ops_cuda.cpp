// CUDA implementations of the dafast ops: tensors -> raw pointers, the current stream, a
// launch, and the error check. Compiled only in CUDA builds; the kernels are in csrc/cuda/.
// Only c10's CUDA headers: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers, which
// CI's toolkit lacks, and CI syntax-checks this file against the CPU wheel's headers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "dafast/linear_logprobs_cuda.h"
#include "dafast/slerp_cuda.h"
#include "linear_logprobs_op.h"
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

void check_launch(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "dafast.slerp: CUDA launch failed: ", cudaGetErrorString(err));
}

void slerp_sums_into_cuda(const at::Tensor& a, const at::Tensor& b, at::Tensor& sums) {
  TORCH_CHECK_VALUE(a.is_cuda(), "dafast.slerp: expected CUDA tensors, got ", a.device());
  const c10::cuda::CUDAGuard guard(a.device());
  const int max_blocks = blocks_to_fill_device(a.get_device());
  at::Tensor workspace = at::zeros({static_cast<int64_t>(slerp_cuda_workspace_bytes(max_blocks))},
                                   a.options().dtype(at::kByte));
  check_launch(slerp_cuda_sums(kernel_dtype(a.scalar_type()), a.const_data_ptr(),
                               b.const_data_ptr(), a.numel(), sums.mutable_data_ptr<double>(),
                               workspace.mutable_data_ptr(), max_blocks,
                               c10::cuda::getCurrentCUDAStream()));
}

void slerp_write_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& sums,
                      at::Tensor& out, const SlerpParams& params) {
  TORCH_CHECK_VALUE(a.is_cuda(), "dafast.slerp: expected CUDA tensors, got ", a.device());
  const c10::cuda::CUDAGuard guard(a.device());
  check_launch(slerp_cuda_write(kernel_dtype(a.scalar_type()), a.const_data_ptr(),
                                b.const_data_ptr(), out.mutable_data_ptr(), a.numel(),
                                sums.const_data_ptr<double>(), params,
                                blocks_to_fill_device(a.get_device()),
                                c10::cuda::getCurrentCUDAStream()));
}

using SlerpCuda = SlerpOps<slerp_sums_into_cuda, slerp_write_cuda>;

// linear_logprobs: the tile loop of linear_logprobs_op.h with cuBLAS GEMMs (through ATen, in the
// input dtype with fp32 output) and the folds of csrc/cuda/linear_logprobs.cu.
struct CudaLogprobs {
  static constexpr int64_t kTokenChunk = kCudaTokenChunk;
  static constexpr int64_t kVocabChunk = kCudaVocabChunk;
  static constexpr bool kGemmInFp32 = false;
  static void forward_fold(const LogprobsForwardTile& tile) {
    const cudaError_t err =
        linear_logprobs_forward_fold_cuda(tile, c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "dafast.linear_logprobs: CUDA launch failed: ",
                cudaGetErrorString(err));
  }
  static void backward_fold(const LogprobsBackwardTile& tile) {
    const cudaError_t err =
        linear_logprobs_backward_fold_cuda(tile, c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "dafast.linear_logprobs_backward: CUDA launch failed: ",
                cudaGetErrorString(err));
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    int64_t ignore_index, int64_t token_chunk, int64_t vocab_chunk, bool with_stats) {
  TORCH_CHECK_VALUE(hidden.is_cuda(), "dafast.linear_logprobs: expected CUDA tensors, got ",
                    hidden.device());
  const c10::cuda::CUDAGuard guard(hidden.device());
  return linear_logprobs_op<CudaLogprobs>(hidden, weight, targets, ignore_index, token_chunk,
                                          vocab_chunk, with_stats);
}

std::tuple<at::Tensor, at::Tensor> linear_logprobs_backward_cuda(
    const at::Tensor& grad_logp, const at::Tensor& hidden, const at::Tensor& weight,
    const at::Tensor& targets, const at::Tensor& lse, int64_t ignore_index, int64_t token_chunk,
    int64_t vocab_chunk, bool hidden_grad, bool weight_grad) {
  TORCH_CHECK_VALUE(hidden.is_cuda(),
                    "dafast.linear_logprobs_backward: expected CUDA tensors, got ", hidden.device());
  const c10::cuda::CUDAGuard guard(hidden.device());
  return linear_logprobs_backward_op<CudaLogprobs>(grad_logp, hidden, weight, targets, lse,
                                                   ignore_index, token_chunk, vocab_chunk,
                                                   hidden_grad, weight_grad);
}

}  // namespace

int cuda_runtime_version_built() { return CUDART_VERSION; }

}  // namespace dafast

TORCH_LIBRARY_IMPL(dafast, CUDA, m) {
  m.impl("slerp", &dafast::SlerpCuda::slerp);
  m.impl("slerp_out", &dafast::SlerpCuda::slerp_out);
  m.impl("slerp_sums", &dafast::SlerpCuda::sums);
  m.impl("linear_logprobs", &dafast::linear_logprobs_cuda);
  m.impl("linear_logprobs_backward", &dafast::linear_logprobs_backward_cuda);
}
