"""The SwiGLU activation forward + backward: dafast's op against HF's eager form (the peer:
act_fn(gate) * up, what LlamaMLP runs) and, on a GPU with liger-kernel installed, Liger's
SiLU-mul kernel, in the same run.

    pytest bench/test_swiglu.py --benchmark-autosave && python bench/compare.py

Shape: SmolLM2-135M's MLP activation, 4096 tokens x 1536 (on a GPU: Llama-3.1-8B's, 8192 x
14336, bf16). extra_info["saved_MiB"]: what each variant keeps for backward (dafast: gate and
up; eager: gate, silu(gate) and up). dafast.mlp also drops the activation's output h, which
down_proj would keep: tests/test_mlp_patch.py checks that, and bench/test_train.py's peak RSS
shows it.
"""

import pytest
import torch
import torch.nn.functional as F

from dafast.ops import swiglu
from test_lora_linear import dtype_id, saved_mib, synchronized

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if CUDA:
    TOKENS, WIDTH, DTYPES = 8192, 14336, [torch.bfloat16]
else:
    TOKENS, WIDTH, DTYPES = 4096, 1536, [torch.float32, torch.bfloat16]


def liger():
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except ImportError:
        return None
    return LigerSiLUMulFunction.apply


ROLES = {
    "dafast": swiglu,
    "eager": lambda gate, up: F.silu(gate) * up,
    "liger": liger() if CUDA else None,
}
# compare.py's ratio is against the peer: Liger where it runs, else the eager form.
PEER = "liger" if ROLES["liger"] is not None else "eager"


@pytest.mark.parametrize("role", list(ROLES))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_swiglu_forward_backward(benchmark, dtype, role):
    fn = ROLES[role]
    if fn is None:
        pytest.skip("Liger-Kernel runs on a GPU with liger-kernel installed")
    gate = torch.randn(TOKENS, WIDTH, device=DEVICE).to(dtype).requires_grad_()
    up = torch.randn(TOKENS, WIDTH, device=DEVICE).to(dtype).requires_grad_()
    grad = torch.randn(TOKENS, WIDTH, device=DEVICE).to(dtype)

    def step():
        return torch.autograd.grad(fn(gate, up), (gate, up), grad)

    benchmark.group = f"swiglu fwd+bwd {dtype_id(dtype)} {TOKENS}x{WIDTH}"
    benchmark.extra_info["role"] = ("dafast" if role == "dafast" else
                                    "peer" if role == PEER else "baseline")
    benchmark.extra_info["variant"] = role
    benchmark.extra_info["saved_MiB"] = saved_mib(lambda: fn(gate, up), gate, [])[0]
    grads = benchmark.pedantic(synchronized(step), rounds=10, warmup_rounds=1)
    if role == "dafast" and grads is not None:  # the same answer as the eager form
        want = torch.autograd.grad(F.silu(gate) * up, (gate, up), grad)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        for ours, theirs in zip(grads, want):
            torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)
