"""SLERP of one 2048 x 8192 bf16 weight pair (an MLP projection of SmolLM-1.7B):
dafast's kernel against mergekit's slerp (the peer) and dafast's pure-PyTorch reference.

    pytest bench/test_slerp.py --benchmark-autosave && python bench/compare.py
"""

import pytest
import torch

from dafast.ops import slerp, slerp_reference

SHAPE = (2048, 8192)
T = 0.3


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    return torch.randn(SHAPE).bfloat16(), torch.randn(SHAPE).bfloat16()


def _run(benchmark, role, fn, a, b):
    benchmark.group = f"slerp bf16 {SHAPE[0]}x{SHAPE[1]}"
    benchmark.extra_info["role"] = role
    return benchmark.pedantic(fn, args=(a, b), rounds=15, warmup_rounds=2)


def test_dafast(benchmark, pair):
    out = torch.empty_like(pair[0])
    result = _run(benchmark, "dafast", lambda a, b: slerp(a, b, T, out=out), *pair)
    assert result.dtype == torch.bfloat16


def test_mergekit(benchmark, pair):
    mergekit_slerp = pytest.importorskip("mergekit.merge_methods.slerp").slerp
    t = torch.tensor([T])
    result = _run(benchmark, "peer", lambda a, b: mergekit_slerp(t, a[None], b[None]), *pair)
    # Same inputs, same answer: the benchmark compares equal work.
    torch.testing.assert_close(result[0].float(), slerp(*pair, T).float(), atol=0, rtol=2 ** -7)


def test_reference(benchmark, pair):
    _run(benchmark, "baseline", lambda a, b: slerp_reference(a, b, T), *pair)
