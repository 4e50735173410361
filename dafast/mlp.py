"""The fused SwiGLU MLP: `dafast.mlp.patch(model)` and `dafast.mlp.unpatch(model)`.

Llama-family MLPs compute down_proj(silu(gate_proj(x)) * up_proj(x)). Patched, they compute the
same on dafast.ops.swiglu and keep two [tokens, intermediate] tensors for backward instead of
four: gate and up (saved by the op), where HF's eager form also keeps silu(gate), and down_proj
keeps its input h = silu(gate) * up. h is not kept: while down_proj runs, a saved-tensors hook
swaps h for a note to recompute it from gate and up when backward needs it (one elementwise pass,
against four GEMMs of the MLP). The gate_proj, up_proj and down_proj layers are whatever the
model has (plain Linear, PEFT LoRA, dafast's patched LoRA) and are called as before.

Per token and layer, that keeps 2 x intermediate_size fewer floats for backward.

Which modules: those whose forward is HF's LlamaMLP.forward, byte for byte (the "Copied from"
MLPs of Mistral, Qwen2/3, OLMo, ... share it) with a SiLU act_fn. Others are left alone. The
recompute steps aside when other saved-tensors hooks are active (activation checkpointing or
offloading own the saved tensors then); the fused op still runs.

Like dafast.lora.patch, this sets an instance `forward`: parameters, state dicts and saving are
untouched; unpatch() before pickling the module object.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from dafast.ops.swiglu import swiglu

__all__ = ["patch", "unpatch", "is_patched"]


def _silu_classes() -> tuple[type, ...]:
    from transformers.activations import SiLUActivation

    return nn.SiLU, SiLUActivation


def _llama_mlp_code():
    from transformers.models.llama.modeling_llama import LlamaMLP

    return LlamaMLP.forward.__code__


def _is_swiglu_mlp(module: nn.Module) -> bool:
    code = getattr(type(module).forward, "__code__", None)
    reference = _llama_mlp_code()
    return (code is not None and code.co_code == reference.co_code
            and code.co_names == reference.co_names
            and isinstance(getattr(module, "act_fn", None), _silu_classes())
            and all(isinstance(getattr(module, name, None), nn.Module)
                    for name in ("gate_proj", "up_proj", "down_proj")))


class _Recompute:
    """What a saved-tensors hook keeps in place of h (or a view of it, as a matmul that flattens
    its input saves): the inputs it is recomputed from and where the view sits in h."""

    __slots__ = ("gate", "up", "size", "stride", "offset")

    def __init__(self, gate, up, view: torch.Tensor, h: torch.Tensor):
        self.gate, self.up = gate, up
        self.size, self.stride = view.size(), view.stride()
        self.offset = view.storage_offset() - h.storage_offset()

    def __call__(self) -> torch.Tensor:
        return swiglu(self.gate, self.up).as_strided(self.size, self.stride, self.offset)


def _recompute_hooks(h: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """Saved-tensors hooks that swap h and its views for a _Recompute. The recomputed h comes
    from the same inputs through the same op, so it has h's layout and a view's size, strides
    and offset apply to it as they did to h."""
    storage = h.untyped_storage().data_ptr()

    def pack(saved: torch.Tensor):
        if saved is h or (type(saved) is torch.Tensor and saved.device == h.device
                          and saved.untyped_storage().data_ptr() == storage):
            return _Recompute(gate, up, saved, h)
        return saved

    def unpack(packed):
        return packed() if isinstance(packed, _Recompute) else packed

    return pack, unpack


def _other_saved_tensor_hooks() -> bool:
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    if gate.dtype != up.dtype or gate.device != up.device:
        return self.down_proj(self.act_fn(gate) * up)
    h = swiglu(gate, up)
    if not h.requires_grad or _other_saved_tensor_hooks():
        return self.down_proj(h)
    with torch.autograd.graph.saved_tensors_hooks(*_recompute_hooks(h, gate, up)):
        return self.down_proj(h)


def is_patched(module: nn.Module) -> bool:
    forward = vars(module).get("forward")
    return getattr(forward, "__func__", None) is _fused_forward


def patch(model: nn.Module) -> int:
    """Make every Llama-style SwiGLU MLP of `model` run the fused MLP (see the module
    docstring). Idempotent. Returns the number of MLPs patched."""
    patched = 0
    for module in model.modules():
        if is_patched(module) or "forward" in vars(module) or not _is_swiglu_mlp(module):
            continue
        module.forward = types.MethodType(_fused_forward, module)
        patched += 1
    return patched


def unpatch(model: nn.Module) -> int:
    """Give every MLP patched by patch() its own forward back. Returns how many it restored."""
    restored = 0
    for module in model.modules():
        if is_patched(module):
            del module.forward
            restored += 1
    return restored
