"""Fused LoRA on PEFT adapters: `dafast.lora.patch(model)` and `dafast.lora.unpatch(model)`.

    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    dafast.lora.patch(model)     # PEFT's LoRA Linear layers now run dafast.ops.lora_linear
    ...train...
    model.save_pretrained(out)   # a plain PEFT adapter: nothing of dafast is in it

patch() replaces only the `forward` of each peft.tuners.lora.Linear instance (an instance
attribute that shadows the class's method). The parameters, the config, saving, loading, merging
and adapter switching stay PEFT's. Every call checks that the layer is in the case dafast fuses,
else it runs PEFT's own forward:

- fused: one active adapter; lora_dropout 0 (or its dropout module in eval mode); no DoRA or
  other LoRA variant; no lora_bias; a plain nn.Linear base layer, without hooks, not
  fan_in_fan_out; the dtypes PEFT itself runs (x and W alike; A and B alike, x's dtype or fp32
  with bf16/fp16 x); all on one device. Under autocast the op runs in the autocast dtype, as
  PEFT's layers then do.
- PEFT's forward, silently: adapters disabled or merged, or no active adapter on this layer (PEFT
  then returns the base layer's output, nothing to fuse).
- PEFT's forward with ONE warning per patch() call and reason: everything else. In particular
  lora_dropout > 0 is never ignored: dropout is not fused, so such layers train exactly as PEFT
  trains them (at PEFT's speed); in eval mode they are fused.

A patched model holds bound methods: unpatch() it before pickling the whole module object
(save_pretrained and state_dict are unaffected).
"""

from __future__ import annotations

import collections
import types
import warnings

import torch
from torch import nn

from dafast.ops.lora_linear import lora_linear

__all__ = ["patch", "unpatch", "is_patched"]

_HALF = (torch.float16, torch.bfloat16)


def _peft_lora_linear() -> type:
    from peft.tuners.lora.layer import Linear

    return Linear


class _PatchState:
    """Shared by the layers of one patch() call: the fallback reasons already warned about."""

    def __init__(self) -> None:
        self.warned: set[str] = set()

    def warn_once(self, reason: str) -> None:
        if reason not in self.warned:
            self.warned.add(reason)
            warnings.warn(f"dafast.lora: a LoRA layer runs PEFT's forward: {reason}",
                          RuntimeWarning, stacklevel=4)


def _is_plain_linear(module: nn.Module) -> bool:
    return (type(module) is nn.Linear and not module._forward_hooks
            and not module._forward_pre_hooks and "forward" not in vars(module))


def _fallback_reason(layer, x: torch.Tensor | None = None, extra_args: bool = False) -> str | None:
    """Why this layer (and input) cannot take the fused path: "" for PEFT's plain cases that need
    no warning, a sentence otherwise, None when it can. Without x, the input-independent part."""
    if layer.disable_adapters or layer.merged:
        return ""
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if not active:
        return ""
    if extra_args:
        return "extra forward arguments (e.g. adapter_names for a mixed-adapter batch)"
    if len(active) > 1:
        return "several active adapters"
    name = active[0]
    # getattr: attributes that older PEFT releases (within pyproject's range) may lack
    if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name):
        return "DoRA or another LoRA variant"
    if getattr(layer, "lora_bias", {}).get(name, False):
        return "lora_bias=True"
    dropout = layer.lora_dropout[name]
    if isinstance(dropout, nn.Dropout):
        if dropout.training and dropout.p > 0:
            return "lora_dropout > 0 in training mode (dropout is not fused)"
    elif not isinstance(dropout, nn.Identity):
        return f"a lora_dropout module of type {type(dropout).__name__}"
    base = layer.get_base_layer()
    if layer.fan_in_fan_out or not _is_plain_linear(base):
        return (f"a base layer of type {type(base).__name__}, fan_in_fan_out or with hooks "
                "(fused: a plain torch.nn.Linear)")
    if not (_is_plain_linear(layer.lora_A[name]) and _is_plain_linear(layer.lora_B[name])
            and layer.lora_B[name].bias is None):
        return "lora_A/lora_B modules that are not plain bias-free torch.nn.Linear"
    if x is None:
        return None
    tensors = (base.weight, base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight)
    if any(t is not None and t.device != x.device for t in tensors):
        return "input and weights on different devices"
    if torch.is_autocast_enabled(x.device.type):
        return None if x.dtype != torch.float64 else "float64 input under autocast"
    w_dtype, ab_dtype = base.weight.dtype, layer.lora_A[name].weight.dtype
    if x.dtype == torch.float64 and x.device.type != "cpu":
        return "float64 on a GPU (the CUDA kernels take fp32, bf16 and fp16)"
    if x.dtype != w_dtype or layer.lora_B[name].weight.dtype != ab_dtype:
        return f"dtypes PEFT itself would not run (x {x.dtype}, weight {w_dtype})"
    if ab_dtype != x.dtype and not (ab_dtype == torch.float32 and x.dtype in _HALF
                                    and getattr(layer, "cast_input_dtype_enabled", True)):
        return f"adapter dtype {ab_dtype} with input dtype {x.dtype}"
    return None


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    reason = _fallback_reason(self, x, bool(args or kwargs))
    if reason is not None:
        if reason:
            self._dafast_state.warn_once(reason)
        return type(self).forward(self, x, *args, **kwargs)
    name = next(n for n in self.active_adapters if n in self.lora_A)
    base = self.get_base_layer()
    weight, bias = base.weight, base.bias
    lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
    scale = float(self.scaling[name])
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # PEFT under autocast runs every linear, the LoRA ones included, in the autocast dtype.
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return lora_linear(x.to(dtype), weight.to(dtype),
                               None if bias is None else bias.to(dtype),
                               lora_a.to(dtype), lora_b.to(dtype), scale)
    return lora_linear(x, weight, bias, lora_a, lora_b, scale)


def is_patched(layer: nn.Module) -> bool:
    forward = vars(layer).get("forward")
    return getattr(forward, "__func__", None) is _fused_forward


def patch(model: nn.Module) -> int:
    """Make every PEFT LoRA Linear layer of `model` run dafast.ops.lora_linear where it can (see
    the module docstring). Idempotent. Returns the number of layers patched; warns once, listing
    the reasons, about layers that will keep PEFT's forward in their current state."""
    lora_linear_class = _peft_lora_linear()
    state = _PatchState()
    reasons: collections.Counter[str] = collections.Counter()
    patched = 0
    for layer in model.modules():
        if type(layer) is not lora_linear_class:
            continue
        if "forward" in vars(layer) and not is_patched(layer):
            reasons["its forward was already replaced by someone else (e.g. accelerate hooks)"] += 1
            continue
        layer.forward = types.MethodType(_fused_forward, layer)
        layer._dafast_state = state
        patched += 1
        reason = _fallback_reason(layer)
        if reason:
            reasons[reason] += 1
    if reasons:
        listed = "; ".join(f"{count} layer(s): {reason}" for reason, count in reasons.items())
        warnings.warn(f"dafast.lora.patch: some LoRA layers run PEFT's forward: {listed}",
                      RuntimeWarning, stacklevel=2)
        state.warned.update(reasons)
    return patched


def unpatch(model: nn.Module) -> int:
    """Give every layer patched by patch() its PEFT forward back. Returns how many it restored."""
    restored = 0
    for layer in model.modules():
        if is_patched(layer):
            del layer.forward
            del layer._dafast_state
            restored += 1
    return restored
