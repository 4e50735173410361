"""dafast.mlp.patch: the fused SwiGLU MLP gives the eager model's loss and gradients, recomputes
h in backward instead of keeping it, and leaves other MLPs alone."""

import copy

import pytest
import torch

import dafast.lora
import dafast.mlp
from conftest import lora_model, tiny_llama
from dafast.ops.swiglu import swiglu as fused_swiglu

pytest.importorskip("peft")

LAYERS = 2  # tiny_llama's


@pytest.fixture
def ids():
    return torch.randint(0, 131, (3, 29))


def loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.requires_grad}


@pytest.fixture
def swiglu_calls(monkeypatch):
    """Counts the fused op's calls made by dafast.mlp: forward and recompute alike."""
    calls = []

    def counting(gate, up):
        calls.append(torch.is_grad_enabled())
        return fused_swiglu(gate, up)

    monkeypatch.setattr(dafast.mlp, "swiglu", counting)
    return calls


@pytest.mark.parametrize("finetune", ["lora", "lora_patched", "full"])
def test_same_loss_and_gradients_as_eager(ids, swiglu_calls, finetune):
    eager = tiny_llama()
    if finetune != "full":
        eager = lora_model(base=eager)
    fused = copy.deepcopy(eager)
    if finetune == "lora_patched":
        assert dafast.lora.patch(fused) == 7 * LAYERS
    assert dafast.mlp.patch(fused) == LAYERS
    want_loss, want = loss_and_grads(eager, ids)
    got_loss, got = loss_and_grads(fused, ids)
    torch.testing.assert_close(got_loss, want_loss)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    # Once per layer forward, once more per layer when backward needed h: it was not kept.
    assert swiglu_calls == [True] * LAYERS + [False] * LAYERS


def test_under_other_saved_tensor_hooks_h_is_kept(ids, swiglu_calls):
    model = lora_model()
    want_loss, want = loss_and_grads(copy.deepcopy(model), ids)
    dafast.mlp.patch(model)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        got_loss, got = loss_and_grads(model, ids)
    torch.testing.assert_close(got_loss, want_loss)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    assert swiglu_calls == [True] * LAYERS  # no recompute: the outer hooks own the saved tensors


def test_inference_keeps_nothing_and_matches(ids, swiglu_calls):
    model = tiny_llama()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        dafast.mlp.patch(model)
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert swiglu_calls == [False] * LAYERS


def test_bf16_model_within_rounding(ids):
    model = tiny_llama(torch.bfloat16)
    with torch.no_grad():
        want = model(input_ids=ids).logits.float()
        dafast.mlp.patch(model)
        got = model(input_ids=ids).logits.float()
    # HF rounds silu(gate) to bf16 before the product, the op rounds once: about one bf16 ulp
    # per activation, a few percent of a logit at most after two layers.
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_other_mlps_are_left_alone():
    model = tiny_llama(act="gelu")
    assert dafast.mlp.patch(model) == 0
    assert not any(dafast.mlp.is_patched(m) for m in model.modules())


def test_patch_is_idempotent_and_unpatch_restores(ids):
    model = tiny_llama()
    assert dafast.mlp.patch(model) == LAYERS
    assert dafast.mlp.patch(model) == 0
    assert sum(dafast.mlp.is_patched(m) for m in model.modules()) == LAYERS
    assert dafast.mlp.unpatch(model) == LAYERS
    assert not any("forward" in vars(m) for m in model.modules())
