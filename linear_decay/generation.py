"""Generation state (DESIGN.md §1): the recurrent cache `generate()` carries between steps, and the one-token
decoding step replayed as a CUDA graph (`config.decode_cuda_graphs`).

The cache holds, per layer, the fp32 state [B, H, K, V] (and LightNet's normaliser), plus model-level state (TPE's
filter state, each row's count of real tokens): constant memory in the context length. It is a pytree node, so
torch.export takes it as an input or output.
"""

import json

import torch
from transformers.cache_utils import Cache


class RecurrentStateLayer:
    """Batch-first named state tensors of one layer (the recurrent state S, LightNet's normaliser, ...). Once
    `pinned` (CUDA-graph decoding), updates of the same shape are written into the existing tensors, so every state
    keeps its address."""

    is_compileable = False
    is_sliding = False
    is_croppable = False
    supports_early_init = False

    def __init__(self):
        self.tensors = {}
        self.pinned = False

    def get(self, name):
        return self.tensors.get(name)

    def set(self, name, value):
        old = self.tensors.get(name)
        if (self.pinned and old is not None and old is not value and old.shape == value.shape
                and old.device == value.device and old.dtype == value.dtype):
            old.copy_(value)
        else:
            self.tensors[name] = value

    def _map(self, fn):
        for name, t in list(self.tensors.items()):
            self.set(name, fn(t))

    def reorder_cache(self, beam_idx):
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats):
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices):
        self._map(lambda t: t[indices])

    def reset(self):
        self.tensors = {}
        self.pinned = False

    def crop(self, tokens_to_remove):
        raise NotImplementedError("a recurrent state cannot be rolled back: it keeps no per-token history")

    def offload(self):
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        pass

    def get_seq_length(self):
        return 0

    def get_max_length(self):
        return -1


class LinearDecayCache(Cache):
    """Cache for `generate()`: per layer the fp32 state [B, H, K, V] (+ LightNet's Z), plus model-level state (TPE
    filter state and each row's count of real tokens, which gives rope/lrpe offsets under left padding)."""

    def __init__(self, config=None, num_layers=None):
        num_layers = num_layers if num_layers is not None else config.num_hidden_layers
        super().__init__(layers=[RecurrentStateLayer() for _ in range(num_layers)])
        self.model_state = RecurrentStateLayer()
        self.seen_tokens = 0
        self.decode_graph = None  # the captured decoding step (`DecodeGraph`), when config.decode_cuda_graphs

    def _all_layers(self):
        return [*self.layers, self.model_state]

    def state_tensors(self):
        """Every tensor the cache holds, in a fixed order."""
        return [t for layer in self._all_layers() for _, t in sorted(layer.tensors.items())]

    def pin(self):
        """From now on state updates are written in place (`RecurrentStateLayer.pinned`)."""
        for layer in self._all_layers():
            layer.pinned = True

    def get_seq_length(self, layer_idx=0):
        return self.seen_tokens

    def get_max_length(self, layer_idx=None):
        return -1

    def has_previous_state(self, layer_idx=None, state_idx=None):
        return self.seen_tokens > 0

    def reorder_cache(self, beam_idx):
        for layer in self._all_layers():
            layer.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats):
        for layer in self._all_layers():
            layer.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices):
        for layer in self._all_layers():
            layer.batch_select_indices(indices)

    def reset(self):
        for layer in self._all_layers():
            layer.reset()
        self.seen_tokens = 0
        self.decode_graph = None

    def crop(self, tokens_to_remove):
        raise NotImplementedError("LinearDecayCache keeps no per-token history and cannot be cropped")

    @property
    def batch_size(self):
        offsets = self.model_state.get("real_tokens")
        return -1 if offsets is None else offsets.shape[0]

    @property
    def is_compileable(self):
        return False

    @property
    def is_initialized(self):
        return self.seen_tokens > 0

    @property
    def is_croppable(self):
        return False

    @property
    def is_linear(self):
        return [True] * len(self.layers)

    @property
    def is_sliding(self):
        return [False] * len(self.layers)


def _cache_flatten(cache):
    """pytree children of a LinearDecayCache: its state tensors (`state_tensors` order); the context holds the
    layer count, each layer's state names and the token count, everything `_cache_unflatten` needs besides."""
    names = tuple(tuple(sorted(layer.tensors)) for layer in cache._all_layers())
    return cache.state_tensors(), (len(cache.layers), names, cache.seen_tokens)


def _cache_flatten_with_keys(cache):
    children, context = _cache_flatten(cache)
    labels = [f"{'layers.' + str(index) if index < context[0] else 'model_state'}.{name}"
              for index, names in enumerate(context[1]) for name in names]
    return [(torch.utils._pytree.MappingKey(label), child) for label, child in zip(labels, children)], context


