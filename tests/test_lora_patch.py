"""dafast.lora.patch on a PEFT model: same loss and gradients as PEFT, adapters stay PEFT's."""

import copy
import warnings

import pytest
import torch

import dafast
from conftest import lora_model, tiny_llama
from dafast.lora import is_patched, patch, unpatch

peft = pytest.importorskip("peft")

N_LORA_LAYERS = 2 * 7  # q, k, v, o, gate, up, down in each of 2 decoder layers


def loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def fused_layers(model):
    return sum(is_patched(m) for m in model.modules())


@pytest.fixture
def ids():
    return torch.randint(0, 131, (2, 23))


def test_patched_model_has_peft_loss_and_gradients(ids):
    model = lora_model()
    loss, grads = loss_and_grads(model, ids)
    assert patch(model) == N_LORA_LAYERS == fused_layers(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback anywhere
        fused_loss, fused_grads = loss_and_grads(model, ids)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-6, atol=0)
    assert fused_grads.keys() == grads.keys() and len(grads) == 2 * N_LORA_LAYERS
    for name, g in grads.items():
        torch.testing.assert_close(fused_grads[name], g, rtol=1e-5, atol=1e-5 * g.abs().max().item())
    with dafast.kernels.mode("reference"):
        ref_loss, _ = loss_and_grads(model, ids)
    torch.testing.assert_close(ref_loss, loss, rtol=1e-6, atol=0)
    assert unpatch(model) == N_LORA_LAYERS and fused_layers(model) == 0
    torch.testing.assert_close(loss_and_grads(model, ids)[0], loss, rtol=0, atol=0)


def test_bf16_model_within_peft_error(ids):
    """A bf16 model with PEFT's default fp32 adapters: against the same weights in fp64, the
    patched model's loss and gradient errors stay within twice PEFT's own."""
    model = lora_model(torch.bfloat16)
    assert next(p for n, p in model.named_parameters() if "lora_A" in n).dtype == torch.float32
    exact = copy.deepcopy(model).double()
    peft_loss, peft_grads = loss_and_grads(model, ids)
    exact_loss, exact_grads = loss_and_grads(exact, ids)
    patch(model)
    loss, grads = loss_and_grads(model, ids)
    assert abs(loss.double() - exact_loss) <= 2 * abs(peft_loss.double() - exact_loss) + 1e-3
    flat = lambda g: torch.cat([t.double().flatten() for t in g.values()])  # noqa: E731
    err, peft_err = (flat(grads) - flat(exact_grads)).norm(), (flat(peft_grads) - flat(exact_grads)).norm()
    assert err <= 2 * peft_err, (err, peft_err)


def test_autocast_runs_fused_like_peft(ids):
    model = lora_model()
    with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # fused, no fallback
        peft_loss = model(input_ids=ids, labels=ids).loss
        patch(model)
        loss = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss, peft_loss, rtol=2e-2, atol=0)


def test_adapters_stay_peft_adapters(ids, tmp_path):
    base = tiny_llama()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = lora_model(base=base).eval()
    patch(model)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        model.save_pretrained(tmp_path)
        fresh = tiny_llama().eval()
        fresh.load_state_dict(base_state)
        base_logits = fresh(input_ids=ids).logits
        loaded = peft.PeftModel.from_pretrained(fresh, tmp_path)  # plain PEFT, unpatched
        assert fused_layers(loaded) == 0
        torch.testing.assert_close(loaded(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)
        merged = copy.deepcopy(model).merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, logits, rtol=1e-4, atol=1e-4)
        with model.disable_adapter():  # PEFT's own path, silently: the base model
            torch.testing.assert_close(model(input_ids=ids).logits, base_logits)
        assert not torch.allclose(base_logits, logits, atol=1e-3)


def test_dropout_falls_back_with_one_warning(ids):
    model = lora_model(lora_dropout=0.1).train()
    reference = copy.deepcopy(model)
    with pytest.warns(RuntimeWarning, match="lora_dropout > 0 in training mode") as caught:
        assert patch(model) == N_LORA_LAYERS
        for _ in range(2):
            torch.manual_seed(1)
            loss = model(input_ids=ids, labels=ids).loss
    assert len([w for w in caught if "dafast" in str(w.message)]) == 1
    torch.manual_seed(1)
    torch.testing.assert_close(loss, reference(input_ids=ids, labels=ids).loss, rtol=0, atol=0)
    model.eval()  # dropout is the identity in eval mode: fused, without a warning
    reference.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits,
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["dora", "two-adapters"])
def test_unsupported_layers_run_peft_with_one_warning(ids, case):
    if case == "dora":
        model = lora_model(use_dora=True)
        match = "DoRA"
    else:
        model = lora_model()
        model.add_adapter("other", peft.LoraConfig(r=4, target_modules="all-linear"))
        model.base_model.set_adapter(["default", "other"])
        match = "several active adapters"
    loss, grads = loss_and_grads(model, ids)
    with pytest.warns(RuntimeWarning, match=match) as caught:
        patch(model)
        fused_loss, fused_grads = loss_and_grads(model, ids)
        loss_and_grads(model, ids)
    assert len([w for w in caught if "dafast" in str(w.message)]) == 1
    assert torch.equal(fused_loss, loss)
    for name, g in grads.items():
        assert torch.equal(fused_grads[name], g), name


def test_patch_is_idempotent_and_unpatch_restores():
    model = lora_model()
    assert patch(model) == N_LORA_LAYERS
    assert patch(model) == N_LORA_LAYERS and fused_layers(model) == N_LORA_LAYERS
    assert unpatch(model) == N_LORA_LAYERS
    assert unpatch(model) == 0
    assert all("forward" not in vars(m) for m in model.modules())
