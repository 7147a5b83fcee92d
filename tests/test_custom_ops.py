"""The Triton kernels as torch custom ops (`linear_decay::chunk_forward`, `chunk_backward`, `recurrent_step`), on CPU
tensors in Triton's interpreter (conftest sets TRITON_INTERPRET=1 without a GPU):

- `torch.library.opcheck` of each op (its schema, autograd registration, fake implementation, and AOT dispatch with
  dynamic shapes, which runs the backward too) for vector, scalar, static and no decay, with and without initial /
  final states, and on packed sequences;
- `torch.compile(fullgraph=True, backend="aot_eager")` through the ops: the same kernels run, so the same numbers as
  eager, bit for bit, and `torch._dynamo.explain` finds no graph break; the compiled decoding step updates the state
  in place as eager does;
- a tiny model on LINEAR_DECAY_BACKEND=triton compiled the same way: a training step (forward and backward) and a
  cached one-token decoding step, each one graph, with eager's logits, gradients and states;
- torch.export of the model and of the decoding step: the ops in the exported graph, eager's results.

Small shapes: under the interpreter every kernel program runs in Python. The CUDA counterpart (Inductor, bf16) is in
tests/test_ops_gpu.py.
"""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

from linear_decay import ops_chunk as chunk_kernels  # noqa: E402
from linear_decay import recurrence as recurrence  # noqa: E402
from linear_decay.ops_chunk import CHUNK, chunk_backward, chunk_forward  # noqa: E402
from linear_decay.ops_chunk import triton_chunked_recurrence  # noqa: E402
from linear_decay.ops_recurrent import recurrent_step, triton_fused_recurrent  # noqa: E402
from linear_decay.modeling_linear_decay import CACHE_FIELD  # noqa: E402

from conftest import perturbed_model, relative_error, tiny_config  # noqa: E402

pytestmark = pytest.mark.slow  # the Triton kernels in the interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KINDS = ["vector", "scalar", "static", "none"]
KEY_DIM, VALUE_DIM = 16, 24
PACKED_LENGTHS = [5, 0, CHUNK + 6, 20]  # an empty sequence, one over a chunk: 4 chunks of the bound's 5


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles anew (no recompilation limit reached across parametrisations)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_inputs(kind, batch, length, seed, heads=1, initial=True, sequences=None, grad=True):
    """q, k, v, log λ (None without decay), initial states ([sequences or batch, H, K, V], or None), all leaves that
    require grad when `grad`. One head unless asked: the interpreter's time grows with the programs."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, heads, KEY_DIM, generator=generator)
    k = torch.randn(batch, length, heads, KEY_DIM, generator=generator)
    v = torch.randn(batch, length, heads, VALUE_DIM, generator=generator)
    shape = {"vector": (batch, length, heads, KEY_DIM), "scalar": (batch, length, heads), "static": (heads,),
             "none": None}[kind]
    log_decay = -torch.rand(shape, generator=generator) if shape is not None else None
    states = torch.randn(sequences or batch, heads, KEY_DIM, VALUE_DIM, generator=generator) if initial else None
    return [x.to(DEVICE).requires_grad_(grad) if x is not None else None for x in (q, k, v, log_decay, states)]


def packed_offsets():
    return torch.tensor([0, *PACKED_LENGTHS]).cumsum(0).to(device=DEVICE, dtype=torch.int32)


# ----------------------------------------------------------------------------------------------------------------
# opcheck


@pytest.mark.parametrize("kind,states", [(kind, True) for kind in KINDS] + [("vector", False), ("none", False)],
                         ids=[*(f"{kind}-initial-final" for kind in KINDS), "vector-no-states", "none-no-states"])
def test_chunk_forward_opcheck(kind, states):
    q, k, v, log_decay, initial = make_inputs(kind, 2, CHUNK - 24, seed=1, initial=states)
    exact_states = kind in ("scalar", "static")  # fp32 chunk states: their d log λ is summed from them
    torch.library.opcheck(chunk_forward, (q, k, v, log_decay, initial, None, 0.5, states, True, exact_states))


@pytest.mark.parametrize("kind", ["scalar", "static"])
def test_chunk_forward_opcheck_packed(kind):
    cu_seqlens = packed_offsets()
    q, k, v, log_decay, initial = make_inputs(kind, 1, sum(PACKED_LENGTHS), seed=2, sequences=len(PACKED_LENGTHS))
    torch.library.opcheck(chunk_forward, (q, k, v, log_decay, initial, cu_seqlens, 0.5, True, True, True))


def test_chunk_forward_opcheck_without_gradients():
    """Nothing requires grad: no scores are kept (`keep` false)."""
    q, k, v, log_decay, initial = make_inputs("scalar", 2, CHUNK - 24, seed=3, grad=False)
    torch.library.opcheck(chunk_forward, (q, k, v, log_decay, initial, None, 0.5, True, False, False))


@pytest.mark.parametrize("kind,packed,decay_grad,initial_grad", [("vector", False, True, True),
                                                                  ("static", True, False, False),
                                                                  ("scalar", False, True, False)])
def test_chunk_backward_opcheck(kind, packed, decay_grad, initial_grad):
    """The backward op alone (chunk_forward's opcheck runs it through autograd too): every gradient, and none of
    d log λ and ∂L/∂S_0 (empty outputs)."""
    cu_seqlens = packed_offsets() if packed else None
    batch, length = (1, sum(PACKED_LENGTHS)) if packed else (2, CHUNK - 24)
    q, k, v, log_decay, initial = make_inputs(kind, batch, length, seed=4, sequences=len(PACKED_LENGTHS) if packed
                                              else None, grad=False)
    exact_states = decay_grad and kind in ("scalar", "static")
    o, final, *kept = chunk_forward(q, k, v, log_decay, initial, cu_seqlens, 0.5, True, True, exact_states)
    generator = torch.Generator().manual_seed(5)
    do = torch.randn(o.shape, generator=generator).to(DEVICE)
    final_grad = torch.randn(final.shape, generator=generator).to(DEVICE)
    torch.library.opcheck(chunk_backward, (do, final_grad, q, k, v, log_decay, initial, *kept, cu_seqlens, 0.5,
                                           decay_grad, initial_grad))


def test_chunk_ops_opcheck_two_state_planes():
    """bf16 scalar decay with d log λ from head dim 128: the forward keeps its chunk states as two bf16 planes
    [2, chunks, H, K, V] (`_state_planes`), and both ops' fake implementations, autograd and the backward agree with
    that layout. (Under Triton's interpreter bf16 values are not exact, DESIGN §7; the GPU tests check them.)"""
    key_dim = chunk_kernels.PLANES_FROM_HEAD_DIM
    generator = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, CHUNK + 6, 2, key_dim, generator=generator).bfloat16().to(DEVICE) for _ in range(3))
    log_decay = -torch.rand(1, CHUNK + 6, 2, generator=generator).to(DEVICE)
    initial = torch.randn(1, 2, key_dim, key_dim, generator=generator).to(DEVICE)
    args = (q, k, v, log_decay, initial, None, key_dim ** -0.5, True, True, True)
    o, final, *kept = chunk_forward(*args)
    states = kept[0]
    assert states.shape == (2, 2, 2, key_dim, key_dim) and states.dtype == torch.bfloat16
    torch.library.opcheck(chunk_forward, args)
    do = torch.randn(o.shape, generator=generator).bfloat16().to(DEVICE)
    final_grad = torch.randn(final.shape, generator=generator).to(DEVICE)
    torch.library.opcheck(chunk_backward, (do, final_grad, q, k, v, log_decay, initial, *kept, None,
                                           key_dim ** -0.5, True, True))


