"""Training: `Trainer` lowers the loss on the bundled corpus; gradient checkpointing keeps loss and gradients."""

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, Trainer, TrainingArguments

import linear_decay
from linear_decay import DECAY_TYPES, LinearDecayForCausalLM

from conftest import perturbed_model, relative_error, tiny_config

DATA_DIR = Path(linear_decay.__file__).resolve().parent / "data"
CORPUS = DATA_DIR / "corpus.txt"
TOKENIZER = DATA_DIR / "tokenizer"
BLOCK = 64


class TokenBlocks(torch.utils.data.Dataset):
    """Consecutive blocks of a token stream as causal LM examples (labels = inputs)."""

    def __init__(self, blocks):
        self.blocks = blocks

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, index):
        return {"input_ids": self.blocks[index], "labels": self.blocks[index].clone()}


def to_blocks(token_ids):
    usable = len(token_ids) // BLOCK * BLOCK
    return torch.tensor(token_ids[:usable], dtype=torch.long).view(-1, BLOCK)


@pytest.fixture(scope="module")
def corpus_blocks():
    """Training blocks from the start of the bundled corpus, held-out blocks from its end."""
    assert CORPUS.is_file(), f"bundled corpus missing: {CORPUS}"
    assert TOKENIZER.is_dir(), f"bundled tokenizer missing: {TOKENIZER}"
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    text = CORPUS.read_text(encoding="utf-8")
    assert len(text) > 400_000
    train = to_blocks(tokenizer(text[:200_000], add_special_tokens=False)["input_ids"])
    held_out = to_blocks(tokenizer(text[-40_000:], add_special_tokens=False)["input_ids"])[:16]
    assert len(train) >= 320 and len(held_out) == 16
    return len(tokenizer), train, held_out


def held_out_loss(model, blocks):
    model.eval()
    with torch.no_grad():
        loss = model(blocks, labels=blocks, use_cache=False).loss.item()
    model.train()
    return loss


@pytest.mark.parametrize("overrides", [
    dict(decay_type="mamba2"),
    dict(decay_type="lightnet", share_decay=True, position_encoding="rope"),
], ids=["mamba2", "lightnet-shared-rope"])
def test_trainer_lowers_the_loss_on_the_bundled_corpus(corpus_blocks, tmp_path, overrides):
    vocab_size, train, held_out = corpus_blocks
    torch.manual_seed(0)
    config = tiny_config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, **overrides)
    model = LinearDecayForCausalLM(config)
    before = held_out_loss(model, held_out)
    assert abs(before - math.log(vocab_size)) < 0.2  # a fresh model is close to uniform

    steps = 40
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8,
                             learning_rate=3e-3, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                             seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=TokenBlocks(train))
    result = trainer.train()

    assert result.global_step == steps
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == steps
    assert all(math.isfinite(loss) for loss in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, f"training loss barely moved: first steps {first:.3f}, last steps {last:.3f}"
    # independent of Trainer's bookkeeping: the loss on held-out text from the end of the corpus drops too
    after = held_out_loss(model, held_out)
    assert after < before - 1.0, f"held-out loss {before:.3f} -> {after:.3f}"


GC_COMBOS = [
    (dict(decay_type="mamba2"), True),
    (dict(decay_type="hgrn2", decay_granularity="vector", position_encoding="tpe"), False),
    (dict(decay_type="lightnet", share_decay=True, position_encoding="rope"), True),
    (dict(decay_type="tnl_l", position_encoding="lrpe"), False),
    (dict(decay_type="simple", decay_granularity="scalar"), True),
]


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.* is deprecated:FutureWarning")
@pytest.mark.parametrize("overrides,use_reentrant", GC_COMBOS,
                         ids=["mamba2-reentrant", "hgrn2-tpe", "lightnet-shared-rope-reentrant", "tnl_l-lrpe",
                              "simple-scalar-reentrant"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(overrides, use_reentrant):
    model = perturbed_model(tiny_config(**overrides), seed=3)
    model.train()
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(4))
    labels = ids.clone()
    labels[0, :3] = -100

    calls = []
    hook = model.model.layers[0].attn.register_forward_hook(lambda *args: calls.append(1))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        return loss.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}

    reference_loss, reference_grads = loss_and_grads()
    assert len(calls) == 1
    calls.clear()

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert model.is_gradient_checkpointing
    checkpointed_loss, checkpointed_grads = loss_and_grads()
    hook.remove()
    assert len(calls) == 2, "the checkpointed layer was not recomputed in the backward pass"

    assert relative_error(checkpointed_loss, reference_loss) <= 1e-6
    assert checkpointed_grads.keys() == reference_grads.keys()
    for name, grad in reference_grads.items():
        assert float(grad.norm()) > 0, f"{name} has no gradient: the comparison would be vacuous"
        error = relative_error(checkpointed_grads[name], grad)
        assert error <= 1e-6, f"{name}: relative error {error:.3g}"


@pytest.mark.parametrize("strong", [False, True], ids=["initialised", "strong-decay"])
@pytest.mark.parametrize("decay_type", DECAY_TYPES)
def test_bf16_autocast_on_the_torch_path(decay_type, strong, monkeypatch, backend):
    """What Trainer's --bf16 does on CPU: the forward under torch.autocast(bfloat16), the backward outside it, on the
    PyTorch path, for every decay type, at initialisation and with every layer's log λ rescaled to reach −20 (the
    strong chunks of vector decay take the sub-chunk form). Loss and gradients are finite and the loss is the fp32
    model's within bf16's rounding of the projections."""
    backend("torch")
    if strong:
        import linear_decay.modeling_linear_decay as modeling

        attention = modeling.linear_decay_attention

        def strong_attention(q, k, v, log_decay, *args, **kwargs):
            if log_decay is not None:
                log_decay = log_decay * (20.0 / log_decay.detach().abs().amax().clamp(min=1e-6))
            return attention(q, k, v, log_decay, *args, **kwargs)

        monkeypatch.setattr(modeling, "linear_decay_attention", strong_attention)
    config = tiny_config(decay_type=decay_type)
    torch.manual_seed(0)
    model = LinearDecayForCausalLM(config)
    input_ids = torch.randint(0, config.vocab_size, (2, 70), generator=torch.Generator().manual_seed(1))
    expected = model(input_ids, labels=input_ids, use_cache=False).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids, labels=input_ids, use_cache=False).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert abs(float(loss) - float(expected)) <= 2 ** -8 * 4 * abs(float(expected))
