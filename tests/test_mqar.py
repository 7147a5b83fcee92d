"""MQAR data (linear_decay/mqar.py): determinism, labels recomputed from the sequence, knobs, batching, the accuracy
metric against a hand count, and a tiny decay model that learns to recall above chance."""

import numpy as np
import pytest
import torch
from transformers import default_data_collator

from linear_decay import LinearDecayForCausalLM
from linear_decay.mqar import (
    FILLER_TOKEN,
    IGNORE_INDEX,
    mqar_accuracy,
    mqar_dataset,
    mqar_examples,
    mqar_recall_counts,
)

from conftest import tiny_config

KNOBS = dict(vocab_size=64, num_pairs=6, num_queries=4, seq_len=48)


def test_same_seed_same_data_other_seed_other_data():
    first = mqar_dataset(20, **KNOBS, seed=3)
    again = mqar_dataset(20, **KNOBS, seed=3)
    other = mqar_dataset(20, **KNOBS, seed=4)
    assert first["input_ids"] == again["input_ids"] and first["labels"] == again["labels"]
    assert first["input_ids"] != other["input_ids"]


@pytest.mark.parametrize("noise", ["random", "zero"])
def test_labels_are_the_values_bound_to_the_queried_keys(noise):
    """Recompute every label from the sequence alone: the context's key -> value map, then each query."""
    vocab, pairs, queries, length = KNOBS["vocab_size"], KNOBS["num_pairs"], KNOBS["num_queries"], KNOBS["seq_len"]
    input_ids, labels = mqar_examples(50, **KNOBS, seed=0, noise=noise)
    assert input_ids.shape == labels.shape == (50, length)
    for tokens, row_labels in zip(input_ids.tolist(), labels.tolist()):
        context_keys, context_values = tokens[0:2 * pairs:2], tokens[1:2 * pairs:2]
        assert len(set(context_keys)) == pairs
        assert all(1 <= k < vocab // 2 for k in context_keys)
        assert all(vocab // 2 <= v < vocab for v in context_values)
        binding = dict(zip(context_keys, context_values))

        labelled = [t for t, label in enumerate(row_labels) if label != IGNORE_INDEX]
        assert len(labelled) == queries
        asked = [tokens[t - 1] for t in labelled]
        assert len(set(asked)) == queries and set(asked) <= set(context_keys)
        for t in labelled:
            assert t - 1 >= 2 * pairs and (t - 1 - 2 * pairs) % 2 == 0  # query keys sit on even offsets after it
            assert row_labels[t] == tokens[t] == binding[tokens[t - 1]]
        if noise == "zero":
            query_positions = {p for t in labelled for p in (t - 1, t)}
            filler = [tokens[p] for p in range(2 * pairs, length) if p not in query_positions]
            assert filler and all(token == FILLER_TOKEN for token in filler)


def test_mixed_pair_counts():
    """min_pairs: each example asks min(num_queries, its pair count) keys (counts 2 and 3 occur beside the capped 4),
    and each label is the value bound to its key in that example's own context (recomputed from the tokens:
    a key's first occurrence is its context slot); min_pairs = num_pairs is a single count."""
    vocab, length = 64, 48
    input_ids, labels = mqar_examples(400, vocab_size=vocab, num_pairs=6, num_queries=4, seq_len=length, seed=5,
                                      min_pairs=2)
    asked_per_row = (labels != IGNORE_INDEX).sum(axis=1)
    assert set(asked_per_row.tolist()) == {2, 3, 4}
    for tokens, row_labels in zip(input_ids.tolist(), labels.tolist()):
        for t, label in enumerate(row_labels):
            if label == IGNORE_INDEX:
                continue
            key = tokens[t - 1]
            first = tokens.index(key)
            assert 1 <= key < vocab // 2 and first % 2 == 0 and first + 1 < t - 1
            assert tokens[first + 1] == label == tokens[t]
    # rows asking 2 or 3 keys hold that many pairs: their queries start after a context of that length
    short = np.flatnonzero(asked_per_row == 2)
    assert short.size and all(np.flatnonzero(labels[row] != IGNORE_INDEX).min() >= 2 * 2 + 1 for row in short)

    full = mqar_examples(50, **KNOBS, seed=7, min_pairs=KNOBS["num_pairs"])
    assert ((full[1] != IGNORE_INDEX).sum(axis=1) == KNOBS["num_queries"]).all()
    with pytest.raises(ValueError, match="min_pairs"):
        mqar_examples(5, **KNOBS, seed=0, min_pairs=KNOBS["num_pairs"] + 1)


def test_knobs_change_what_they_name():
    input_ids, labels = mqar_examples(200, vocab_size=1000, num_pairs=20, num_queries=7, seq_len=100, seed=1)
    assert input_ids.shape == (200, 100) and input_ids.min() >= 0 and input_ids.max() < 1000
    assert ((labels != IGNORE_INDEX).sum(axis=1) == 7).all()
    assert (input_ids[:, 0:40:2] < 500).all() and (input_ids[:, 1:40:2] >= 500).all()

    # Zoology's power law puts queries closer to the context than uniform placement does.
    def mean_query_offset(power):
        _, labels = mqar_examples(300, vocab_size=64, num_pairs=4, num_queries=4, seq_len=200, seed=2,
                                  query_gap_power=power)
        return np.argwhere(labels != IGNORE_INDEX)[:, 1].mean()

    assert mean_query_offset(0.01) < 0.7 * mean_query_offset(None)

    for bad in (dict(num_pairs=40), dict(num_queries=7), dict(seq_len=19), dict(vocab_size=3)):
        with pytest.raises(ValueError, match="mqar"):
            mqar_examples(1, **{**dict(vocab_size=64, num_pairs=6, num_queries=4, seq_len=48), **bad}, seed=0)
    with pytest.raises(ValueError, match="noise"):
        mqar_examples(1, **KNOBS, seed=0, noise="gaussian")
    assert len(mqar_dataset(3, vocab_size=64, num_pairs=5, seq_len=20, seed=0)[0]["labels"]) == 20
    assert sum(label != IGNORE_INDEX for label in mqar_dataset(3, vocab_size=64, num_pairs=5, seq_len=20,
                                                               seed=0)[0]["labels"]) == 5  # queries default: all


def test_batches_with_the_default_collator():
    dataset = mqar_dataset(10, **KNOBS, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=default_data_collator)
    batch = next(iter(loader))
    assert set(batch) == {"input_ids", "labels"}
    assert batch["input_ids"].shape == batch["labels"].shape == (4, KNOBS["seq_len"])
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    assert torch.equal(batch["input_ids"], torch.tensor(dataset["input_ids"][:4]))


def test_accuracy_counts_each_recall_from_its_query_key():
    input_ids, labels = mqar_examples(8, **KNOBS, seed=5)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, KNOBS["seq_len"], KNOBS["vocab_size"], generator=generator)
    rows, value_positions = np.nonzero(labels != IGNORE_INDEX)
    make_right = np.arange(len(rows)) % 3 == 0  # plant the right answer at every third query key
    for row, t in zip(rows[make_right], value_positions[make_right]):
        logits[row, t - 1, labels[row, t]] = 100.0
    expected_correct = sum(int(logits[r, t - 1].argmax() == labels[r, t]) for r, t in zip(rows, value_positions))
    assert expected_correct >= make_right.sum()

    assert mqar_recall_counts(logits, torch.tensor(labels)) == (expected_correct, len(rows))
    assert mqar_accuracy(logits, torch.tensor(labels)) == pytest.approx(expected_correct / len(rows))
    assert mqar_accuracy(logits.numpy(), labels) == pytest.approx(expected_correct / len(rows))
    assert mqar_accuracy(logits.argmax(-1).numpy(), labels) == pytest.approx(expected_correct / len(rows))
    assert np.isnan(mqar_accuracy(logits, torch.full_like(torch.tensor(labels), IGNORE_INDEX)))


def test_a_tiny_decay_model_learns_to_recall_above_chance():
    """Easy setting: 16 values (chance 1/16), 4 pairs, 24 tokens; Simple Decay p = 0.99 (DESIGN §2)."""
    knobs = dict(vocab_size=32, num_pairs=4, num_queries=4, seq_len=24)
    steps, batch = 100, 32
    train_ids, train_labels = map(torch.tensor, mqar_examples(steps * batch, **knobs, seed=0))
    eval_ids, eval_labels = map(torch.tensor, mqar_examples(256, **knobs, seed=1))
    torch.manual_seed(0)
    model = LinearDecayForCausalLM(tiny_config(vocab_size=32, hidden_size=64, intermediate_size=128, decay_rank=16,
                                               decay_type="simple", simple_decay_init=0.99))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for step in range(steps):
        rows = slice(step * batch, (step + 1) * batch)
        model(input_ids=train_ids[rows], labels=train_labels[rows]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        accuracy = mqar_accuracy(model(input_ids=eval_ids, use_cache=False).logits, eval_labels)
    chance = 1 / 16
    assert accuracy > 2.5 * chance, accuracy
