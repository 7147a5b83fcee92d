"""The chunked linear cross-entropy (`config.loss_chunk_size`) against transformers' own causal-LM loss on full
logits (the model with loss_chunk_size=0): same loss and the same gradient for every parameter, with ignored labels,
a chunk that does not divide the tokens, tied embeddings, gradient accumulation's num_items_in_batch and bf16
autocast; evaluation mode keeps returning logits."""

import pytest
import torch

from conftest import perturbed_model, relative_error, tiny_config

VOCAB = 64


def batch(seed=0, rows=3, length=23):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, length), generator=generator)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt that is not scored
    labels[2, -4:] = -100  # right padding
    return ids, labels


def loss_and_grads(model, ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, use_cache=False, **kwargs)
    out.loss.backward()
    return out, {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def reference_model(model):
    reference = type(model)(tiny_config(**{**model.config.to_diff_dict(), "loss_chunk_size": 0}))
    reference.load_state_dict(model.state_dict())
    return reference.train()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_chunked_loss_equals_the_full_logits_loss(tied, chunk):
    model = perturbed_model(tiny_config(decay_type="gla", tie_word_embeddings=tied, loss_chunk_size=chunk), seed=1)
    model.train()
    ids, labels = batch()
    out, grads = loss_and_grads(model, ids, labels)
    expected_out, expected_grads = loss_and_grads(reference_model(model), ids, labels)
    assert out.logits is None and expected_out.logits.shape == (3, 23, VOCAB)
    assert relative_error(out.loss, expected_out.loss) <= 1e-6
    # tied: one parameter carries the embedding's and the head's gradient
    assert grads.keys() == expected_grads.keys() and ("lm_head.weight" in grads) is not tied
    for name, grad in expected_grads.items():
        assert float(grad.norm()) > 0, name
        assert relative_error(grads[name], grad) <= 1e-5, (name, relative_error(grads[name], grad))


def test_num_items_in_batch_divides_the_summed_loss():
    """Gradient accumulation: the Trainer passes the number of labelled tokens of the whole accumulated batch."""
    model = perturbed_model(tiny_config(decay_type="mamba2", loss_chunk_size=10), seed=2).train()
    ids, labels = batch(seed=3)
    reference = reference_model(model)
    for items in (50, torch.tensor(123)):
        out, grads = loss_and_grads(model, ids, labels, num_items_in_batch=items)
        expected_out, expected_grads = loss_and_grads(reference, ids, labels, num_items_in_batch=items)
        assert relative_error(out.loss, expected_out.loss) <= 1e-6
        for name, grad in expected_grads.items():
            assert relative_error(grads[name], grad) <= 1e-5, name
    # and the plain mean is a different number: the divisor really is used
    plain, _ = loss_and_grads(model, ids, labels)
    assert abs(plain.loss.item() - out.loss.item()) > 0.1 * plain.loss.item()


def test_bf16_autocast_stays_close_to_the_full_logits_loss():
    model = perturbed_model(tiny_config(decay_type="simple", decay_granularity="scalar", loss_chunk_size=16), seed=4)
    model.train()
    ids, labels = batch(seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = loss_and_grads(model, ids, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_out, expected_grads = loss_and_grads(reference_model(model), ids, labels)
    assert relative_error(out.loss, expected_out.loss) <= 1e-2
    assert relative_error(torch.cat([g.flatten() for g in grads.values()]),
                          torch.cat([expected_grads[n].flatten() for n in grads])) <= 3e-2


def test_evaluation_mode_and_unlabelled_forward_keep_the_logits():
    model = perturbed_model(tiny_config(loss_chunk_size=8), seed=6)
    ids, labels = batch(seed=7)
    model.eval()
    with torch.no_grad():
        evaluated = model(input_ids=ids, labels=labels, use_cache=False)
        expected = reference_model(model).eval()(input_ids=ids, labels=labels, use_cache=False)
    assert torch.allclose(evaluated.logits, expected.logits) and torch.allclose(evaluated.loss, expected.loss)
    model.train()
    assert model(input_ids=ids, use_cache=False).logits.shape == (3, 23, VOCAB)


def test_all_labels_ignored_gives_nan_like_transformers():
    model = perturbed_model(tiny_config(loss_chunk_size=8), seed=8).train()
    ids, labels = batch(seed=9)
    labels[:] = -100
    chunked = model(input_ids=ids, labels=labels, use_cache=False).loss
    full = reference_model(model)(input_ids=ids, labels=labels, use_cache=False).loss
    assert torch.isnan(full) and torch.isnan(chunked)


def test_trainer_with_gradient_accumulation_takes_the_same_steps(tmp_path):
    """Two optimizer steps of 2 × 2 accumulated micro-batches through the stock Trainer: the chunked loss and the
    full-logits loss end at the same weights and log the same losses."""
    from transformers import Trainer, TrainingArguments

    ids, labels = batch(seed=10, rows=8, length=17)
    rows = [{"input_ids": i, "labels": l} for i, l in zip(ids, labels)]
    results = {}
    for chunk in (0, 5):
        model = perturbed_model(tiny_config(decay_type="hgrn2", loss_chunk_size=chunk), seed=11)
        args = TrainingArguments(output_dir=str(tmp_path / str(chunk)), per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-2, logging_steps=1,
                                 save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                                 train_sampling_strategy="sequential")
        trainer = Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        results[chunk] = (losses, {n: p.detach().clone() for n, p in model.named_parameters()})
    (full_losses, full_weights), (chunked_losses, chunked_weights) = results[0], results[5]
    assert len(full_losses) == 2 and chunked_losses == pytest.approx(full_losses, rel=1e-5)
    for name, weight in full_weights.items():
        assert relative_error(chunked_weights[name], weight) <= 1e-5, name


@pytest.mark.parametrize("num_items", [None, 40])
def test_chunked_loss_never_reads_the_device(num_items):
    """No host-device synchronisation in the loss, forward or backward (on a GPU the host then queues the backward
    while the forward still runs): no op that reads a value to the host, and no boolean-mask indexing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from linear_decay.loss import chunked_linear_cross_entropy

    reading = {"aten::_local_scalar_dense", "aten::nonzero", "aten::item", "aten::is_nonzero", "aten::masked_select"}
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name
            if name in reading or (name == "aten::index" and any(
                    t is not None and t.dtype == torch.bool for t in args[1])):
                seen.append(name)
            return func(*args, **(kwargs or {}))

    generator = torch.Generator().manual_seed(11)
    hidden = torch.randn(3, 23, 16, generator=generator, requires_grad=True)
    weight = torch.randn(VOCAB, 16, generator=generator, requires_grad=True)
    _, labels = batch(seed=12)
    items = None if num_items is None else torch.tensor(num_items)
    with Record():
        loss = chunked_linear_cross_entropy(hidden, weight, labels, 7, items)
        loss.backward()
    assert seen == []
    assert torch.isfinite(loss) and hidden.grad is not None and weight.grad is not None
