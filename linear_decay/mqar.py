"""Multi-query associative recall (MQAR, Zoology / Based): a synthetic recall probe for the decays of DESIGN.md §2.

A decay forgets; MQAR measures what is still recallable. Every example is one sequence of `seq_len` tokens:

    k_1 v_1 k_2 v_2 ... k_n v_n | x x k_a v_a x x x k_b v_b x ... x
    \\_____ n = num_pairs _____/   \\____ num_queries queries in the rest ____/

- Vocabulary of `vocab_size` tokens, split into disjoint ranges: token 0 is the filler, keys are
  [1, vocab_size // 2), values are [vocab_size // 2, vocab_size) (Zoology's split).
- Context: `num_pairs` distinct keys, each followed by its value (values drawn independently, so two keys may share
  a value).
- Queries: `num_queries` distinct keys drawn from the inserted ones (so num_queries <= num_pairs), each placed on an
  even offset of the region after the context and followed by its value. As in Zoology, the slot j (0 = right after
  the context) is chosen with probability ∝ (j + 1)^(a − 1), a = `query_gap_power` (0.01: mostly short gaps, with a
  long tail); `query_gap_power=None` places queries uniformly.
- Mixed difficulty (`min_pairs`): each example draws its own number of pairs n uniformly from [min_pairs,
  num_pairs] and asks min(num_queries, n) of them, the rest of its sequence after its 2n context tokens. Zoology
  trains on such a mixture (few pairs up to many); easy examples let a model find the recall mechanism that the hard
  ones need. Held-out sets are usually made at the full `num_pairs`.
- Filler: every other position holds noise, as in Zoology's `random_non_queries`: a token drawn uniformly from the
  whole vocabulary (`noise="random"`, the default), or token 0 (`noise="zero"`). Noise is never labelled.

`labels` follow the Hugging Face causal-LM convention (aligned with `input_ids`; the model shifts them): -100
everywhere except at each query's value, where the label is that value. So the position whose next token is the
recalled value is the query key, and the model is scored on predicting the value from it. `mqar_accuracy` does the
shift. Examples are a deterministic function of the arguments (numpy's PCG64 seeded with `seed`): the same call gives
the same dataset on every machine.
"""

import numpy as np
import torch

IGNORE_INDEX = -100
FILLER_TOKEN = 0


