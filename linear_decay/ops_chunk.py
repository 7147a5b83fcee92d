"""Triton kernels for the chunked decay recurrence (DESIGN.md §1), forward and backward, on packed sequences. This
module is the host side (chunk layouts, launch settings, the custom ops and their autograd); the kernels live by stage
in `ops_chunk_forward` and `ops_chunk_backward`, their shared device functions in `ops_chunk_common`.

    o, final_state = triton_chunked_recurrence(q, k, v, log_decay, scale, initial_state, output_final_state,
                                               cu_seqlens=None)

Same contract as `recurrence.chunked_recurrence` (whose docstring gives the shapes), plus `cu_seqlens`:
int32 offsets [N + 1] of N sequences packed along T of a batch of one (varlen); initial/final states are then
[N, H, K, V]. A regular batch [B, T] runs as B packed sequences of length T, so every kernel below sees packed
sequences. The oracle is `recurrence.naive_recurrence`; `chunked_recurrence` is the PyTorch twin.

Algorithm (per head; b = cumulative log λ within a chunk of CHUNK tokens, fp32; q is pre-multiplied by `scale`):

- `_cumulative_decay_kernel`: b of every chunk, chunk-major, read by every later kernel (kept for the backward);
  for vector decay `_chunk_scores_kernel` writes it, and the forward walk cumulates log λ itself.
- `_chunk_states_kernel`: walks each sequence in chunks and stores the state at every chunk start
  (S ← e^{B} ⊙ S + (k ⊙ e^{B − b})ᵀ v, B the chunk's total log-decay), kept for the backward (in the dot operand
  dtype, or exact where scalar or static decay's d log λ will be summed from them: fp32, `_state_dtype`, or two bf16
  planes, `_state_planes`). With few sequences × heads the walks (this one and the state gradients') go through
  segments of a sequence in parallel (`_segment_plan`): each segment from zero, `_combine_segments_kernel` joins
  their ends in order, and each segment again from its true start.
- `_chunk_output_kernel`: one program per (chunk, head; for scalar, static and no decay also per block of 128 value
  channels): o = (q ⊙ e^{b}) S + A v, A the causal decayed scores of the chunk (scalar, static and no decay: q kᵀ
  and q S in one pass; vector decay: from `_chunk_scores_kernel`, `_intra_scores`). The cost does not depend on the
  decay's strength: for vector decay the chunk is halved log2(CHUNK) times, and each pair of tokens factorises about
  the middle row of the one block that has them in different halves, both factors e^{≤ 0}: one dot per level, no
  pair summed one by one.
- backward: the state gradient at every chunk end (`_chunk_state_grads_kernel`, reverse walk), then dv per (chunk,
  head) (`_chunk_value_grads_kernel`, from the scores the forward kept); for vector decay the scores' gradient
  dA = do vᵀ (`_chunk_score_grads_kernel`; the key-gradient kernel forms it itself for the other decays) and the
  chunk's own pairs' part of dq and dk per sub-chunk of SUB_CHUNK rows (`_chunk_intra_grads_kernel`: pairs across
  sub-chunks about an anchor row, pairs within one by halving, small dots at near-fp32 accuracy, `_grad_dot`); then
  dq, dk and d log λ per (chunk, head, key block) (`_chunk_key_grads_kernel`). d log λ is summed within the chunk
  from fp32 terms that are each a part of the gradient (the pairs of tokens that straddle a position), never as a
  difference of sequence-long sums, so that its error stays at the level of the other gradients at any decay
  strength.
- Vector decay's scores kernel also writes the decayed dot operands q ⊙ e^{b} and k ⊙ e^{B − b} (`_decayed_operands`):
  the output and the state-gradient walk read the first, the value gradients the second, each instead of q or k and
  the fp32 b; the values are the ones those stages formed from q, k and b themselves, bit for bit.
- Vector decay's chunk scores (forward) and its dA and own-pair gradients (backward) need no state: on a GPU, from
  head dim 128, the state walks, which run one program per sequence × head × block (or segment) and leave most of
  the GPU idle, go to a second stream of higher priority, and these stages fill the GPU beside them (`_walk_stream`).

Triton ≥ 3.4 and < 3.7.1 miscompiles `tl.dot(tl.trans(x), y)` on Hopper when x is a down-cast dot result (DESIGN §7):
transposed operands here are always loaded or elementwise tensors; results wanted transposed are computed as
`dot(state, trans(loaded))` and transposed in registers.

The forward and the backward are also torch custom ops (`linear_decay::chunk_forward`, `linear_decay::chunk_backward`)
with fake implementations and registered autograd: torch.compile and torch.export keep each call as one node of their
graphs (no graph break). Eager calls skip the op's dispatch (`_EagerChunkedRecurrence`). Packed sequences get a count
of chunks from shapes alone (`_num_chunks`), so that no shape depends on cu_seqlens' values.
"""

import contextlib
import functools
from types import MappingProxyType

import torch
import triton.language as tl

from .ops_chunk_backward import (_chunk_intra_grads_kernel, _chunk_key_grads_kernel, _chunk_score_grads_kernel,
                                 _chunk_state_grads_kernel, _chunk_value_grads_kernel)
