"""Generation with the recurrent cache, for every supported point of the design space (DESIGN.md §1–4, §7).

Every check compares the code path under test with an independent reference computed without it: cached decoding
against uncached decoding or one full forward pass, a left-padded batch against each row run alone, beam scores
against log-probs recomputed from a plain forward pass, sampled tokens against the ranks of recomputed logits.
"""

import functools
import inspect

import pytest
import torch
from transformers import GenerationMixin

import linear_decay
from linear_decay import LinearDecayCache
from linear_decay.modeling_linear_decay import CACHE_FIELD, RECURRENT_MAX_TOKENS

from conftest import combo_id, perturbed_model, relative_error, tiny_config

PAD = 0  # pad token id; real prompt tokens below are drawn from [1, vocab)
TOLERANCE = 1e-5

COMBOS = linear_decay.valid_combinations()




# A few diverse combinations for the more expensive checks: every decay family, both granularities, sharing, and
# every position encoding (rope / lrpe offsets, tpe state, lightnet's running normaliser).
SUBSET = [
    ("mamba2", "vector", False, "rope"),
    ("mamba2", "scalar", False, "tpe"),
    ("gla", "vector", True, "lrpe"),
    ("hgrn2", "vector", False, "tpe"),
    ("hgrn2", "scalar", False, "rope"),
    ("lightnet", "vector", False, "lrpe"),
    ("lightnet", "vector", True, "rope"),
    ("lightnet", "scalar", False, "tpe"),
    ("tnl", "scalar", False, "lrpe"),
    ("tnl_l", "scalar", False, "rope"),
    ("simple", "vector", True, "none"),
    ("none", "scalar", False, "tpe"),
]
ROPE_LIKE = [
    ("mamba2", "vector", False, "rope"),
    ("lightnet", "vector", False, "lrpe"),
    ("tnl_l", "scalar", False, "rope"),
]
assert all(combo in COMBOS for combo in SUBSET + ROPE_LIKE)  # every listed combination is supported

all_combos = pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
subset_combos = pytest.mark.parametrize("combo", SUBSET, ids=combo_id)


@functools.lru_cache(maxsize=None)
def _model(combo):
    decay_type, granularity, share, position = combo
    config = tiny_config(decay_type=decay_type, decay_granularity=granularity, share_decay=share,
                         position_encoding=position, pad_token_id=PAD)
    return perturbed_model(config, seed=0).eval()


def model_for(combo):
    model = _model(combo)
    assert not model.training
    return model


def random_ids(batch, length, seed):
    return torch.randint(1, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def full_logits(model, ids, **kwargs):
    """The reference: one uncached forward pass over the whole sequence."""
    with torch.no_grad():
        return model(ids, use_cache=False, **kwargs).logits


def greedy(model, ids, max_new_tokens, **kwargs):
    return model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True,
                          output_logits=True, **kwargs)


def left_pad(rows):
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
    return ids, mask


def state_shapes(cache):
    shapes = {}
    for index, layer in enumerate(cache.layers):
        for name, tensor in layer.tensors.items():
            shapes[f"layer{index}.{name}"] = tuple(tensor.shape)
    for name, tensor in cache.model_state.tensors.items():
        shapes[f"model.{name}"] = tuple(tensor.shape)
    return shapes


# ---------------------------------------------------------------------------------------------------------------
# Cached decoding against uncached decoding / the full forward pass (every combination)
# ---------------------------------------------------------------------------------------------------------------


@all_combos
def test_cached_greedy_generate_matches_uncached(combo):
    model = model_for(combo)
    prompt = random_ids(2, 6, seed=1)
    new = 12
    cached = greedy(model, prompt, new)
    uncached = greedy(model, prompt, new, use_cache=False)

    assert cached.sequences.shape == (2, 6 + new)
    assert torch.equal(cached.sequences[:, :6], prompt)
    assert torch.equal(cached.sequences, uncached.sequences)
    generated = cached.sequences[:, 6:]
    assert generated.unique().numel() > 2, "degenerate generation: the test would not tell decoders apart"
    for step, (a, b) in enumerate(zip(cached.logits, uncached.logits)):
        assert relative_error(a, b) <= TOLERANCE, f"step {step}"
    # and the step logits are the full forward pass's logits at the right positions
    reference = full_logits(model, cached.sequences)
    stepped = torch.stack(cached.logits, dim=1)
    assert relative_error(stepped, reference[:, 5:-1]) <= TOLERANCE


