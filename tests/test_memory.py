"""dafast.memory: the caching CPU allocator (csrc/cpu/caching_allocator.cpp). Blocks are reused,
never shared by two live tensors, the cache never lifts the peak above the live bytes' peak,
small tensors and the off state are torch's, and a stage trains on it and turns it off after."""

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import dafast
import dafast.memory as memory
from conftest import tiny_llama

pytestmark = pytest.mark.skipif(not dafast.build_info()["loaded"], reason="needs dafast._C")

MIB = 1 << 20


def size_class(n: int) -> int:
    """The allocator's rounding: 64 KiB steps below 32 MiB, 2 MiB steps above."""
    step = 64 << 10 if n < 32 * MIB else 2 * MIB
    return -(-n // step) * step


@pytest.fixture
def allocator():
    memory.disable()  # a fresh cache and high-water mark
    memory.enable()
    memory.reset_peak()
    yield memory
    memory.disable()


def test_enable_disable_are_idempotent_and_restore_torch():
    memory.disable()
    assert not memory.enabled()
    with memory.caching_cpu_allocator():
        memory.enable()
        assert memory.enabled()
        with memory.caching_cpu_allocator():  # nested: stays on when the inner block ends
            pass
        assert memory.enabled()
    assert not memory.enabled()
    live = memory.stats()["live_bytes"]
    kept = torch.empty(4 * MIB, dtype=torch.uint8)
    assert memory.stats()["live_bytes"] == live  # torch's own allocator again
    with memory.caching_cpu_allocator(on=False):
        assert not memory.enabled()
    del kept


def test_a_freed_block_is_reused_for_its_size_class(allocator):
    a = torch.empty(3 * MIB - 5, dtype=torch.uint8)
    where = a.data_ptr()
    assert allocator.stats()["live_bytes"] == size_class(3 * MIB - 5)
    del a
    stats = allocator.stats()
    assert stats["live_bytes"] == 0 and stats["cached_bytes"] == size_class(3 * MIB - 5)
    b = torch.empty(3 * MIB - 1000, dtype=torch.uint8)  # same class
    assert b.data_ptr() == where
    assert allocator.stats()["hits"] == 1 and allocator.stats()["cached_bytes"] == 0
    c = torch.empty(8 * MIB, dtype=torch.uint8)  # another class: fresh memory
    assert c.data_ptr() != where and allocator.stats()["misses"] == 2


def test_small_tensors_are_left_to_torch(allocator):
    small = [torch.empty(allocator.stats()["min_bytes"] - 1, dtype=torch.uint8) for _ in range(8)]
    assert allocator.stats()["live_bytes"] == 0 and allocator.stats()["misses"] == 0
    del small


def test_live_tensors_never_share_memory(allocator):
    """Fill every live tensor with its own value through a random sequence of allocations and
    frees (cache hits, misses and evictions); a block handed out twice would overwrite one."""
    rng = random.Random(0)
    live: dict[int, torch.Tensor] = {}
    for i in range(300):
        if live and rng.random() < 0.45:
            live.pop(rng.choice(list(live)))
        else:
            t = torch.empty(rng.choice([1, 2, 3, 5, 9, 40]) * MIB // 4 + rng.randrange(64),
                            dtype=torch.float32)
            t.fill_(i)
            live[i] = t
        for value, t in live.items():
            assert t[0].item() == value and t[-1].item() == value
    stats = allocator.stats()
    assert stats["hits"] > 0 and stats["misses"] > 0 and stats["evictions"] > 0, stats


def test_the_cache_never_lifts_the_peak_above_the_live_peak(allocator):
    rng = random.Random(1)
    live, held, peak_live = [], 0, 0
    for _ in range(400):
        if live and rng.random() < 0.5:
            t = live.pop(rng.randrange(len(live)))
            held -= size_class(t.numel())
            del t
        else:
            n = rng.randrange(MIB, 48 * MIB)
            live.append(torch.empty(n, dtype=torch.uint8))
            held += size_class(n)
        peak_live = max(peak_live, held)
        assert allocator.stats()["live_bytes"] == held
    assert allocator.stats()["peak_bytes"] == peak_live
    del live
    allocator.empty_cache()
    assert allocator.stats()["cached_bytes"] == 0


def test_tensors_outlive_the_allocator(allocator):
    kept = torch.full((2 * MIB,), 7, dtype=torch.int32)
    live = allocator.stats()["live_bytes"]
    allocator.disable()
    assert kept.sum().item() == 7 * 2 * MIB
    del kept  # given back to the system, not cached
    assert allocator.stats()["live_bytes"] == live - 8 * MIB
    assert allocator.stats()["cached_bytes"] == 0


def test_threads_allocate_concurrently(allocator):
    def churn(seed: int) -> bool:
        rng = random.Random(seed)
        mine = [torch.full((rng.randrange(MIB // 4, 4 * MIB),), seed, dtype=torch.int32)
                for _ in range(40)]
        return all(bool((t == seed).all()) for t in mine)

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(churn, range(16)))
    assert allocator.stats()["live_bytes"] == 0


def test_training_math_is_unchanged(allocator):
    """A forward and backward of a small Llama whose activations are MBs (so they are the
    allocator's) gives the same gradients on either allocator, bit for bit."""
    model = tiny_llama(hidden=256, intermediate=704, vocab=4099, max_positions=None)
    ids = torch.randint(0, model.config.vocab_size, (4, 257))

    def grads():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    cached = grads()
    assert allocator.stats()["hits"] > 0
    allocator.disable()
    system = grads()
    for a, b in zip(cached, system):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
