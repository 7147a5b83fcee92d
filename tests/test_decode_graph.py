"""CUDA-graph decoding (config.decode_cuda_graphs, `DecodeGraph`) on the CPU: everything but the capture itself.

`DecodeGraph(capture=False)` pins the cache, warms the step up, restores the states from the snapshot and then runs
each step on its static input buffer, exactly the bookkeeping the captured graph relies on; the captured replay is
tested on the GPU (tests/test_ops_gpu.py). References: generate() with the option off (the plain eager path).
"""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import linear_decay.modeling_linear_decay as modeling
from linear_decay import LinearDecayCache

from conftest import combo_id, perturbed_model, relative_error, tiny_config

COMBOS = [
    ("mamba2", "vector", False, "rope"),
    ("gla", "vector", True, "lrpe"),
    ("hgrn2", "scalar", False, "tpe"),
    ("lightnet", "vector", False, "rope"),
    ("tnl", "scalar", False, "none"),
]


MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)


class CountOps(TorchDispatchMode):
    """Counts the calls of the given aten ops while active."""

    def __init__(self, *ops):
        super().__init__()
        self.ops, self.count = ops, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.ops
        return func(*args, **(kwargs or {}))


@pytest.fixture
def graphs_on_cpu(monkeypatch):
    """Let the graph path run on CPU tensors (eagerly, capture=False) and count the graphs built."""
    monkeypatch.setattr(modeling.DecodeGraph, "enabled_on", staticmethod(lambda ids: ids is not None))
    built = []
    original = modeling.DecodeGraph.__init__

    def counted(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(modeling.DecodeGraph, "__init__", counted)
    return built


def model_for(combo, graphs):
    decay_type, granularity, share, position = combo
    model = perturbed_model(tiny_config(decay_type=decay_type, decay_granularity=granularity, share_decay=share,
                                        position_encoding=position, decode_cuda_graphs=graphs)).eval()
    return model


def prompt(vocab, seed=0):
    ids = torch.randint(1, vocab, (3, 9), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    ids[0, :3] = 0
    return ids, mask


def generate(model, ids, mask, **options):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, pad_token_id=0,
                          output_scores=True, return_dict_in_generate=True, **options)


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_graph_decoding_matches_eager_greedy_and_beam(graphs_on_cpu, combo):
    model = model_for(combo, graphs=False)
    ids, mask = prompt(model.config.vocab_size)
    for options in (dict(do_sample=False), dict(do_sample=False, num_beams=3)):
        model.config.decode_cuda_graphs = False
        expected = generate(model, ids, mask, **options)
        assert not graphs_on_cpu
        model.config.decode_cuda_graphs = True
        actual = generate(model, ids, mask, **options)
        assert len(graphs_on_cpu) == 1  # beam search decodes 9 rows: a graph of its own; reordering keeps addresses
        graphs_on_cpu.clear()
        assert torch.equal(actual.sequences, expected.sequences), options
        for a, e in zip(actual.scores, expected.scores):
            finite = torch.isfinite(e)
            assert torch.equal(finite, torch.isfinite(a))
            assert relative_error(a[finite], e[finite]) <= 1e-6


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_pinned_states_keep_their_addresses_and_the_step_never_syncs(graphs_on_cpu, combo):
    """After the prefill every state tensor keeps its storage through the decoding steps (what a replayed graph
    reads and writes), and the step body has no host synchronisation (a captured graph cannot contain one)."""
    model = model_for(combo, graphs=True)
    ids, mask = prompt(model.config.vocab_size, seed=1)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
        assert isinstance(cache, LinearDecayCache)
        step_ids = out.logits[:, -1:].argmax(-1)
        step_mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
        model(input_ids=step_ids, attention_mask=step_mask, cache=cache)  # builds the graph
        graph = cache.decode_graph
        addresses = [t.data_ptr() for t in cache.state_tensors()]
        seen = cache.seen_tokens

        class NoHostSync(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                assert func not in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default), \
                    f"host synchronisation inside the decoding step: {func}"
                return func(*args, **(kwargs or {}))

        with NoHostSync():
            graph._step(model, cache)
        assert [t.data_ptr() for t in cache.state_tensors()] == addresses
        assert cache.seen_tokens == seen + 1 and cache.decode_graph is graph


def test_graph_path_checks_the_new_tokens_without_embedding_them_twice(graphs_on_cpu):
    """Outside the graph the step's tokens are only range-checked (a clear error for an id outside the vocabulary);
    the one embedding lookup is the graph's (on CPU, the step run eagerly)."""
    model = model_for(COMBOS[0], graphs=True)
    ids, mask = prompt(model.config.vocab_size, seed=10)

    with torch.no_grad():
        cache = model(input_ids=ids, attention_mask=mask, use_cache=True).cache
        step = torch.ones(3, 1, dtype=torch.long)
        model(input_ids=step, cache=cache)  # builds the graph
        with CountOps(torch.ops.aten.embedding.default) as lookups:
            model(input_ids=step, cache=cache)
        assert lookups.count == 1
        with pytest.raises(ValueError, match="outside the vocabulary"):
            model(input_ids=step * model.config.vocab_size, cache=cache)


def test_graph_path_is_skipped_where_it_does_not_apply(graphs_on_cpu):
    """Prefill, gradients, a new token marked padding in the mask, and a model split over devices by a device map
    take the eager path."""
    model = model_for(("mamba2", "scalar", False, "none"), graphs=True)
    ids, mask = prompt(model.config.vocab_size, seed=2)
    out = model(input_ids=ids, attention_mask=mask, use_cache=True)  # gradients enabled
    cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
    step = torch.ones(3, 1, dtype=torch.long)
    model(input_ids=step, attention_mask=torch.cat([mask, torch.ones_like(step)], 1), cache=cache)
    with torch.no_grad():
        model(input_ids=step, attention_mask=torch.cat([mask, torch.ones_like(step), torch.zeros_like(step)], 1),
              cache=cache)
        model.hf_device_map = {"model.embed_tokens": 0, "model.layers": 1, "lm_head": 1}
        model(input_ids=step, cache=cache)
    assert not graphs_on_cpu
    del model.hf_device_map
    with torch.no_grad():
        model(input_ids=step, cache=cache)
    assert len(graphs_on_cpu) == 1  # the same step on one device does take the graph path


def test_graph_decoding_is_the_default():
    assert tiny_config().decode_cuda_graphs is True


def test_invalid_option_is_a_clear_error():
    with pytest.raises(ValueError, match="decode_cuda_graphs"):
        tiny_config(decode_cuda_graphs="yes")


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_graph_step_runs_each_mixers_input_projections_as_one_matmul(graphs_on_cpu, combo):
    """The graph's step multiplies by each mixer's input projections stacked once (one matmul instead of one per
    projection), and the next generate() call stacks the weights as they are then: a weight changed between calls is
    seen, as the eager path sees it."""
    model = model_for(combo, graphs=True)
    ids, mask = prompt(model.config.vocab_size, seed=3)

    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
        step_ids = out.logits[:, -1:].argmax(-1)
        model(input_ids=step_ids, attention_mask=torch.cat([mask, torch.ones_like(step_ids)], 1), cache=cache)
        graph = cache.decode_graph
        with CountOps(*MATMULS) as stacked:
            graph._step(model, cache)
        model.config.decode_cuda_graphs = False
        with CountOps(*MATMULS) as separate:
            model(input_ids=step_ids, cache=cache)
    mixers = [layer.attn for layer in model.model.layers]
    saved = sum(len(mixer.input_projections()) - 1 for mixer in mixers)
    assert saved > 0 and stacked.count == separate.count - saved
    assert all(mixer.stacked_input_weight is None for mixer in mixers)  # only while a step runs

    with torch.no_grad():
        mixers[0].q_proj.weight.mul_(-1.5)
    expected = generate(model, ids, mask)
    model.config.decode_cuda_graphs = True
    actual = generate(model, ids, mask)
    assert torch.equal(actual.sequences, expected.sequences)
    for a, e in zip(actual.scores, expected.scores):
        finite = torch.isfinite(e)
        assert torch.equal(finite, torch.isfinite(a)) and relative_error(a[finite], e[finite]) <= 1e-6


def assert_same_scores(actual, expected):
    assert torch.equal(actual.sequences, expected.sequences)
    for a, e in zip(actual.scores, expected.scores):
        finite = torch.isfinite(e)
        assert torch.equal(finite, torch.isfinite(a)) and relative_error(a[finite], e[finite]) <= 1e-6


@pytest.mark.parametrize("combo", [COMBOS[0], COMBOS[2]], ids=combo_id)
def test_later_generate_calls_take_the_models_graph_over(graphs_on_cpu, combo):
    """The model keeps its graph: a second generate() call at the same batch size makes none, and gives the eager
    path's tokens and scores on its own prompt."""
    model = model_for(combo, graphs=True)
    first, second = prompt(model.config.vocab_size, seed=4), prompt(model.config.vocab_size, seed=5)
    generate(model, *first)
    assert len(graphs_on_cpu) == 1
    actual = generate(model, *second)
    assert len(graphs_on_cpu) == 1
    model.config.decode_cuda_graphs = False
    assert_same_scores(actual, generate(model, *second))


def step_logits(model, cache, token, mask):
    """One decoding step of `token` [B, 1] on `cache`; its logits and the mask grown by the new column."""
    mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    return model(input_ids=token, attention_mask=mask, cache=cache).logits[:, -1], mask


@pytest.mark.parametrize("combo", [COMBOS[1], COMBOS[3]], ids=combo_id)
def test_caches_taking_turns_on_one_graph_each_keep_their_own_states(graphs_on_cpu, combo):
    """Two caches decoding in turns (and a deep copy of one, transformers' prompt-cache reuse) share the model's one
    graph; each step's logits equal those of the same step on separate caches decoded eagerly."""
    model = model_for(combo, graphs=True)
    prompts = [prompt(model.config.vocab_size, seed=6), prompt(model.config.vocab_size, seed=7)]
    tokens = torch.randint(1, model.config.vocab_size, (6, 3, 1), generator=torch.Generator().manual_seed(8))
    turns = [0, 0, 1, 1, 0, 2, 1, 0, 2]  # 2: a deep copy of cache 0, made right after its third step

    def run(graphs):
        model.config.decode_cuda_graphs = graphs
        logits, caches, masks, steps = [], [], [], [0, 0, 0]
        with torch.no_grad():
            for ids, mask in prompts:
                caches.append(model(input_ids=ids, attention_mask=mask, use_cache=True).cache)
                masks.append(mask)
            for index, turn in enumerate(turns):
                if turn == 2 and len(caches) == 2:
                    caches.append(copy.deepcopy(caches[0]))
                    assert caches[2].decode_graph is None  # not a copy of the graph (nor of the modules it runs)
                    masks.append(masks[0])
                    steps[2] = steps[0]
                step, mask = step_logits(model, caches[turn], tokens[steps[turn]], masks[turn])
                masks[turn], steps[turn] = mask, steps[turn] + 1
                logits.append(step)
        return logits

    expected = run(graphs=False)
    assert not graphs_on_cpu
    actual = run(graphs=True)
    assert len(graphs_on_cpu) == 1
    for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert relative_error(a, e) <= 1e-6, f"step {index} (cache {turns[index]})"


def test_a_new_graph_where_the_old_one_would_read_the_wrong_tensors(graphs_on_cpu):
    """A replaced parameter, another batch size, a changed config and `release_decode_graph()` each make the next
    generate() call capture again; its tokens and scores are the eager path's."""
    model = model_for(("gla", "scalar", False, "rope"), graphs=True)
    ids, mask = prompt(model.config.vocab_size, seed=9)
    generate(model, ids, mask)
    assert len(graphs_on_cpu) == 1

    def check(ids, mask, builds):
        actual = generate(model, ids, mask)
        assert len(graphs_on_cpu) == builds
        model.config.decode_cuda_graphs = False
        expected = generate(model, ids, mask)
        model.config.decode_cuda_graphs = True
        assert_same_scores(actual, expected)

    mixer = model.model.layers[0].attn
    mixer.o_proj.weight = torch.nn.Parameter(mixer.o_proj.weight.detach() * -2)
    check(ids, mask, builds=2)
    check(ids[:2], mask[:2], builds=3)
    model.config.rms_norm_eps = 1e-3
    check(ids[:2], mask[:2], builds=4)
    model.release_decode_graph()
    check(ids[:2], mask[:2], builds=5)
    check(ids[:2], mask[:2], builds=5)
