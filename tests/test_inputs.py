"""Input validation (clear errors before any compute), label masking, logits_to_keep, accepted mask shapes."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from linear_decay import LinearDecayCache
from linear_decay.modeling_linear_decay import CACHE_FIELD

from conftest import perturbed_model, relative_error, tiny_config

VOCAB = 64
BATCH, LENGTH = 2, 9


@pytest.fixture(scope="module", params=[
    dict(decay_type="mamba2"),
    dict(decay_type="lightnet", share_decay=True, position_encoding="rope"),
    dict(decay_type="tnl", position_encoding="tpe"),
], ids=["mamba2", "lightnet-shared-rope", "tnl-tpe"])
def model(request):
    return perturbed_model(tiny_config(**request.param), seed=2).eval()


def ids_of(batch=BATCH, length=LENGTH, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def no_compute(model):
    """Fails if any leaf module (embedding, projection, norm) runs inside the block."""
    calls = []
    handles = [module.register_forward_pre_hook(lambda mod, args, name=name: calls.append(name))
               for name, module in model.named_modules() if not list(module.children())]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    assert not calls, f"modules ran before the error: {calls[:5]}"


def assert_rejected(model, match, error=ValueError, **kwargs):
    with no_compute(model), pytest.raises(error, match=match):
        model(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Clear errors before compute
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 100, -1])
def test_out_of_vocabulary_token_ids_are_rejected(model, bad):
    ids = ids_of()
    ids[1, 4] = bad
    assert_rejected(model, rf"token id {bad}\b.*vocabulary \[0, {VOCAB}\)", input_ids=ids)


def test_out_of_vocabulary_token_id_is_rejected_in_generate(model):
    ids = ids_of()
    ids[0, 0] = VOCAB
    with no_compute(model), pytest.raises(ValueError, match="vocabulary"):
        model.generate(ids, max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("shape", [(BATCH, 0), (0, LENGTH)])
def test_empty_input_is_rejected(model, shape):
    assert_rejected(model, "empty input", input_ids=torch.zeros(shape, dtype=torch.long))


def test_empty_inputs_embeds_are_rejected(model):
    assert_rejected(model, "empty input", inputs_embeds=torch.zeros(BATCH, 0, model.config.hidden_size))


def test_malformed_input_ids_are_rejected(model):
    assert_rejected(model, "input_ids must be", input_ids=ids_of()[0])  # 1-D
    assert_rejected(model, "integer", input_ids=ids_of().float())
    assert_rejected(model, "inputs_embeds must be", inputs_embeds=torch.zeros(BATCH, LENGTH, 7))


@pytest.mark.parametrize("mask_shape", [(BATCH, LENGTH + 1), (BATCH, LENGTH - 1), (BATCH + 1, LENGTH), (LENGTH,),
                                        (BATCH, 1, LENGTH)])
def test_attention_mask_of_wrong_shape_is_rejected(model, mask_shape):
    assert_rejected(model, r"attention_mask has shape", input_ids=ids_of(),
                    attention_mask=torch.ones(mask_shape, dtype=torch.long))


def test_attention_mask_longer_than_past_plus_new_is_rejected(model):
    ids = ids_of()
    with torch.no_grad():
        cache = getattr(model(ids[:, :5], use_cache=True), CACHE_FIELD)
    assert_rejected(model, r"past \+ new", input_ids=ids[:, 5:6], attention_mask=torch.ones(BATCH, 7),
                    use_cache=True, **{CACHE_FIELD: cache})


def test_attention_mask_may_cover_new_or_past_plus_new_tokens(model):
    """Both accepted mask lengths give the full forward pass's logits when stepping with a cache."""
    ids = ids_of()
    with torch.no_grad():
        reference = model(ids, use_cache=False).logits
        for mask_covers_past in (False, True):
            out = model(ids[:, :5], attention_mask=torch.ones(BATCH, 5), use_cache=True)
            cache, pieces = getattr(out, CACHE_FIELD), [out.logits]
            for t in range(5, LENGTH):
                mask = torch.ones(BATCH, t + 1 if mask_covers_past else 1)
                pieces.append(model(ids[:, t:t + 1], attention_mask=mask, use_cache=True,
                                    **{CACHE_FIELD: cache}).logits)
            assert relative_error(torch.cat(pieces, dim=1), reference) <= 1e-5


