"""The token mixer's input projections in one matmul (`fused_projections`, training only): the same loss and the same
gradient for every parameter as each projection on its own, for every kind of decay projection (low-rank vector,
scalar, none, shared with the key); one matmul where there were five; and layers that are not plain `nn.Linear`
(hooked, subclassed: LoRA adapters, quantised layers) keep running as themselves."""

import pytest
import torch
import torch.nn as nn

import linear_decay.modeling_linear_decay as modeling
from conftest import perturbed_model, relative_error, tiny_config


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("overrides", [
    dict(decay_type="gla"),  # low-rank vector decay projection and the output gate
    dict(decay_type="mamba2", decay_granularity="scalar"),  # d -> H decay projection
    dict(decay_type="tnl"),  # static decay: no decay projection
    dict(decay_type="hgrn2", share_decay=True, use_output_gate=False),  # z = W_k x, no gate
], ids=["gla", "mamba2-scalar", "tnl", "hgrn2-shared-no-gate"])
def test_fused_projections_equal_separate_ones(monkeypatch, overrides):
    model = perturbed_model(tiny_config(**overrides), seed=3)
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(1))
    loss, grads = loss_and_grads(model, ids)
    monkeypatch.setattr(modeling, "_plain_linear", lambda layer: False)  # every projection on its own
    expected_loss, expected_grads = loss_and_grads(model, ids)
    assert relative_error(loss, expected_loss) <= 1e-6
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        assert relative_error(grads[name], grad) <= 1e-5, name


def test_one_matmul_for_the_inputs_of_the_mixer():
    model = modeling.LinearDecayForCausalLM(tiny_config(decay_type="gla", num_hidden_layers=1))
    attention = model.model.layers[0].attn
    x = torch.randn(1, 5, 32)
    layers = [attention.q_proj, attention.k_proj, attention.v_proj, attention.decay_proj[0], attention.gate_proj[0]]
    calls = []
    original = torch.nn.functional.linear
    torch.nn.functional.linear = lambda *args: calls.append(tuple(args[1].shape)) or original(*args)
    try:
        outputs = modeling.fused_projections(x, layers)
        assert calls == [(32 * 3 + 8 + attention.head_dim, 32)]
        with torch.no_grad():  # inference: no weight copy, each layer on its own
            separate = modeling.fused_projections(x, layers)
        assert calls[1:] == [tuple(layer.weight.shape) for layer in layers]
    finally:
        torch.nn.functional.linear = original
    assert [tuple(o.shape) for o in outputs] == [(1, 5, layer.out_features) for layer in layers]
    for output, reference, layer in zip(outputs, separate, layers):
        assert relative_error(output, layer(x)) <= 1e-6 and relative_error(reference, layer(x)) == 0


def test_hooked_and_subclassed_layers_run_as_themselves():
    model = modeling.LinearDecayForCausalLM(tiny_config(decay_type="gla", num_hidden_layers=1)).train()
    attention = model.model.layers[0].attn
    ids = torch.randint(0, 64, (1, 6))
    seen = []
    handle = attention.v_proj.register_forward_hook(lambda module, args, output: seen.append(1) or output * 0)
    silenced = model(input_ids=ids, labels=ids, use_cache=False).loss
    handle.remove()
    assert seen == [1]  # the hook ran, and its zeroed values reached the loss:
    assert abs(float(silenced) - float(model(input_ids=ids, labels=ids, use_cache=False).loss)) > 1e-6

    class Adapted(nn.Linear):  # e.g. a LoRA layer: its own forward adds to the base weight's output
        def forward(self, x):
            return super().forward(x) + 1.0

    adapted = Adapted(32, 32, bias=False)
    adapted.weight = attention.q_proj.weight
    assert not modeling._plain_linear(adapted)
    outputs = modeling.fused_projections(torch.zeros(1, 2, 32), [adapted, attention.k_proj])
    assert torch.equal(outputs[0], torch.ones(1, 2, 32))
