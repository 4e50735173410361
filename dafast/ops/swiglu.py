"""swiglu: the gated activation of Llama-family MLPs as one op.

    h = silu(gate) * up          gate, up [*] of one shape and dtype  ->  h [*] in that dtype

The MLP is down_proj(swiglu(gate_proj(x), up_proj(x))). HF's eager form, act_fn(gate) * up,
keeps three [tokens, intermediate] tensors for backward (gate, silu(gate), up) and makes two
passes forward and four backward. This op saves gate and up only, and each direction is one pass
over them (csrc/cpu/swiglu.cpp, csrc/cuda/swiglu.cu), with the math of csrc/include/dafast/swiglu.h
in fp32 and one rounding per output (HF rounds silu(gate) to the storage dtype first, so in
bf16/fp16 the two differ by about one rounding). dafast.mlp builds the fused MLP on it, which
also recomputes h in backward instead of keeping it for down_proj.

Native dtypes: float32, float16, bfloat16; the reference also takes float64 (gradcheck).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dafast._native import check_inputs, extension_loaded, use_native


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up computed in float32 (float64 for float64 inputs), rounded once to the
    inputs' dtype; autograd does the backward."""
    check_inputs("swiglu", gate, up, True)
    acc = torch.float64 if gate.dtype == torch.float64 else torch.float32
    return (F.silu(gate.to(acc)) * up.to(acc)).to(gate.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up on dafast's kernels, differentiable for gate and up (see the module
    docstring). float64 (and DAFAST_KERNELS=reference) take the reference."""
    if use_native() and gate.dtype != torch.float64:
        return torch.ops.dafast.swiglu(gate, up)
    return swiglu_reference(gate, up)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    gate, up = ctx.saved_tensors
    grad_gate, grad_up = torch.ops.dafast.swiglu_backward(grad_out, gate, up)
    need_gate, need_up = ctx.needs_input_grad[:2]
    return grad_gate if need_gate else None, grad_up if need_up else None


if extension_loaded():
    # Shape functions only: the C++ op checks its inputs when it runs.

    @torch.library.register_fake("dafast::swiglu")
    def _swiglu_fake(gate, up):
        return torch.empty_like(gate, memory_format=torch.contiguous_format)

    @torch.library.register_fake("dafast::swiglu_backward")
    def _swiglu_backward_fake(grad_out, gate, up):
        return (torch.empty_like(gate, memory_format=torch.contiguous_format),
                torch.empty_like(gate, memory_format=torch.contiguous_format))

    torch.library.register_autograd("dafast::swiglu", _backward, setup_context=_setup_context)