from .ops_chunk_common import (CHUNK, CHUNK_LEVELS, DECAY_NONE, DECAY_SCALAR, DECAY_STATIC, DECAY_VECTOR,
                               MAX_HEAD_DIM, SUB_CHUNK)
from .ops_chunk_forward import (_chunk_output_kernel, _chunk_scores_kernel, _chunk_states_kernel,
                                _combine_segments_kernel, _cumulative_decay_kernel)
from .ops_host import cdiv, next_power_of_2, op_name, per_tensor, sm_count


def _dot_settings(dtype):
    """(dot operand dtype, dot precision, precision of the backward's dots with fp32 operands, the same where fp32
    accuracy is needed): bf16 operands for bf16 inputs; fp32 otherwise (fp16 cannot hold e^{b}), as TF32 for fp16
    inputs and exact for fp32 inputs. dq and dk of the chunk's own pairs are dots of dA (fp32) with decayed keys /
    queries: TF32 (bf16 and fp16 inputs) is as exact as the bf16 outputs need; for vector decay, whose d log λ is
    summed from them, they keep near-fp32 accuracy (`_grad_dot`): three bf16 products for bf16 inputs (as accurate
    as three TF32 products at each strength of BENCHMARKS.md and faster), three TF32 products for fp16 inputs (the
    CPU suite's dtype; Triton's interpreter has no bf16 dot)."""
    if dtype == torch.float32:
        return tl.float32, "ieee", "ieee", "ieee"
    if dtype == torch.bfloat16:
        return tl.bfloat16, "ieee", "tf32", "bf16x3"
    return tl.float32, "tf32", "tf32", "tf32x3"


def _chunk_layout(cu_seqlens, batch, length, device):
    """Chunk bookkeeping: (cu_seqlens, per-sequence first chunk [N + 1], chunk -> sequence, chunk -> first token),
    with `_num_chunks` chunks. Made on the device without a device-to-host read; a regular batch's once per shape,
    packed sequences' once per cu_seqlens tensor (every layer gets the model's one)."""
    if cu_seqlens is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return _make_regular_layout(batch, length, device)  # a graph's private memory is not for keeping
        return _regular_layout(batch, length, device)
    cu_seqlens = cu_seqlens.to(device)
    layout = per_tensor(cu_seqlens, functools.partial(_packed_chunk_layout, length=length))
    if layout[2].numel() != _num_chunks(batch, length, cu_seqlens.numel() - 1, True):  # kept for another length
        layout = _packed_chunk_layout(cu_seqlens, length)
    return layout


def _make_regular_layout(batch, length, device):
    """`_chunk_layout` of B sequences of T tokens."""
    with torch.inference_mode(False):  # ordinary tensors even when first made under inference mode (they are kept)
        per_sequence = cdiv(length, CHUNK)
        cu_seqlens = torch.arange(0, batch + 1, device=device, dtype=torch.int32) * length
        chunk_offsets = torch.arange(0, batch + 1, device=device, dtype=torch.int32) * per_sequence
        chunk_seq = torch.arange(batch, device=device, dtype=torch.int32).repeat_interleave(per_sequence)
        chunk_token = (chunk_seq * length + torch.arange(per_sequence, device=device, dtype=torch.int32)
                       .repeat(batch) * CHUNK).to(torch.int32)
    return cu_seqlens, chunk_offsets, chunk_seq, chunk_token


# read-only index tensors shared by every call of a shape: six small launches fewer per layer and pass
_regular_layout = functools.lru_cache(maxsize=64)(_make_regular_layout)


def _decay_kind(log_decay, key_dim):
    if log_decay is None:
        return DECAY_NONE
    return {1: DECAY_STATIC, 3: DECAY_SCALAR, 4: DECAY_VECTOR}[log_decay.dim()]


def _kept_dtype(dtype):
    """dtype of the chunk scores the forward keeps for the backward, and of the chunk states unless
    `_state_dtype` says otherwise: the dot operand dtype (`_dot_settings`)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _state_dtype(dtype, exact_states):
    """dtype of the chunk states (and their gradients): fp32 where `exact_states`, else `_kept_dtype`. Scalar and
    static decay's d log λ takes e^{B} Σ S ⊙ dS over a head's K·V entries at every chunk: a dot product of two rounded
    random-signed tensors keeps their rounding's relative error (bf16: up to 2^-8), and for a head whose λ is near 1
    over thousands of tokens, or an fp32 initial state, that term dominates: 4–8e-3 relative error in d log λ from
    bf16 states (the GPU acceptance grid), none from fp32 ones. Vector decay's d log λ keeps bf16 states (per channel,
    within 2× FLA's error at every strength, BENCHMARKS.md; fp32 states would cost it about 0.3 ms in 3 at
    8×2048×16×128)."""
    return torch.float32 if exact_states else _kept_dtype(dtype)


# From this head dim on, exact chunk states of bf16 inputs are kept as two bf16 planes (`_state_planes`); below it
# they stay fp32 (BENCHMARKS.md's launch-settings table has both).
PLANES_FROM_HEAD_DIM = 128


# From this head dim on, scalar and static decay's key gradients take dk's own pairs from dq's pairs transposed
# instead of a second dot for dA's transpose (`_intra_grads`; measured with the planes, BENCHMARKS.md).
TRANSPOSED_PAIRS_FROM_HEAD_DIM = 128


def _state_planes(dtype, exact_states, key_dim):
    """Whether the exact chunk states (`_state_dtype`) are two planes of bf16, [2, chunks, H, K, V]: the state rounded
    to bf16 and what the rounding left, together as exact as fp32 to about 2^-16. The output and the value gradients
    read the first plane alone (the dot operand they would round fp32 states to), half the bytes of fp32; the key
    gradients read both."""
    return exact_states and dtype == torch.bfloat16 and key_dim >= PLANES_FROM_HEAD_DIM


def _new_states(like, chunks, heads, key_dim, value_dim, exact_states):
    """An empty tensor for the chunk states (or their gradients) of inputs like `like`: [2, chunks, H, K, V] bf16
    where `_state_planes`, else [chunks, H, K, V] in `_state_dtype`."""
    if _state_planes(like.dtype, exact_states, key_dim):
        return like.new_empty(2, chunks, heads, key_dim, value_dim, dtype=torch.bfloat16)
    return like.new_empty(chunks, heads, key_dim, value_dim, dtype=_state_dtype(like.dtype, exact_states))


def _zero_spare(states, spare):
    """Zero the last `spare` chunks (`_spare_chunks`) of `_new_states`' tensor, in every plane."""
    if spare > 0:
        (states[:, -spare:] if states.dim() == 5 else states[-spare:]).zero_()


