"""lora_linear: a LoRA linear layer as one op, with PEFT's semantics.

    y = x W^T + b + s (x A^T) B^T

    x [*, in]   W [out, in]   b [out] or None   A [r, in]   B [out, r]   s: float  ->  y [*, out]

dtypes, as peft.tuners.lora.layer.Linear computes them: W and b have x's dtype; A and B have
x's dtype, or are float32 while x is bfloat16/float16 ("mixed precision": PEFT then casts x to
float32 for the LoRA branch, adds the float32 LoRA product to the base output and casts the sum
back). y always has x's dtype. float64 is accepted on the CPU (for gradcheck and golden values).

Autograd: gradients for x, A and B. W and b are frozen in LoRA training; if they do require
grad, their gradients are computed too (plain PyTorch, not fused). The forward saves only x and
xa = x A^T (x only if A trains, xa only if B trains); dx is skipped when x needs no grad.

The native kernels (csrc/cpu/lora_linear.cpp, csrc/cuda/lora_linear.cu + csrc/ops_cuda.cpp) compute in fp32
and differ from PEFT only by rounding. Both round xa = x A^T to A's dtype, as PEFT's lora_B sees
it. In half precision PEFT then rounds the base output, the LoRA product, its scaled copy and the
sum; the CPU kernel rounds once more (the sum); the CUDA path twice: the expand kernel writes
b + s xa B^T in y's dtype, then cuBLAS adds x W^T onto it (beta = 1, fp32 accumulation) and
rounds the sum, one rounding more for writing y once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dafast._native import check_inputs, extension_loaded, use_native


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """PEFT's LoRA Linear forward, step for step (dropout 0, one adapter); autograd does backward.

    x [*, in], weight [out, in], bias [out] or None, lora_a [r, in], lora_b [out, r] -> [*, out]
    in x's dtype. The tests and benchmarks use it as PEFT's semantics in a function.
    """
    check_inputs("lora_linear", x, weight, bias, lora_a, lora_b, float(scale))
    result = F.linear(x, weight, bias)
    lora = F.linear(F.linear(x.to(lora_a.dtype), lora_a), lora_b) * scale
    return (result + lora).to(x.dtype)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """y = x W^T + b + scale (x A^T) B^T on dafast's kernels (see the module docstring).

    x [*, in], weight [out, in], bias [out] or None, lora_a [r, in], lora_b [out, r] -> [*, out].
    """
    if use_native():
        return torch.ops.dafast.lora_linear(x, weight, bias, lora_a, lora_b, float(scale))[0]
    return lora_linear_reference(x, weight, bias, lora_a, lora_b, scale)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale = inputs
    _, xa = output
    ctx.mark_non_differentiable(xa)  # an internal by-product, saved for backward
    ctx.set_materialize_grads(False)  # no zero-filled gradient for xa on every backward
    # In setup_context torch.library's needs_input_grad has one more (internal) entry.
    _, need_w, _, need_a, need_b = ctx.needs_input_grad[:5]
    ctx.scale = scale
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x if (need_a or need_w) else None, weight, lora_a, lora_b,
                          xa if need_b else None)


def _backward(ctx, grad_y, _grad_xa):
    if grad_y is None:  # y did not reach the loss
        return None, None, None, None, None, None
    x, weight, lora_a, lora_b, xa = ctx.saved_tensors
    need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
    grad_x, grad_a, grad_b = torch.ops.dafast.lora_linear_backward(
        grad_y, x, weight, lora_a, lora_b, xa, ctx.scale, [need_x, need_a, need_b])
    # W and b are frozen in LoRA; should they train anyway, their gradients are still right.
    grad_w = grad_bias = None
    if need_w:
        grad_w = grad_y.reshape(-1, grad_y.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
    if need_bias and ctx.has_bias:
        grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
    return grad_x, grad_w, grad_bias, grad_a, grad_b, None


if extension_loaded():

    # Shape functions: the C++ op checks its inputs when it runs. The fake checks what its
    # shapes rest on, and the devices: it is the kernel whenever an input is on the meta device
    # (the dispatcher picks Meta over CPU), and it refuses what the CUDA kernel refuses.
    @torch.library.register_fake("dafast::lora_linear")
    def _lora_linear_fake(x, weight, bias, lora_a, lora_b, scale):
        op = "dafast.lora_linear: "
        torch._check_value(x.dim() >= 1, lambda: f"{op}x must be [..., in_features], got a scalar")
        torch._check_value(weight.dim() == 2, lambda: f"{op}weight must be 2-D [out_features, "
                           f"in_features], got shape {list(weight.shape)}")
        torch._check_value(lora_a.dim() == 2, lambda: f"{op}lora_a must be [r, in_features="
                           f"{weight.shape[1]}], got shape {list(lora_a.shape)}")
        for name, t in (("weight", weight), ("bias", bias), ("lora_a", lora_a), ("lora_b", lora_b)):
            torch._check_value(t is None or t.device == x.device, lambda: f"{op}{name} must be on "
                               f"x's device {x.device}, got {t.device}")
        torch._check_type(x.dtype != torch.float64 or x.device.type != "cuda", lambda: (
            f"{op}float64 is supported on the CPU only (for gradcheck), got a float64 tensor on "
            f"{x.device}"))
        y = x.new_empty((*x.shape[:-1], weight.shape[0]))
        xa = x.new_empty((*x.shape[:-1], lora_a.shape[0]), dtype=lora_a.dtype)
        return y, xa

    @torch.library.register_fake("dafast::lora_linear_backward")
    def _lora_linear_backward_fake(grad_y, x, weight, lora_a, lora_b, xa, scale, output_mask):
        grad_x = grad_y.new_empty((*grad_y.shape[:-1], weight.shape[1])) if output_mask[0] else None
        grad_a = torch.empty_like(lora_a, memory_format=torch.contiguous_format) if output_mask[1] else None
        grad_b = torch.empty_like(lora_b, memory_format=torch.contiguous_format) if output_mask[2] else None
        return grad_x, grad_a, grad_b

    torch.library.register_autograd("dafast::lora_linear", _backward, setup_context=_setup_context)
