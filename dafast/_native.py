"""Loading of the native extension `dafast._C` and the switch between kernels and references.

Every op in dafast.ops has a pure-PyTorch reference next to its native kernel. Which one runs:

    DAFAST_KERNELS=auto       (default) the native kernels, or the references with one warning
                              if the extension failed to build or load
    DAFAST_KERNELS=native     the native kernels; an error if the extension is missing
    DAFAST_KERNELS=reference  the references everywhere

and `with dafast.kernels.mode("reference"): ...` overrides it for a block of code (process-wide, like
torch's backend flags).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pathlib
import warnings
from typing import Iterator

import torch  # also loads libtorch/libc10, which dafast._C links against

MODES = ("auto", "native", "reference")

_C = None
_load_error: Exception | None = None
try:
    _C = importlib.import_module("dafast._C")  # registers torch.ops.dafast.*
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    _load_error = exc

# A plain global rather than a ContextVar: torch.compile traces (and guards on) globals, and
# cannot trace ContextVar.get.
_mode_override: str | None = None
_warned = False


def extension_loaded() -> bool:
    return _C is not None


def build_info() -> dict:
    """What the native extension was built with: backends, OpenMP, torch version."""
    if _C is None:
        return {"loaded": False, "error": repr(_load_error), "backends": []}
    return {"loaded": True, **_C.build_info()}


def kernel_mode() -> str:
    mode = _mode_override or os.environ.get("DAFAST_KERNELS", "auto").strip().lower()
    if mode not in MODES:
        raise ValueError(f"DAFAST_KERNELS must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


@contextlib.contextmanager
def kernels(mode: str) -> Iterator[None]:
    """Run the enclosed code on the native kernels or on the references (dafast.kernels.mode)."""
    if mode not in MODES:
        raise ValueError(f"dafast.kernels.mode() takes one of {', '.join(MODES)}; got {mode!r}")
    global _mode_override
    previous, _mode_override = _mode_override, mode
    try:
        yield
    finally:
        _mode_override = previous


def use_native() -> bool:
    """Whether ops should call torch.ops.dafast.* (True) or their references (False)."""
    global _warned
    mode = kernel_mode()
    if mode == "reference":
        return False
    if _C is not None:
        return True
    if mode == "native":
        raise RuntimeError(
            f"DAFAST_KERNELS=native but the dafast._C extension did not load: {_load_error!r}. "
            "Rebuild with `pip install --no-build-isolation -e .`"
        )
    if not _warned:
        _warned = True
        warnings.warn(
            f"dafast._C did not load ({_load_error!r}); running the pure-PyTorch references. "
            "Rebuild with `pip install --no-build-isolation -e .`",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


def check_inputs(op: str, *args) -> None:
    """Run the native op's input checks (csrc/<op>_op.h, the one place they are written) on a
    call of its pure-PyTorch reference, so that the reference refuses bad input as the kernel
    does: the same ValueError or TypeError, the same message.

    Skipped without the extension (a broken build, warned about once by use_native): the
    references then raise PyTorch's own errors. Skipped while torch.compile traces, which cannot
    enter a C++ function; the compiled graph's ops raise their own errors then.
    """
    if _C is not None and not torch.compiler.is_compiling():
        getattr(_C, f"check_{op}")(*args)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively, where bf16 matmuls beat fp32 ones
    (Linux: the avx512_bf16 or amx_bf16 flag; False where that cannot be read)."""
    try:
        flags = pathlib.Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
