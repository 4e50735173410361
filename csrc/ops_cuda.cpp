// CUDA implementations of the dafast ops: tensors -> raw pointers, the current stream, a
// launch, and the error check. Compiled only in CUDA builds; the kernels are in csrc/cuda/.
// Only c10's CUDA headers: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers, which
// CI's toolkit lacks, and CI syntax-checks this file against the CPU wheel's headers.
#include <ATen/ATen.h>
#include <algorithm>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "dafast/lora_linear_cuda.h"
#include "dafast/linear_logprobs_cuda.h"
#include "dafast/slerp_cuda.h"
#include "dafast/swiglu_cuda.h"
#include "linear_logprobs_op.h"
#include "lora_linear_op.h"
#include "slerp_op.h"
#include "swiglu_op.h"

namespace dafast {
namespace {

int sm_count(int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// Enough blocks of 256 threads to fill every SM (8 resident per SM); reductions store one
// partial per block.
int blocks_to_fill_device(int device) { return sm_count(device) * 8; }

void check_launch(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "dafast.slerp: CUDA launch failed: ", cudaGetErrorString(err));
}

void slerp_sums_into_cuda(const at::Tensor& a, const at::Tensor& b, at::Tensor& sums) {
  TORCH_CHECK_VALUE(a.is_cuda(), "dafast.slerp: expected CUDA tensors, got ", a.device());
  const c10::cuda::CUDAGuard guard(a.device());
  const int max_blocks = blocks_to_fill_device(a.get_device());
  at::Tensor workspace = at::zeros({static_cast<int64_t>(slerp_cuda_workspace_bytes(max_blocks))},
                                   a.options().dtype(at::kByte));
  check_launch(slerp_cuda_sums(to_kernel_dtype(a.scalar_type()), a.const_data_ptr(),
                               b.const_data_ptr(), a.numel(), sums.mutable_data_ptr<double>(),
                               workspace.mutable_data_ptr(), max_blocks,
                               c10::cuda::getCurrentCUDAStream()));
}

void slerp_write_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& sums,
                      at::Tensor& out, const SlerpParams& params) {
  TORCH_CHECK_VALUE(a.is_cuda(), "dafast.slerp: expected CUDA tensors, got ", a.device());
  const c10::cuda::CUDAGuard guard(a.device());
  check_launch(slerp_cuda_write(to_kernel_dtype(a.scalar_type()), a.const_data_ptr(),
                                b.const_data_ptr(), out.mutable_data_ptr(), a.numel(),
                                sums.const_data_ptr<double>(), params,
                                blocks_to_fill_device(a.get_device()),
                                c10::cuda::getCurrentCUDAStream()));
}

using SlerpCuda = SlerpOps<slerp_sums_into_cuda, slerp_write_cuda>;

// ---- lora_linear ----------------------------------------------------------------------------
// cuBLAS (through ATen) for the two big GEMMs, csrc/cuda/lora_linear.cu for everything r-wide:
//   forward:  xa = x A^T (thin kernel, row product), y = b + s xa B^T (expand kernel), then
//             y += x W^T as a GEMM with beta = 1, so the LoRA term costs no extra pass over y.
//   backward: one read of dY gives dB = s dY^T xa and dXA = s dY B (thin kernel, both products);
//             one read of x gives dA = dXA^T x; dx = dXA A (expand), then dx += dY W (beta = 1).
// The thin kernels were compiled, not run, when written (no GPU at hand): untuned.

// The row product's partial sums in the backward stay under this (see there).
constexpr int64_t kMaxRowPartialBytes = int64_t(32) << 20;

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "dafast.lora_linear: ", what, " failed: ", cudaGetErrorString(err));
}

void check_lora_cuda(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.is_cuda(), "dafast.lora_linear: expected CUDA tensors, got ", x.device());
  TORCH_CHECK_TYPE(x.scalar_type() != at::kDouble,
                   "dafast.lora_linear: float64 is supported on the CPU only (for gradcheck), got "
                   "a float64 tensor on ", x.device());
}

// Empty products (no rows, no in or no out features) are ATen's: nothing worth a kernel.
bool is_degenerate(const LoraShapes& s) {
  return s.rows == 0 || s.in_features == 0 || s.out_features == 0;
}

