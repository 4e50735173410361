"""dafast's operators. Each module holds one op: its pure-PyTorch reference, the wrapper that
calls torch.ops.dafast.<op>, its fake (meta) registration and, where it trains, its autograd."""

from dafast.ops.linear_logprobs import LogprobStats, linear_logprobs, linear_logprobs_reference
from dafast.ops.lora_linear import lora_linear, lora_linear_reference
from dafast.ops.slerp import slerp, slerp_reference, slerp_sums
from dafast.ops.swiglu import swiglu, swiglu_reference

__all__ = [
    "LogprobStats", "linear_logprobs", "linear_logprobs_reference", "lora_linear",
    "lora_linear_reference", "slerp", "slerp_reference", "slerp_sums", "swiglu", "swiglu_reference",
]