@pytest.mark.parametrize("kind,state", [(kind, "in-place") for kind in KINDS] + [("vector", "new"),
                                                                                 ("vector", "read-only")])
def test_recurrent_step_opcheck(kind, state):
    """The state read and overwritten (the model's decoding), written only (no initial state), read only (no final
    state)."""
    q, k, v, log_decay, initial = make_inputs(kind, 2, 3, seed=6, heads=2, grad=False)
    if state == "new":  # no initial state: every element of the final one is written
        initial = torch.empty_like(initial)
    torch.library.opcheck(recurrent_step, (q, k, v, log_decay, initial, 0.5, state != "new", state != "read-only"))


def test_packed_layout_reads_nothing_to_the_host():
    """The packed-sequence layout is built on the device: each sequence's chunks in order (an empty one has none),
    then the bound's spare chunk, given to the last sequence past its end, so that all its rows are masked."""

    class NoHostRead(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            assert func not in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default), func
            return func(*args, **(kwargs or {}))

    cu_seqlens = packed_offsets()
    length = sum(PACKED_LENGTHS)
    with NoHostRead():
        bounds, chunk_offsets, chunk_seq, chunk_token = chunk_kernels._packed_chunk_layout(cu_seqlens, length)
    assert chunk_seq.numel() == (length + (CHUNK - 1) * len(PACKED_LENGTHS)) // CHUNK == 5
    assert torch.equal(bounds.cpu(), cu_seqlens.cpu())
    assert chunk_offsets.tolist() == [0, 1, 1, 3, 4]
    assert chunk_seq.tolist() == [0, 2, 2, 3, 3]
    assert chunk_token.tolist() == [0, 5, 5 + CHUNK, 5 + CHUNK + 6, 5 + CHUNK + 6 + CHUNK]
    assert chunk_token[-1] >= cu_seqlens[-1]  # the spare chunk: past the last sequence's end