void lora_linear_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                              const at::Tensor& lora_b, double scale, const LoraShapes& s,
                              at::Tensor& y, at::Tensor& xa) {
  check_lora_cuda(x);
  const c10::cuda::CUDAGuard guard(x.device());
  if (is_degenerate(s)) {
    const at::Tensor x32 = x.to(at::kFloat);
    xa.copy_(at::mm(x32, lora_a.to(at::kFloat).t()));
    at::Tensor y32 = at::mm(x32, weight.to(at::kFloat).t());
    y32.addmm_(xa.to(at::kFloat), lora_b.to(at::kFloat).t(), 1.0, scale);
    if (bias.has_value()) y32.add_(bias->to(at::kFloat));
    y.copy_(y32);
    return;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count(x.get_device());
  const at::Tensor a_t = lora_a.t().contiguous();  // [in, r]: Bm of the row product
  const LoraThinPlan plan = lora_thin_plan(s.rows, s.in_features, s.rank, sms);
  at::Tensor row_partial =
      at::empty({plan.col_groups, s.rows, s.rank}, x.options().dtype(at::kFloat));
  check_launch(lora_thin_products(plan, to_kernel_dtype(x.scalar_type()), x.const_data_ptr(), s.rows,
                                  s.in_features, s.rank, DType::kFloat32, nullptr, nullptr,
                                  to_kernel_dtype(a_t.scalar_type()), a_t.const_data_ptr(),
                                  row_partial.mutable_data_ptr<float>(), stream),
               "x A^T");
  check_launch(lora_sum_partials(row_partial.const_data_ptr<float>(), plan.col_groups,
                                 s.rows * s.rank, 1.0f, to_kernel_dtype(xa.scalar_type()),
                                 xa.mutable_data_ptr(), stream),
               "x A^T (sum)");
  check_launch(lora_expand(to_kernel_dtype(xa.scalar_type()), xa.const_data_ptr(),
                           to_kernel_dtype(lora_b.scalar_type()), lora_b.const_data_ptr(), s.rows,
                           s.out_features, s.rank, static_cast<float>(scale),
                           to_kernel_dtype(y.scalar_type()),
                           bias.has_value() ? bias->const_data_ptr() : nullptr,
                           y.mutable_data_ptr(), stream),
               "b + s xa B^T");
  y.addmm_(x, weight.t());  // cuBLAS with beta = 1: the base GEMM accumulates onto the LoRA term
}

void lora_linear_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                               const at::Tensor& weight, const at::Tensor& lora_a,
                               const at::Tensor& lora_b, const at::Tensor& xa, double scale,
                               const LoraShapes& s, at::Tensor& grad_x, at::Tensor& grad_a,
                               at::Tensor& grad_b) {
  check_lora_cuda(grad_y);
  const c10::cuda::CUDAGuard guard(grad_y.device());
  const bool need_x = grad_x.defined(), need_a = grad_a.defined(), need_b = grad_b.defined();
  if (is_degenerate(s)) {
    const at::Tensor dy = grad_y.to(at::kFloat);
    const at::Tensor dxa = at::mm(dy, lora_b.to(at::kFloat)).mul_(scale);
    if (need_b) grad_b.copy_(at::mm(dy.t(), xa.to(at::kFloat)).mul_(scale));
    if (need_a) grad_a.copy_(at::mm(dxa.t(), x.to(at::kFloat)));
    if (need_x) grad_x.copy_(at::addmm(at::mm(dy, weight.to(at::kFloat)), dxa, lora_a.to(at::kFloat)));
    return;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count(grad_y.get_device());
  const auto f32 = grad_y.options().dtype(at::kFloat);

  // One read of dY: column product with xa (dB), row product with B (dXA). The row product's
  // partials take col_groups * rows * rank floats (a LoRA'd 128k-entry head at 8k tokens is
  // tens of MB): dY is read in row blocks whose partials stay under kMaxRowPartialBytes (sized
  // with the plan for one row, which has the most column groups, so an upper bound), and dB's
  // per-block sums add up in fp32 before one rounding.
  const bool need_rows = need_x || need_a;
  const int64_t per_row =
      lora_thin_plan(1, s.out_features, s.rank, sms).col_groups * s.rank * int64_t(sizeof(float));
  const int64_t fitting = std::max<int64_t>(16, kMaxRowPartialBytes / per_row / 16 * 16);
  const int64_t block_rows = need_rows ? std::min(fitting, s.rows) : s.rows;
  const bool blocked = block_rows < s.rows;
  at::Tensor dxa = need_rows ? at::empty({s.rows, s.rank}, f32) : at::Tensor();
  at::Tensor db = need_b && blocked ? at::zeros({s.out_features, s.rank}, f32) : at::Tensor();
  for (int64_t r0 = 0; r0 < s.rows; r0 += block_rows) {
    const int64_t nr = std::min(block_rows, s.rows - r0);
    const LoraThinPlan plan = lora_thin_plan(nr, s.out_features, s.rank, sms);
    at::Tensor col_partial =
        need_b ? at::empty({plan.splits, s.out_features, s.rank}, f32) : at::Tensor();
    at::Tensor row_partial = need_rows ? at::empty({plan.col_groups, nr, s.rank}, f32) : at::Tensor();
    check_launch(lora_thin_products(
                     plan, to_kernel_dtype(grad_y.scalar_type()), grad_y.narrow(0, r0, nr).const_data_ptr(),
                     nr, s.out_features, s.rank,
                     need_b ? to_kernel_dtype(xa.scalar_type()) : DType::kFloat32,
                     need_b ? xa.narrow(0, r0, nr).const_data_ptr() : nullptr,
                     need_b ? col_partial.mutable_data_ptr<float>() : nullptr,
                     to_kernel_dtype(lora_b.scalar_type()), lora_b.const_data_ptr(),
                     need_rows ? row_partial.mutable_data_ptr<float>() : nullptr, stream),
                 "dY^T xa and dY B");
    if (need_b && !blocked) {
      check_launch(lora_sum_partials(col_partial.const_data_ptr<float>(), plan.splits,
                                     s.out_features * s.rank, static_cast<float>(scale),
                                     to_kernel_dtype(grad_b.scalar_type()), grad_b.mutable_data_ptr(),
                                     stream),
                   "dB (sum)");
    } else if (need_b) {
      at::Tensor db_block = at::empty({s.out_features, s.rank}, f32);
      check_launch(lora_sum_partials(col_partial.const_data_ptr<float>(), plan.splits,
                                     s.out_features * s.rank, 1.0f, DType::kFloat32,
                                     db_block.mutable_data_ptr(), stream),
                   "dB (block sum)");
      db.add_(db_block);
    }
    if (need_rows) {
      check_launch(lora_sum_partials(row_partial.const_data_ptr<float>(), plan.col_groups,
                                     nr * s.rank, static_cast<float>(scale), DType::kFloat32,
                                     dxa.narrow(0, r0, nr).mutable_data_ptr(), stream),
                   "dXA (sum)");
    }
  }
  if (db.defined()) grad_b.copy_(db.mul_(scale));
  if (!need_rows) return;
  if (need_a) {  // dA^T = x^T dXA: the column product over one read of x
    const LoraThinPlan plan_x = lora_thin_plan(s.rows, s.in_features, s.rank, sms);
    at::Tensor col_x = at::empty({plan_x.splits, s.in_features, s.rank}, f32);
    check_launch(lora_thin_products(plan_x, to_kernel_dtype(x.scalar_type()), x.const_data_ptr(),
                                    s.rows, s.in_features, s.rank, DType::kFloat32,
                                    dxa.const_data_ptr(), col_x.mutable_data_ptr<float>(),
                                    DType::kFloat32, nullptr, nullptr, stream),
                 "x^T dXA");
    at::Tensor grad_a_t = at::empty({s.in_features, s.rank}, lora_a.options());
    check_launch(lora_sum_partials(col_x.const_data_ptr<float>(), plan_x.splits,
                                   s.in_features * s.rank, 1.0f,
                                   to_kernel_dtype(grad_a_t.scalar_type()),
                                   grad_a_t.mutable_data_ptr(), stream),
                 "dA (sum)");
    grad_a.copy_(grad_a_t.t());
  }
  if (need_x) {  // dx = dXA A, then the GEMM accumulates dY W onto it (beta = 1)
    const at::Tensor a_t = lora_a.t().contiguous();
    check_launch(lora_expand(DType::kFloat32, dxa.const_data_ptr(),
                             to_kernel_dtype(a_t.scalar_type()), a_t.const_data_ptr(), s.rows,
                             s.in_features, s.rank, 1.0f, to_kernel_dtype(grad_x.scalar_type()),
                             nullptr, grad_x.mutable_data_ptr(), stream),
                 "dXA A");
    grad_x.addmm_(grad_y, weight);
  }
}

// linear_logprobs: the tile loop of linear_logprobs_op.h with cuBLAS GEMMs (through ATen, in the
// input dtype with fp32 output) and the folds of csrc/cuda/linear_logprobs.cu.
struct CudaLogprobs {
  static constexpr int64_t kTokenChunk = kCudaTokenChunk;
  static constexpr int64_t kVocabChunk = kCudaVocabChunk;
  static at::ScalarType gemm_dtype(at::ScalarType input) { return input; }
  static constexpr bool kFp32OutputGemm = true;
  static constexpr bool kFoldWritesHalf = true;
  // The CUDA fold does not write probabilities back (and is not yet measured on a GPU): the
  // backward recomputes the tiles there, and with_dhidden is refused.
  static constexpr bool kDhiddenInForward = false;
  // Nothing may wait for the device while a CUDA graph is captured: the rows are masked then.
  static bool may_sync() {
    return !mask_rows_forced() && c10::cuda::currentStreamCaptureStatusMayInitCtx() ==
                                      c10::cuda::CaptureStatus::None;
  }
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_logprobs_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    int64_t ignore_index, int64_t token_chunk, int64_t vocab_chunk, bool with_stats,
    bool with_dhidden) {
  TORCH_CHECK_VALUE(hidden.is_cuda(), "dafast.linear_logprobs: expected CUDA tensors, got ",
                    hidden.device());
  const c10::cuda::CUDAGuard guard(hidden.device());
  return linear_logprobs_op<CudaLogprobs>(hidden, weight, targets, ignore_index, token_chunk,
                                          vocab_chunk, with_stats, with_dhidden);
}

std::tuple<at::Tensor, at::Tensor> linear_logprobs_backward_cuda(
    const at::Tensor& grad_logp, const at::Tensor& hidden, const at::Tensor& weight,
    const at::Tensor& targets, const at::Tensor& lse, int64_t ignore_index, int64_t token_chunk,
    int64_t vocab_chunk, bool hidden_grad, bool weight_grad, const std::optional<at::Tensor>& rows) {
  TORCH_CHECK_VALUE(hidden.is_cuda(),
                    "dafast.linear_logprobs_backward: expected CUDA tensors, got ", hidden.device());
  const c10::cuda::CUDAGuard guard(hidden.device());
  return linear_logprobs_backward_op<CudaLogprobs>(grad_logp, hidden, weight, targets, lse,
                                                   ignore_index, token_chunk, vocab_chunk,
                                                   hidden_grad, weight_grad, rows);
}

// ---- swiglu -------------------------------------------------------------------------------

void check_swiglu_launch(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "dafast.swiglu: CUDA launch failed: ", cudaGetErrorString(err));
}

