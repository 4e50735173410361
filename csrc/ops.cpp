// The dafast operator library: schemas, CPU implementations, and the pybind11 module
// `dafast._C` for what is not an op (build information, the caching CPU allocator, the ops'
// input checks for the pure-PyTorch references). Loading the module registers the ops as
// torch.ops.dafast.*; the CUDA implementations live in ops_cuda.cpp (CUDA builds only).
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cpu/Utils.h>

#include "cpu/caching_allocator.h"
#include "cpu/kernels.h"
#include "linear_logprobs_op.h"
#include "lora_linear_op.h"
#include "slerp_op.h"
#include "swiglu_op.h"

#ifdef DAFAST_WITH_CUDA
namespace dafast {
int cuda_runtime_version_built();  // ops_cuda.cpp
}
#endif

TORCH_LIBRARY(dafast, m) {
  m.def("slerp(Tensor a, Tensor b, float t, float dot_threshold=0.9995, float eps=1e-08) -> Tensor");
  // The out= form returns nothing, as torch.library wants of mutating custom ops; the Python
  // wrapper returns `out`. With `sums` (from slerp_sums over whole tensors) it writes a chunk
  // of a merge too large to hold at once.
  m.def("slerp_out(Tensor a, Tensor b, float t, float dot_threshold=0.9995, float eps=1e-08, *, "
        "Tensor? sums=None, Tensor(a!) out) -> ()");
  // The reduction pass alone: float64 [|a|^2, |b|^2, a.b]; sums of chunks add up.
  m.def("slerp_sums(Tensor a, Tensor b) -> Tensor");
  // y = x W^T + b + scale (x A^T) B^T. Also returns xa = x A^T, which the autograd formula saves
  // instead of recomputing it; the Python wrapper dafast.ops.lora_linear returns y only.
  m.def("lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
        "float scale) -> (Tensor, Tensor)");
  // Gradients for (x, lora_a, lora_b), each computed only where output_mask says so (else None).
  m.def("lora_linear_backward(Tensor grad_y, Tensor? x, Tensor weight, Tensor lora_a, "
        "Tensor lora_b, Tensor? xa, float scale, bool[3] output_mask) -> (Tensor?, Tensor?, Tensor?)");
  // Per-token log p(target | hidden) under the head `weight` without the [N, V] logits. Returns
  // (logp [N], lse [N], stats [3, N] or [0, N], dlogp_dhidden [N, H] or [0], rows [count]: the
  // positions computed, for the backward's `rows`, so that it need not select them); stats rows:
  // entropy, mean logit, target is top-1; with_dhidden (CPU only): d logp_i / d hidden_i in
  // fp32, so that a frozen head's backward needs no GEMM. Chunk sizes 0 pick the device's
  // defaults. See dafast/ops/linear_logprobs.py.
  m.def("linear_logprobs(Tensor hidden, Tensor weight, Tensor targets, int ignore_index=-100, "
        "int token_chunk=0, int vocab_chunk=0, bool with_stats=False, bool with_dhidden=False) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Gradients of sum(grad_logp * logp) for hidden and weight; a gradient not asked for comes back
  // as an empty tensor, and dW (the LoRA case: a frozen head) is then never computed.
  m.def("linear_logprobs_backward(Tensor grad_logp, Tensor hidden, Tensor weight, Tensor targets, "
        "Tensor lse, int ignore_index, int token_chunk, int vocab_chunk, bool hidden_grad, "
        "bool weight_grad, Tensor? rows=None) -> (Tensor, Tensor)");
  // silu(gate) * up, the gated activation of Llama-family MLPs; the autograd formula saves gate
  // and up, and the backward returns (grad_gate, grad_up) from one pass.
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_backward(Tensor grad_out, Tensor gate, Tensor up) -> (Tensor, Tensor)");
}

namespace dafast {
namespace {

void slerp_sums_into_cpu(const at::Tensor& a, const at::Tensor& b, at::Tensor& sums) {
  const SlerpSums s = slerp_sums_cpu(a, b);
  double* p = sums.mutable_data_ptr<double>();
  p[0] = s.aa;
  p[1] = s.bb;
  p[2] = s.ab;
}

void slerp_write_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& sums,
                     at::Tensor& out, const SlerpParams& params) {
  const double* p = sums.const_data_ptr<double>();
  slerp_cpu(a, b, out, SlerpSums{p[0], p[1], p[2]}, params);
}

using SlerpCpu = SlerpOps<slerp_sums_into_cpu, slerp_write_cpu>;

// Whether this CPU multiplies bf16 natively; DAFAST_CPU_BF16_GEMM=0 or 1 overrides it (the tests
// run both paths on any CPU).
bool cpu_bf16_gemm() {
  static const bool native = [] {
    const auto caps = at::cpu::get_cpu_capabilities();
    const auto has = [&](const char* name) {
      const auto it = caps.find(name);
      return it != caps.end() && it->second.toBool();
    };
    return has("avx512_bf16") || has("amx_bf16");
  }();
  const char* force = std::getenv("DAFAST_CPU_BF16_GEMM");
  if (force != nullptr && (force[0] == '0' || force[0] == '1')) return force[0] == '1';
  return native;
}

// linear_logprobs: the tile loop of linear_logprobs_op.h with ATen GEMMs and the CPU folds.
struct CpuLogprobs {
  static constexpr int64_t kTokenChunk = kCpuTokenChunk;
  static constexpr int64_t kVocabChunk = kCpuVocabChunk;
  // Half-precision GEMMs are several times slower than fp32 on CPUs without native bf16
  // arithmetic; on those with it (AVX512-BF16, AMX) bf16 GEMMs are the faster ones.
  static at::ScalarType gemm_dtype(at::ScalarType input) {
    return input == at::kBFloat16 && cpu_bf16_gemm() ? at::kBFloat16 : at::kFloat;
  }
  static constexpr bool kFp32OutputGemm = false;
  static constexpr bool kFoldWritesHalf = false;
  // GEMMs bound the CPU's time: a frozen head's step takes two (forward, sum p W) instead of three.
  static constexpr bool kDhiddenInForward = true;
  static bool may_sync() { return !mask_rows_forced(); }
  static void forward_fold(const LogprobsForwardTile& tile) { linear_logprobs_forward_fold_cpu(tile); }
  static void backward_fold(const LogprobsBackwardTile& tile) { linear_logprobs_backward_fold_cpu(tile); }
};

}  // namespace
}  // namespace dafast

