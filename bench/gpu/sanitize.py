"""Every dafast kernel once, forward and backward, at small odd shapes: the workload that
bench/gpu/run.sh runs under compute-sanitizer (memcheck on all of them, racecheck on the ones
with shared-memory reductions: slerp's sums, linear_logprobs' folds, lora_linear's thin
products). Shapes cross each kernel's block and vector width, and one input of each elementwise
kernel starts 2 bytes past a 16-byte boundary (the scalar-head path).

    python bench/gpu/sanitize.py [--device cpu] [--only reductions]
"""

import argparse

import torch

from dafast.ops import linear_logprobs, lora_linear, slerp, slerp_sums, swiglu


def misaligned(n, dtype, device):
    """A length-n tensor whose data starts one element past a 16-byte boundary."""
    return torch.randn(n + 1, device=device).to(dtype)[1:]


def reductions(device):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        a, b = misaligned(70001, dtype, device), torch.randn(70001, device=device).to(dtype)
        slerp_sums(a, b)
        slerp(a, b, 0.3)
        hidden = torch.randn(67, 96, device=device).to(dtype).requires_grad_()
        weight = torch.randn(1029, 96, device=device).to(dtype).requires_grad_()
        targets = torch.randint(0, 1029, (67,), device=device)
        targets[::7] = -100
        linear_logprobs(hidden, weight, targets, chunk_size=32, vocab_chunk_size=500).sum().backward()
        for rank in (8, 40):
            x = torch.randn(3, 301, 136, device=device).to(dtype).requires_grad_()
            w = torch.randn(72, 136, device=device).to(dtype)
            a_ = torch.randn(rank, 136, device=device).requires_grad_()
            b_ = torch.randn(72, rank, device=device).requires_grad_()
            lora_linear(x, w, None, a_, b_, 0.5).sum().backward()


def elementwise(device):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        gate = misaligned(40007, dtype, device).requires_grad_()
        up = torch.randn(40007, device=device).to(dtype).requires_grad_()
        swiglu(gate, up).sum().backward()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--only", choices=["reductions", "elementwise"])
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.only != "elementwise":
        reductions(args.device)
    if args.only != "reductions":
        elementwise(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    print("sanitize.py: ok")


if __name__ == "__main__":
    main()