# prefill 12 (chunked path, output state), then 1,1 (decoding step), 3 at once (decoding step, several tokens),
# 10 at once (> RECURRENT_MAX_TOKENS: chunked path starting from the cached state), then 1 again.
SCHEDULE = [12, 1, 1, 3, 10, 1]


@all_combos
def test_prefill_then_step_matches_full_forward(combo):
    assert 3 <= RECURRENT_MAX_TOKENS < 10 < 12, "the schedule must exercise both paths with and without a state"
    model = model_for(combo)
    ids = random_ids(2, sum(SCHEDULE), seed=2)
    reference = full_logits(model, ids)

    cache, pos, errors = None, 0, {}
    with torch.no_grad():
        for n in SCHEDULE:
            kwargs = {CACHE_FIELD: cache} if cache is not None else {}
            out = model(ids[:, pos:pos + n], use_cache=True, **kwargs)
            cache = getattr(out, CACHE_FIELD)
            assert isinstance(cache, LinearDecayCache)
            assert out.logits.shape == (2, n, 64)
            errors[f"tokens {pos}:{pos + n}"] = relative_error(out.logits, reference[:, pos:pos + n])
            pos += n
            assert cache.get_seq_length() == pos
    assert max(errors.values()) <= TOLERANCE, errors


@all_combos
def test_left_padded_batch_matches_each_row_alone(combo):
    """Left padding must leave every row's state, rope/lrpe offsets, lightnet normaliser and tpe state untouched."""
    model = model_for(combo)
    generator = torch.Generator().manual_seed(3)
    lengths = [7, 3, 11]
    rows = [torch.randint(1, 64, (n,), generator=generator) for n in lengths]
    ids, mask = left_pad(rows)
    width = ids.shape[1]
    new = 8

    batched = greedy(model, ids, new, attention_mask=mask, pad_token_id=PAD)
    padded_last = full_logits(model, ids, attention_mask=mask)[:, -1]
    for i, row in enumerate(rows):
        alone = greedy(model, row[None], new, pad_token_id=PAD)
        assert torch.equal(batched.sequences[i, width:], alone.sequences[0, len(row):]), f"row {i}"
        for step in range(new):
            error = relative_error(batched.logits[step][i], alone.logits[step][0])
            assert error <= TOLERANCE, f"row {i}, step {step}: {error}"
        error = relative_error(padded_last[i], full_logits(model, row[None])[0, -1])
        assert error <= TOLERANCE, f"row {i} last-token logits: {error}"

    # The check is sensitive: ignoring the mask (pad tokens read as text) changes the padded rows well beyond the
    # tolerance (strong decays forget the pads quickly, so look at every real position, not only the last).
    unmasked = full_logits(model, ids)
    for i, row in enumerate(rows):
        if len(row) < width:
            error = relative_error(unmasked[i, width - len(row):], full_logits(model, row[None])[0])
            assert error > 10 * TOLERANCE, f"row {i}: padding without a mask changed nothing ({error:.3g})"


# ---------------------------------------------------------------------------------------------------------------
# Beam search, sampling
# ---------------------------------------------------------------------------------------------------------------


def recomputed_log_prob(model, sequences, prompt_length, **kwargs):
    """Σ log p(generated token | prefix) from one plain forward pass per sequence."""
    log_probs = full_logits(model, sequences, **kwargs).float().log_softmax(-1)
    targets = sequences[:, prompt_length:]
    return log_probs[:, prompt_length - 1:-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1).sum(-1)


