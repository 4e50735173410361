"""dafast.ops.slerp: native kernels against the pure-PyTorch reference and against fp64 math."""

import math

import pytest
import torch

import dafast
from dafast.ops import slerp, slerp_reference, slerp_sums
from dafast.ops.slerp import slerp_sums_reference
from conftest import DEVICES, KERNEL_DTYPES

SIZES = [1, 7, 4097, (1 << 20) + 3]
TS = [0.0, 0.3, 0.5, 1.0]


def golden(a, b, t):
    """The exact answer for these (already rounded) inputs: the reference in float64."""
    return slerp_reference(a.double(), b.double(), t)


def assert_as_accurate_as_reference(out, a, b, t):
    """The kernel's error against fp64 math is at most twice the reference's own error at the
    same dtype (plus a few fp32 ulps of the output's scale, for outputs that round exactly)."""
    assert out.dtype == a.dtype and out.shape == a.shape
    exact = golden(a.cpu(), b.cpu(), t)
    kernel_err = (out.cpu().double() - exact).abs().max().item()
    reference_err = (slerp_reference(a, b, t).cpu().double() - exact).abs().max().item()
    scale = exact.abs().max().item()
    assert kernel_err <= 2 * reference_err + 4 * 2**-23 * scale, (kernel_err, reference_err)