def _cache_unflatten(children, context):
    num_layers, names, seen_tokens = context
    cache = LinearDecayCache(num_layers=num_layers)
    children = iter(children)
    for layer, layer_names in zip(cache._all_layers(), names):
        for name in layer_names:
            layer.tensors[name] = next(children)
    cache.seen_tokens = seen_tokens
    return cache


def _register_cache_pytree():
    """Make LinearDecayCache a pytree node, so torch.export (and transformers' DynamoExporter, which keeps a node
    registered before it) takes it as an input or output; its context is JSON for `torch.export.save`."""
    try:
        torch.utils._pytree.register_pytree_node(
            LinearDecayCache, _cache_flatten, _cache_unflatten,
            serialized_type_name=f"{LinearDecayCache.__module__}.{LinearDecayCache.__qualname__}",
            flatten_with_keys_fn=_cache_flatten_with_keys,
            to_dumpable_context=lambda context: json.dumps([context[0], [list(n) for n in context[1]], context[2]]),
            from_dumpable_context=lambda dumped: (lambda c: (c[0], tuple(tuple(n) for n in c[1]), c[2]))(
                json.loads(dumped)),
        )
    except ValueError as error:  # registered already (the module imported twice under one name)
        if "already registered" not in str(error):
            raise


_register_cache_pytree()


class DecodeGraph:
    """One-token decoding steps of a model on one cache, replayed as a CUDA graph.

    The cache is pinned (states updated in place, so their addresses are fixed), the step runs twice on a side
    stream to compile and warm up every kernel, the states are restored from a snapshot, and the step is captured
    with a static input buffer. Each call then copies the new tokens into that buffer and replays: the whole step
    (embedding, every layer, the head) is one launch. Each mixer's input projections run as one matmul on a copy of
    their weights stacked when the graph is made (its mixers' `stacked_input_weight` while a step runs; the graph
    keeps the copies: about 3·d² values a layer, and one GEMM a layer instead of up to five). `capture=False` keeps
    all of this but runs the step eagerly on the static buffer (what CPU tests exercise; the graph itself needs
    CUDA)."""

    @staticmethod
    def enabled_on(input_ids):
        """CUDA tensors only: CPU decoding has no launch overhead to remove."""
        return input_ids is not None and input_ids.is_cuda

    def __init__(self, model, cache, input_ids, capture=True):
        self.batch_size, self.capture = input_ids.shape[0], capture
        self.stacked = [(mixer, mixer.stacked_weight_of_inputs()) for mixer in model.modules()
                        if hasattr(mixer, "stacked_input_weight")]
        cache.pin()
        names_before = [sorted(layer.tensors) for layer in cache._all_layers()]
        snapshot = [t.clone() for t in cache.state_tensors()]
        seen = cache.seen_tokens
        self.static_ids = input_ids.clone()
        if capture:
            side = torch.cuda.Stream(device=input_ids.device)
            side.wait_stream(torch.cuda.current_stream(input_ids.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._step(model, cache)
            torch.cuda.current_stream(input_ids.device).wait_stream(side)
        else:
            self._step(model, cache)
        if [sorted(layer.tensors) for layer in cache._all_layers()] != names_before:
            raise RuntimeError("a decoding step created cache state that the prefill did not: cannot pin it")
        for tensor, saved in zip(cache.state_tensors(), snapshot):
            tensor.copy_(saved)
        self.addresses = self._addresses(cache)
        if capture:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_logits = self._step(model, cache)
        cache.seen_tokens = seen

    def _step(self, model, cache):
        model.model.tokens_checked = True
        for mixer, weight in self.stacked:
            mixer.stacked_input_weight = weight
        try:
            hidden = model.model(input_ids=self.static_ids, cache=cache, use_cache=True).last_hidden_state
        finally:
            model.model.tokens_checked = False
            for mixer, _ in self.stacked:
                mixer.stacked_input_weight = None
        return model.lm_head(hidden)

    @staticmethod
    def _addresses(cache):
        return [t.data_ptr() for t in cache.state_tensors()]

    def matches(self, cache, input_ids):
        """Whether this graph still reads this cache's tensors for a batch of this size."""
        return input_ids.shape[0] == self.batch_size and self._addresses(cache) == self.addresses

    def __call__(self, model, cache, input_ids):
        self.static_ids.copy_(input_ids)
        if self.capture:
            self.graph.replay()
            logits = self.static_logits.clone()
            cache.seen_tokens += 1
        else:
            logits = self._step(model, cache)
        return logits