@all_combos
def test_beam_search_scores_match_recomputed_log_probs(combo):
    model = model_for(combo)
    prompt = random_ids(2, 5, seed=4)
    beams = 3
    out = model.generate(prompt, num_beams=beams, num_return_sequences=beams, max_new_tokens=6, do_sample=False,
                         length_penalty=0.0, early_stopping=False, output_scores=True, return_dict_in_generate=True)
    sequences, scores = out.sequences, out.sequences_scores
    assert sequences.shape == (2 * beams, 5 + 6)
    assert torch.equal(sequences[:, :5], prompt.repeat_interleave(beams, dim=0))
    # length_penalty=0: a sequence's score is the plain sum of its tokens' log-probs
    expected = recomputed_log_prob(model, sequences, 5)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-5)
    for group in range(2):
        rows = slice(group * beams, (group + 1) * beams)
        assert (scores[rows][:-1] >= scores[rows][1:]).all(), "beams are returned best first"
        assert len({tuple(s.tolist()) for s in sequences[rows]}) == beams, "returned beams are distinct"
    # asking for one sequence returns the top beam of each prompt
    top = model.generate(prompt, num_beams=beams, num_return_sequences=1, max_new_tokens=6, do_sample=False,
                         length_penalty=0.0, early_stopping=False, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(top.sequences, sequences[::beams])
    torch.testing.assert_close(top.sequences_scores, recomputed_log_prob(model, top.sequences, 5),
                               atol=1e-4, rtol=1e-5)


@subset_combos
def test_beam_search_on_left_padded_batch_matches_rows_alone(combo):
    """Beam reordering must carry the per-row state (real-token counts, normaliser, tpe) with each beam."""
    model = model_for(combo)
    generator = torch.Generator().manual_seed(5)
    rows = [torch.randint(1, 64, (n,), generator=generator) for n in (6, 2, 9)]
    ids, mask = left_pad(rows)
    kwargs = dict(num_beams=3, max_new_tokens=5, do_sample=False, length_penalty=0.0, early_stopping=False,
                  output_scores=True, return_dict_in_generate=True, pad_token_id=PAD)
    batched = model.generate(ids, attention_mask=mask, **kwargs)
    for i, row in enumerate(rows):
        alone = model.generate(row[None], **kwargs)
        assert torch.equal(batched.sequences[i, ids.shape[1]:], alone.sequences[0, len(row):]), f"row {i}"
        torch.testing.assert_close(batched.sequences_scores[i], alone.sequences_scores[0], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(alone.sequences_scores[0], recomputed_log_prob(model, alone.sequences, len(row))[0],
                                   atol=1e-4, rtol=1e-5)


@all_combos
def test_sampling_is_reproducible_and_respects_top_k(combo):
    model = model_for(combo)
    prompt = random_ids(3, 5, seed=6)
    top_k, new = 3, 10
    kwargs = dict(do_sample=True, top_k=top_k, temperature=2.0, max_new_tokens=new)

    torch.manual_seed(11)
    first = model.generate(prompt, **kwargs)
    torch.manual_seed(11)
    second = model.generate(prompt, **kwargs)
    torch.manual_seed(12)
    other_seed = model.generate(prompt, **kwargs)
    assert torch.equal(first, second)
    assert not torch.equal(first, other_seed)

    # rank of every sampled token among the logits recomputed by a full forward pass of its prefix
    logits = full_logits(model, first)[:, 4:-1]
    chosen = first[:, 5:]
    rank = (logits > logits.gather(-1, chosen.unsqueeze(-1))).sum(-1)
    assert int(rank.max()) < top_k, rank
    assert int(rank.max()) > 0, "every token was the argmax: the test would not see top_k being ignored"


@subset_combos
def test_generate_from_inputs_embeds_matches_input_ids(combo):
    model = model_for(combo)
    prompt = random_ids(2, 5, seed=9)
    reference = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    embeds = model.get_input_embeddings()(prompt).detach()
    generated = model.generate(inputs_embeds=embeds, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, reference[:, 5:])  # decoder-only generate returns only the new tokens here


# ---------------------------------------------------------------------------------------------------------------
# Explicit cache, constant-size state
# ---------------------------------------------------------------------------------------------------------------


@all_combos
def test_generate_with_explicit_cache(combo):
    model = model_for(combo)
    prompt = random_ids(2, 5, seed=7)
    reference = model.generate(prompt, max_new_tokens=11, do_sample=False, use_cache=False)

    cache = LinearDecayCache(model.config)
    first = model.generate(prompt, max_new_tokens=6, do_sample=False, **{CACHE_FIELD: cache})
    assert torch.equal(first, reference[:, :11])
    seen = cache.get_seq_length()
    assert seen == 5 + 6 - 1  # the last generated token has not been fed yet
    assert cache.layers[0].get("recurrent") is not None

    # Continue from the filled cache: a linear cache is not sliced by generate, so pass only the unseen tokens with
    # the full attention mask (transformers' contract for restarting from a cache).
    second = model.generate(first[:, seen:], attention_mask=torch.ones_like(first), max_new_tokens=5,
                            do_sample=False, **{CACHE_FIELD: cache})
    assert torch.equal(second, reference[:, seen:])


def restart_inputs(sequences, seen):
    """The input_ids generate() expects when restarting from a filled cache without an attention mask: transformers
    versions that exempt linear caches from prefix slicing (`all(cache.is_linear)` in `_prefill`, 5.2x) take only the
    unseen tokens; older ones (5.17) take the full sequence and slice off the cached prefix themselves."""
    if "is_linear" in inspect.getsource(GenerationMixin._prefill):
        return sequences[:, seen:]
    return sequences


# rope/lrpe (the bug surface) plus two controls without position offsets
CONTINUE_COMBOS = ROPE_LIKE + [("mamba2", "scalar", False, "tpe"), ("lightnet", "vector", True, "none")]


@pytest.mark.parametrize("combo", CONTINUE_COMBOS, ids=combo_id)
def test_continue_from_explicit_cache_without_attention_mask(combo):
    """The cache keeps each row's count of real tokens, so rope/lrpe offsets must continue from it (DESIGN §4) when
    generation restarts from a filled cache without an attention mask, as they do in a plain cached forward call."""
    model = model_for(combo)
    prompt = random_ids(2, 5, seed=7)
    reference = model.generate(prompt, max_new_tokens=11, do_sample=False, use_cache=False)

    cache = LinearDecayCache(model.config)
    first = model.generate(prompt, max_new_tokens=6, do_sample=False, **{CACHE_FIELD: cache})
    seen = cache.get_seq_length()
    second = model.generate(restart_inputs(first, seen), max_new_tokens=5, do_sample=False, output_logits=True,
                            return_dict_in_generate=True, **{CACHE_FIELD: cache})
    assert cache.get_seq_length() == 5 + 11 - 1
    expected = full_logits(model, reference)[:, seen:-1]
    error = relative_error(torch.stack(second.logits, dim=1), expected)
    assert error <= TOLERANCE, f"continuation logits differ from the full forward pass (relative error {error:.3g})"
    assert torch.equal(second.sequences[:, -6:], reference[:, -6:])


@all_combos
def test_cache_state_has_constant_size(combo):
    model = model_for(combo)
    config = model.config
    ids = random_ids(2, 40, seed=8)
    with torch.no_grad():
        out = model(ids[:, :4], use_cache=True)
        cache = getattr(out, CACHE_FIELD)
        after_prefill = state_shapes(cache)
        numel = sum(t.numel() for layer in cache.layers for t in layer.tensors.values())
        for t in range(4, 40):
            model(ids[:, t:t + 1], use_cache=True, **{CACHE_FIELD: cache})
        after_steps = state_shapes(cache)
        long_prefill = state_shapes(getattr(model(ids, use_cache=True), CACHE_FIELD))

    assert cache.get_seq_length() == 40
    assert after_prefill == after_steps == long_prefill
    assert numel == sum(t.numel() for layer in cache.layers for t in layer.tensors.values())
    for index in range(config.num_hidden_layers):
        assert after_steps[f"layer{index}.recurrent"] == (2, config.num_heads, config.key_dim, config.head_dim)
    for name, shape in after_steps.items():
        assert 40 not in shape and 36 not in shape, f"{name} grows with the sequence: {shape}"

    # the same through generate: a short and a long generation leave equally sized state
    short_cache, long_cache = LinearDecayCache(config), LinearDecayCache(config)
    model.generate(ids[:, :4], max_new_tokens=2, do_sample=False, **{CACHE_FIELD: short_cache})
    model.generate(ids[:, :4], max_new_tokens=24, do_sample=False, **{CACHE_FIELD: long_cache})
    assert state_shapes(short_cache) == state_shapes(long_cache) == after_steps