def test_attention_mask_dtypes_are_equivalent(model):
    ids = ids_of()
    long_mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    long_mask[0, :3] = 0
    with torch.no_grad():
        unmasked = model(ids, use_cache=False).logits
        expected = model(ids, attention_mask=long_mask, use_cache=False).logits
        for dtype in (torch.bool, torch.int32, torch.float32):
            ones = model(ids, attention_mask=torch.ones(BATCH, LENGTH, dtype=dtype), use_cache=False).logits
            assert relative_error(ones, unmasked) <= 1e-6, dtype
            padded = model(ids, attention_mask=long_mask.to(dtype), use_cache=False).logits
            assert relative_error(padded, expected) <= 1e-6, dtype
    # and the mask does act: the padded row differs from the unmasked one, the other row does not
    assert relative_error(expected[0, 3:], unmasked[0, 3:]) > 1e-4
    assert relative_error(expected[1], unmasked[1]) <= 1e-6


def test_right_padding_leaves_real_positions_unchanged(model):
    ids = ids_of()
    padded = torch.cat([ids, torch.zeros(BATCH, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(BATCH, LENGTH), torch.zeros(BATCH, 4)], dim=1)
    with torch.no_grad():
        reference = model(ids, use_cache=False).logits
        out = model(padded, attention_mask=mask, use_cache=False).logits
    assert relative_error(out[:, :LENGTH], reference) <= 1e-6


@pytest.mark.parametrize("length", [LENGTH - 1, LENGTH + 1, 1])
@pytest.mark.parametrize("layout", ["1d", "row", "batch"])
def test_position_ids_of_another_length_are_rejected(model, length, layout):
    """Whatever the position encoding (none ignores positions, rope rotates by them, tpe filters): one position per
    token, or a clear error naming both lengths — a length-1 row must not broadcast over the sequence."""
    positions = torch.arange(length)
    positions = {"1d": positions, "row": positions[None], "batch": positions.expand(BATCH, length)}[layout]
    assert_rejected(model, rf"position_ids have length {length}\b.*sequence length {LENGTH}\b", input_ids=ids_of(),
                    position_ids=positions)


def test_position_ids_of_another_batch_size_are_rejected(model):
    assert_rejected(model, rf"position_ids have shape \({BATCH + 1}, {LENGTH}\)", input_ids=ids_of(),
                    position_ids=torch.arange(LENGTH).expand(BATCH + 1, LENGTH))


def test_position_ids_length_is_checked_against_the_new_tokens_when_decoding(model):
    ids = ids_of()
    with torch.no_grad():
        cache = getattr(model(ids[:, :5], use_cache=True), CACHE_FIELD)
    assert_rejected(model, r"position_ids have length 6\b.*sequence length 1\b", input_ids=ids[:, 5:6],
                    position_ids=torch.arange(6)[None], use_cache=True, **{CACHE_FIELD: cache})


def test_position_ids_of_the_right_shape_are_the_default_positions(model):
    """0..T-1 given as [T], [1, T] or [B, T] equal the positions the model counts itself."""
    ids = ids_of()
    with torch.no_grad():
        reference = model(ids, use_cache=False).logits
        for positions in (torch.arange(LENGTH), torch.arange(LENGTH)[None], torch.arange(LENGTH).expand(BATCH, -1)):
            assert torch.equal(model(ids, position_ids=positions, use_cache=False).logits, reference)


def test_position_ids_check_holds_under_torch_compile():
    """The check compares shapes only: torch.compile traces it (dynamo; the eager backend keeps the test fast), the
    compiled model gives the eager logits and the same error."""
    model = perturbed_model(tiny_config(decay_type="gla", position_encoding="rope"), seed=2).eval()
    compiled = torch.compile(model, backend="eager")
    ids, positions = ids_of(), torch.arange(LENGTH)[None]
    with torch.no_grad():
        assert torch.equal(compiled(ids, position_ids=positions, use_cache=False).logits,
                           model(ids, position_ids=positions, use_cache=False).logits)
        with pytest.raises(ValueError, match=rf"length {LENGTH - 1}\b.*sequence length {LENGTH}\b"):
            compiled(ids, position_ids=positions[:, 1:], use_cache=False)


@pytest.mark.parametrize("labels_shape", [(BATCH, LENGTH - 1), (BATCH,), (BATCH + 1, LENGTH), (BATCH, LENGTH, 1)])
def test_labels_of_wrong_shape_are_rejected(model, labels_shape):
    labels = torch.zeros(labels_shape, dtype=torch.long)
    assert_rejected(model, r"labels have shape", input_ids=ids_of(), labels=labels)


@pytest.mark.parametrize("bad", [VOCAB, -1, -5, -101])
def test_out_of_range_labels_are_rejected(model, bad):
    labels = ids_of(seed=1)
    labels[0, 3] = bad
    assert_rejected(model, rf"labels contain {bad}\b", input_ids=ids_of(), labels=labels)


def test_exactly_one_of_input_ids_and_inputs_embeds(model):
    ids = ids_of()
    embeds = torch.randn(BATCH, LENGTH, model.config.hidden_size)
    assert_rejected(model, "exactly one of input_ids or inputs_embeds", input_ids=ids, inputs_embeds=embeds)
    assert_rejected(model, "exactly one of input_ids or inputs_embeds")


@pytest.mark.parametrize("cache_name", ["cache", "past_key_values"])
@pytest.mark.parametrize("bad_cache", [DynamicCache, lambda: ((torch.zeros(1),),), dict],
                         ids=["DynamicCache", "tuple", "dict"])
def test_foreign_cache_object_is_rejected(model, cache_name, bad_cache):
    # A wrong cache type is a type error; the message must name the cache class the model needs.
    assert_rejected(model, "LinearDecayCache", error=(TypeError, ValueError), input_ids=ids_of(), use_cache=True,
                    **{cache_name: bad_cache()})


def test_foreign_cache_object_is_rejected_in_generate(model):
    with no_compute(model), pytest.raises((TypeError, ValueError), match="LinearDecayCache"):
        model.generate(ids_of(), max_new_tokens=2, do_sample=False, **{CACHE_FIELD: DynamicCache()})


# ---------------------------------------------------------------------------------------------------------------
# Label masking, logits_to_keep, inputs_embeds
# ---------------------------------------------------------------------------------------------------------------


def test_labels_minus_100_are_ignored(model):
    ids = ids_of(length=12)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, 7] = -100
    labels[1, -1] = -100
    out = model(input_ids=ids, labels=labels, use_cache=False)

    # reference: cross-entropy over the non-ignored shifted positions, computed here from the returned logits
    logits = out.logits[:, :-1].float()
    targets = labels[:, 1:]
    keep = targets != -100
    expected = F.cross_entropy(logits[keep], targets[keep], reduction="sum") / keep.sum()
    assert keep.sum() == BATCH * 11 - 5  # label 0 of each row is never a target after the shift
    assert relative_error(out.loss.detach(), expected.detach()) <= 1e-6

    # the ignored positions really are excluded: the unmasked loss differs
    unmasked = model(input_ids=ids, labels=ids, use_cache=False).loss.detach()
    assert abs(unmasked.item() - out.loss.detach().item()) > 1e-4