def _planes(states):
    """(first plane, second plane, whether there are two) of `_new_states`' tensor; without planes the states
    themselves twice (the second never read)."""
    if states.dim() == 5:
        return states[0], states[1], True
    return states, states, False


def _num_chunks(batch, length, num_sequences, packed):
    """Chunks of the layout, from shapes alone (so the fake implementations give the real shapes): B·⌈T/C⌉ for a
    regular batch; for N packed sequences of T tokens in all the bound ⌊(T + (C − 1)·N) / C⌋ ≥ Σ ⌈n_i / C⌉ (each
    sequence leaves under C rows of its last chunk empty), at most N − 1 more than needed, so that no count is read
    from the device; the chunks past the sequences' own are spare and stay empty (`_packed_chunk_layout`)."""
    if not packed:
        return batch * cdiv(length, CHUNK)
    return (length + (CHUNK - 1) * num_sequences) // CHUNK


def _spare_chunks(chunks, length, packed):
    """How many of the layout's last chunks may be spare (no sequence's, `_num_chunks`): for packed sequences at most
    chunks − ⌈T / C⌉, as Σ ⌈n_i / C⌉ ≥ ⌈T / C⌉; zeroed where kept or read, so that every value is a written one."""
    return chunks - cdiv(length, CHUNK) if packed else 0


def _packed_chunk_layout(cu_seqlens, length):
    """`_chunk_layout` of packed sequences with `_num_chunks`' count of chunks, without a device-to-host read: each
    sequence's chunks in order, then the spare ones, given to the last sequence past its end (every row masked)."""
    num_sequences = cu_seqlens.numel() - 1
    bounds = cu_seqlens.to(torch.int32)
    counts = (bounds[1:] - bounds[:-1] + CHUNK - 1) // CHUNK
    chunk_offsets = torch.nn.functional.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
    chunks = torch.arange(_num_chunks(1, length, num_sequences, True), device=bounds.device, dtype=torch.int32)
    chunk_seq = torch.searchsorted(chunk_offsets[1:], chunks, right=True, out_int32=True)
    chunk_seq = chunk_seq.clamp_(max=max(num_sequences - 1, 0))
    chunk_token = (bounds[chunk_seq] + (chunks - chunk_offsets[chunk_seq]) * CHUNK).to(torch.int32)
    return bounds, chunk_offsets, chunk_seq, chunk_token


