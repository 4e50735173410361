"""The native build is there and the kernel/reference switch routes as documented."""

import importlib
import os
import subprocess
import sys

import pytest
import torch

import dafast

# The package re-exports the function `slerp` under the module's name: fetch the module itself.
slerp_module = importlib.import_module("dafast.ops.slerp")


def test_native_extension_loaded():
    # CI must never pass on a broken native build by silently running the references.
    info = dafast.build_info()
    assert info["loaded"], info
    assert "cpu" in info["backends"]
    assert info["openmp"]
    assert info["torch_version"].split(".")[:2] == torch.__version__.split("+")[0].split(".")[:2]


def test_cuda_backend_built_when_torch_has_cuda():
    if torch.version.cuda is None or os.environ.get("DAFAST_SKIP_CUDA") == "1":
        pytest.skip("CPU-only torch or DAFAST_SKIP_CUDA=1: no CUDA backend expected")
    assert "cuda" in dafast.build_info()["backends"]


def _op_calls():
    """Each registered op called once on small inputs, with what it must return, from the
    pure-PyTorch references (and autograd through them for the backward ops)."""
    from dafast.ops import (linear_logprobs_reference, lora_linear_reference, slerp_reference,
                            swiglu_reference)
    from dafast.ops.slerp import slerp_sums_reference

    ops = torch.ops.dafast
    a, b = torch.randn(5, 7), torch.randn(5, 7)
    out = torch.empty(5, 7)

    def slerp_out():
        ops.slerp_out(a, b, 0.3, sums=None, out=out)
        return out

    def slerp_out_with_sums():
        ops.slerp_out(a, b, 0.3, 0.9995, 1e-8, sums=slerp_sums_reference(a, b), out=out)
        return out

    x, w, bias = torch.randn(3, 6, requires_grad=True), torch.randn(4, 6), torch.randn(4)
    lora_a = torch.randn(2, 6, requires_grad=True)
    lora_b = torch.randn(4, 2, requires_grad=True)
    grad_y = torch.randn(3, 4)
    lora_grads = torch.autograd.grad(lora_linear_reference(x, w, bias, lora_a, lora_b, 0.5),
                                     (x, lora_a, lora_b), grad_y)
    xa = (x @ lora_a.T).detach()
    lora_args = (x.detach(), w, bias, lora_a.detach(), lora_b.detach())

    hidden = torch.randn(6, 8, requires_grad=True)
    head = torch.randn(11, 8, requires_grad=True)
    targets = torch.tensor([3, -100, 0, 10, 5, -100])
    logp = linear_logprobs_reference(hidden, head, targets)
    grad_logp = torch.randn(6)
    logprobs_grads = torch.autograd.grad(logp, (hidden, head), grad_logp)
    lse = torch.logsumexp(hidden.detach() @ head.detach().T, -1)

    gate, up = torch.randn(4, 9, requires_grad=True), torch.randn(4, 9, requires_grad=True)
    grad_h = torch.randn(4, 9)
    swiglu_grads = torch.autograd.grad(swiglu_reference(gate, up), (gate, up), grad_h)
    return {
        "slerp": [(lambda: ops.slerp(a, b, 0.3), slerp_reference(a, b, 0.3))],
        "slerp_out": [(slerp_out, slerp_reference(a, b, 0.3)),
                      (slerp_out_with_sums, slerp_reference(a, b, 0.3))],
        "slerp_sums": [(lambda: ops.slerp_sums(a, b), slerp_sums_reference(a, b))],
        "lora_linear": [(lambda: ops.lora_linear(*lora_args, 0.5),
                         (lora_linear_reference(*lora_args, 0.5), xa))],
        "lora_linear_backward": [(lambda: ops.lora_linear_backward(
            grad_y, x.detach(), w, lora_a.detach(), lora_b.detach(), xa, 0.5, [True, True, True]),
            lora_grads)],
        "linear_logprobs": [(lambda: ops.linear_logprobs(hidden.detach(), head.detach(), targets)[:2],
                             (logp.detach(), lse.masked_fill(targets == -100, 0)))],
        "linear_logprobs_backward": [(lambda: ops.linear_logprobs_backward(
            grad_logp, hidden.detach(), head.detach(), targets,
            lse.masked_fill(targets == -100, 0), -100, 0, 0, True, True), logprobs_grads)],
        "swiglu": [(lambda: ops.swiglu(gate.detach(), up.detach()),
                    swiglu_reference(gate.detach(), up.detach()))],
        "swiglu_backward": [(lambda: ops.swiglu_backward(grad_h, gate.detach(), up.detach()),
                             swiglu_grads)],
    }


def test_every_registered_op_computes_its_reference():
    """The ops the dispatcher holds are exactly those called here, and each returns what its
    reference computes: a missing, extra or broken registration fails."""
    calls = _op_calls()
    assert dafast.build_info()["ops"] == sorted(calls)
    for name, cases in calls.items():
        for call, want in cases:
            got = call()
            got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
            assert len(got) == len(want), name
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w.detach(), rtol=1e-5, atol=1e-5, msg=name)


def test_context_manager_routes_to_reference(monkeypatch):
    calls = []
    real = slerp_module.slerp_reference
    monkeypatch.setattr(slerp_module, "slerp_reference", lambda *a: calls.append(1) or real(*a))
    a, b = torch.randn(10), torch.randn(10)
    dafast.ops.slerp(a, b, 0.5)
    assert calls == []
    with dafast.kernels.mode("reference"):
        assert dafast.kernel_mode() == "reference"
        dafast.ops.slerp(a, b, 0.5)
    assert calls == [1]
    assert dafast.kernel_mode() == "auto"


def test_bad_mode_is_refused(monkeypatch):
    with pytest.raises(ValueError, match="kernels"):
        with dafast.kernels.mode("fast"):
            pass
    monkeypatch.setenv("DAFAST_KERNELS", "fastest")
    with pytest.raises(ValueError, match="DAFAST_KERNELS must be one of"):
        dafast.kernel_mode()


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_env_var_selects_reference():
    result = _python("import dafast; print(dafast.kernel_mode())", DAFAST_KERNELS="reference")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "reference"


# Simulates a failed build: importing dafast._C raises ImportError.
_BLOCK_EXTENSION = "import sys; sys.modules['dafast._C'] = None\n"


def test_missing_extension_falls_back_with_one_warning():
    code = _BLOCK_EXTENSION + (
        "import warnings, torch, dafast\n"
        "assert not dafast.build_info()['loaded']\n"
        "a, b = torch.randn(5), torch.randn(5)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    out1 = dafast.ops.slerp(a, b, 0.3)\n"
        "    out2 = dafast.ops.slerp(a, b, 0.3)\n"
        "assert torch.equal(out1, dafast.ops.slerp_reference(a, b, 0.3))\n"
        "print(sum('did not load' in str(w.message) for w in caught))\n"
    )
    result = _python(code, DAFAST_KERNELS="auto")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"


def test_missing_extension_with_native_mode_is_an_error():
    code = _BLOCK_EXTENSION + "import torch, dafast\ndafast.ops.slerp(torch.ones(3), torch.ones(3), 0.5)\n"
    result = _python(code, DAFAST_KERNELS="native")
    assert result.returncode != 0
    assert "DAFAST_KERNELS=native but the dafast._C extension did not load" in result.stderr
