"""LoRA fine-tuning with peft: `LoraConfig()` finds this model type's default target modules, a fine-tune through
transformers' Trainer lowers the loss, the adapter saves and reloads to the same logits, `merge_and_unload()` gives the
adapter model's logits, and the fused input projections of the mixer (`fused_projections`) keep the adapters' output:
the same loss and gradients as running every projection on its own."""

import math

import pytest
import torch
import torch.nn as nn
from transformers import Trainer, TrainingArguments

import linear_decay.modeling_linear_decay as modeling
from linear_decay import LinearDecayForCausalLM
from conftest import perturbed_model, relative_error, tiny_config

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

# fp32 throughout: a merged weight W + s·BA and the adapter's x Wᵀ + s·(x Aᵀ)Bᵀ differ by rounding only
FP32_RTOL = 1e-5


def lora_model(config, seed=0, **lora):
    """A perturbed base model with LoRA adapters whose B is not zero (`init_lora_weights=False`), so that the adapters
    change the logits from the start."""
    base = perturbed_model(config, seed=seed)
    torch.manual_seed(seed + 1)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora))


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_config_without_target_modules_takes_the_model_defaults():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    assert TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["linear_decay"] == list(modeling.PEFT_TARGET_MODULES)
    config = tiny_config(decay_type="gla", num_hidden_layers=3)
    model = get_peft_model(perturbed_model(config), LoraConfig())
    adapted = sorted(name.removeprefix("base_model.model.") for name, module in model.named_modules()
                     if isinstance(module, LoraLayer))
    assert adapted == sorted(f"model.layers.{i}.attn.{target}" for i in range(3) for target in ("q_proj", "v_proj"))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)


class RepeatedSequences(torch.utils.data.Dataset):
    """Four fixed random token sequences (drawn with `seed`), repeated: what a LoRA of the attention projections can
    learn in a few dozen steps."""

    def __init__(self, vocab_size, seed, length=24, count=64):
        self.patterns = torch.randint(0, vocab_size, (4, length), generator=torch.Generator().manual_seed(seed))
        self.count = count

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        ids = self.patterns[index % len(self.patterns)]
        return {"input_ids": ids, "labels": ids}


def pretrained_base(config, path, steps=50):
    """A base model trained (all weights, plain loop) to memorise four other sequences, saved to `path`: a randomly
    initialised model cannot be fine-tuned through LoRA alone, its final norm and small LM head bound the logits."""
    torch.manual_seed(0)
    model = LinearDecayForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = RepeatedSequences(config.vocab_size, seed=1).patterns.repeat(2, 1)
    for _ in range(steps):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(path)
    return path


