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

from dafast._native import extension_loaded, use_native

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_OP = "dafast.swiglu: "


def _check_pair(gate: torch.Tensor, other: torch.Tensor, name: str) -> None:
    if other.dtype != gate.dtype:
        raise TypeError(f"{_OP}{name} must have gate's dtype {gate.dtype}, got {other.dtype}")
    if other.shape != gate.shape:
        raise ValueError(f"{_OP}{name} must have gate's shape {list(gate.shape)}, got "
                         f"{list(other.shape)}")
    if other.device != gate.device:
        raise ValueError(f"{_OP}{name} must be on gate's device {gate.device}, got {other.device}")


def _check_inputs(gate: torch.Tensor, up: torch.Tensor, *, allow_float64: bool = False) -> None:
    """The checks of csrc/ops_common.h (check_swiglu_inputs), in order, with the same messages."""
    if gate.dtype not in KERNEL_DTYPES and not (allow_float64 and gate.dtype == torch.float64):
        raise TypeError(f"{_OP}gate must be float32, float16 or bfloat16, got {gate.dtype}")
    _check_pair(gate, up, "up")


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up computed in float32 (float64 for float64 inputs), rounded once to the
    inputs' dtype; autograd does the backward."""
    _check_inputs(gate, up, allow_float64=True)
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
    @torch.library.register_fake("dafast::swiglu")
    def _swiglu_fake(gate, up):
        _check_inputs(gate, up)
        return torch.empty_like(gate, memory_format=torch.contiguous_format)

    @torch.library.register_fake("dafast::swiglu_backward")
    def _swiglu_backward_fake(grad_out, gate, up):
        _check_inputs(gate, up)
        _check_pair(gate, grad_out, "grad_out")
        return (torch.empty_like(gate, memory_format=torch.contiguous_format),
                torch.empty_like(gate, memory_format=torch.contiguous_format))

    torch.library.register_autograd("dafast::swiglu", _backward, setup_context=_setup_context)