def pair(n, dtype, device):
    return (torch.randn(n, device=device).to(dtype), torch.randn(n, device=device).to(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("t", TS)
def test_matches_reference(device, dtype, n, t):
    a, b = pair(n, dtype, device)
    assert_as_accurate_as_reference(slerp(a, b, t), a, b, t)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_endpoints_are_exact(device, dtype):
    a, b = pair(4097, dtype, device)
    assert torch.equal(slerp(a, b, 0.0), a)
    assert torch.equal(slerp(a, b, 1.0), b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["colinear", "antiparallel"])
def test_parallel_inputs_interpolate_linearly(device, dtype, sign):
    a = torch.randn(4097, device=device).to(dtype)
    b = (sign * 2.5 * a.float()).to(dtype)
    t = 0.3
    out = slerp(a, b, t)
    assert_as_accurate_as_reference(out, a, b, t)
    lerp = ((1 - t) * a.double() + t * b.double()).to(dtype)
    torch.testing.assert_close(out, lerp, atol=0, rtol=2 ** -7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_zero_vectors_are_safe(device, dtype):
    zero = torch.zeros(4097, device=device, dtype=dtype)
    b = torch.randn(4097, device=device).to(dtype)
    t = 0.3
    # A zero norm counts as 1, so the angle is pi/2: out = sin(t pi/2) b, as in mergekit.
    out = slerp(zero, b, t)
    assert torch.isfinite(out).all()
    expected = (math.sin(t * math.pi / 2) * b.double()).to(dtype)
    torch.testing.assert_close(out, expected, atol=0, rtol=2 ** -7)
    assert torch.equal(slerp(zero, zero, t), zero)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # fp16 flushes 1e-12 to 0
def test_tiny_vectors(device, dtype):
    a = (1e-12 * torch.randn(4097, device=device)).to(dtype)
    b = torch.randn(4097, device=device).to(dtype)
    out = slerp(a, b, 0.5)
    assert torch.isfinite(out).all()
    assert_as_accurate_as_reference(out, a, b, 0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # fp16 tops out at 65504
@pytest.mark.parametrize("scale", [1e20, 1e30, 1e37])
def test_huge_finite_inputs_do_not_overflow(device, dtype, scale):
    """Squares of values above ~1.8e19 overflow fp32: the sums must not (CPU: double lanes,
    CUDA: a scaled accumulation), and neither must the reference's norms."""
    a, b = pair((1 << 16) + 5, dtype, device)
    a, b = (a.float() * scale).to(dtype), (b.float() * scale).to(dtype)
    torch.testing.assert_close(slerp_sums(a, b), slerp_sums_reference(a, b), rtol=1e-5, atol=0)
    exact = golden(a.cpu(), b.cpu(), 0.3)
    for mode in ("native", "reference"):
        with dafast.kernels.mode(mode):
            out = slerp(a, b, 0.3)
        assert torch.isfinite(out).all(), mode
        err = (out.cpu().double() - exact).abs().max().item()
        assert err <= 1e-2 * exact.abs().max().item(), (mode, err)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_non_contiguous_inputs(device, dtype):
    a = torch.randn(64, 130, device=device).to(dtype)[:, ::2]
    b = torch.randn(65, 64, device=device).to(dtype).t()
    assert not a.is_contiguous() and not b.is_contiguous()
    out = slerp(a, b, 0.3)
    assert_as_accurate_as_reference(out, a, b, 0.3)
    assert torch.equal(out, slerp(a.contiguous(), b.contiguous(), 0.3))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_out_form_writes_in_place(device, dtype):
    a, b = pair(4097, dtype, device)
    out = torch.empty_like(a)
    assert slerp(a, b, 0.3, out=out) is out
    assert torch.equal(out, slerp(a, b, 0.3))
    strided = torch.empty(4097, 2, device=device, dtype=dtype)[:, 0]
    slerp(a, b, 0.3, out=strided)
    assert torch.equal(strided, out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_shapes_are_kept(device, dtype):
    a = torch.randn(3, 5, 7, device=device).to(dtype)
    b = torch.randn(3, 5, 7, device=device).to(dtype)
    out = slerp(a, b, 0.3)
    assert out.shape == (3, 5, 7)
    assert_as_accurate_as_reference(out, a, b, 0.3)
    empty = torch.empty(0, 4, device=device, dtype=dtype)
    assert slerp(empty, empty, 0.3).shape == (0, 4)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_and_independent_of_thread_count(device):
    a, b = pair((1 << 20) + 3, torch.float32, device)
    first = slerp(a, b, 0.3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = slerp(a, b, 0.3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, slerp(a, b, 0.3))
    assert torch.equal(first, single)


# NaN policy (see dafast/ops/slerp.py): non-finite input poisons the whole output, never a
# plausible tensor. Both the kernel and the reference follow it.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["a", "b"])
def test_non_finite_input_gives_all_nan(device, dtype, bad, where):
    a, b = pair(4097, dtype, device)
    (a if where == "a" else b)[123] = bad
    for mode in ("native", "reference"):
        with dafast.kernels.mode(mode):
            assert slerp(a, b, 0.3).isnan().all(), mode


@pytest.mark.parametrize("mode", ["native", "reference"])
def test_bad_input_raises_clear_errors(mode):
    a, b = torch.randn(10), torch.randn(10)
    with dafast.kernels.mode(mode):
        with pytest.raises(ValueError, match=r"same shape, got \[10\] and \[11\]"):
            slerp(a, torch.randn(11), 0.5)
        with pytest.raises(TypeError, match="same dtype, got torch.float32 and torch.bfloat16"):
            slerp(a, b.bfloat16(), 0.5)
        with pytest.raises(TypeError, match="dtype must be float32, float16 or bfloat16"):
            slerp(a.long(), b.long(), 0.5)
        for t in (-0.1, 1.5, float("nan")):
            with pytest.raises(ValueError, match=r"t must be in \[0, 1\]"):
                slerp(a, b, t)
        with pytest.raises(ValueError, match="dot_threshold must be in"):
            slerp(a, b, 0.5, dot_threshold=1.0)
        with pytest.raises(ValueError, match="eps must be in"):
            slerp(a, b, 0.5, eps=-1.0)
        with pytest.raises(ValueError, match=r"out must have shape \[10\]"):
            slerp(a, b, 0.5, out=torch.empty(9))
        with pytest.raises(TypeError, match="out must have dtype torch.float32"):
            slerp(a, b, 0.5, out=torch.empty(10, dtype=torch.float16))


def test_out_overlapping_an_input_is_refused():
    a, b = torch.randn(10), torch.randn(10)
    with pytest.raises(ValueError, match="out must not overlap a or b"):
        slerp(a, b, 0.5, out=a)
    with pytest.raises(ValueError, match="out must not overlap a or b"):
        slerp(a, b, 0.5, out=b)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_device_mismatch_is_refused():
    with pytest.raises(ValueError, match="same device"):
        slerp(torch.randn(10, device="cuda"), torch.randn(10), 0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_opcheck(device, dtype):
    a = torch.randn(33, 7, device=device).to(dtype)
    b = torch.randn(33, 7, device=device).to(dtype)
    torch.library.opcheck(torch.ops.dafast.slerp.default, (a, b, 0.3, 0.9995, 1e-8))
    torch.library.opcheck(torch.ops.dafast.slerp_out.default, (a, b, 0.3, 0.9995, 1e-8),
                          {"out": torch.empty_like(a)})
    sums = torch.ops.dafast.slerp_sums(a, b)
    torch.library.opcheck(torch.ops.dafast.slerp_sums.default, (a, b))
    torch.library.opcheck(torch.ops.dafast.slerp_out.default, (a, b, 0.3, 0.9995, 1e-8),
                          {"sums": sums, "out": torch.empty_like(a)})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_sums_match_float64(device, dtype):
    a, b = pair(4097, dtype, device)
    a[0] = 0.0
    expected = slerp_sums_reference(a, b)
    assert expected.dtype == torch.float64 and expected.shape == (3,)
    torch.testing.assert_close(slerp_sums(a, b), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("mode", ["native", "reference"])
@pytest.mark.parametrize("rows_per_chunk", [16, 13])  # 16 x 1024 is one CPU block; 13 is not
def test_chunked_equals_whole(device, dtype, mode, rows_per_chunk):
    a = torch.randn(100, 1024, device=device).to(dtype)
    b = torch.randn(100, 1024, device=device).to(dtype)
    with dafast.kernels.mode(mode):
        whole = slerp(a, b, 0.3)
        chunks = list(zip(a.split(rows_per_chunk), b.split(rows_per_chunk)))
        sums = sum(slerp_sums(x, y) for x, y in chunks)
        # fp32 block sums over another partition: equal to fp32 accumulation error
        torch.testing.assert_close(sums, slerp_sums(a, b), rtol=1e-5, atol=0)
        out = torch.empty_like(a)
        for (x, y), o in zip(chunks, out.split(rows_per_chunk)):
            assert slerp(x, y, 0.3, sums=sums, out=o) is o
    assert_as_accurate_as_reference(out, a, b, 0.3)
    if mode == "native" and device == "cpu" and rows_per_chunk == 16:
        assert torch.equal(out, whole)  # block-aligned chunks: the same float sums, bit for bit


@pytest.mark.parametrize("mode", ["native", "reference"])
def test_bad_sums_are_refused(mode):
    a, b = torch.randn(10), torch.randn(10)
    with dafast.kernels.mode(mode):
        with pytest.raises(TypeError, match="sums must be float64"):
            slerp(a, b, 0.5, sums=torch.zeros(3))
        with pytest.raises(ValueError, match=r"sums must have shape \[3\]"):
            slerp(a, b, 0.5, sums=torch.zeros(4, dtype=torch.float64))


def test_compiles_without_graph_breaks():
    a, b = torch.randn(4097), torch.randn(4097)
    compiled = torch.compile(lambda x, y: slerp(x, y, 0.3), fullgraph=True)
    assert torch.equal(compiled(a, b), slerp(a, b, 0.3))


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("case", ["random", "colinear", "zero"])
def test_reference_has_mergekit_semantics(dtype, t, case):
    """The reference against mergekit's own slerp, where mergekit is installed (CI installs it)."""
    mergekit_slerp = pytest.importorskip("mergekit.merge_methods.slerp").slerp
    a, b = torch.randn(257, 31).to(dtype), torch.randn(257, 31).to(dtype)
    if case == "colinear":
        b = (3 * a.float()).to(dtype)
    elif case == "zero":
        a = torch.zeros_like(a)
    # mergekit's leading axis is a batch of independent tensors: one tensor is a batch of one.
    theirs = mergekit_slerp(torch.tensor([t]), a[None], b[None])[0]
    ours = slerp_reference(a, b, t)
    torch.testing.assert_close(ours.float(), theirs.float(), atol=1e-6, rtol=2 ** -7)
    assert_as_accurate_as_reference(slerp(a, b, t), a, b, t)