void swiglu_forward_cuda(const at::Tensor& gate, const at::Tensor& up, at::Tensor& out) {
  TORCH_CHECK_VALUE(gate.is_cuda(), "dafast.swiglu: expected CUDA tensors, got ", gate.device());
  const c10::cuda::CUDAGuard guard(gate.device());
  check_swiglu_launch(swiglu_cuda_forward(to_kernel_dtype(gate.scalar_type()), gate.const_data_ptr(),
                                          up.const_data_ptr(), out.mutable_data_ptr(),
                                          gate.numel(), blocks_to_fill_device(gate.get_device()),
                                          c10::cuda::getCurrentCUDAStream()));
}

void swiglu_backward_cuda(const at::Tensor& grad_out, const at::Tensor& gate, const at::Tensor& up,
                          at::Tensor& grad_gate, at::Tensor& grad_up) {
  TORCH_CHECK_VALUE(gate.is_cuda(), "dafast.swiglu: expected CUDA tensors, got ", gate.device());
  const c10::cuda::CUDAGuard guard(gate.device());
  check_swiglu_launch(swiglu_cuda_backward(
      to_kernel_dtype(gate.scalar_type()), grad_out.const_data_ptr(), gate.const_data_ptr(),
      up.const_data_ptr(), grad_gate.mutable_data_ptr(), grad_up.mutable_data_ptr(), gate.numel(),
      blocks_to_fill_device(gate.get_device()), c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

int cuda_runtime_version_built() { return CUDART_VERSION; }

}  // namespace dafast

TORCH_LIBRARY_IMPL(dafast, CUDA, m) {
  m.impl("slerp", &dafast::SlerpCuda::slerp);
  m.impl("slerp_out", &dafast::SlerpCuda::slerp_out);
  m.impl("slerp_sums", &dafast::SlerpCuda::sums);
  m.impl("lora_linear", &dafast::lora_linear_op<dafast::lora_linear_forward_cuda>);
  m.impl("lora_linear_backward",
         &dafast::lora_linear_backward_op<dafast::lora_linear_backward_cuda>);
  m.impl("linear_logprobs", &dafast::linear_logprobs_cuda);
  m.impl("linear_logprobs_backward", &dafast::linear_logprobs_backward_cuda);
  m.impl("swiglu", &dafast::swiglu_op<dafast::swiglu_forward_cuda>);
  m.impl("swiglu_backward", &dafast::swiglu_backward_op<dafast::swiglu_backward_cuda>);
}