def test_loss_has_gradient_and_matches_mean_cross_entropy(model):
    ids = ids_of(length=10)
    out = model(input_ids=ids, labels=ids, use_cache=False)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1))
    assert relative_error(out.loss.detach(), expected.detach()) <= 1e-6
    assert out.loss.requires_grad


@pytest.mark.parametrize("keep", [1, 3])
def test_logits_to_keep_returns_the_last_positions(model, keep):
    ids = ids_of()
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        last = model(ids, use_cache=False, logits_to_keep=keep).logits
    assert last.shape == (BATCH, keep, VOCAB)
    assert relative_error(last, full[:, -keep:]) <= 1e-6


def test_logits_to_keep_zero_returns_every_position(model):
    ids = ids_of()
    with torch.no_grad():
        assert model(ids, use_cache=False, logits_to_keep=0).logits.shape == (BATCH, LENGTH, VOCAB)


def test_inputs_embeds_equal_input_ids(model):
    ids = ids_of()
    with torch.no_grad():
        from_ids = model(input_ids=ids, use_cache=False).logits
        from_embeds = model(inputs_embeds=model.get_input_embeddings()(ids), use_cache=False).logits
    assert relative_error(from_embeds, from_ids) <= 1e-6


def test_use_cache_returns_a_linear_decay_cache(model):
    with torch.no_grad():
        out = model(ids_of(), use_cache=True)
        assert isinstance(getattr(out, CACHE_FIELD), LinearDecayCache)
        assert getattr(model(ids_of(), use_cache=False), CACHE_FIELD) is None