def test_lora_fine_tune_with_trainer_then_save_reload_and_merge(tmp_path):
    """LoRA with the default targets through Trainer; the adapter's save / reload and its merge."""
    config = tiny_config(decay_type="mamba2")
    base_path = pretrained_base(config, tmp_path / "base")
    model = get_peft_model(LinearDecayForCausalLM.from_pretrained(base_path), LoraConfig(r=8, lora_alpha=16))
    data = RepeatedSequences(config.vocab_size, seed=2)
    ids = data.patterns
    base_logits = logits(model, ids)  # B = 0: the adapter starts as the identity
    steps = 40
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=steps, per_device_train_batch_size=8,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                             seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    assert trainer.train().global_step == steps
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == steps and all(math.isfinite(loss) for loss in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, losses
    assert not any(p.requires_grad for name, p in model.named_parameters() if "lora_" not in name)

    tuned = logits(model, ids)
    assert relative_error(tuned, base_logits) > 1e-2  # the adapter moved the model
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()

    reloaded = PeftModel.from_pretrained(LinearDecayForCausalLM.from_pretrained(base_path), tmp_path / "adapter")
    assert torch.equal(logits(reloaded, ids), tuned)

    merged = reloaded.merge_and_unload()
    assert not any(isinstance(module, LoraLayer) for module in merged.modules())
    assert relative_error(logits(merged, ids), tuned) <= FP32_RTOL


@pytest.mark.parametrize("overrides", [
    dict(decay_type="gla"),  # low-rank vector decay projection and the output gate: five input projections
    dict(decay_type="hgrn2", share_decay=True, position_encoding="rope"),  # keys from the decay, no decay projection
    dict(decay_type="tnl", use_output_gate=False),  # q, k, v only
], ids=["gla", "hgrn2-shared-rope", "tnl-no-gate"])
def test_merge_and_unload_gives_the_adapter_logits(overrides):
    model = lora_model(tiny_config(**overrides), target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    ids = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(2))
    adapted = logits(model, ids)
    with model.disable_adapter():
        base = logits(model, ids)
    assert relative_error(adapted, base) > 1e-2
    merged = model.merge_and_unload()
    assert relative_error(logits(merged, ids), adapted) <= FP32_RTOL


def loss_and_grads(model, ids):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("targets", [
    ["q_proj", "v_proj"],  # the defaults: k, the decay's and the gate's first layers stay fused
    ["q_proj", "k_proj", "v_proj", "decay_proj.0", "gate_proj.0"],  # every fused projection adapted
], ids=["defaults", "all-fused-inputs"])
def test_fused_projections_keep_the_adapters(monkeypatch, targets):
    """Training-mode loss and gradients (LoRA's and, with the base unfrozen, the base weights') with the fused input
    projections equal those with every projection run on its own; and an adapted projection's output in the fused call
    is the adapter layer's own output, not its base weight's."""
    model = lora_model(tiny_config(decay_type="gla"), seed=3, target_modules=targets)
    for param in model.parameters():
        param.requires_grad_(True)
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(1))

    attention = model.base_model.model.model.layers[0].attn
    layers = [attention.q_proj, attention.k_proj, attention.v_proj, attention.decay_proj[0], attention.gate_proj[0]]
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    adapted = [layer for layer in layers if isinstance(layer, LoraLayer)]
    assert len(adapted) == sum(1 for t in targets if t in ("q_proj", "k_proj", "v_proj", "decay_proj.0",
                                                             "gate_proj.0"))
    plain = [layer for layer in layers if not isinstance(layer, LoraLayer)]
    shapes, linear = [], torch.nn.functional.linear
    torch.nn.functional.linear = lambda *args, **kwargs: shapes.append(tuple(args[1].shape)) or linear(*args, **kwargs)
    try:
        with torch.enable_grad():
            outputs = modeling.fused_projections(x, layers)
    finally:
        torch.nn.functional.linear = linear
    stacked = (sum(layer.out_features for layer in plain), 32)
    assert (stacked in shapes) == (len(plain) >= 2)  # the plain projections still run as one matmul
    for layer, output in zip(layers, outputs):
        with torch.no_grad():
            assert relative_error(output, layer(x)) <= FP32_RTOL
            if isinstance(layer, LoraLayer):
                assert relative_error(output, layer.get_base_layer()(x)) > 1e-3

    loss, grads = loss_and_grads(model, ids)
    monkeypatch.setattr(modeling, "_plain_linear", lambda layer: False)  # every projection on its own
    expected_loss, expected_grads = loss_and_grads(model, ids)
    assert relative_error(loss, expected_loss) <= 1e-6
    assert grads.keys() == expected_grads.keys()
    assert any("lora_" in name for name in grads)
    for name, grad in expected_grads.items():
        assert relative_error(grads[name], grad) <= FP32_RTOL, name


def test_plain_linear_rejects_what_is_not_a_bare_linear():
    layer = nn.Linear(8, 8, bias=False)
    assert modeling._plain_linear(layer)
    assert not modeling._plain_linear(nn.Linear(8, 8, bias=True))
    hooked = nn.Linear(8, 8, bias=False)
    hooked.register_full_backward_hook(lambda *args: None)
    assert not modeling._plain_linear(hooked)
    parametrised = nn.Linear(8, 8, bias=False)
    torch.nn.utils.parametrize.register_parametrization(parametrised, "weight", nn.Identity())
    assert not modeling._plain_linear(parametrised)
    wrapped = get_peft_model(nn.Sequential(nn.Linear(8, 8, bias=False)), LoraConfig(target_modules=["0"]))
    assert not modeling._plain_linear(wrapped.base_model.model[0])
    assert modeling._plain_linear(wrapped.merge_and_unload()[0])
