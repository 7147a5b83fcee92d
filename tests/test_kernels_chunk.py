"""The chunked Triton kernels (kernels_chunk_linear_decay) against the fp32 naive recurrence, in Triton's interpreter
on CPU (conftest sets TRITON_INTERPRET=1 without a GPU): forward, final state and every gradient, for vector,
scalar, static and no decay; packed sequences; lengths that are not a multiple of the chunk; strong decays that
force the pairwise path. fp32 only on CPU (DESIGN §7: bf16 dots are wrong under the interpreter)."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from linear_decay import recurrence_linear_decay as recurrence  # noqa: E402
from linear_decay import kernels_chunk_linear_decay as kernels  # noqa: E402
from linear_decay.kernels_chunk_linear_decay import CHUNK, triton_chunked_recurrence  # noqa: E402
from linear_decay.recurrence_linear_decay import naive_recurrence  # noqa: E402

from conftest import perturbed_model, relative_error, tiny_config  # noqa: E402

TOLERANCE = 2e-5  # fp32 against fp32 with a different summation order


def make_log_decay(kind, batch, length, heads, key_dim, strength=1.0, generator=None):
    if kind == "vector":
        return F.logsigmoid(torch.randn(batch, length, heads, key_dim, generator=generator) + 2) * strength
    if kind == "scalar":
        return F.logsigmoid(torch.randn(batch, length, heads, generator=generator) + 2) * strength
    if kind == "static":
        return torch.log1p(-torch.pow(2.0, -torch.arange(1, heads + 1, dtype=torch.float32)))
    return None


def make_inputs(kind, batch, length, heads, key_dim, value_dim, strength=1.0, seed=0, initial=True):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, heads, key_dim, generator=generator)
    k = torch.randn(batch, length, heads, key_dim, generator=generator)
    v = torch.randn(batch, length, heads, value_dim, generator=generator)
    log_decay = make_log_decay(kind, batch, length, heads, key_dim, strength, generator)
    state = torch.randn(batch, heads, key_dim, value_dim, generator=generator) if initial else None
    return [x.requires_grad_() if x is not None else None for x in (q, k, v, log_decay, state)]


def outputs_and_grads(fn, inputs, scale, seed=1, **kwargs):
    """o, final state and the gradients of a random projection of both (so dS_T is exercised)."""
    q, k, v, log_decay, state = inputs
    o, final = fn(q, k, v, log_decay, scale=scale, initial_state=state, output_final_state=True, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=generator)).sum() + (final * torch.randn(final.shape,
                                                                                         generator=generator)).sum()
    wrt = [x for x in inputs if x is not None and x.requires_grad]
    return [o, final, *torch.autograd.grad(loss, wrt)]


def assert_close(actual, expected, names, tolerance=TOLERANCE):
    for name, a, e in zip(names, actual, expected):
        assert a.shape == e.shape, (name, a.shape, e.shape)
        assert torch.isfinite(a).all(), name
        assert relative_error(a, e) <= tolerance, (name, relative_error(a, e))


# Vector decay's factorised scores (`_decayed_scores`) compute the entries above the diagonal too and discard them;
# with a chunk's span up to 120 those can overflow, which numpy's matmul under the interpreter reports.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in matmul:RuntimeWarning")

NAMES = ["o", "final_state", "dq", "dk", "dv", "d_log_decay", "d_initial_state"]


# (kind, WHOLE_CHUNKS): the vector kernels under both settings (TUNING) — the 16-token walk only, or whole chunks /
# halves where the decay span allows; the others have one code path
KINDS_AND_PATHS = [("vector", False), ("vector", True), ("scalar", False), ("static", False), ("none", False)]


def kinds_id(case):
    kind, whole = case
    return f"{kind}-whole-chunks" if whole else kind


def set_whole_chunks(monkeypatch, whole):
    for kernel in ("output", "dq", "dk_dv"):
        monkeypatch.setitem(kernels.TUNING_OVERRIDES, (kernel, kernels.DECAY_VECTOR), {"WHOLE_CHUNKS": whole})


@pytest.mark.parametrize("case", KINDS_AND_PATHS, ids=kinds_id)
@pytest.mark.parametrize("length", [1, CHUNK - 1, CHUNK + 37])
def test_kernels_match_naive_recurrence(case, length, monkeypatch):
    kind, whole = case
    set_whole_chunks(monkeypatch, whole)
    inputs = make_inputs(kind, 2, length, 2, 32, 48, seed=length)
    actual = outputs_and_grads(triton_chunked_recurrence, inputs, scale=0.7)
    expected = outputs_and_grads(naive_recurrence, inputs, scale=0.7)
    names = [n for n in NAMES if n != "d_log_decay" or inputs[3] is not None]
    assert_close(actual, expected, names)


@pytest.mark.parametrize("kind", ["vector", "scalar"])
def test_strong_decays_stay_exact(kind):
    """log λ down to about −40 per step: vector decay leaves the factorised form for the pairwise one."""
    inputs = make_inputs(kind, 1, 40, 1, 16, 16, strength=20.0, seed=3)
    actual = outputs_and_grads(triton_chunked_recurrence, inputs, scale=1.0)
    expected = outputs_and_grads(naive_recurrence, inputs, scale=1.0)
    # d log λ is a difference of large terms (q ⊙ dq − k ⊙ dk) when decays are this strong
    assert_close(actual, expected, NAMES, tolerance=2e-4)


@pytest.mark.parametrize("whole", [False, True], ids=["walk", "whole-chunks"])
def test_mixed_strength_sub_chunks(whole, monkeypatch):
    """Channels with weak and strong decay in one head, over several chunks, no initial state."""
    set_whole_chunks(monkeypatch, whole)
    q, k, v, log_decay, _ = make_inputs("vector", 2, 2 * CHUNK + 5, 2, 16, 32, seed=4, initial=False)
    with torch.no_grad():
        log_decay[..., :4] *= 60.0
        log_decay[..., 4:8] *= 1e-3
    inputs = [q, k, v, log_decay, None]
    actual = outputs_and_grads(triton_chunked_recurrence, inputs, scale=0.25)
    expected = outputs_and_grads(naive_recurrence, inputs, scale=0.25)
    assert_close(actual, expected, NAMES[:-1], tolerance=2e-4)


def spans(log_decay):
    """The largest decay span (−Σ log λ) over the tokens of `log_decay` [T, H, K], over every channel of every head."""
    return float(-log_decay.sum(0).amin())


def give_every_vector_path(log_decay):
    """Decays [B, 5·CHUNK − 7, H, K ≥ 6] edited in place so that the five chunks take every path of `_vector_path`:
    chunk 0 mild (one step); chunk 1 a channel at about −5 per step (16-token sub-chunks: each half spans > 120);
    chunk 2 one at −3 (halves: 192 over the chunk, 96 per half); chunk 3 one at −1.5 (one step with the centred
    factors: 96, beyond one factor's e^{60}); chunk 4 mild and partial."""
    with torch.no_grad():
        log_decay[:, CHUNK:2 * CHUNK, :, 3] *= 40.0
        log_decay[:, 2 * CHUNK:3 * CHUNK, :, 5] = -3.0
        log_decay[:, 3 * CHUNK:4 * CHUNK, :, 4] = -1.5
    chunks = log_decay.detach()[0].split(CHUNK)
    halves = [max(spans(c[: CHUNK // 2]), spans(c[CHUNK // 2:])) for c in chunks]
    assert spans(chunks[0]) <= 60 and spans(chunks[4]) <= 60
    assert spans(chunks[1]) > 120 and halves[1] > 120
    assert spans(chunks[2]) > 120 >= halves[2]
    assert 60 < spans(chunks[3]) <= 120


def test_every_vector_path_in_one_sequence(monkeypatch):
    """Vector decay takes a chunk in one factorised step when every channel's decay span over it is ≤ 120 (factors
    centred on half the span, each ≤ e^{60}), its two halves in turn when each half's spans are, else 16-token
    sub-chunks (`_vector_path`); one sequence and its gradients (incl. through the initial state) cross every path
    and their hand-overs of the state (`give_every_vector_path`)."""
    set_whole_chunks(monkeypatch, True)
    q, k, v, log_decay, state = make_inputs("vector", 1, 5 * CHUNK - 7, 2, 16, 24, seed=11)
    give_every_vector_path(log_decay)
    inputs = [q, k, v, log_decay, state]
    actual = outputs_and_grads(triton_chunked_recurrence, inputs, scale=0.5)
    expected = outputs_and_grads(naive_recurrence, inputs, scale=0.5)
    assert_close(actual, expected, NAMES, tolerance=1e-4)


def test_second_backward_reads_the_kept_states(monkeypatch):
    """The forward keeps its chunk states for the backward; the halves and sub-chunk walks of the output and dq
    kernels carry their state through other slots (a scratch, the consumed state gradients), so a second backward
    through the same graph gives the same gradients, bit for bit."""
    set_whole_chunks(monkeypatch, True)
    q, k, v, log_decay, state = make_inputs("vector", 1, 5 * CHUNK - 7, 2, 16, 24, seed=17)
    give_every_vector_path(log_decay)
    o, final = triton_chunked_recurrence(q, k, v, log_decay, scale=0.5, initial_state=state, output_final_state=True)
    generator = torch.Generator().manual_seed(2)
    loss = (o * torch.randn(o.shape, generator=generator)).sum() + (final * torch.randn(final.shape,
                                                                                         generator=generator)).sum()
    wrt = [q, k, v, log_decay, state]
    first = torch.autograd.grad(loss, wrt, retain_graph=True)
    second = torch.autograd.grad(loss, wrt)
    for name, a, b in zip(["dq", "dk", "dv", "d_log_decay", "d_initial_state"], first, second):
        assert torch.equal(a, b), name


def test_non_power_of_two_head_dims():
    inputs = make_inputs("vector", 1, CHUNK + 3, 3, 24, 40, seed=5)
    actual = outputs_and_grads(triton_chunked_recurrence, inputs, scale=0.5)
    expected = outputs_and_grads(naive_recurrence, inputs, scale=0.5)
    assert_close(actual, expected, NAMES)


@pytest.mark.parametrize("case", KINDS_AND_PATHS[:4], ids=kinds_id)
def test_packed_sequences_equal_separate_runs(case, monkeypatch):
    kind, whole = case
    set_whole_chunks(monkeypatch, whole)
    lengths = [1, CHUNK + 6, CHUNK, 5]
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    q, k, v, log_decay, _ = make_inputs(kind, 1, sum(lengths), 2, 16, 16, seed=6, initial=False)
    state = torch.randn(len(lengths), 2, 16, 16).requires_grad_()
    inputs = [q, k, v, log_decay, state]
    actual = outputs_and_grads(triton_chunked_recurrence, inputs, scale=1.0, cu_seqlens=cu_seqlens)

    def one_by_one(q, k, v, log_decay, scale, initial_state, output_final_state):
        return recurrence._per_sequence(naive_recurrence, q, k, v, log_decay, scale, initial_state,
                                        output_final_state, cu_seqlens)

    expected = outputs_and_grads(one_by_one, inputs, scale=1.0)
    assert_close(actual, expected, NAMES)


def test_fp16_inputs():
    q, k, v, log_decay, state = make_inputs("vector", 1, CHUNK + 9, 2, 32, 32, seed=7)
    half = [x.detach().half() for x in (q, k, v)]
    o, final = triton_chunked_recurrence(*half, log_decay.detach(), initial_state=state.detach(),
                                         output_final_state=True)
    expected_o, expected_final = naive_recurrence(*half, log_decay.detach(), initial_state=state.detach(),
                                                  output_final_state=True)
    assert o.dtype == torch.float16 and final.dtype == torch.float32
    assert relative_error(o, expected_o) <= 2e-3  # TF32 dots for fp16 inputs
    assert relative_error(final, expected_final) <= 2e-3


def test_dispatch(monkeypatch):
    monkeypatch.delenv("LINEAR_DECAY_BACKEND", raising=False)
    assert recurrence.resolve_backend("cpu") == "torch"
    assert recurrence.resolve_backend("cuda") == "triton"
    monkeypatch.setenv("LINEAR_DECAY_BACKEND", "triton")
    assert recurrence.resolve_backend("cpu") == "triton"
    q, k, v, log_decay, _ = make_inputs("scalar", 1, 10, 1, 16, 16, initial=False)
    cu_seqlens = torch.tensor([0, 4, 10], dtype=torch.int32)
    monkeypatch.setenv("LINEAR_DECAY_BACKEND", "torch")  # no varlen in the PyTorch path: one sequence at a time
    o_torch, _ = recurrence.linear_decay_attention(q, k, v, log_decay, cu_seqlens=cu_seqlens)
    monkeypatch.setenv("LINEAR_DECAY_BACKEND", "triton")
    o_triton, _ = recurrence.linear_decay_attention(q, k, v, log_decay, cu_seqlens=cu_seqlens)
    expected = torch.cat([naive_recurrence(q[:, :4], k[:, :4], v[:, :4], log_decay[:, :4])[0],
                          naive_recurrence(q[:, 4:], k[:, 4:], v[:, 4:], log_decay[:, 4:])[0]], dim=1)
    assert relative_error(o_torch, expected) <= TOLERANCE and relative_error(o_triton, expected) <= TOLERANCE


@pytest.mark.parametrize("decay_type,granularity", [("mamba2", "vector"), ("gla", "scalar"), ("tnl", "scalar")])
def test_whole_model_on_the_kernels(monkeypatch, decay_type, granularity):
    """A tiny model on LINEAR_DECAY_BACKEND=triton against the naive oracle: logits and every parameter gradient."""
    config = tiny_config(decay_type=decay_type, decay_granularity=granularity, hidden_size=32, num_heads=2)
    model = perturbed_model(config, seed=11)
    input_ids = torch.randint(0, config.vocab_size, (2, CHUNK + 7), generator=torch.Generator().manual_seed(0))

    def run(backend):
        monkeypatch.setenv("LINEAR_DECAY_BACKEND", backend)
        model.zero_grad()
        logits = model(input_ids, use_cache=False).logits
        logits.float().logsumexp(-1).mean().backward()
        return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    logits, grads = run("triton")
    expected_logits, expected_grads = run("naive")
    assert relative_error(logits, expected_logits) <= TOLERANCE
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert relative_error(grad, expected_grads[name]) <= 1e-4, name


@pytest.mark.parametrize("decay_type,granularity,position", [("gla", "vector", "none"), ("lightnet", "vector", "tpe"),
                                                             ("tnl", "scalar", "rope")])
def test_padded_batch_runs_packed(monkeypatch, decay_type, granularity, position):
    """On a varlen backend a left-padded batch runs as packed sequences: each row's logits (and its cached state,
    seen through the next token) equal the row run alone and unpadded on the naive oracle."""
    config = tiny_config(decay_type=decay_type, decay_granularity=granularity, position_encoding=position)
    model = perturbed_model(config, seed=12).eval()
    lengths = [CHUNK + 6, 23]
    rows = [torch.randint(0, config.vocab_size, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths]
    width = max(lengths)
    input_ids = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(width - len(r)), torch.ones(len(r))]) for r in rows]).long()
    next_token = torch.tensor([[5], [7]])
    assert 1 - mask.float().mean() >= recurrence.PACK_MIN_PADDING

    calls = []
    packed = recurrence._packed_by_mask
    monkeypatch.setattr(recurrence, "_packed_by_mask", lambda *args: calls.append(1) or packed(*args))
    monkeypatch.setenv("LINEAR_DECAY_BACKEND", "triton")
    with torch.no_grad():
        out = model(input_ids, attention_mask=mask, use_cache=True)
        step = model(next_token, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
                     past_key_values=out.past_key_values, use_cache=True)
    assert calls, "the padded batch did not take the packed path"

    monkeypatch.setenv("LINEAR_DECAY_BACKEND", "naive")
    with torch.no_grad():
        for index, row in enumerate(rows):
            alone = model(torch.cat([row, next_token[index]])[None], use_cache=False).logits[0]
            assert relative_error(out.logits[index, width - len(row):], alone[:-1]) <= TOLERANCE
            assert relative_error(step.logits[index, -1], alone[-1]) <= TOLERANCE


def test_layout_first_made_under_inference_mode_serves_training():
    """A regular batch's chunk layout is kept per shape; made first under torch.inference_mode (evaluation), it must
    still be savable for the backward of a later training call of the same shape, which matches the oracle."""
    kernels._regular_layout.cache_clear()
    inputs = make_inputs("scalar", 2, CHUNK + 5, 2, 16, 16, seed=3)
    with torch.inference_mode():
        triton_chunked_recurrence(*(x.detach() for x in inputs[:4]), scale=0.5)
    actual = outputs_and_grads(triton_chunked_recurrence, inputs, scale=0.5)
    assert kernels._regular_layout.cache_info().hits >= 1
    expected = outputs_and_grads(naive_recurrence, inputs, scale=0.5)
    assert_close(actual, expected, NAMES)


@pytest.mark.parametrize("kind", ["vector", "scalar", "static", "none", "vector-frozen"])
@pytest.mark.parametrize("packed", [False, True], ids=["one-sequence", "packed"])
def test_walks_in_segments(kind, packed):
    """With few sequences × heads the kernels that walk whole sequences split them into segments (`_segment_plan`):
    the state walks go through the segments from zero, combine their ends (`_combine_segments_kernel`) and walk them
    again from the combined starts; the finishing pass adds the later segments' d log λ sums afterwards
    (`_add_segment_carry_kernel`). Output, final state and every gradient (initial state included) still match the
    naive recurrence, and packed sequences of fewer segments than the longest take no part of another's."""
    lengths = [5 * CHUNK + 3] if not packed else [3 * CHUNK + 1, CHUNK - 3, 2 * CHUNK]
    heads = 1
    max_chunks = sum(-(-n // CHUNK) for n in lengths) if packed else -(-lengths[0] // CHUNK)
    assert kernels._segment_plan(len(lengths) * heads, max_chunks, torch.device("cpu"))[0] > 1
    q, k, v, log_decay, _ = make_inputs(kind.split("-")[0], 1, sum(lengths), heads, 16, 24, seed=12, initial=False)
    if kind.endswith("frozen"):  # no d log λ wanted: the finishing pass sums dq, dk only, still in segments
        log_decay = log_decay.detach()
    state = torch.randn(len(lengths), heads, 16, 24).requires_grad_()
    inputs = [q, k, v, log_decay, state]
    if packed:
        cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
        actual = outputs_and_grads(triton_chunked_recurrence, inputs, scale=0.5, cu_seqlens=cu_seqlens)

        def reference(q, k, v, log_decay, scale, initial_state, output_final_state):
            return recurrence._per_sequence(naive_recurrence, q, k, v, log_decay, scale, initial_state,
                                            output_final_state, cu_seqlens)
    else:
        actual = outputs_and_grads(triton_chunked_recurrence, inputs, scale=0.5)
        reference = naive_recurrence
    expected = outputs_and_grads(reference, inputs, scale=0.5)
    names = [n for n in NAMES if n != "d_log_decay" or (log_decay is not None and log_decay.requires_grad)]
    assert_close(actual, expected, names, tolerance=5e-5)


@pytest.mark.parametrize("segment_chunks", [1, 2, 100])
def test_forced_segment_lengths(segment_chunks, monkeypatch):
    """SEGMENT_CHUNKS (what tune_chunk_kernels.py --segment-chunks sweeps) overrides `_segment_plan`'s rule for every
    walk: segments of one chunk, of two (the last one short) or longer than the sequence (one whole walk) all give
    the naive recurrence's outputs and gradients."""
    monkeypatch.setattr(kernels, "SEGMENT_CHUNKS", segment_chunks)
    length = 3 * CHUNK + 7
    assert kernels._segment_plan(64, 4, torch.device("cpu")) == (-(-4 // min(segment_chunks, 4)),
                                                                  min(segment_chunks, 4))
    inputs = make_inputs("vector", 2, length, 2, 16, 24, seed=21)
    actual = outputs_and_grads(triton_chunked_recurrence, inputs, scale=0.5)
    expected = outputs_and_grads(naive_recurrence, inputs, scale=0.5)
    assert_close(actual, expected, NAMES, tolerance=5e-5)


@pytest.mark.parametrize("value_loop", [True, False], ids=["value-loop", "value-parts"])
@pytest.mark.parametrize("kind", ["scalar", "static", "none", "vector"])
def test_gradients_without_decay_gradient(kind, value_loop, monkeypatch):
    """Without d log λ (a fixed or frozen decay, or none) and with VALUE_LOOP, every kind but vector decay has the dq
    and dk/dv kernels write dq and dk straight into the gradients: no finishing pass runs. The gradients match the
    naive recurrence either way; vector decay (whose halves and walks add into fp32) and VALUE_LOOP off keep the pass."""
    code = {"vector": kernels.DECAY_VECTOR, "scalar": kernels.DECAY_SCALAR, "static": kernels.DECAY_STATIC,
            "none": kernels.DECAY_NONE}[kind]
    for kernel in ("dq", "dk_dv"):
        monkeypatch.setitem(kernels.TUNING_OVERRIDES, (kernel, code), {"VALUE_LOOP": value_loop})
    finishing = []
    finish_kernel = kernels._finish_grads_kernel

    class RecordedLaunches:
        def __getitem__(self, grid):
            finishing.append(grid)
            return finish_kernel[grid]

    monkeypatch.setattr(kernels, "_finish_grads_kernel", RecordedLaunches())
    q, k, v, log_decay, state = make_inputs(kind, 2, 2 * CHUNK + 9, 2, 16, 48, seed=21)
    inputs = [q, k, v, None if log_decay is None else log_decay.detach(), state]
    actual = outputs_and_grads(triton_chunked_recurrence, inputs, scale=0.5)
    expected = outputs_and_grads(naive_recurrence, inputs, scale=0.5)
    assert_close(actual, expected, [n for n in NAMES if n != "d_log_decay"])
    assert bool(finishing) == (kind == "vector" or not value_loop)


@pytest.mark.parametrize("value_loop", [True, False], ids=["value-loop", "value-parts"])
@pytest.mark.parametrize("kind", ["vector", "scalar", "static", "none"])
def test_value_loop_matches_naive_recurrence(kind, value_loop, monkeypatch):
    """Both VALUE_LOOP settings: the dq and dk/dv kernels take every value block in one program and write dq, dk in
    one part (on, the default), or one program and one fp32 part per value block (off); V = 48 makes two value blocks
    of 32 (the second ragged). Vector decay also crosses the halves and sub-chunk walks, which add block by block
    (`give_every_vector_path`), with the initial state's gradient."""
    code = {"vector": kernels.DECAY_VECTOR, "scalar": kernels.DECAY_SCALAR, "static": kernels.DECAY_STATIC,
            "none": kernels.DECAY_NONE}[kind]
    for kernel in ("dq", "dk_dv"):
        monkeypatch.setitem(kernels.TUNING_OVERRIDES, (kernel, code), {"VALUE_LOOP": value_loop})
    q, k, v, log_decay, state = make_inputs(kind, 2, 5 * CHUNK - 7, 2, 16, 48, seed=13)
    if kind == "vector":
        give_every_vector_path(log_decay)
    inputs = [q, k, v, log_decay, state]
    assert kernels._launch("dq", 48, code)[1]["VALUE_LOOP"] == value_loop and kernels._launch("dq", 48, code)[0] == 32
    actual = outputs_and_grads(triton_chunked_recurrence, inputs, scale=0.5)
    expected = outputs_and_grads(naive_recurrence, inputs, scale=0.5)
    names = [n for n in NAMES if n != "d_log_decay" or log_decay is not None]
    assert_close(actual, expected, names, tolerance=1e-4 if kind == "vector" else TOLERANCE)
