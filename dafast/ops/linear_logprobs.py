"""linear_logprobs: per-token log-probabilities under a linear LM head, without the logits.

    logp[i] = hidden[i] . weight[t_i] - logsumexp_v(hidden[i] . weight[v])     0 where t_i is ignored

hidden [N, H] and weight [V, H] share one dtype (float32, float16 or bfloat16; the reference also
takes float64, for golden values); targets [N] int64 in [0, V) or equal to ignore_index. logp is
[N] float32, differentiable for hidden and weight. With return_stats=True it also returns, per
token and without gradient, what TRL's trainers log: the entropy of the next-token distribution,
the mean logit, and whether the target is the (first) argmax; all 0 / False where ignored.

The native kernels never hold the [N, V] logits. Ignored tokens are dropped first; the rest is
walked in tiles of [chunk_size tokens, vocab_chunk_size vocabulary entries] (CPU default 1024 x
2048: the fp32 tile and the weight chunk stay in the last-level cache; CUDA 4096 x 8192). Per
tile, a GEMM writes fp32 logits and one fused pass folds them into a running max, sum of
exponentials and the target's logit (and the statistics). Only the per-token log-sum-exp is
saved for backward, besides the inputs; the backward recomputes each tile, turns it in place into
upstream * (onehot(target) - softmax), and two GEMMs accumulate dHidden and dW in fp32. dW is
never computed when the weight needs no gradient (a frozen head, as with LoRA). dHidden comes
back in hidden's dtype, dW in weight's. On CUDA the GEMMs run in the input dtype with fp32 output.
On the CPU they run in fp32 on upcast chunks for fp16 inputs, and for bf16 inputs on CPUs without
native bf16 arithmetic (half-precision GEMMs are several times slower there); on CPUs with it
(AVX512-BF16, AMX) bf16 GEMMs are the fast ones, so bf16 inputs multiply in bf16 there, each
tile's product widened to fp32 (the logits rounded to bf16 as the reference's are, the gradient
tile rounded to bf16 for its two GEMMs). DAFAST_CPU_BF16_GEMM=0 or 1 forces either CPU path.

A frozen head on the CPU takes a shortcut, because there the GEMMs are nearly the whole cost:
d logp_i / d hidden_i = W[t_i] - sum_v softmax_iv W_v does not depend on the upstream gradient,
so the forward computes it, with one more GEMM per tile on the tile's exp(z - max) already at
hand, and saves it ([N, H] fp32); the backward is then one multiply. Two GEMMs per step instead
of three (forward, recompute, dHidden). The forward does this whenever hidden will need a
gradient and the weight will not.

Host synchronisation (CUDA): the forward waits for the device once, for the number of tokens
that count (and of bad targets, checked on the device); it returns their positions, and the
backward reuses them without waiting. While a CUDA graph is being captured nothing may wait: all
N rows are computed and the ignored ones zeroed, and a bad target fails a device-side assert
(without its position, and fatal to the CUDA context) instead of raising ValueError.

The reference is the unfused path: logits = hidden @ weight.T in the input dtype, then
log_softmax in float32 (float64 for float64 inputs) and a gather.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dafast._native import check_inputs, extension_loaded, use_native

_OP = "dafast.linear_logprobs: "
# Config attributes that change a model's logits beyond hidden @ weight.T.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier",
                    "lm_head_multiplier", "logits_scaling")


def lm_head_weight(model) -> torch.Tensor | None:
    """The weight [V, H] of a causal LM's head when its logits are exactly
    ``last_hidden_state @ weight.T`` (what linear_logprobs computes), else None: a head with a
    bias, logit soft-capping or logit scaling (Gemma 2, Granite, Cohere, ...)."""
    head = model.get_output_embeddings()
    config = model.config.get_text_config()
    if (not isinstance(head, torch.nn.Linear) or head.bias is not None
            or any(getattr(config, name, None) is not None for name in LOGIT_TRANSFORMS)):
        return None
    return head.weight


class LogprobStats(NamedTuple):
    entropy: torch.Tensor     # [N] float32
    mean_logit: torch.Tensor  # [N] float32
    is_top1: torch.Tensor     # [N] bool


def linear_logprobs_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              ignore_index: int = -100, return_stats: bool = False):
    """The unfused path: full logits in the input dtype, log_softmax in float32 (float64 for
    float64 inputs), gather. Same shapes and results as linear_logprobs; holds [N, V] logits."""
    check_inputs("linear_logprobs", hidden, weight, targets, int(ignore_index), 0, 0, True)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    return logprobs_from_logits((hidden @ weight.T).to(acc), targets, ignore_index, return_stats)


def logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         return_stats: bool = False):
    """linear_logprobs' outputs from logits [N, V] already computed (log_softmax in float32, or
    float64 for float64 logits): the reference, and the loss of heads the kernel does not cover."""
    if logits.dtype != torch.float64:
        logits = logits.float()
    log_probs = logits.log_softmax(-1)
    valid = targets != ignore_index
    safe = targets.masked_fill(~valid, 0).unsqueeze(-1)
    logp = log_probs.gather(-1, safe).squeeze(-1).masked_fill(~valid, 0)
    if not return_stats:
        return logp
    with torch.no_grad():
        entropy = -(log_probs.exp() * log_probs).sum(-1).masked_fill(~valid, 0)
        mean_logit = logits.mean(-1).masked_fill(~valid, 0)
        is_top1 = (logits.argmax(-1) == targets) & valid
    return logp, LogprobStats(entropy.float(), mean_logit.float(), is_top1)


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    ignore_index: int = -100, *, chunk_size: int | None = None,
                    vocab_chunk_size: int | None = None, return_stats: bool = False):
    """Per-token log p(target | hidden) under the head `weight` (see the module docstring).

    hidden [N, H], weight [V, H], targets [N] int64. Returns logp [N] float32, and with
    return_stats=True (logp, LogprobStats). chunk_size / vocab_chunk_size set the tile shape in
    tokens and vocabulary entries (None: the device's default); results do not depend on them
    beyond fp32 rounding.
    """
    token_chunk, vocab_chunk = int(chunk_size or 0), int(vocab_chunk_size or 0)
    if not use_native():  # the kernels' dtypes only, and their chunk sizes
        check_inputs("linear_logprobs", hidden, weight, targets, int(ignore_index), token_chunk,
                     vocab_chunk, False)
        return linear_logprobs_reference(hidden, weight, targets, ignore_index, return_stats)
    # See the module docstring: a frozen head's hidden gradient, computed in the forward (CPU).
    with_dhidden = (hidden.device.type == "cpu" and torch.is_grad_enabled()
                    and hidden.requires_grad and not weight.requires_grad)
    logp, _, stats, _, _ = torch.ops.dafast.linear_logprobs(
        hidden, weight, targets, int(ignore_index), token_chunk, vocab_chunk, return_stats,
        with_dhidden)
    if not return_stats:
        return logp
    return logp, LogprobStats(stats[0], stats[1], stats[2] > 0.5)


if extension_loaded():

    # Shape functions: the C++ op checks its inputs when it runs. The forward's fake checks what
    # its shapes rest on, and refuses with_dhidden off the CPU as the CUDA kernel does.
    @torch.library.register_fake("dafast::linear_logprobs")
    def _linear_logprobs_fake(hidden, weight, targets, ignore_index=-100, token_chunk=0,
                              vocab_chunk=0, with_stats=False, with_dhidden=False):
        torch._check_value(hidden.dim() == 2, lambda: f"{_OP}hidden must be 2-D [N, H], got "
                           f"shape {list(hidden.shape)}")
        torch._check_value(not with_dhidden or hidden.device.type == "cpu", lambda: (
            f"{_OP}with_dhidden is implemented on the CPU only, not on {hidden.device}"))
        n = hidden.shape[0]
        f32 = dict(dtype=torch.float32)
        # The positions computed: as many as are not ignored (or all N): data-dependent.
        count = torch.library.get_ctx().new_dynamic_size()
        return (hidden.new_empty(n, **f32), hidden.new_empty(n, **f32),
                hidden.new_empty((3 if with_stats else 0, n), **f32),
                hidden.new_empty(hidden.shape if with_dhidden else (0,), **f32),
                targets.new_empty(count))

    @torch.library.register_fake("dafast::linear_logprobs_backward")
    def _linear_logprobs_backward_fake(grad_logp, hidden, weight, targets, lse, ignore_index,
                                       token_chunk, vocab_chunk, hidden_grad, weight_grad,
                                       rows=None):
        return (hidden.new_empty(hidden.shape if hidden_grad else (0,)),
                weight.new_empty(weight.shape if weight_grad else (0,)))

    def _setup_context(ctx, inputs, output):
        hidden, weight, targets, ignore_index, token_chunk, vocab_chunk, _, with_dhidden = inputs
        _, lse, stats, dhidden, rows = output
        ctx.save_for_backward(hidden, weight, targets, lse, dhidden, rows)
        ctx.config = (ignore_index, token_chunk, vocab_chunk)
        ctx.with_dhidden = with_dhidden
        ctx.mark_non_differentiable(lse, stats, dhidden, rows)
        ctx.set_materialize_grads(False)

    def _backward(ctx, grad_logp, _grad_lse, _grad_stats, _grad_dhidden, _grad_rows):
        hidden_grad, weight_grad = ctx.needs_input_grad[:2]
        if grad_logp is None or not (hidden_grad or weight_grad):
            return (None,) * 8
        hidden, weight, targets, lse, dhidden, rows = ctx.saved_tensors
        if ctx.with_dhidden and not weight_grad:
            grad_hidden = (grad_logp.float().unsqueeze(1) * dhidden).to(hidden.dtype)
            return (grad_hidden, None, None, None, None, None, None, None)
        grad_hidden, grad_weight = torch.ops.dafast.linear_logprobs_backward(
            grad_logp.float().contiguous(), hidden, weight, targets, lse, *ctx.config,
            hidden_grad, weight_grad, rows)
        return (grad_hidden if hidden_grad else None, grad_weight if weight_grad else None,
                None, None, None, None, None, None)

    torch.library.register_autograd("dafast::linear_logprobs", _backward,
                                    setup_context=_setup_context)
