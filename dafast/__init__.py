"""dafast: fast, reproducible domain adaptation of LLMs on fused C++/CUDA kernels."""

from dafast._native import build_info, extension_loaded, kernel_mode
from dafast import kernels, lora, ops

__version__ = "0.1.0"
__all__ = ["build_info", "extension_loaded", "kernel_mode", "kernels", "lora", "ops", "__version__"]
