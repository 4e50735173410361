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


def test_ops_are_registered():
    assert torch.ops.dafast.slerp.default is not None
    assert torch.ops.dafast.slerp_out.default is not None


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