# ----------------------------------------------------------------------------------------------------------------
# torch.compile through the ops


def loss_and_grads(fn, inputs, cu_seqlens=None):
    """<o, r> + <final state, r'> and its gradients to every input that requires grad."""
    q, k, v, log_decay, initial = inputs
    o, final = fn(q, k, v, log_decay, 0.5, initial, True, cu_seqlens)
    generator = torch.Generator().manual_seed(7)
    loss = (o * torch.randn(o.shape, generator=generator).to(DEVICE)).sum() \
        + (final * torch.randn(final.shape, generator=generator).to(DEVICE)).sum()
    wrt = [x for x in inputs if x is not None and x.requires_grad]
    return [o.detach(), final.detach(), *torch.autograd.grad(loss, wrt)]


def chunked(q, k, v, log_decay, scale, initial, output_final_state, cu_seqlens):
    return triton_chunked_recurrence(q, k, v, log_decay, scale=scale, initial_state=initial,
                                     output_final_state=output_final_state, cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("kind,packed,frozen", [("vector", False, False), ("static", False, False),
                                                ("scalar", True, False), ("static", True, True)],
                         ids=["vector", "static", "scalar-packed", "static-packed-frozen-decay"])
def test_compiled_chunked_recurrence_equals_eager(kind, packed, frozen):
    """Forward and backward compiled with fullgraph=True (aot_eager): one graph, eager's outputs and gradients bit
    for bit (d log λ summed over the tokens for static decay; none wanted for a frozen one, as tnl's)."""
    cu_seqlens = packed_offsets() if packed else None
    batch, length = (1, sum(PACKED_LENGTHS)) if packed else (2, CHUNK + 9)
    inputs = make_inputs(kind, batch, length, seed=8, sequences=len(PACKED_LENGTHS) if packed else None)
    if frozen:
        inputs[3] = inputs[3].detach()
    expected = loss_and_grads(chunked, inputs, cu_seqlens)
    actual = loss_and_grads(torch.compile(chunked, fullgraph=True, backend="aot_eager"), inputs, cu_seqlens)
    assert len(actual) == len(expected) == 6 + (not frozen) - (kind == "none")
    for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a.shape == e.shape and a.dtype == e.dtype and torch.equal(a, e), index
    explanation = torch._dynamo.explain(chunked)(*inputs[:4], 0.5, inputs[4], True, cu_seqlens)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.parametrize("kind", ["vector", "scalar"])
def test_compiled_decoding_step_updates_the_state_in_place(kind):
    """The compiled step writes the new state into the fp32 contiguous initial state and returns that very tensor,
    as eager does; o and the state equal eager's."""
    q, k, v, log_decay, initial = make_inputs(kind, 2, 2, seed=9, heads=2, grad=False)

    def step(q, k, v, log_decay, state):
        return triton_fused_recurrent(q, k, v, log_decay, scale=0.5, initial_state=state, output_final_state=True)

    eager_state, compiled_state = initial.clone(), initial.clone()
    o, final = step(q, k, v, log_decay, eager_state)
    assert final is eager_state
    compiled_o, compiled_final = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, log_decay,
                                                                                          compiled_state)
    assert compiled_final is compiled_state
    assert torch.equal(compiled_o, o) and torch.equal(compiled_state, eager_state)
    explanation = torch._dynamo.explain(step)(q, k, v, log_decay, initial.clone())
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


# ----------------------------------------------------------------------------------------------------------------
# The whole model, compiled


# vector decay with rope; static decay (tnl) with TPE, whose filter is a second recurrence with broadcast q, k
MODEL_COMBOS = [("mamba2", "vector", "rope"), ("tnl", "scalar", "tpe")]


def model_for(combo, seed):
    decay_type, granularity, position = combo
    return perturbed_model(tiny_config(decay_type=decay_type, decay_granularity=granularity,
                                       position_encoding=position, num_hidden_layers=1), seed=seed)


def padded_batch(vocab, length=CHUNK - 24):
    ids = torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(10)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a left-padded row: under compile the mask path runs padded (no packing decided on the host)
    return ids, mask