def _chunk_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None,
                   initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None, scale: float,
                   output_final_state: bool, keep: bool, exact_states: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunked recurrence's forward (module docstring): (o, the final states [N, H, K, V] fp32 or, unless
    `output_final_state`, an empty tensor, and for `_chunk_backward` the chunk states [chunks, H, K, V] in
    `_state_dtype`, and when `keep` the chunks' scores [chunks, H, C, C] in `_kept_dtype`, the cumulative log λ
    (`_cumulative_decay`, fp32) and for vector decay the decayed operands (`_decayed_operands`), else empty; chunks:
    `_num_chunks`)."""
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    decay = _decay_kind(log_decay, key_dim)
    layout = _chunk_layout(cu_seqlens, batch, length, q.device)
    num_sequences = layout[0].numel() - 1
    q, k, v = (x.contiguous() for x in (q, k, v))
    g = log_decay.float().contiguous() if log_decay is not None else q.new_zeros(1, dtype=torch.float32)
    initial = initial_state.float().contiguous() if initial_state is not None else None
    o = v.new_empty(v.shape)
    chunks = layout[2].numel()
    dot_dtype, precision, _, _ = _dot_settings(q.dtype)
    vector = decay == DECAY_VECTOR
    # vector decay: the scores kernel writes b, and the walk cumulates log λ itself (`_chunk_states_kernel`)
    b = g.new_empty(chunks, CHUNK, heads, key_dim) if vector else _cumulative_decay(g, layout, decay, heads, key_dim)
    scores = q.new_empty(chunks if keep or vector else 0, heads, CHUNK, CHUNK, dtype=_kept_dtype(q.dtype))
    decayed = _decayed_operands(q, vector, keep)
    with _walk_stream(q.device, "forward", vector, key_dim) as walk_stream:
        with walk_stream():
            states, final = _forward_states(k, v, g if vector else b, initial, layout, decay, heads, key_dim,
                                            value_dim, num_sequences, cdiv(length, CHUNK), output_final_state,
                                            _spare_chunks(chunks, length, cu_seqlens is not None), exact_states)
        if vector:  # beside the walk
            block_k, _, launch = _launch("scores", key_dim, value_dim, dot_dtype)
            _chunk_scores_kernel[(chunks, heads)](q, k, g, b, scores, decayed[0], decayed[-1], layout[0], layout[2],
                                                  layout[3], scale, heads, key_dim, block_k, CHUNK, CHUNK_LEVELS, keep,
                                                  dot_dtype, precision, **launch)
    block_k, block_v, launch = _launch("output", key_dim, value_dim, dot_dtype, decay)
    whole_value = launch.pop("whole_value")
    value_blocks = cdiv(value_dim, block_v) if whole_value else 1  # value blocks per program
    _chunk_output_kernel[(chunks * cdiv(cdiv(value_dim, block_v), value_blocks), heads)](
        q, k, v, b, _planes(states)[0], o, scores, decayed[0] if vector else q, layout[0], layout[2], layout[3], scale,
        heads, key_dim, value_dim, block_k, block_v, CHUNK, decay, keep, dot_dtype, precision, value_blocks, **launch)
    if not keep:  # the scores and decayed operands were only the output's
        scores = q.new_empty(0, heads, CHUNK, CHUNK, dtype=scores.dtype)
        decayed = _decayed_operands(q, False, False)
    kept_decay = b if keep and decay != DECAY_NONE else g.new_empty(0)
    return o, final if final is not None else g.new_empty(0), states, scores, kept_decay, decayed


def _decayed_operands(q, vector, keep):
    """An empty tensor for vector decay's decayed dot operands [2, B, T, H, K] in `_kept_dtype`: q ⊙ e^{b} (scaled) and
    k ⊙ e^{B − b}, written by `_chunk_scores_kernel` and read by the output, the state-gradient walk and the value
    gradients instead of q or k with b (half the bytes of b alone, and no exponentials on the walk's path); without
    `keep` (no backward) the first alone, [1, B, T, H, K]; for the other decays [0]."""
    return q.new_empty((1 + keep, *q.shape) if vector else (0,), dtype=_kept_dtype(q.dtype))


def _chunk_forward_fake(q, k, v, log_decay, initial_state, cu_seqlens, scale, output_final_state, keep,
                        exact_states):
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    num_sequences = batch if cu_seqlens is None else cu_seqlens.shape[0] - 1
    chunks = _num_chunks(batch, length, num_sequences, cu_seqlens is not None)
    kept = _kept_dtype(q.dtype)
    final = q.new_empty((num_sequences, heads, key_dim, value_dim) if output_final_state else (0,),
                        dtype=torch.float32)
    decay = _decay_kind(log_decay, key_dim)
    kept_decay = q.new_empty((chunks, CHUNK, heads, *((key_dim,) if decay == DECAY_VECTOR else ()))
                             if keep and decay != DECAY_NONE else (0,), dtype=torch.float32)
    return (v.new_empty(v.shape), final,
            _new_states(q, chunks, heads, key_dim, value_dim, exact_states),
            q.new_empty(chunks if keep else 0, heads, CHUNK, CHUNK, dtype=kept), kept_decay,
            _decayed_operands(q, keep and decay == DECAY_VECTOR, True))


def _chunk_backward(do: torch.Tensor, final_grad: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, log_decay: torch.Tensor | None, initial_state: torch.Tensor | None,
                    states: torch.Tensor, scores: torch.Tensor, kept_decay: torch.Tensor, decayed: torch.Tensor,
                    cu_seqlens: torch.Tensor | None, scale: float, decay_grad: bool,
                    initial_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunked recurrence's backward from `_chunk_forward`'s inputs, what it kept (chunk states, scores,
    cumulative log λ, decayed operands) and the gradients of o and (or None) of the final states: (dq, dk, dv,
    d log λ, ∂L/∂S_0), each in its input's shape and dtype; d log λ only when `decay_grad` and ∂L/∂S_0 only when
    `initial_grad`, else empty tensors."""
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    decay = _decay_kind(log_decay, key_dim)
    layout = _chunk_layout(cu_seqlens, batch, length, q.device)
    num_sequences = layout[0].numel() - 1
    q, k, v, do = (x.contiguous() for x in (q, k, v, do))
    needs_decay_grad = decay_grad and decay != DECAY_NONE
    b = kept_decay if decay != DECAY_NONE else q.new_zeros(1, dtype=torch.float32)  # no kernel reads it then
    dot_dtype, precision, fp32_precision, exact_precision = _dot_settings(q.dtype)
    state_grads = torch.empty_like(states)
    grads_high, grads_low, planes = _planes(state_grads)
    _zero_spare(state_grads, _spare_chunks(grads_high.shape[0], length, cu_seqlens is not None))
    initial_grad = (q.new_empty(num_sequences, heads, key_dim, value_dim, dtype=torch.float32)
                    if initial_grad and initial_state is not None else None)
    final_grad = final_grad.float().contiguous() if final_grad is not None else None
    chunks = layout[2].numel()
    vector = decay == DECAY_VECTOR
    dv, dq, dk = torch.empty_like(v), torch.empty_like(q), torch.empty_like(k)
    dA = dq_intra = dk_intra = None
    if vector:  # dA = do vᵀ, and the chunks' own pairs at fp32 accuracy where d log λ is summed from them
        dA = q.new_empty(chunks, heads, CHUNK, CHUNK, dtype=torch.float32)
        dq_intra, dk_intra = (q.new_empty(q.shape, dtype=torch.float32) for _ in range(2))
    block_k_split, block_v, launch = _launch("state_grads", key_dim, value_dim, dot_dtype, decay)
    blocks = (cdiv(key_dim, block_k_split), cdiv(value_dim, block_v))

    def state_grads_walk(walk, segments, segment_chunks, segment_state, segment_decay):
        _chunk_state_grads_kernel[(*blocks, num_sequences * heads * segments)](
            q, decayed[0] if vector else q, do, b, final_grad, grads_high, grads_low, initial_grad, segment_state,
            segment_decay, layout[0], layout[1], scale, segments, segment_chunks, heads, key_dim, value_dim,
            block_k_split, block_v, CHUNK, decay, final_grad is not None, initial_grad is not None, walk, planes,
            dot_dtype, precision, **launch)

    with _walk_stream(q.device, "backward", vector, key_dim) as walk_stream:
        with walk_stream():
            _state_walk(state_grads_walk, blocks, block_k_split, block_v, num_sequences, heads, cdiv(length, CHUNK),
                        key_dim, value_dim, decay, final_grad, initial_grad, layout[0], q.device, reverse=True)
            block_k, block_v, launch = _launch("value_grads", key_dim, value_dim, dot_dtype)
            _chunk_value_grads_kernel[(chunks, heads)](
                k, decayed[1] if vector else k, v, b, do, scores, grads_high, dv, layout[0], layout[2], layout[3],
                heads, key_dim, value_dim, block_k, block_v, CHUNK, decay, dot_dtype, precision, **launch)
        if vector:  # beside the walk
            _, block_v, launch = _launch("score_grads", key_dim, value_dim, dot_dtype)
            _chunk_score_grads_kernel[(chunks, heads)](v, do, dA, layout[0], layout[2], layout[3], heads, value_dim,
                                                       block_v, CHUNK, dot_dtype, precision, **launch)
            block_k, _, launch = _launch("intra_grads", key_dim, value_dim, dot_dtype)
            _chunk_intra_grads_kernel[(chunks * CHUNK // SUB_CHUNK * cdiv(key_dim, block_k), heads)](
                q, k, b, dA, dq_intra, dk_intra, layout[0], layout[2], layout[3], scale, heads, key_dim, block_k,
                CHUNK, SUB_CHUNK, SUB_CHUNK.bit_length() - 1, exact_precision if needs_decay_grad else fp32_precision,
                **launch)
    block_k, block_v, launch = _launch("key_grads", key_dim, value_dim, dot_dtype, decay)
    key_blocks = cdiv(key_dim, block_k)
    d_log_decay = None
    if needs_decay_grad:  # scalar and static decay: a partial sum per key block
        d_log_decay = q.new_empty(*(() if vector else (key_blocks,)), batch, length, heads,
                                  *((key_dim,) if vector else ()), dtype=torch.float32)
    _chunk_key_grads_kernel[(chunks * key_blocks, heads)](
        q, k, v, b, do, *_planes(states)[:2], grads_high, grads_low, dA, dq_intra, dk_intra, dq, dk, d_log_decay,
        layout[0], layout[2], layout[3], scale, batch * length, heads, key_dim, value_dim, block_k, block_v, CHUNK,
        decay, needs_decay_grad, planes, key_dim >= TRANSPOSED_PAIRS_FROM_HEAD_DIM, dot_dtype, precision,
        fp32_precision, **launch)
    if d_log_decay is None:
        d_log_decay = q.new_empty(0, dtype=log_decay.dtype if log_decay is not None else torch.float32)
    else:
        if not vector:
            d_log_decay = d_log_decay.sum(0)
        if decay == DECAY_STATIC:
            d_log_decay = d_log_decay.sum((0, 1))
        d_log_decay = d_log_decay.view(log_decay.shape).to(log_decay.dtype)
    initial_dtype = initial_state.dtype if initial_state is not None else torch.float32
    initial_grad = initial_grad.to(initial_dtype) if initial_grad is not None else q.new_empty(0, dtype=initial_dtype)
    return dq, dk, dv, d_log_decay, initial_grad


def _chunk_backward_fake(do, final_grad, q, k, v, log_decay, initial_state, states, scores, kept_decay, decayed,
                         cu_seqlens, scale, decay_grad, initial_grad):
    with_decay_grad = decay_grad and log_decay is not None
    with_initial_grad = initial_grad and initial_state is not None
    d_log_decay = (log_decay.new_empty(log_decay.shape) if with_decay_grad
                   else q.new_empty(0, dtype=log_decay.dtype if log_decay is not None else torch.float32))
    initial_dtype = initial_state.dtype if initial_state is not None else torch.float32
    initial_grad = q.new_empty(initial_state.shape if with_initial_grad else (0,), dtype=initial_dtype)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), d_log_decay, initial_grad


chunk_forward = torch.library.custom_op(op_name("chunk_forward"), _chunk_forward, mutates_args=())
chunk_forward.register_fake(_chunk_forward_fake)
chunk_backward = torch.library.custom_op(op_name("chunk_backward"), _chunk_backward, mutates_args=())
chunk_backward.register_fake(_chunk_backward_fake)


def _save_for_backward(ctx, inputs, output):
    """What the backward reads (the op's setup_context, and `_EagerChunkedRecurrence`'s): the inputs, the chunk
    states (instead of a second walk), the scores, the cumulative log λ and the decayed operands."""
    q, k, v, log_decay, initial_state, cu_seqlens, scale, output_final_state, keep, exact_states = inputs
    _, _, states, scores, kept_decay, decayed = output
    ctx.save_for_backward(q, k, v, log_decay, initial_state, states, scores, kept_decay, decayed, cu_seqlens)
    ctx.mark_non_differentiable(states, scores, kept_decay, decayed)
    ctx.set_materialize_grads(False)
    ctx.scale, ctx.output_final_state = scale, output_final_state


def _gradients(ctx, do, final_grad, backward):
    """The inputs' gradients through `backward` (the op `chunk_backward`, or `_chunk_backward` itself in eager)."""
    q, k, v, log_decay, initial_state, states, scores, kept_decay, decayed, cu_seqlens = ctx.saved_tensors
    wants_decay_grad, wants_initial_grad = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
    if do is None:  # only the final states reach the loss
        do = torch.zeros_like(v)
    dq, dk, dv, d_log_decay, initial_grad = backward(
        do, final_grad if ctx.output_final_state else None, q, k, v, log_decay, initial_state, states, scores,
        kept_decay, decayed, cu_seqlens, ctx.scale, wants_decay_grad, wants_initial_grad)
    return (dq, dk, dv, d_log_decay if wants_decay_grad else None, initial_grad if wants_initial_grad else None,
            None, None, None, None, None)


chunk_forward.register_autograd(lambda ctx, do, final_grad, *_: _gradients(ctx, do, final_grad, chunk_backward),
                                setup_context=_save_for_backward)


class _EagerChunkedRecurrence(torch.autograd.Function):
    """The same forward and backward as the op, called directly: in eager mode the op's dispatch (schema binding,
    fake-tensor plumbing) costs about 0.3 ms of host time per layer's forward + backward, and eager steps are
    host-bound at small shapes; compiled and exported graphs take the op (`triton_chunked_recurrence`)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _chunk_forward(*inputs)
        _save_for_backward(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, do, final_grad, *_):
        return _gradients(ctx, do, final_grad, _chunk_backward)


def _multiprocessors(device):
    """The GPU's SM count; under TRITON_INTERPRET (CPU tensors) 8, so that the CPU tests with one or two sequences
    and heads take the segmented paths meant for few programs (`_segment_plan`)."""
    return sm_count(device, cpu_value=8)


def _segment_plan(programs, max_chunks, device):
    """(segments, chunks per segment) for the kernels that walk a whole sequence per program (the state walks, the
    finishing pass): whole sequences while they give at least half as many programs as the GPU has SMs (the shapes
    of BENCHMARKS.md's kernel tables, measured so), else segments for about two programs per SM — one 16k-token
    sequence of 16 heads: 16 segments of 16 chunks instead of 16 walks of 256 chunks."""
    sms = _multiprocessors(device)
    if 2 * programs >= sms or max_chunks < 2:
        return 1, max(max_chunks, 1)
    segment_chunks = cdiv(max_chunks, min(max_chunks, cdiv(2 * sms, programs)))
    return cdiv(max_chunks, segment_chunks), segment_chunks


def _state_walk(launch_walk, blocks, block_k, block_v, num_sequences, heads, max_chunks, key_dim, value_dim, decay,
                start, end, cu_seqlens, device, reverse):
    """A state walk (`_chunk_states_kernel`, or `_chunk_state_grads_kernel` with `reverse`) through
    `launch_walk(walk, segments, segment_chunks, segment_state, segment_decay)`: whole sequences (walk 0) or, per
    `_segment_plan`, segments from zero (walk 1), `_combine_segments_kernel` (start: initial state / final-state
    gradient, end: final state / initial-state gradient, either None), and segments from their combined start
    (walk 2)."""
    sequences_heads = num_sequences * heads
    segments, segment_chunks = _segment_plan(sequences_heads * blocks[0] * blocks[1], max_chunks, device)
    if segments == 1:
        launch_walk(0, 1, segment_chunks, None, None)
        return
    vector = decay == DECAY_VECTOR
    segment_state = torch.empty(sequences_heads * segments, key_dim, value_dim, device=device, dtype=torch.float32)
    segment_decay = torch.empty(sequences_heads * segments, *((key_dim,) if vector else ()), device=device,
                                dtype=torch.float32)
    launch_walk(1, segments, segment_chunks, segment_state, segment_decay)
    _combine_segments_kernel[(*blocks, sequences_heads)](
        segment_state, segment_decay, start, end, cu_seqlens, segments, segment_chunks, heads, key_dim, value_dim,
        block_k, block_v, CHUNK, vector, start is not None, end is not None, reverse, num_warps=4)
    launch_walk(2, segments, segment_chunks, segment_state, segment_decay)


@functools.lru_cache(maxsize=None)
def _priority_stream(device_index, priority):
    """One CUDA stream per device and priority (lower is more urgent), made once: `_walk_stream`'s."""
    return torch.cuda.Stream(device=device_index, priority=priority)


@contextlib.contextmanager
def _walk_stream(device, stage, vector, key_dim):
    """Runs vector decay's state walk of `stage` ("forward" / "backward") beside the stages that need no state:
    yields a context factory under which the walk is launched, on a second stream of `TUNING["walk_stream"]`'s
    priority that starts after the work queued so far; what is launched outside it goes to the current stream, which
    waits for the walk's stream when the block ends. A walk runs one program per sequence × head × key and value block
    (or segment), too few to fill the GPU, and each program's chunks one after another; at a priority above the
    current stream's its programs start first and the others fill the rest of the GPU. What is allocated under it
    comes from the walk stream's memory, whose blocks are reused only there, and every use of that stream starts by
    waiting for the current one: a block is never reused before its last reader ran. Off the GPU, for the other
    decays, below the setting's head dim or with the stage's setting 0: everything on the current stream, in launch
    order."""
    settings = TUNING["walk_stream"]
    if device.type != "cuda" or not vector or not settings[stage] or key_dim < settings["from_head_dim"]:
        yield contextlib.nullcontext
        return
    current = torch.cuda.current_stream(device)
    walk = _priority_stream(current.device_index, settings["priority"])
    walk.wait_stream(current)
    try:
        yield functools.partial(torch.cuda.stream, walk)
    finally:
        current.wait_stream(walk)


def _key_block(key_dim):
    return max(16, next_power_of_2(key_dim))


# Launch settings per kernel (and, where vector decay differs, per kernel for vector decay): key and value blocks
# (capped by the head dims; the state walks and the gradient kernels split the key dim over programs, the output and
# value-gradient kernels loop over its blocks; a kernel without a key or value block takes the whole head dim), warps,
# pipeline stages, and for the output whether one program takes every value block (`whole_value`: vector decay's
# q ⊙ e^{b} then formed once), and where set a cap on registers per thread (Triton's `maxnreg`: vector key gradients
# at 80 hold three programs an SM instead of two, for 64 bytes of spilled stack at K = 128; the own-pair gradients at
# 80 six instead of four, for 16 bytes). The scores' gradient runs unpipelined: Triton 3.6 compiles its loop over
# value blocks at two stages to a wrong dA from four blocks on (head dim 256: dq, dk and d log λ off by 20–100 % on
# an H100 and an H200), at one stage exactly. `walk_stream`: whether vector decay's state walks run on a second stream
# beside the stages that need no state, forward and backward, its priority, and the head dim from which it does
# (`_walk_stream`: at head dim 64 the overlap gained nothing on average and made the time vary more). Chosen by
# sweeps on an H100 at the three shapes of BENCHMARKS.md's kernel table, whose launch-settings table has the
# measurements: e.g. the value gradients at 4 warps and 3 stages, 2.74 / 5.64 ms vector forward+backward at
# 8×2048×16×128 / 2×16384×16×128 against 2.91 / 6.00 at 8 warps and 2 stages.
TUNING = MappingProxyType({  # read-only: the kernels' one source of launch settings
    "states": MappingProxyType(dict(block_k=64, block_v=64, num_warps=4, num_stages=3)),
    "states_vector": MappingProxyType(dict(block_k=64, block_v=64, num_warps=4, num_stages=2)),
    "output": MappingProxyType(dict(block_k=128, block_v=128, num_warps=4, num_stages=2, whole_value=False)),
    "output_vector": MappingProxyType(dict(block_k=128, block_v=64, num_warps=8, num_stages=3, whole_value=True)),
    "scores": MappingProxyType(dict(block_k=128, num_warps=8)),
    "state_grads": MappingProxyType(dict(block_k=64, block_v=64, num_warps=4, num_stages=3)),
    "state_grads_vector": MappingProxyType(dict(block_k=64, block_v=64, num_warps=4, num_stages=2)),
    "value_grads": MappingProxyType(dict(block_k=64, block_v=64, num_warps=4, num_stages=3)),
    "score_grads": MappingProxyType(dict(block_v=64, num_warps=4, num_stages=1)),
    "intra_grads": MappingProxyType(dict(block_k=32, block_v=64, num_warps=4, num_stages=3, maxnreg=80)),
    "key_grads": MappingProxyType(dict(block_k=64, block_v=64, num_warps=4, num_stages=2)),
    "key_grads_vector": MappingProxyType(dict(block_k=32, block_v=64, num_warps=8, num_stages=2, maxnreg=80)),
    "walk_stream": MappingProxyType(dict(forward=1, backward=1, priority=-1, from_head_dim=128)),  # `_walk_stream`
})


def _launch(kernel, key_dim, value_dim, dot_dtype, decay=None):
    """(key block, value block, launch kwargs) of one kernel (for decay kind `decay` where its settings differ).
    `TUNING` is for bf16 dot operands; fp32 operands (fp16 and fp32 inputs) make every pipelined tile twice as large,
    so they run at most two stages (vector decay's output at K = 128 would need 272 KiB of shared memory at three)
    and without a register cap (`maxnreg`: vector key gradients would spill 400–800 bytes a thread under it)."""
    settings = dict(TUNING.get(f"{kernel}_vector" if decay == DECAY_VECTOR else kernel, TUNING[kernel]))
    if dot_dtype == tl.float32:
        settings["num_stages"] = min(settings.get("num_stages", 2), 2)
        settings.pop("maxnreg", None)
    block_k = min(settings.pop("block_k", MAX_HEAD_DIM), _key_block(key_dim))  # a kernel without key blocks: all K
    block_v = min(settings.pop("block_v", MAX_HEAD_DIM), _key_block(value_dim))
    return block_k, block_v, settings


def _cumulative_decay(g, layout, decay, heads, key_dim):
    """log λ cumulated within each chunk, chunk-major (`_cumulative_decay_kernel`); without decay g itself (no kernel
    reads it)."""
    if decay == DECAY_NONE:
        return g
    cu_seqlens, _, chunk_seq, chunk_token = layout
    b = g.new_empty(chunk_seq.numel(), CHUNK, heads, *((key_dim,) if decay == DECAY_VECTOR else ()))
    _cumulative_decay_kernel[(chunk_seq.numel(), heads)](g, b, cu_seqlens, chunk_seq, chunk_token, heads, key_dim,
                                                         _key_block(key_dim), CHUNK, decay, num_warps=8)
    return b


def _forward_states(k, v, decay_of_chunks, initial, layout, decay, heads, key_dim, value_dim, num_sequences,
                    max_chunks, output_final_state, spare=0, exact_states=False):
    """States at every chunk start (`_new_states`) and the final states (fp32) or None
    (`_state_walk`; max_chunks: a bound on a sequence's chunks, ⌈T / C⌉); the last `spare` chunks zeroed first
    (`_spare_chunks`). `decay_of_chunks`: log λ itself for vector decay (the walk cumulates it), else its cumulative
    sums (`_cumulative_decay`)."""
    cu_seqlens, chunk_offsets, chunk_seq, _ = layout
    dot_dtype, precision, _, _ = _dot_settings(k.dtype)
    states = _new_states(k, chunk_seq.numel(), heads, key_dim, value_dim, exact_states)
    _zero_spare(states, spare)
    high, low, planes = _planes(states)
    final = (k.new_empty(num_sequences, heads, key_dim, value_dim, dtype=torch.float32) if output_final_state
             else None)
    block_k, block_v, launch = _launch("states", key_dim, value_dim, dot_dtype, decay)
    blocks = (cdiv(key_dim, block_k), cdiv(value_dim, block_v))

    def states_walk(walk, segments, segment_chunks, segment_state, segment_decay):
        _chunk_states_kernel[(*blocks, num_sequences * heads * segments)](
            k, v, decay_of_chunks, initial, high, low, final, segment_state, segment_decay, cu_seqlens, chunk_offsets,
            segments, segment_chunks, heads, key_dim, value_dim, block_k, block_v, CHUNK, decay, initial is not None,
            output_final_state, walk, planes, decay == DECAY_VECTOR, dot_dtype, precision, **launch)

    _state_walk(states_walk, blocks, block_k, block_v, num_sequences, heads, max_chunks, key_dim, value_dim, decay,
                initial, final, cu_seqlens, k.device, reverse=False)
    return states, final


def triton_chunked_recurrence(q, k, v, log_decay=None, scale=1.0, initial_state=None, output_final_state=False,
                              cu_seqlens=None):
    """The chunked recurrence on the Triton kernels (module docstring); autograd to q, k, v, log λ, initial state.
    Under torch.compile / torch.export through the custom op `chunk_forward`, one node of their graphs."""
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"the Triton kernels take head dims up to {MAX_HEAD_DIM}; got K={q.shape[-1]}, "
                         f"V={v.shape[-1]}")
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"cu_seqlens needs the sequences packed into a batch of one; got batch {q.shape[0]}")
    keep = torch.is_grad_enabled() and any(x is not None and x.requires_grad
                                           for x in (q, k, v, log_decay, initial_state))  # the scores, for the backward
    # the layouts the kernels read, made here: the op keeps these very tensors for its backward (no second copy)
    q, k, v = (x.contiguous() for x in (q, k, v))
    log_decay = log_decay.float().contiguous() if log_decay is not None else None
    initial_state = initial_state.float().contiguous() if initial_state is not None else None
    forward = chunk_forward if torch.compiler.is_compiling() else _EagerChunkedRecurrence.apply
    # scalar and static decay: exact chunk states where d log λ is summed from them (`_state_dtype`, `_state_planes`)
    exact_states = keep and log_decay is not None and log_decay.requires_grad and log_decay.dim() != 4
    o, final, *_ = forward(q, k, v, log_decay, initial_state, cu_seqlens, float(scale), output_final_state, keep,
                           exact_states)
    return o, final if output_final_state else None


__all__ = ["triton_chunked_recurrence"]
