"""The chunked Triton kernels (ops_chunk) against the float64 token-by-token oracle, in Triton's
interpreter on CPU (conftest sets TRITON_INTERPRET=1 without a GPU): forward, final state and every gradient, for
vector, scalar, static and no decay; packed sequences; lengths that are not a multiple of the chunk; decays from
mild to far stronger than trained models reach. fp32 (and fp16 inputs) only on CPU (DESIGN §7: bf16 dots are wrong
under the interpreter); bf16 is tested on the GPU (test_ops_gpu.py)."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from linear_decay import recurrence as recurrence  # noqa: E402
from linear_decay import ops_chunk as kernels  # noqa: E402
from linear_decay.ops_chunk import CHUNK, triton_chunked_recurrence  # noqa: E402
from linear_decay.recurrence import naive_recurrence  # noqa: E402

from conftest import perturbed_model, relative_error, tiny_config  # noqa: E402

pytestmark = pytest.mark.slow  # the Triton kernels in the interpreter

# fp32 kernels against the float64 oracle: a few hundred units of fp32 roundoff (2^-24) for sums over a chunk
FP32_UNIT = 2.0 ** -24
TOLERANCE = 2e-5


def cumulative_tolerance(log_decay):
    """The bound for strong decays: the kernels take e^{b_i − b_j} from log λ cumulated over a chunk, whose fp32
    rounding is an absolute error of about |b| · 2^-24 in the exponent, i.e. a relative error of every decayed term
    (|b| ≤ CHUNK · max |log λ|); never below TOLERANCE."""
    if log_decay is None:
        return TOLERANCE
    return max(TOLERANCE, 8 * FP32_UNIT * CHUNK * float(log_decay.detach().abs().max()))


def make_log_decay(kind, batch, length, heads, key_dim, strength=1.0, generator=None):
    if kind == "vector":
        return F.logsigmoid(torch.randn(batch, length, heads, key_dim, generator=generator) + 2) * strength
    if kind == "scalar":
        return F.logsigmoid(torch.randn(batch, length, heads, generator=generator) + 2) * strength
    if kind == "static":
        return torch.log1p(-torch.pow(2.0, -torch.arange(1, heads + 1, dtype=torch.float32))) * strength
    return None


def make_inputs(kind, batch, length, heads, key_dim, value_dim, strength=1.0, seed=0, initial=True):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, heads, key_dim, generator=generator)
    k = torch.randn(batch, length, heads, key_dim, generator=generator)
    v = torch.randn(batch, length, heads, value_dim, generator=generator)
    log_decay = make_log_decay(kind, batch, length, heads, key_dim, strength, generator)
    state = torch.randn(batch, heads, key_dim, value_dim, generator=generator) if initial else None
    return [x.requires_grad_() if x is not None else None for x in (q, k, v, log_decay, state)]


def outputs_and_grads(fn, inputs, scale, seed=1, projection_dtype=torch.float32, **kwargs):
    """o, final state and the gradients of a random projection of both (so dS_T is exercised); the projection is
    drawn in `projection_dtype` whatever the outputs' dtype, so that the float64 oracle sees the same one."""
    q, k, v, log_decay, state = inputs
    o, final = fn(q, k, v, log_decay, scale=scale, initial_state=state, output_final_state=True, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    loss = ((o * torch.randn(o.shape, generator=generator).to(projection_dtype).to(o.dtype)).sum()
            + (final * torch.randn(final.shape, generator=generator).to(final.dtype)).sum())
    wrt = [x for x in inputs if x is not None and x.requires_grad]
    return [o, final, *torch.autograd.grad(loss, wrt)]


def float64_copies(inputs):
    return [None if x is None else x.detach().double().requires_grad_(x.requires_grad) for x in inputs]


def oracle(inputs, scale, **kwargs):
    """The float64 token-by-token recurrence on float64 copies of the inputs: the reference of every test here."""
    return outputs_and_grads(naive_recurrence, float64_copies(inputs), scale, **kwargs)


def assert_close(actual, expected, names, tolerance=TOLERANCE):
    for name, a, e in zip(names, actual, expected):
        assert a.shape == e.shape, (name, a.shape, e.shape)
        assert torch.isfinite(a).all(), name
        assert relative_error(a, e) <= tolerance, (name, relative_error(a, e))


NAMES = ["o", "final_state", "dq", "dk", "dv", "d_log_decay", "d_initial_state"]
KINDS = ["vector", "scalar", "static", "none"]


def names_for(inputs):
    return [n for n in NAMES if n != "d_log_decay" or (inputs[3] is not None and inputs[3].requires_grad)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("length", [1, CHUNK - 1, CHUNK + 37])
def test_kernels_match_naive_recurrence(kind, length):
    inputs = make_inputs(kind, 2, length, 2, 32, 48, seed=length)
    actual = outputs_and_grads(triton_chunked_recurrence, inputs, scale=0.7)
    assert_close(actual, oracle(inputs, scale=0.7), names_for(inputs))


def trained_like_log_decay(kind, batch, length, heads, key_dim, low, generator):
    """log λ ~ uniform(low, 0): the decays of trained models (RESULTS.md) and stronger."""
    shape = {"vector": (batch, length, heads, key_dim), "scalar": (batch, length, heads), "static": (heads,)}[kind]
    return torch.rand(shape, generator=generator) * low


@pytest.mark.parametrize("low", [-6.0, -20.0])
@pytest.mark.parametrize("kind", ["vector", "scalar", "static"])
def test_trained_like_decays(kind, low):
    """log λ uniform in (−6, 0) and (−20, 0) over three chunks, with an initial state: outputs and every gradient,
    d log λ included, match the float64 oracle (the chunk's sub-blocks, its diagonal pairs and the pairs that
    straddle chunks all carry terms this strong)."""
    inputs = make_inputs(kind, 2, 2 * CHUNK + 21, 2, 16, 24, seed=9)
    with torch.no_grad():
        inputs[3].copy_(trained_like_log_decay(kind, 2, 2 * CHUNK + 21, 2, 16, low, torch.Generator().manual_seed(2)))
    actual = outputs_and_grads(triton_chunked_recurrence, inputs, scale=0.5)
    assert_close(actual, oracle(inputs, scale=0.5), NAMES, tolerance=cumulative_tolerance(inputs[3]))


@pytest.mark.parametrize("kind", ["vector", "scalar"])
def test_strong_decays_stay_exact(kind):
    """log λ down to about −40 per step: every decayed term underflows within a few tokens."""
    inputs = make_inputs(kind, 1, 40, 1, 16, 16, strength=20.0, seed=3)
    actual = outputs_and_grads(triton_chunked_recurrence, inputs, scale=1.0)
    assert_close(actual, oracle(inputs, scale=1.0), NAMES, tolerance=cumulative_tolerance(inputs[3]))


def test_mixed_strength_channels():
    """Channels with weak and strong decay in one head, over several chunks, no initial state."""
    q, k, v, log_decay, _ = make_inputs("vector", 2, 2 * CHUNK + 5, 2, 16, 32, seed=4, initial=False)
    with torch.no_grad():
        log_decay[..., :4] *= 60.0
        log_decay[..., 4:8] *= 1e-3
    inputs = [q, k, v, log_decay, None]
    actual = outputs_and_grads(triton_chunked_recurrence, inputs, scale=0.25)
    assert_close(actual, oracle(inputs, scale=0.25), NAMES[:-1], tolerance=cumulative_tolerance(log_decay))


@pytest.mark.parametrize("kind", ["vector", "scalar"])
def test_decay_gradient_keeps_fp32_intermediates(kind):
    """fp16 q, k, v (values exact in fp16) with strong decays: the oracle computes on the same values in float64,
    so the only error left is the kernels' own arithmetic. If any term of d log λ (dq, dk, the pairs that straddle a
    position) passed through fp16 on its way, its error would be of the order of fp16's unit roundoff 2^-11 times the
    cancellation between those terms; kept in fp32 it stays a hundred times under that."""
    inputs = make_inputs(kind, 1, 2 * CHUNK + 9, 2, 32, 32, seed=7)
    with torch.no_grad():
        inputs[3].copy_(trained_like_log_decay(kind, 1, 2 * CHUNK + 9, 2, 32, -6.0,
                                               torch.Generator().manual_seed(5)))
    half = [x.detach().half().requires_grad_() for x in inputs[:3]] + inputs[3:]
    exact = [x.detach().double().requires_grad_() if x is not None else None for x in half]
    actual = outputs_and_grads(triton_chunked_recurrence, half, scale=0.5, projection_dtype=torch.float16)
    expected = outputs_and_grads(naive_recurrence, exact, scale=0.5, projection_dtype=torch.float16)
    assert relative_error(actual[5], expected[5]) <= 2.0 ** -11 / 100


def test_second_backward_reads_the_kept_states():
    """The forward keeps its chunk states for the backward, which only reads them: a second backward through the
    same graph gives the same gradients, bit for bit."""
    q, k, v, log_decay, state = make_inputs("vector", 1, 5 * CHUNK - 7, 2, 16, 24, seed=17)
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
    assert_close(actual, oracle(inputs, scale=0.5), NAMES)


@pytest.mark.parametrize("kind", KINDS[:3])
def test_packed_sequences_equal_separate_runs(kind):
    lengths = [1, CHUNK + 6, CHUNK, 5]
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    q, k, v, log_decay, _ = make_inputs(kind, 1, sum(lengths), 2, 16, 16, seed=6, initial=False)
    state = torch.randn(len(lengths), 2, 16, 16).requires_grad_()
    inputs = [q, k, v, log_decay, state]
    actual = outputs_and_grads(triton_chunked_recurrence, inputs, scale=1.0, cu_seqlens=cu_seqlens)

    def one_by_one(q, k, v, log_decay, scale, initial_state, output_final_state):
        return recurrence._per_sequence(naive_recurrence, q, k, v, log_decay, scale, initial_state,
                                        output_final_state, cu_seqlens)

    expected = outputs_and_grads(one_by_one, float64_copies(inputs), scale=1.0)
    assert_close(actual, expected, NAMES)


def test_fp16_inputs():
    q, k, v, log_decay, state = make_inputs("vector", 1, CHUNK + 9, 2, 32, 32, seed=7)
    half = [x.detach().half() for x in (q, k, v)]
    o, final = triton_chunked_recurrence(*half, log_decay.detach(), initial_state=state.detach(),
                                         output_final_state=True)
    expected_o, expected_final = naive_recurrence(*(x.double() for x in half), log_decay.detach().double(),
                                                  initial_state=state.detach().double(), output_final_state=True)
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


def test_fused_kernels_follow_the_backend(monkeypatch):
    """The fused norm / SwiGLU / decay / loss kernels run exactly where the recurrence runs on the Triton kernels (the
    config's kernel_backend, which $LINEAR_DECAY_BACKEND overrides) and the config enables them; a misspelt override is
    an error, not a silent fallback."""
    from linear_decay.modeling_linear_decay import use_fused_kernels

    x = torch.zeros(2)
    monkeypatch.delenv("LINEAR_DECAY_BACKEND", raising=False)
    assert not use_fused_kernels(x)
    for backend, expected in (("triton", True), ("torch", False), ("naive", False), ("auto", False)):
        assert use_fused_kernels(x, backend=backend) is expected
        assert not use_fused_kernels(x, enabled=False, backend=backend)
        monkeypatch.setenv("LINEAR_DECAY_BACKEND", backend)
        assert use_fused_kernels(x) is expected
        assert use_fused_kernels(x, backend="torch" if expected else "triton") is expected  # the override wins
        monkeypatch.delenv("LINEAR_DECAY_BACKEND")
    monkeypatch.setenv("LINEAR_DECAY_BACKEND", "tritn")
    with pytest.raises(ValueError, match="LINEAR_DECAY_BACKEND='tritn'; allowed: torch, triton, naive, auto"):
        use_fused_kernels(x)


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
    expected_logits, expected_grads = run("naive")  # the fp32 oracle: the model itself runs in fp32
    assert relative_error(logits, expected_logits) <= TOLERANCE
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert relative_error(grad, expected_grads[name]) <= 1e-4, name


FUSED_PIECES = {"rms_norm": "fuse_norm", "gated_rms_norm": "fuse_norm", "swiglu": "fuse_swiglu",
                "softplus_decay": "fuse_decay", "cross_entropy": "fuse_cross_entropy"}


@pytest.mark.parametrize("switched_off", [None, *sorted(set(FUSED_PIECES.values()))])
def test_config_chooses_the_fast_paths(monkeypatch, switched_off):
    """Without any environment variable, `kernel_backend="triton"` runs the recurrence and every fused piece on the
    Triton kernels, each `fuse_*` set to False keeps its piece's torch code, and the loss and logits equal the
    `kernel_backend="torch"` model's (same weights)."""
    import linear_decay.modeling_linear_decay as modeling
    from linear_decay import recurrence

    monkeypatch.delenv("LINEAR_DECAY_BACKEND", raising=False)
    calls = {}
    for name in [*FUSED_PIECES, "triton"]:
        table = recurrence.BACKENDS if name == "triton" else None
        original = table[name] if table is not None else getattr(modeling, name)

        def counted(*args, original=original, name=name, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return original(*args, **kwargs)

        if table is not None:
            monkeypatch.setitem(table, name, counted)
        else:
            monkeypatch.setattr(modeling, name, counted)
    overrides = dict(decay_type="mamba2", decay_granularity="vector")
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(3))
    results = {}
    for backend in ("torch", "triton"):
        flags = {switched_off: False} if switched_off and backend == "triton" else {}
        model = perturbed_model(tiny_config(kernel_backend=backend, **overrides, **flags), seed=13)
        calls.clear()
        out = model(ids, labels=ids, use_cache=False)
        results[backend] = (out.loss.detach(), out.logits.detach(), dict(calls))
    assert not results["torch"][2], f"kernel_backend='torch' ran Triton kernels: {results['torch'][2]}"
    ran = results["triton"][2]
    assert ran.get("triton", 0) == 2, ran  # the recurrence of each layer
    for piece, flag in FUSED_PIECES.items():
        assert (piece in ran) == (flag != switched_off), (piece, ran)
    assert relative_error(results["triton"][1], results["torch"][1]) <= 1e-5
    assert abs(float(results["triton"][0]) - float(results["torch"][0])) <= 1e-5


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
    assert_close(actual, oracle(inputs, scale=0.5), NAMES)


@pytest.mark.parametrize("kind", ["vector", "scalar", "static", "none", "vector-frozen"])
@pytest.mark.parametrize("packed", [False, True], ids=["one-sequence", "packed"])
def test_walks_in_segments(kind, packed):
    """With few sequences × heads the state walks split sequences into segments (`_segment_plan`): they go through
    the segments from zero, combine their ends (`_combine_segments_kernel`) and walk them again from the combined
    starts. Output, final state and every gradient (initial state included) still match the oracle, and packed
    sequences of fewer segments than the longest take no part of another's."""
    lengths = [5 * CHUNK + 3] if not packed else [3 * CHUNK + 1, CHUNK - 3, 2 * CHUNK]
    heads = 1
    max_chunks = sum(-(-n // CHUNK) for n in lengths) if packed else -(-lengths[0] // CHUNK)
    assert kernels._segment_plan(len(lengths) * heads, max_chunks, torch.device("cpu"))[0] > 1
    q, k, v, log_decay, _ = make_inputs(kind.split("-")[0], 1, sum(lengths), heads, 16, 24, seed=12, initial=False)
    if kind.endswith("frozen"):  # no d log λ wanted
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
    expected = outputs_and_grads(reference, float64_copies(inputs), scale=0.5)
    assert_close(actual, expected, names_for(inputs))


@pytest.mark.parametrize("segment_chunks", [1, 2, 100])
def test_forced_segment_lengths(segment_chunks, monkeypatch):
    """Every walk in segments of one chunk, of two (the last one short) or longer than the sequence (one whole walk),
    whatever `_segment_plan`'s rule would pick: all give the oracle's outputs and gradients."""
    plans = []

    def forced_plan(programs, max_chunks, device):
        chunks = max(1, min(segment_chunks, max_chunks))
        plans.append((-(-max(max_chunks, 1) // chunks), chunks))
        return plans[-1]

    monkeypatch.setattr(kernels, "_segment_plan", forced_plan)
    length = 3 * CHUNK + 7
    inputs = make_inputs("vector", 2, length, 2, 16, 24, seed=21)
    actual = outputs_and_grads(triton_chunked_recurrence, inputs, scale=0.5)
    assert_close(actual, oracle(inputs, scale=0.5), NAMES)
    assert plans and all(plan == (-(-4 // min(segment_chunks, 4)), min(segment_chunks, 4)) for plan in plans), plans


@pytest.mark.parametrize("kind", ["vector", "scalar"])
def test_key_and_value_blocks(kind):
    """Every kernel takes the key and value dims in blocks (TUNING's block_k and block_v: the walks split them over
    programs, the others loop over them or spread them over programs): at K = 200 and V = 136 every kernel has
    several of each, the last ones ragged, and the outputs and gradients are the oracle's."""
    key_dim, value_dim = 200, 136
    for kernel in {name.removesuffix("_vector") for name in kernels.TUNING}:
        for decay in (kernels.DECAY_VECTOR, kernels.DECAY_SCALAR):
            block_k, block_v, _ = kernels._launch(kernel, key_dim, value_dim, kernels._dot_settings(torch.float16)[0],
                                                  decay)
            assert key_dim % block_k and value_dim % block_v, (kernel, decay, block_k, block_v)
    inputs = make_inputs(kind, 2, CHUNK + 29, 2, key_dim, value_dim, seed=23)
    actual = outputs_and_grads(triton_chunked_recurrence, inputs, scale=0.5)
    assert_close(actual, oracle(inputs, scale=0.5), NAMES)


@pytest.mark.parametrize("kind", ["scalar", "static"])
def test_wide_heads_take_transposed_pairs(kind):
    """From head dim 128 on, scalar and static decay's key gradients take dk's own pairs from dq's pairs transposed
    (`_intra_grads`); at K = 128, with strong decays and d log λ, every gradient is the oracle's."""
    assert 128 >= kernels.TRANSPOSED_PAIRS_FROM_HEAD_DIM
    inputs = make_inputs(kind, 1, CHUNK + 19, 2, 128, 16, seed=27)
    with torch.no_grad():
        inputs[3].copy_(trained_like_log_decay(kind, 1, CHUNK + 19, 2, 128, -6.0, torch.Generator().manual_seed(8)))
    actual = outputs_and_grads(triton_chunked_recurrence, inputs, scale=128 ** -0.5)
    assert_close(actual, oracle(inputs, scale=128 ** -0.5), NAMES, tolerance=cumulative_tolerance(inputs[3]))


@pytest.mark.parametrize("kind", ["scalar", "static", "vector"])
def test_gradients_without_decay_gradient(kind):
    """A fixed or frozen decay: no d log λ is computed, the other gradients still match the oracle. V = 80 makes two
    value blocks, the second ragged."""
    q, k, v, log_decay, state = make_inputs(kind, 2, 2 * CHUNK + 9, 2, 16, 80, seed=21)
    inputs = [q, k, v, log_decay.detach(), state]
    actual = outputs_and_grads(triton_chunked_recurrence, inputs, scale=0.5)
    assert_close(actual, oracle(inputs, scale=0.5), names_for(inputs))


@pytest.mark.parametrize("kind", ["vector", "scalar"])
def test_forward_without_autograd(kind):
    """Under no_grad the forward keeps nothing for a backward (no scores are stored) and gives the oracle's outputs."""
    inputs = make_inputs(kind, 2, 2 * CHUNK + 5, 2, 16, 24, seed=25)
    q, k, v, log_decay, state = inputs
    with torch.no_grad():
        o, final = triton_chunked_recurrence(q, k, v, log_decay, scale=0.5, initial_state=state,
                                             output_final_state=True)
        expected = naive_recurrence(*float64_copies(inputs)[:4], scale=0.5, initial_state=state.double(),
                                    output_final_state=True)
    assert_close([o, final], expected, ["o", "final_state"])