@pytest.mark.parametrize("combo", MODEL_COMBOS[:1], ids="-".join)
def test_compiled_training_step_has_no_graph_break(monkeypatch, combo):
    """LINEAR_DECAY_BACKEND=triton: the model's loss compiled with fullgraph=True (aot_eager) is one graph through
    the chunk op, and its forward and backward give eager's logits and parameter gradients. Eager runs the padded
    batch padded too (no packing), as the compiled model does, so that both compute the same sums."""
    monkeypatch.setenv("LINEAR_DECAY_BACKEND", "triton")
    monkeypatch.setattr(recurrence, "PACK_MIN_PADDING", 2.0)
    model = model_for(combo, seed=11).to(DEVICE)
    ids, mask = padded_batch(model.config.vocab_size)

    def training_step(model, ids, mask):
        out = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False)
        return out.loss, out.logits

    def run(step):
        model.zero_grad(set_to_none=True)
        loss, logits = step(model, ids, mask)
        loss.backward()
        return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    logits, grads = run(training_step)
    compiled_logits, compiled_grads = run(torch.compile(training_step, fullgraph=True, backend="aot_eager"))
    assert relative_error(compiled_logits, logits) <= 1e-6
    assert compiled_grads.keys() == grads.keys()
    for name, grad in grads.items():
        assert relative_error(compiled_grads[name], grad) <= 1e-6, name
    explanation = torch._dynamo.explain(training_step)(model, ids, mask)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    assert "linear_decay.chunk_forward" in str(explanation.graphs[0].graph)


@pytest.mark.parametrize("combo", MODEL_COMBOS, ids="-".join)
def test_compiled_decoding_step_has_no_graph_break(monkeypatch, combo):
    """After an eager prefill, a cached one-token step compiled with fullgraph=True (aot_eager) is one graph
    through the decoding op: eager's logits, and the cache's recurrent states updated in place (the same tensors)."""
    monkeypatch.setenv("LINEAR_DECAY_BACKEND", "triton")
    model = model_for(combo, seed=12).to(DEVICE).eval()
    model.config.decode_cuda_graphs = False
    ids, mask = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        prefill = getattr(model(input_ids=ids, attention_mask=mask, use_cache=True), CACHE_FIELD)
    token = torch.tensor([[3], [5]], device=DEVICE)
    step_mask = torch.cat([mask, torch.ones_like(token)], dim=1)

    def decoding_step(token, step_mask, cache):
        return model(input_ids=token, attention_mask=step_mask, use_cache=True, **{CACHE_FIELD: cache}).logits

    def recurrent_states(cache):
        return [layer.tensors["recurrent"] for layer in cache.layers]

    eager_cache, compiled_cache = copy.deepcopy(prefill), copy.deepcopy(prefill)
    compiled_states = recurrent_states(compiled_cache)
    with torch.no_grad():
        logits = decoding_step(token, step_mask, eager_cache)
        compiled_logits = torch.compile(decoding_step, fullgraph=True, backend="aot_eager")(token, step_mask,
                                                                                           compiled_cache)
        explanation = torch._dynamo.explain(decoding_step)(token, step_mask, copy.deepcopy(prefill))
    assert relative_error(compiled_logits, logits) <= 1e-6
    assert all(a is b for a, b in zip(recurrent_states(compiled_cache), compiled_states, strict=True))
    for actual, expected in zip(compiled_cache.state_tensors(), eager_cache.state_tensors(), strict=True):
        assert relative_error(actual, expected) <= 1e-6
    assert compiled_cache.seen_tokens == eager_cache.seen_tokens == ids.shape[1] + 1
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    assert "linear_decay.recurrent_step" in str(explanation.graphs[0].graph)


# ----------------------------------------------------------------------------------------------------------------
# torch.export through the ops


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, mask):
        return self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def test_exported_model_runs_the_chunk_op(monkeypatch):
    """torch.export of the model on LINEAR_DECAY_BACKEND=triton keeps the chunk op in its graph and gives eager's
    logits (a left-padded row: both run it padded)."""
    monkeypatch.setenv("LINEAR_DECAY_BACKEND", "triton")
    monkeypatch.setattr(recurrence, "PACK_MIN_PADDING", 2.0)
    model = model_for(MODEL_COMBOS[0], seed=13).to(DEVICE).eval()
    ids, mask = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        program = torch.export.export(_Logits(model), (ids, mask))
        expected = _Logits(model)(ids, mask)
    assert "linear_decay.chunk_forward" in str(program.graph)
    assert relative_error(program.module()(ids, mask), expected) <= 1e-6


class _DecodingStep(torch.nn.Module):
    def forward(self, q, k, v, log_decay, state):
        return triton_fused_recurrent(q, k, v, log_decay, scale=0.5, initial_state=state, output_final_state=True)


def test_exported_decoding_step_updates_the_state_in_place():
    q, k, v, log_decay, initial = make_inputs("vector", 2, 1, seed=14, heads=2, grad=False)
    program = torch.export.export(_DecodingStep(), (q, k, v, log_decay, initial.clone()))
    assert "linear_decay.recurrent_step" in str(program.graph)
    eager_state, exported_state = initial.clone(), initial.clone()
    o, _ = _DecodingStep()(q, k, v, log_decay, eager_state)
    exported_o, final = program.module()(q, k, v, log_decay, exported_state)
    assert final is exported_state
    assert torch.equal(exported_o, o) and torch.equal(exported_state, eager_state)