def mqar_token_ranges(vocab_size):
    """(keys, values): the half-open token ranges [start, stop) of keys and values."""
    return (1, vocab_size // 2), (vocab_size // 2, vocab_size)


def check_mqar_knobs(vocab_size, num_pairs, num_queries, seq_len):
    """Raise ValueError unless the knobs describe a possible MQAR example."""
    if vocab_size < 4:
        raise ValueError(f"mqar: vocab_size={vocab_size} must be at least 4 (filler, keys and values)")
    (key_start, key_stop), _ = mqar_token_ranges(vocab_size)
    if not 1 <= num_pairs <= key_stop - key_start:
        raise ValueError(f"mqar: num_pairs={num_pairs} must lie in [1, {key_stop - key_start}] "
                         f"(distinct keys available with vocab_size={vocab_size})")
    if not 1 <= num_queries <= num_pairs:
        raise ValueError(f"mqar: num_queries={num_queries} must lie in [1, num_pairs={num_pairs}] "
                         "(each query asks for a distinct inserted key)")
    query_slots = (seq_len - 2 * num_pairs) // 2
    if query_slots < num_queries:
        raise ValueError(f"mqar: seq_len={seq_len} is too short for {num_pairs} pairs and {num_queries} queries "
                         f"(needs at least {2 * (num_pairs + num_queries)})")


def _query_slot_probabilities(num_slots, query_gap_power):
    if query_gap_power is None:
        return np.full(num_slots, 1.0 / num_slots)
    weights = np.arange(1, num_slots + 1, dtype=np.float64) ** (query_gap_power - 1.0)
    return weights / weights.sum()


def mqar_examples(num_examples, *, vocab_size, num_pairs, num_queries, seq_len, seed, query_gap_power=0.01,
                  noise="random", min_pairs=None):
    """(input_ids, labels): two int64 arrays [num_examples, seq_len] in the format of the module docstring;
    `min_pairs` mixes pair counts (module docstring)."""
    check_mqar_knobs(vocab_size, num_pairs, num_queries, seq_len)
    if min_pairs is not None and not 1 <= min_pairs <= num_pairs:
        raise ValueError(f"mqar: min_pairs={min_pairs} must lie in [1, num_pairs={num_pairs}]")
    if noise not in ("random", "zero"):
        raise ValueError(f"mqar: noise={noise!r}; allowed: 'random', 'zero'")
    rng = np.random.default_rng(seed)
    (key_start, key_stop), (value_start, value_stop) = mqar_token_ranges(vocab_size)
    slot_probabilities = {}  # pair count -> the query slots' probabilities after its context

    if noise == "random":
        input_ids = rng.integers(0, vocab_size, size=(num_examples, seq_len), dtype=np.int64)
    else:
        input_ids = np.full((num_examples, seq_len), FILLER_TOKEN, dtype=np.int64)
    labels = np.full((num_examples, seq_len), IGNORE_INDEX, dtype=np.int64)
    pair_counts = (np.full(num_examples, num_pairs) if min_pairs is None
                   else rng.integers(min_pairs, num_pairs + 1, size=num_examples))
    for row, pairs in enumerate(pair_counts.tolist()):
        context, queries = 2 * pairs, min(num_queries, pairs)
        if pairs not in slot_probabilities:
            slot_probabilities[pairs] = _query_slot_probabilities((seq_len - context) // 2, query_gap_power)
        keys = rng.choice(np.arange(key_start, key_stop), size=pairs, replace=False)
        values = rng.integers(value_start, value_stop, size=pairs)
        input_ids[row, 0:context:2] = keys
        input_ids[row, 1:context:2] = values
        asked = rng.choice(pairs, size=queries, replace=False)
        slots = rng.choice(len(slot_probabilities[pairs]), size=queries, replace=False,
                           p=slot_probabilities[pairs])
        key_positions = context + 2 * slots
        input_ids[row, key_positions] = keys[asked]
        input_ids[row, key_positions + 1] = values[asked]
        labels[row, key_positions + 1] = values[asked]
    return input_ids, labels


def mqar_dataset(num_examples, *, vocab_size, num_pairs, num_queries=None, seq_len, seed, query_gap_power=0.01,
                 noise="random", min_pairs=None):
    """A `datasets.Dataset` of MQAR examples with `input_ids` and `labels` (module docstring); `num_queries`
    defaults to `num_pairs` (every key asked once, as in Zoology)."""
    from datasets import Dataset  # only here: mqar_examples and the scoring need no `datasets`

    num_queries = num_pairs if num_queries is None else num_queries
    input_ids, labels = mqar_examples(num_examples, vocab_size=vocab_size, num_pairs=num_pairs,
                                      num_queries=num_queries, seq_len=seq_len, seed=seed,
                                      query_gap_power=query_gap_power, noise=noise, min_pairs=min_pairs)
    return Dataset.from_dict({"input_ids": input_ids.tolist(), "labels": labels.tolist()})


def _as_tensor(array):
    return array if isinstance(array, torch.Tensor) else torch.as_tensor(np.asarray(array))


def mqar_recall_counts(logits, labels):
    """(correct, total) recalls: the prediction at position t (argmax of logits[t], or predicted ids when `logits`
    has the rank of `labels`) is scored against labels[t + 1] wherever that label is not -100."""
    logits, labels = _as_tensor(logits), _as_tensor(labels)
    predictions = logits.argmax(-1) if logits.dim() == labels.dim() + 1 else logits
    predictions, targets = predictions[..., :-1], labels[..., 1:].to(predictions.device)
    scored = targets != IGNORE_INDEX
    return int((predictions[scored] == targets[scored]).sum()), int(scored.sum())


def mqar_accuracy(logits, labels):
    """Fraction of recalled values predicted exactly (argmax) from their query key; NaN when nothing is labelled.
    Accepts torch tensors or numpy arrays (e.g. a Trainer `EvalPrediction`), logits [..., T, V] or ids [..., T]."""
    correct, total = mqar_recall_counts(logits, labels)
    return correct / total if total else float("nan")


__all__ = ["mqar_dataset", "mqar_examples", "mqar_accuracy", "mqar_recall_counts", "mqar_token_ranges",
           "check_mqar_knobs", "IGNORE_INDEX", "FILLER_TOKEN"]
