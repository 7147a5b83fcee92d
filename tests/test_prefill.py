"""Chunked prefill in generate() (transformers' `generate(..., prefill_chunk_size=N)`): a prompt fed through our
recurrent cache in pieces gives the same scores and tokens as one prefill call, with left padding, for each kind of
decay, LightNet's running normaliser and every position encoding; greedy, sampling with a fixed seed and beam
search. Only the recurrent state passes between pieces, so this keeps prefill memory flat in the prompt length."""

import pytest
import torch

from conftest import perturbed_model, relative_error, tiny_config

COMBOS = [
    ("mamba2", "vector", "none"),
    ("gla", "scalar", "rope"),
    ("lightnet", "vector", "lrpe"),
    ("tnl", "scalar", "tpe"),
    ("hgrn2", "vector", "none"),
]


def left_padded_prompt(seed=4, batch=2, length=37, pad=6):
    ids = torch.randint(1, 64, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    return ids, mask


def generate(model, ids, mask, piece, **options):
    defaults = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True,
                    return_dict_in_generate=True)
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, prefill_chunk_size=piece, **{**defaults, **options})


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(c))
def test_prefill_in_pieces_equals_one_call(combo):
    decay_type, granularity, position = combo
    model = perturbed_model(tiny_config(decay_type=decay_type, decay_granularity=granularity,
                                        position_encoding=position), seed=3).eval()
    ids, mask = left_padded_prompt()
    whole = generate(model, ids, mask, piece=None)
    pieces = generate(model, ids, mask, piece=8)  # 37 tokens: 8, 8, 8, 8, 5
    assert torch.equal(pieces.sequences, whole.sequences)
    for a, b in zip(pieces.scores, whole.scores):
        assert relative_error(a, b) <= 1e-5


def test_sampling_and_beam_search_with_pieces():
    model = perturbed_model(tiny_config(decay_type="lightnet", position_encoding="rope"), seed=5).eval()
    ids, mask = left_padded_prompt(seed=6)
    for options in (dict(do_sample=True, top_k=10), dict(num_beams=3, output_scores=False)):
        results = []
        for piece in (None, 8):
            torch.manual_seed(0)
            results.append(generate(model, ids, mask, piece, **options).sequences)
        assert torch.equal(*results), options