TORCH_LIBRARY_IMPL(dafast, CPU, m) {
  m.impl("slerp", &dafast::SlerpCpu::slerp);
  m.impl("slerp_out", &dafast::SlerpCpu::slerp_out);
  m.impl("slerp_sums", &dafast::SlerpCpu::sums);
  m.impl("lora_linear", &dafast::lora_linear_op<dafast::lora_linear_forward_cpu>);
  m.impl("lora_linear_backward",
         &dafast::lora_linear_backward_op<dafast::lora_linear_backward_cpu>);
  m.impl("linear_logprobs", &dafast::linear_logprobs_op<dafast::CpuLogprobs>);
  m.impl("linear_logprobs_backward", &dafast::linear_logprobs_backward_op<dafast::CpuLogprobs>);
  m.impl("swiglu", &dafast::swiglu_op<dafast::swiglu_forward_cpu>);
  m.impl("swiglu_backward", &dafast::swiglu_backward_op<dafast::swiglu_backward_cpu>);
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  pybind11::list backends;
  backends.append("cpu");
#ifdef DAFAST_WITH_CUDA
  backends.append("cuda");
  info["cuda_runtime"] = dafast::cuda_runtime_version_built();
#endif
  info["backends"] = backends;
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." +
                          std::to_string(TORCH_VERSION_MINOR) + "." +
                          std::to_string(TORCH_VERSION_PATCH);
  // The ops as the dispatcher holds them (not as this file means them), so that a test can
  // tell a missing registration from a present one.
  pybind11::list ops;
  for (const c10::OperatorName& name : c10::Dispatcher::singleton().getAllOpNames()) {
    if (name.name.rfind("dafast::", 0) == 0) ops.append(name.name.substr(8));
  }
  ops.attr("sort")();
  info["ops"] = ops;
  return info;
}

// Bad input is a ValueError or TypeError from the check functions below, as it is from the ops.
void translate_check_errors(std::exception_ptr error) {
  try {
    if (error) std::rethrow_exception(error);
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
  } catch (const c10::TypeError& e) {
    PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dafast native kernels; the ops are registered as torch.ops.dafast.*";
  m.def("build_info", &build_info, "Backends, versions and ops this extension was compiled with.");
  pybind11::register_local_exception_translator(&translate_check_errors);
  // The ops' input checks (<op>_op.h) for the pure-PyTorch references in dafast/ops, which thus
  // refuse what the kernels refuse, with the same messages: the checks are written once.
  namespace py = pybind11;
  m.def("check_slerp", &dafast::check_slerp_call, py::arg("a"), py::arg("b"), py::arg("t"),
        py::arg("dot_threshold"), py::arg("eps"), py::arg("sums"), py::arg("out"),
        py::arg("allow_float64"));
  m.def("check_lora_linear",
        [](const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
           const at::Tensor& lora_a, const at::Tensor& lora_b, double scale) {
          dafast::check_lora_inputs(x, weight, bias, lora_a, lora_b, scale);
        },
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("lora_a"), py::arg("lora_b"),
        py::arg("scale"));
  m.def("check_linear_logprobs", &dafast::check_linear_logprobs_call, py::arg("hidden"),
        py::arg("weight"), py::arg("targets"), py::arg("ignore_index"), py::arg("token_chunk"),
        py::arg("vocab_chunk"), py::arg("allow_float64"));
  m.def("check_swiglu", &dafast::check_swiglu_inputs, py::arg("gate"), py::arg("up"),
        py::arg("allow_float64"));
  // The caching CPU allocator (cpu/caching_allocator.cpp), driven by dafast/memory.py.
  m.def("cpu_allocator_enable", &dafast::cpu_allocator_enable);
  m.def("cpu_allocator_disable", &dafast::cpu_allocator_disable);
  m.def("cpu_allocator_enabled", &dafast::cpu_allocator_enabled);
  m.def("cpu_allocator_empty_cache", &dafast::cpu_allocator_empty_cache);
  m.def("cpu_allocator_reset_peak", &dafast::cpu_allocator_reset_peak);
  m.def("cpu_allocator_min_bytes", &dafast::cpu_allocator_min_bytes);
  m.def("cpu_allocator_stats", [] {
    const auto s = dafast::cpu_allocator_stats();
    return std::map<std::string, uint64_t>{
        {"live_bytes", s.live_bytes}, {"cached_bytes", s.cached_bytes},
        {"peak_bytes", s.peak_bytes}, {"hits", s.hits}, {"misses", s.misses},
        {"evictions", s.evictions}};
  });
}
