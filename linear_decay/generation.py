"""Generation state (DESIGN.md §1): the recurrent cache `generate()` carries between steps, and the one-token
decoding step replayed as a CUDA graph (`config.decode_cuda_graphs`).

The cache holds, per layer, the fp32 state [B, H, K, V] (and LightNet's normaliser), plus model-level state (TPE's
filter state, each row's count of real tokens): constant memory in the context length. It is a pytree node, so
torch.export takes it as an input or output.
"""

import copy
import json
import weakref

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

    def hold(self, tensors):
        """Hold `tensors` (in `state_tensors` order, same shapes) as the states, pinned: `DecodeGraph.adopt`."""
        tensors = iter(tensors)
        for layer in self._all_layers():
            layer.tensors = {name: next(tensors) for name in sorted(layer.tensors)}
        self.pin()

    def __deepcopy__(self, memo):
        """A copy of the states (transformers' prompt-cache reuse copies a cache); the copy has no decoding graph of
        its own: its first step takes one over or makes one (`DecodeGraph.for_step`)."""
        copied = memo[id(self)] = type(self).__new__(type(self))
        for name, value in vars(self).items():
            setattr(copied, name, None if name == "decode_graph" else copy.deepcopy(value, memo))
        return copied

    def keep_own_copies(self):
        """Replace every state by a copy of it and drop the decoding graph: what a cache keeps when its graph takes
        over another cache's states."""
        for layer in self._all_layers():
            layer.tensors = {name: tensor.clone() for name, tensor in layer.tensors.items()}
        self.decode_graph = None

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
    CUDA).

    A model keeps its latest graph, and the next cache of the same batch size takes it over (`for_step`, `adopt`), so
    later generate() calls replay without capturing again; `release(model)` frees it
    (`LinearDecayForCausalLM.release_decode_graph`)."""

    _latest = weakref.WeakKeyDictionary()  # model -> the last graph made for it

    @staticmethod
    def enabled_on(input_ids):
        """CUDA tensors only: CPU decoding has no launch overhead to remove."""
        return input_ids is not None and input_ids.is_cuda

    @classmethod
    def for_step(cls, model, cache, input_ids):
        """The graph that runs this step: the cache's own while it still reads the cache's states, else the model's
        latest graph where it can take the cache over, else a new one (then the model's latest)."""
        graph = cache.decode_graph
        if graph is None or not graph.matches(model, cache, input_ids):
            graph = cls._latest.get(model)
            if graph is None or not graph.adopt(model, cache, input_ids):
                graph = cls(model, cache, input_ids, capture=input_ids.is_cuda)
                cls._latest[model] = graph
            cache.decode_graph = graph
        return graph

    @classmethod
    def release(cls, model):
        """Forget the model's latest graph: its state tensors, stacked weights and captured memory are freed once no
        cache holds them."""
        cls._latest.pop(model, None)

    def __init__(self, model, cache, input_ids, capture=True):
        self.batch_size, self.capture = input_ids.shape[0], capture
        self.model = weakref.ref(model)
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
        self.states = cache.state_tensors()
        self.layout, self.reads = self._layout(cache), self._model_tensors(model)
        self.config = model.config.to_dict()
        self.owner = weakref.ref(cache)
        if capture:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_logits = self._step(model, cache)
        cache.seen_tokens = seen

    def adopt(self, model, cache, input_ids):
        """Take `cache` over, if this graph was made for this model as it is now (the same parameter and buffer
        tensors, the same config) and for a cache of this batch size and state layout: the cache that held the
        graph's state tensors keeps copies of its own, the new cache's states are copied into them and the cache
        holds them, and the stacked input weights are made again from the weights as they are now (an optimizer step
        or a `load_state_dict` between calls writes into the tensors the graph reads). Returns whether it did."""
        if (self.model() is not model or input_ids.shape[0] != self.batch_size
                or input_ids.device != self.static_ids.device or self._layout(cache) != self.layout
                or self._model_tensors(model) != self.reads or model.config.to_dict() != self.config):
            return False
        restacked = [mixer.stacked_weight_of_inputs() for mixer, _ in self.stacked]
        if any((new is None) != (old is None) or (new is not None and new.shape != old.shape)
               for new, (_, old) in zip(restacked, self.stacked)):
            return False  # a projection changed kind (e.g. an adapter or a hook added): capture again
        for new, (_, old) in zip(restacked, self.stacked):
            if old is not None:
                old.copy_(new)
        previous = self.owner()
        if previous is not None and previous is not cache:
            previous.keep_own_copies()
        for state, tensor in zip(self.states, cache.state_tensors()):
            state.copy_(tensor)
        cache.hold(self.states)
        self.owner = weakref.ref(cache)
        return True

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
    def _layout(cache):
        """Each state's layer, name, shape, dtype and device."""
        return [(index, name, t.shape, t.dtype, t.device) for index, layer in enumerate(cache._all_layers())
                for name, t in sorted(layer.tensors.items())]

    @staticmethod
    def _model_tensors(model):
        """Where each parameter and buffer of the model lies (address, shape, dtype): what the captured step reads."""
        return [(t.data_ptr(), t.shape, t.dtype) for t in (*model.parameters(), *model.buffers())]

    def matches(self, model, cache, input_ids):
        """Whether this graph was made for this model and still reads this cache's tensors, for a batch of this
        size."""
        return (self.model() is model and input_ids.shape[0] == self.batch_size
                and [t.data_ptr() for t in cache.state_tensors()] == [t.data_ptr() for t in self.states])

    def __call__(self, model, cache, input_ids):
        self.static_ids.copy_(input_ids)
        if self.capture:
            self.graph.replay()
            logits = self.static_logits.clone()
            cache.seen_tokens += 1
        else:
            logits = self._step(model, cache)
        return logits
