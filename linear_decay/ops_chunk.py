"""Triton kernels for the chunked decay recurrence (DESIGN.md §1), forward and backward, on packed sequences.

    o, final_state = triton_chunked_recurrence(q, k, v, log_decay, scale, initial_state, output_final_state,
                                               cu_seqlens=None)

Same contract as `recurrence.chunked_recurrence` (whose docstring gives the shapes), plus `cu_seqlens`:
int32 offsets [N + 1] of N sequences packed along T of a batch of one (varlen); initial/final states are then
[N, H, K, V]. A regular batch [B, T] runs as B packed sequences of length T, so every kernel below sees packed
sequences. The oracle is `recurrence.naive_recurrence`; `chunked_recurrence` is the PyTorch twin.

Algorithm (per head; b = cumulative log λ within a chunk of CHUNK tokens, fp32; q is pre-multiplied by `scale`):

- `_cumulative_decay_kernel`: b of every chunk, chunk-major, read by every later kernel (kept for the backward).
- `_chunk_states_kernel`: walks each sequence in chunks and stores the state at every chunk start
  (S ← e^{B} ⊙ S + (k ⊙ e^{B − b})ᵀ v, B the chunk's total log-decay), kept for the backward (in the dot operand
  dtype, or fp32 where scalar or static decay's d log λ will be summed from them: `_state_dtype`). With few sequences
  × heads the walks (this one and the state gradients') go through segments of a sequence in parallel
  (`_segment_plan`): each segment from zero, `_combine_segments_kernel` joins their ends in order, and each segment
  again from its true start.
- `_chunk_output_kernel`: one program per (chunk, head; for scalar, static and no decay also per value block):
  o = (q ⊙ e^{b}) S + A v, A the causal decayed scores of the chunk (`_intra_scores`). The cost does not depend on
  the decay's strength: for vector decay the chunk is halved log2(CHUNK) times, and each pair of tokens factorises
  about the middle row of the one block that has them in different halves, both factors e^{≤ 0}: one dot per level,
  no pair summed one by one.
- backward: the state gradient at every chunk end (`_chunk_state_grads_kernel`, reverse walk), then dv per (chunk,
  head) (`_chunk_value_grads_kernel`, from the scores the forward kept), and there, for vector decay, the scores'
  gradient dA = do vᵀ (the key-gradient kernel forms it itself for the other decays); for vector decay the chunk's own
  pairs' part of dq and dk per sub-chunk of SUB_CHUNK rows (`_chunk_intra_grads_kernel`: pairs across sub-chunks about
  an anchor row, pairs within one by halving, small dots at near-fp32 accuracy, `_grad_dot`); then dq, dk and d log λ per (chunk, head,
  key block) (`_chunk_key_grads_kernel`). d log λ is summed within the chunk from fp32 terms that are each a part of the
  gradient (the pairs of tokens that straddle a position), never as a difference of sequence-long sums, so that its
  error stays at the level of the other gradients at any decay strength.

Triton ≥ 3.4 and < 3.7.1 miscompiles `tl.dot(tl.trans(x), y)` on Hopper when x is a down-cast dot result (DESIGN §7):
transposed operands here are always loaded or elementwise tensors; results wanted transposed are computed as
`dot(state, trans(loaded))` and transposed in registers.

The forward and the backward are also torch custom ops (`linear_decay::chunk_forward`, `linear_decay::chunk_backward`)
with fake implementations and registered autograd: torch.compile and torch.export keep each call as one node of their
graphs (no graph break). Eager calls skip the op's dispatch (`_EagerChunkedRecurrence`). Packed sequences get a count
of chunks from shapes alone (`_num_chunks`), so that no shape depends on cu_seqlens' values.
"""

import functools

import torch

from .ops_host import cdiv, next_power_of_2, op_name, per_tensor, sm_count

try:
    import triton
    import triton.language as tl
except ImportError as error:  # CPU-only torch ships without Triton: recurrence keeps the PyTorch path
    raise ImportError("Triton is not installed") from error

CHUNK = 64
CHUNK_LEVELS = CHUNK.bit_length() - 1  # vector decay: the halvings of a chunk in `_intra_scores`
SUB_CHUNK = 16  # vector decay's backward: the rows of a chunk per program of `_chunk_intra_grads_kernel`
MAX_HEAD_DIM = 256

DECAY_NONE, DECAY_STATIC, DECAY_SCALAR, DECAY_VECTOR = "none", "static", "scalar", "vector"  # the kernels' DECAY


# ----------------------------------------------------------------------------------------------------------------
# Shared device functions
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_log_decay(g_ptr, token0, rows, row_mask, head, H: tl.constexpr, K: tl.constexpr, cols,
                    DECAY: tl.constexpr):
    """log λ of `rows` (token offsets from token0) at key channels `cols` as fp32: [R, len(cols)] for vector decay,
    [R] otherwise; 0 where masked."""
    if DECAY == "vector":
        ptrs = g_ptr + ((token0 + rows[:, None]) * H + head) * K + cols[None, :]
        return tl.load(ptrs, mask=row_mask[:, None] & (cols[None, :] < K), other=0.0).to(tl.float32)
    elif DECAY == "scalar":
        return tl.load(g_ptr + (token0 + rows) * H + head, mask=row_mask, other=0.0).to(tl.float32)
    elif DECAY == "static":
        gamma = tl.load(g_ptr + head).to(tl.float32)
        return tl.where(row_mask, gamma, 0.0)
    else:
        return tl.zeros(rows.shape, dtype=tl.float32)


@triton.jit
def _chunk_decay(b_ptr, chunk, head, H: tl.constexpr, K: tl.constexpr, cols, C: tl.constexpr, DECAY: tl.constexpr):
    """(b, total) of a whole chunk, read from its cumulative log λ (`_cumulative_decay_kernel`): b [C, len(cols)]
    for vector decay, [C] otherwise, and its last row ([len(cols)] or a scalar). Loaded, not scanned: the state walks
    go through the chunks one after another, so a scan per chunk would sit on their critical path."""
    rows = tl.arange(0, C)
    if DECAY == "vector":
        base = b_ptr + (chunk * C * H + head) * K  # row r at base + r·H·K
        b = tl.load(base + rows[:, None] * H * K + cols[None, :], mask=(cols < K)[None, :], other=0.0)
        return b, tl.load(base + (C - 1) * H * K + cols, mask=cols < K, other=0.0)
    elif DECAY == "none":
        b = tl.zeros((C,), dtype=tl.float32)
        return b, tl.sum(b, axis=0)
    else:
        base = b_ptr + chunk * C * H + head  # row r at base + r·H
        return tl.load(base + rows * H), tl.load(base + (C - 1) * H)



@triton.jit
def _row_decay(b, VECTOR: tl.constexpr):
    """e^{b} shaped to multiply a [R, K] tile."""
    if VECTOR:
        decay = tl.exp(b)
    else:
        decay = tl.exp(b)[:, None]
    return decay


@triton.jit
def _to_end(b, total, VECTOR: tl.constexpr):
    """e^{B − b} shaped to multiply a [R, K] tile (B: the block's total log-decay)."""
    if VECTOR:
        decay = tl.exp(total[None, :] - b)
    else:
        decay = tl.exp(total - b)[:, None]
    return decay


@triton.jit
def _tile(ptr, token0, rows, row_mask, head, H: tl.constexpr, D: tl.constexpr, cols, col_mask):
    """Rows `token0 + rows` of a [T, H, D] tensor at columns `cols` as fp32 [R, len(cols)]; 0 where masked."""
    ptrs = ptr + ((token0 + rows[:, None]) * H + head) * D + cols[None, :]
    return tl.load(ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)



@triton.jit
def _advance_state(state, k, v, b, total, VECTOR: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """The state after a block of tokens (k, v, cumulative log λ b, its sum B): e^{B} ⊙ S + (k ⊙ e^{B − b})ᵀ v."""
    if VECTOR:
        k_to_end = k * tl.exp(total[None, :] - b)
        state = state * tl.exp(total)[:, None]
    else:
        k_to_end = k * tl.exp(total - b)[:, None]
        state = state * tl.exp(total)
    return state + tl.dot(tl.trans(k_to_end.to(DOT_DTYPE)), v.to(DOT_DTYPE), input_precision=PRECISION)



@triton.jit
def _level_factors(b, b_ptr, chunk, first, local, head, H: tl.constexpr, K: tl.constexpr, cols, C: tl.constexpr,
                   HALF: tl.constexpr):
    """One level of the dyadic split of the chunk rows `first + local` (`_intra_scores`, `_chunk_intra_grads_kernel`):
    rows in blocks of 2·HALF, each block's middle row m its anchor. Returns (e^{b_i − b_m} on the second half of each
    block, else 0; e^{b_m − b_j} on the first half, else 0) [len(local), len(cols)]: both ≤ 1 at any decay strength,
    their product e^{b_i − b_j} for i in the second half and j in the first half of one block."""
    middle = (local // (2 * HALF)) * (2 * HALF) + HALF
    anchor = tl.load(b_ptr + ((chunk * C + first + middle[:, None]) * H + head) * K + cols[None, :],
                     mask=(cols < K)[None, :], other=0.0)
    second = (local >= middle)[:, None]
    factor = tl.exp(tl.where(second, b - anchor, anchor - b))
    return tl.where(second, factor, 0.0), tl.where(second, 0.0, factor)


@triton.jit
def _same_block(HALF: tl.constexpr, R: tl.constexpr):
    """[R, R]: rows i and columns j in the same block of 2·HALF rows."""
    i = tl.arange(0, R)[:, None]
    j = tl.arange(0, R)[None, :]
    return i // (2 * HALF) == j // (2 * HALF)


@triton.jit
def _intra_scores(q, k, b, b_ptr, chunk, head, H: tl.constexpr, K: tl.constexpr, cols, C: tl.constexpr,
                  LEVELS: tl.constexpr, DECAY: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """A[i, j] = Σ_c q_ic k_jc e^{b_ic − b_jc} for j ≤ i, else 0: the chunk's causal decayed scores [C, C], fp32.

    Scalar (and static, and no) decay: (q kᵀ) ⊙ e^{b_i − b_j}. Vector decay (DESIGN §1, "chunked form") whatever the
    decay's strength, by halving: every pair j < i is split by exactly one level (`_level_factors`, C = 2^LEVELS), the
    one whose block holds both with j in its first half and i in its second; there it factorises about the block's
    middle row into two factors ≤ 1, one dot per level. Each token with itself has no decay: Σ_c q_ic k_ic."""
    i = tl.arange(0, C)[:, None]
    j = tl.arange(0, C)[None, :]
    if DECAY == "vector":
        rows = tl.arange(0, C)
        scores = tl.where(i == j, tl.sum(q * k, axis=1)[:, None], 0.0)
        for level in tl.static_range(LEVELS):
            q_factor, k_factor = _level_factors(b, b_ptr, chunk, 0, rows, head, H, K, cols, C, C >> (level + 1))
            part = tl.dot((q * q_factor).to(DOT_DTYPE), tl.trans((k * k_factor).to(DOT_DTYPE)),
                          input_precision=PRECISION)
            scores += tl.where(_same_block(C >> (level + 1), C), part, 0.0)
    else:
        scores = tl.dot(q.to(DOT_DTYPE), tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION)
        scores = tl.where(i >= j, scores * tl.exp(tl.where(i >= j, b[:, None] - b[None, :], float("-inf"))), 0.0)
    return scores


# ----------------------------------------------------------------------------------------------------------------
# Forward kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _cumulative_decay_kernel(g_ptr, b_ptr, cu_seqlens_ptr, chunk_seq_ptr, chunk_token_ptr, H: tl.constexpr,
                             K: tl.constexpr, BK: tl.constexpr, C: tl.constexpr, DECAY: tl.constexpr):
    """log λ cumulated within each chunk (inclusive), chunk-major: b [chunks, C, H, K] for vector decay, [chunks, C, H]
    for scalar and static decay; rows past a sequence's end repeat its last value."""
    chunk, head = tl.program_id(0), tl.program_id(1)
    seq, token0 = tl.load(chunk_seq_ptr + chunk), tl.load(chunk_token_ptr + chunk)
    eos = tl.load(cu_seqlens_ptr + seq + 1)
    rows = tl.arange(0, C)
    ck = tl.arange(0, BK)
    b = tl.cumsum(_load_log_decay(g_ptr, token0, rows, token0 + rows < eos, head, H, K, ck, DECAY), axis=0)
    if DECAY == "vector":
        tl.store(b_ptr + ((chunk * C + rows[:, None]) * H + head) * K + ck[None, :], b, mask=(ck < K)[None, :])
    else:
        tl.store(b_ptr + (chunk * C + rows) * H + head, b)


@triton.jit
def _chunk_states_kernel(k_ptr, v_ptr, b_ptr, initial_ptr, states_ptr, final_ptr, segment_state_ptr,
                         segment_decay_ptr, cu_seqlens_ptr, chunk_offsets_ptr, segments, segment_chunks,
                         H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                         C: tl.constexpr, DECAY: tl.constexpr, HAS_INITIAL: tl.constexpr, STORE_FINAL: tl.constexpr,
                         WALK: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """The state at the start of every chunk of one (sequence, head, value block), and the final state.

    WALK (`_segment_plan`): 0 — a whole sequence per program; with segments of `segment_chunks` chunks, 1 — each
    segment from zero (the first from the initial state), storing only its end state and total log-decay for
    `_combine_segments_kernel`, then 2 — each segment again from the state the combination gave it, storing the
    chunk states."""
    k_block, v_block, program = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_head, segment = program // segments, program % segments
    seq, head = seq_head // H, seq_head % H
    bos, eos = tl.load(cu_seqlens_ptr + seq), tl.load(cu_seqlens_ptr + seq + 1)
    first_chunk = tl.load(chunk_offsets_ptr + seq)
    VECTOR: tl.constexpr = DECAY == "vector"
    ck = k_block * BK + tl.arange(0, BK)  # key channels evolve independently: split over programs
    cv = v_block * BV + tl.arange(0, BV)
    state_offsets = ck[:, None] * V + cv[None, :]
    state_mask = (ck < K)[:, None] & (cv < V)[None, :]
    num_chunks = tl.cdiv(eos - bos, C)
    first, last, state = _walk_start(initial_ptr, segment_state_ptr, program, seq_head, segment, segment_chunks,
                                     num_chunks, state_offsets, state_mask, K, V, BK, BV, HAS_INITIAL, WALK, False)
    if WALK == 1:
        decay_sum = tl.zeros((BK,) if VECTOR else (1,), dtype=tl.float32)
    rows = tl.arange(0, C)
    for n in range(first, last):
        if WALK != 1:
            tl.store(states_ptr + ((first_chunk + n) * H + head) * K * V + state_offsets,
                     state.to(states_ptr.dtype.element_ty), mask=state_mask)
        token0 = bos + n * C
        row_mask = token0 + rows < eos
        k = _tile(k_ptr, token0, rows, row_mask, head, H, K, ck, ck < K)
        v = _tile(v_ptr, token0, rows, row_mask, head, H, V, cv, cv < V)
        b, total = _chunk_decay(b_ptr, first_chunk + n, head, H, K, ck, C, DECAY)
        state = _advance_state(state, k, v, b, total, VECTOR, DOT_DTYPE, PRECISION)
        if WALK == 1:
            decay_sum += total
    if WALK == 0 and STORE_FINAL:
        tl.store(final_ptr + seq_head * K * V + state_offsets, state, mask=state_mask)
    if WALK == 1:
        _store_segment(segment_state_ptr, segment_decay_ptr, program, state, state_offsets, state_mask, decay_sum,
                       ck, K, V, VECTOR)


@triton.jit
def _walk_start(boundary_ptr, segment_state_ptr, program, seq_head, segment, segment_chunks, num_chunks, state_offsets,
                state_mask, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                HAS_BOUNDARY: tl.constexpr, WALK: tl.constexpr, REVERSE: tl.constexpr):
    """(first chunk, end chunk, starting value) of a state walk (`_chunk_states_kernel`, `_chunk_state_grads_kernel`):
    WALK 0 the whole sequence from its boundary value (the initial state, or ∂L/∂S_T when REVERSE) or zero; else one
    segment, from the combined start (WALK 2) or from zero, the boundary value added on the segment at the walk's
    starting end (the first segment; REVERSE: the last, or an empty sequence's only one)."""
    if WALK == 0:  # kept apart: the whole-sequence walk keeps the code it had before segments
        first, last = 0, num_chunks
        if HAS_BOUNDARY:
            state = tl.load(boundary_ptr + seq_head * K * V + state_offsets, mask=state_mask, other=0.0)
            state = state.to(tl.float32)
        else:
            state = tl.zeros((BK, BV), dtype=tl.float32)
    else:
        first = segment * segment_chunks
        last = tl.minimum(first + segment_chunks, num_chunks)
        state = tl.zeros((BK, BV), dtype=tl.float32)
        if WALK == 2:
            state += tl.load(segment_state_ptr + program * K * V + state_offsets, mask=state_mask, other=0.0)
        elif HAS_BOUNDARY:
            if (last == num_chunks) if REVERSE else (segment == 0):
                state += tl.load(boundary_ptr + seq_head * K * V + state_offsets, mask=state_mask,
                                 other=0.0).to(tl.float32)
    return first, last, state


@triton.jit
def _store_segment(segment_state_ptr, segment_decay_ptr, program, state, state_offsets, state_mask, decay_sum, ck,
                   K: tl.constexpr, V: tl.constexpr, VECTOR: tl.constexpr):
    """A segment walk's end value and its total log-decay, for `_combine_segments_kernel` (every value block of a key
    block stores the same decay)."""
    tl.store(segment_state_ptr + program * K * V + state_offsets, state, mask=state_mask)
    if VECTOR:
        tl.store(segment_decay_ptr + program * K + ck, decay_sum, mask=ck < K)
    else:
        tl.store(segment_decay_ptr + program + tl.arange(0, 1), decay_sum)


@triton.jit
def _combine_segments_kernel(segment_state_ptr, segment_decay_ptr, start_ptr, end_ptr, cu_seqlens_ptr, segments,
                             segment_chunks, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                             BV: tl.constexpr, C: tl.constexpr, VECTOR: tl.constexpr, HAS_START: tl.constexpr,
                             STORE_END: tl.constexpr, REVERSE: tl.constexpr):
    """Between the two segment walks of a state walk (forward: the states; REVERSE: their gradients): the walk's
    value X where each segment starts, X ← e^{D_p} ⊙ X + E_p segment by segment (E_p: segment p's end value from
    zero, the first segment's from the start value; D_p: its total log-decay), written over E_p for the second walk;
    the first segment gets the start value (initial state / final-state gradient), and the last X is the end value
    (final state / initial-state gradient)."""
    k_block, v_block, seq_head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq = seq_head // H
    bos, eos = tl.load(cu_seqlens_ptr + seq), tl.load(cu_seqlens_ptr + seq + 1)
    own = tl.maximum(tl.cdiv(tl.cdiv(eos - bos, C), segment_chunks), 1)  # a packed sequence's own segments
    ck = k_block * BK + tl.arange(0, BK)
    cv = v_block * BV + tl.arange(0, BV)
    state_offsets = ck[:, None] * V + cv[None, :]
    state_mask = (ck < K)[:, None] & (cv < V)[None, :]
    base = seq_head * segments
    walked_first = own - 1 if REVERSE else 0
    value = tl.load(segment_state_ptr + (base + walked_first) * K * V + state_offsets, mask=state_mask, other=0.0)
    start = tl.zeros((BK, BV), dtype=tl.float32)
    if HAS_START:
        start += tl.load(start_ptr + seq_head * K * V + state_offsets, mask=state_mask, other=0.0).to(tl.float32)
    tl.store(segment_state_ptr + (base + walked_first) * K * V + state_offsets, start, mask=state_mask)
    for t in range(1, own):
        segment = base + (own - 1 - t if REVERSE else t)
        end_value = tl.load(segment_state_ptr + segment * K * V + state_offsets, mask=state_mask, other=0.0)
        tl.store(segment_state_ptr + segment * K * V + state_offsets, value, mask=state_mask)
        if VECTOR:
            decay = tl.exp(tl.load(segment_decay_ptr + segment * K + ck, mask=ck < K, other=0.0))[:, None]
        else:
            decay = tl.exp(tl.sum(tl.load(segment_decay_ptr + segment + tl.arange(0, 1)), axis=0))
        value = value * decay + end_value
    if STORE_END:
        tl.store(end_ptr + seq_head * K * V + state_offsets, value, mask=state_mask)



@triton.jit
def _chunk_output_kernel(q_ptr, k_ptr, v_ptr, b_ptr, states_ptr, o_ptr, scores_ptr, cu_seqlens_ptr, chunk_seq_ptr,
                         chunk_token_ptr, scale, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                         BV: tl.constexpr, C: tl.constexpr, LEVELS: tl.constexpr, DECAY: tl.constexpr,
                         STORE_SCORES: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                         VALUE_BLOCKS: tl.constexpr):
    """o of one (chunk, head, VALUE_BLOCKS blocks of BV value channels): o = (q ⊙ e^{b}) S + A v, the scores A first
    (`_intra_scores`, summed over key blocks of BK channels; kept for the backward when STORE_SCORES), then each value
    block. Vector decay's scores cost six dots per key block: one program takes every value block; the others' one
    dot is recomputed per value block, which spreads a chunk over more programs."""
    chunk, head, value_program = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq, token0 = tl.load(chunk_seq_ptr + chunk), tl.load(chunk_token_ptr + chunk)
    eos = tl.load(cu_seqlens_ptr + seq + 1)
    rows = tl.arange(0, C)
    row_mask = token0 + rows < eos
    scores = tl.zeros((C, C), dtype=tl.float32)
    for key_block in tl.range(0, tl.cdiv(K, BK), num_stages=1):  # not pipelined: six levels' tiles per stage
        ck = key_block * BK + tl.arange(0, BK)
        q = _tile(q_ptr, token0, rows, row_mask, head, H, K, ck, ck < K) * scale
        k = _tile(k_ptr, token0, rows, row_mask, head, H, K, ck, ck < K)
        b, _ = _chunk_decay(b_ptr, chunk, head, H, K, ck, C, DECAY)
        scores += _intra_scores(q, k, b, b_ptr, chunk, head, H, K, ck, C, LEVELS, DECAY, DOT_DTYPE, PRECISION)
    scores = scores.to(DOT_DTYPE)
    if STORE_SCORES and value_program == 0:
        tl.store(scores_ptr + (chunk * H + head) * C * C + rows[:, None] * C + rows[None, :], scores)
    chunk_states_ptr = states_ptr + (chunk * H + head) * K * V
    for value_block in range(value_program * VALUE_BLOCKS, tl.minimum((value_program + 1) * VALUE_BLOCKS,
                                                                       tl.cdiv(V, BV))):
        cv = value_block * BV + tl.arange(0, BV)
        v = _tile(v_ptr, token0, rows, row_mask, head, H, V, cv, cv < V).to(DOT_DTYPE)
        o = tl.dot(scores, v, input_precision=PRECISION)
        for key_block in range(tl.cdiv(K, BK)):
            ck = key_block * BK + tl.arange(0, BK)
            q = _tile(q_ptr, token0, rows, row_mask, head, H, K, ck, ck < K) * scale
            b, _ = _chunk_decay(b_ptr, chunk, head, H, K, ck, C, DECAY)
            state = tl.load(chunk_states_ptr + ck[:, None] * V + cv[None, :],
                            mask=(ck < K)[:, None] & (cv < V)[None, :], other=0.0).to(DOT_DTYPE)
            o += tl.dot((q * _row_decay(b, DECAY == "vector")).to(DOT_DTYPE), state, input_precision=PRECISION)
        tl.store(o_ptr + ((token0 + rows[:, None]) * H + head) * V + cv[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & (cv < V)[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Backward kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _chunk_state_grads_kernel(q_ptr, do_ptr, b_ptr, final_grad_ptr, state_grads_ptr, initial_grad_ptr,
                              segment_state_ptr, segment_decay_ptr, cu_seqlens_ptr, chunk_offsets_ptr, scale, segments,
                              segment_chunks, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                              BV: tl.constexpr, C: tl.constexpr, DECAY: tl.constexpr, HAS_FINAL_GRAD: tl.constexpr,
                              STORE_INITIAL_GRAD: tl.constexpr, WALK: tl.constexpr, DOT_DTYPE: tl.constexpr,
                              PRECISION: tl.constexpr):
    """∂L/∂S at the end of every chunk (reverse walk): dS ← e^{B} ⊙ dS + (q ⊙ e^{b})ᵀ do; ∂L/∂S_0 last. WALK as in
    `_chunk_states_kernel`, segments walked last to first (the sequence's last segment from ∂L/∂S_T)."""
    k_block, v_block, program = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_head, segment = program // segments, program % segments
    seq, head = seq_head // H, seq_head % H
    bos, eos = tl.load(cu_seqlens_ptr + seq), tl.load(cu_seqlens_ptr + seq + 1)
    first_chunk = tl.load(chunk_offsets_ptr + seq)
    VECTOR: tl.constexpr = DECAY == "vector"
    ck = k_block * BK + tl.arange(0, BK)  # key channels evolve independently: split over programs
    cv = v_block * BV + tl.arange(0, BV)
    state_offsets = ck[:, None] * V + cv[None, :]
    state_mask = (ck < K)[:, None] & (cv < V)[None, :]
    num_chunks = tl.cdiv(eos - bos, C)
    first, last, dstate = _walk_start(final_grad_ptr, segment_state_ptr, program, seq_head, segment, segment_chunks,
                                      num_chunks, state_offsets, state_mask, K, V, BK, BV, HAS_FINAL_GRAD, WALK, True)
    if WALK == 1:
        decay_sum = tl.zeros((BK,) if VECTOR else (1,), dtype=tl.float32)
    rows = tl.arange(0, C)
    for r in range(last - first):
        n = last - 1 - r
        if WALK != 1:
            tl.store(state_grads_ptr + ((first_chunk + n) * H + head) * K * V + state_offsets,
                     dstate.to(state_grads_ptr.dtype.element_ty), mask=state_mask)
        token0 = bos + n * C
        row_mask = token0 + rows < eos
        q = _tile(q_ptr, token0, rows, row_mask, head, H, K, ck, ck < K) * scale
        do = _tile(do_ptr, token0, rows, row_mask, head, H, V, cv, cv < V)
        b, total = _chunk_decay(b_ptr, first_chunk + n, head, H, K, ck, C, DECAY)
        if VECTOR:
            dstate = dstate * tl.exp(total)[:, None]
        else:
            dstate = dstate * tl.exp(total)
        q_from_start = (q * _row_decay(b, VECTOR)).to(DOT_DTYPE)
        dstate += tl.dot(tl.trans(q_from_start), do.to(DOT_DTYPE), input_precision=PRECISION)
        if WALK == 1:
            decay_sum += total
    if WALK == 0 and STORE_INITIAL_GRAD:
        tl.store(initial_grad_ptr + seq_head * K * V + state_offsets, dstate, mask=state_mask)
    if WALK == 1:
        _store_segment(segment_state_ptr, segment_decay_ptr, program, dstate, state_offsets, state_mask, decay_sum,
                       ck, K, V, VECTOR)



@triton.jit
def _chunk_value_grads_kernel(k_ptr, v_ptr, b_ptr, do_ptr, scores_ptr, state_grads_ptr, dv_ptr, dA_ptr, cu_seqlens_ptr,
                              chunk_seq_ptr, chunk_token_ptr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                              BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, DECAY: tl.constexpr,
                              DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """dv of one (chunk, head), dv = Aᵀ do + (k ⊙ e^{B − b}) dS (A: the scores the forward kept, dS: ∂L/∂S at the
    chunk's end), value block by value block; for vector decay also the scores' gradient dA = do vᵀ (causal, fp32)
    for `_chunk_intra_grads_kernel` (the key-gradient kernel forms it itself for the other decays)."""
    chunk, head = tl.program_id(0), tl.program_id(1)
    seq, token0 = tl.load(chunk_seq_ptr + chunk), tl.load(chunk_token_ptr + chunk)
    eos = tl.load(cu_seqlens_ptr + seq + 1)
    rows = tl.arange(0, C)
    row_mask = token0 + rows < eos
    i = rows[:, None]
    j = rows[None, :]
    chunk_scores_ptr = scores_ptr + (chunk * H + head) * C * C
    scores_t = tl.load(chunk_scores_ptr + j * C + i)  # Aᵀ, loaded transposed
    chunk_grads_ptr = state_grads_ptr + (chunk * H + head) * K * V
    dA = tl.zeros((C, C), dtype=tl.float32)
    for value_block in range(tl.cdiv(V, BV)):
        cv = value_block * BV + tl.arange(0, BV)
        v = _tile(v_ptr, token0, rows, row_mask, head, H, V, cv, cv < V).to(DOT_DTYPE)
        do = _tile(do_ptr, token0, rows, row_mask, head, H, V, cv, cv < V).to(DOT_DTYPE)
        if DECAY == "vector":
            dA += tl.dot(do, tl.trans(v), input_precision=PRECISION)
        dv = tl.dot(scores_t, do, input_precision=PRECISION)
        for key_block in range(tl.cdiv(K, BK)):
            ck = key_block * BK + tl.arange(0, BK)
            k = _tile(k_ptr, token0, rows, row_mask, head, H, K, ck, ck < K)
            b, total = _chunk_decay(b_ptr, chunk, head, H, K, ck, C, DECAY)
            dstate = tl.load(chunk_grads_ptr + ck[:, None] * V + cv[None, :],
                             mask=(ck < K)[:, None] & (cv < V)[None, :], other=0.0).to(DOT_DTYPE)
            dv += tl.dot((k * _to_end(b, total, DECAY == "vector")).to(DOT_DTYPE), dstate, input_precision=PRECISION)
        tl.store(dv_ptr + ((token0 + rows[:, None]) * H + head) * V + cv[None, :], dv.to(dv_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & (cv < V)[None, :])
    if DECAY == "vector":
        tl.store(dA_ptr + (chunk * H + head) * C * C + i * C + j, tl.where(i >= j, dA, 0.0))


@triton.jit
def _pair_decay(b):
    """Scalar, static and no decay: [C, C], e^{b_i − b_j} at row i, column j for j < i, else 0."""
    i = tl.arange(0, b.shape[0])[:, None]
    j = tl.arange(0, b.shape[0])[None, :]
    return tl.exp(tl.where(i > j, b[:, None] - b[None, :], float("-inf")))


@triton.jit
def _intra_grads(q, k, b, decay, dA, dA_t, GRAD_PRECISION: tl.constexpr):
    """Scalar, static and no decay: the chunk's own part of dq and dk, fp32, without the diagonal (each token with
    itself): dq_i = Σ_{j < i} dA_ij k_j e^{b_i − b_j}, dk_j = Σ_{i > j} dA_ij q_i e^{b_i − b_j}; decay from
    `_pair_decay`, dA [C, C] causal, dA_t its transpose (both loaded). Vector decay: `_chunk_intra_grads_kernel`."""
    i = tl.arange(0, dA.shape[0])[:, None]
    j = tl.arange(0, dA.shape[0])[None, :]
    decay_t = tl.exp(tl.where(i < j, b[None, :] - b[:, None], float("-inf")))  # `decay` at row j, column i
    dq = tl.dot(dA * decay, k, input_precision=GRAD_PRECISION)
    dk = tl.dot(dA_t * decay_t, q, input_precision=GRAD_PRECISION)
    return dq, dk


@triton.jit
def _straddling_pairs(q, k, decay, dA, scale, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Scalar and static decay: the chunk's own pairs' part of d log λ, [C] — at position r, Σ over the pairs
    s < r ≤ t of dA_ts A_ts (A_ts = q_t·k_s e^{b_t − b_s}: the scores summed over the channels of q and k, given
    unscaled and bf16-exact; decay from `_pair_decay`), each pair counted where its decay spans r. All terms fp32,
    none cancels another."""
    i = tl.arange(0, dA.shape[0])[:, None]
    j = tl.arange(0, dA.shape[0])[None, :]
    scores = tl.dot(q.to(DOT_DTYPE), tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION) * scale
    pairs = dA * scores * decay
    before = tl.cumsum(pairs, axis=1) - pairs  # [t, r]: Σ_{s < r} of row t
    return tl.sum(tl.where(i >= j, before, 0.0), axis=0)  # [r]: Σ_{t ≥ r}


@triton.jit
def _grad_dot(a, b, GRAD_PRECISION: tl.constexpr):
    """a @ b for fp32 a, b at GRAD_PRECISION: "bf16x3" splits each operand into bf16 high and low parts and sums three
    bf16 products (the two low parts' product dropped: ~2^-16 relative, on bf16 tensor cores at twice TF32's rate);
    otherwise tl.dot's own input precisions ("tf32x3", "tf32", "ieee")."""
    if GRAD_PRECISION == "bf16x3":
        a_high = a.to(tl.bfloat16)
        a_low = (a - a_high.to(tl.float32)).to(tl.bfloat16)
        b_high = b.to(tl.bfloat16)
        b_low = (b - b_high.to(tl.float32)).to(tl.bfloat16)
        out = tl.dot(a_low, b_high)
        out = tl.dot(a_high, b_low, out)
        return tl.dot(a_high, b_high, out)
    else:
        return tl.dot(a, b, input_precision=GRAD_PRECISION)


@triton.jit
def _chunk_intra_grads_kernel(q_ptr, k_ptr, b_ptr, dA_ptr, dq_ptr, dk_ptr, cu_seqlens_ptr, chunk_seq_ptr,
                              chunk_token_ptr, scale, H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
                              C: tl.constexpr, SUB: tl.constexpr, SUB_LEVELS: tl.constexpr,
                              GRAD_PRECISION: tl.constexpr):
    """Vector decay: the chunk's own part of dq and dk (`_intra_grads`' sums) for one sub-chunk of SUB rows and BK
    key channels, fp32, without each token with itself. Pairs in different sub-chunks factorise about one row of
    this sub-chunk, its first for dq (e^{b_i − b_n} e^{b_n − b_j}), its last for dk, both factors ≤ 1; pairs within
    it by halving (`_level_factors`). Every dot is [SUB, SUB] × [SUB, BK] with fp32 operands (`_grad_dot`)."""
    SUBS: tl.constexpr = C // SUB
    chunk_sub, head, key_block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    chunk, sub = chunk_sub // SUBS, chunk_sub % SUBS
    seq, token0 = tl.load(chunk_seq_ptr + chunk), tl.load(chunk_token_ptr + chunk)
    eos = tl.load(cu_seqlens_ptr + seq + 1)
    first = sub * SUB
    if token0 + first >= eos:
        return
    local = tl.arange(0, SUB)
    rows = first + local
    row_mask = token0 + rows < eos
    ck = key_block * BK + tl.arange(0, BK)
    chunk_dA_ptr = dA_ptr + (chunk * H + head) * C * C
    chunk_b_ptr = b_ptr + (chunk * C * H + head) * K  # row r of the chunk's b at chunk_b_ptr + r·H·K
    q = _tile(q_ptr, token0, rows, row_mask, head, H, K, ck, ck < K) * scale
    k = _tile(k_ptr, token0, rows, row_mask, head, H, K, ck, ck < K)
    b = tl.load(chunk_b_ptr + rows[:, None] * H * K + ck[None, :], mask=(ck < K)[None, :], other=0.0)
    dq = tl.zeros((SUB, BK), dtype=tl.float32)
    dk = tl.zeros((SUB, BK), dtype=tl.float32)
    if sub > 0:
        b_first = tl.load(chunk_b_ptr + first * H * K + ck, mask=ck < K, other=0.0)
        for other in range(0, sub):
            rows_j = other * SUB + local
            k_j = _tile(k_ptr, token0, rows_j, token0 + rows_j < eos, head, H, K, ck, ck < K)
            b_j = tl.load(chunk_b_ptr + rows_j[:, None] * H * K + ck[None, :], mask=(ck < K)[None, :], other=0.0)
            dA = tl.load(chunk_dA_ptr + rows[:, None] * C + rows_j[None, :])
            dq += _grad_dot(dA, k_j * tl.exp(b_first[None, :] - b_j), GRAD_PRECISION)
        dq *= tl.exp(b - b_first[None, :])
    if sub < SUBS - 1:
        b_last = tl.load(chunk_b_ptr + (first + SUB - 1) * H * K + ck, mask=ck < K, other=0.0)
        for other in range(sub + 1, SUBS):
            rows_i = other * SUB + local
            q_i = _tile(q_ptr, token0, rows_i, token0 + rows_i < eos, head, H, K, ck, ck < K) * scale
            b_i = tl.load(chunk_b_ptr + rows_i[:, None] * H * K + ck[None, :], mask=(ck < K)[None, :], other=0.0)
            dA_t = tl.load(chunk_dA_ptr + rows_i[None, :] * C + rows[:, None])
            dk += _grad_dot(dA_t, q_i * tl.exp(b_i - b_last[None, :]), GRAD_PRECISION)
        dk *= tl.exp(b_last[None, :] - b)
    dA = tl.load(chunk_dA_ptr + rows[:, None] * C + rows[None, :])
    dA_t = tl.load(chunk_dA_ptr + rows[None, :] * C + rows[:, None])
    for level in tl.static_range(SUB_LEVELS):
        q_factor, k_factor = _level_factors(b, b_ptr, chunk, first, local, head, H, K, ck, C, SUB >> (level + 1))
        same = _same_block(SUB >> (level + 1), SUB)
        dq += q_factor * _grad_dot(tl.where(same, dA, 0.0), k * k_factor, GRAD_PRECISION)
        dk += k_factor * _grad_dot(tl.where(same, dA_t, 0.0), q * q_factor, GRAD_PRECISION)
    offsets = ((token0 + rows[:, None]) * H + head) * K + ck[None, :]
    mask = row_mask[:, None] & (ck < K)[None, :]
    tl.store(dq_ptr + offsets, dq, mask=mask)
    tl.store(dk_ptr + offsets, dk, mask=mask)


@triton.jit
def _chunk_key_grads_kernel(q_ptr, k_ptr, v_ptr, b_ptr, do_ptr, states_ptr, state_grads_ptr, dA_ptr, dq_intra_ptr,
                            dk_intra_ptr, dq_ptr, dk_ptr, dg_ptr, cu_seqlens_ptr, chunk_seq_ptr, chunk_token_ptr, scale,
                            T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                            C: tl.constexpr, DECAY: tl.constexpr, DECAY_GRAD: tl.constexpr, DOT_DTYPE: tl.constexpr,
                            PRECISION: tl.constexpr, GRAD_PRECISION: tl.constexpr):
    """dq, dk and (DECAY_GRAD) d log λ of one (chunk, head, block of BK key channels), from the state S at the chunk's
    start, ∂L/∂S at its end (dS) and dA = do vᵀ (vector decay: from `_chunk_value_grads_kernel`; the others form it
    here, beside do Sᵀ, from the same tiles): dq = e^{b} ⊙ (do Sᵀ) + intra,
    dk = e^{B − b} ⊙ (v dSᵀ) + intra; the intra parts from `_chunk_intra_grads_kernel` (vector decay) or
    `_intra_grads`, then each token with itself (dA_ii, undecayed).

    d log λ within the chunk, from fp32 terms that are each a part of the gradient (nothing cancels across chunks):
    d log λ_r = Σ_{t ≥ r} (q ⊙ dq − k ⊙ dk_intra)_t + Σ_{s < r} (k ⊙ dk_state)_s + e^{B} ⊙ Σ_v S ⊙ dS, the pairs of
    tokens (s < r ≤ t) inside the chunk, from before it to inside, from inside to after it, and across it; dq and
    dk_intra here without each token's pair with itself, which has no decay to differentiate. Scalar and static
    decay sum it over the block's channels, the chunk's own pairs straddling r directly (`_straddling_pairs`): one
    partial sum per key block, [T, H] each, added on the host."""
    chunk, head, key_block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq, token0 = tl.load(chunk_seq_ptr + chunk), tl.load(chunk_token_ptr + chunk)
    eos = tl.load(cu_seqlens_ptr + seq + 1)
    VECTOR: tl.constexpr = DECAY == "vector"
    # fp32 states with narrower dot operands (`_state_dtype`): the d log λ sums see the states' fp32 values
    EXACT_STATES: tl.constexpr = DECAY_GRAD and states_ptr.dtype.element_ty != DOT_DTYPE
    rows = tl.arange(0, C)
    i = rows[:, None]
    j = rows[None, :]
    row_mask = token0 + rows < eos
    ck = key_block * BK + tl.arange(0, BK)
    chunk_states_ptr = states_ptr + (chunk * H + head) * K * V
    chunk_grads_ptr = state_grads_ptr + (chunk * H + head) * K * V
    dq = tl.zeros((C, BK), dtype=tl.float32)
    dk_state = tl.zeros((C, BK), dtype=tl.float32)
    across = tl.zeros((BK,), dtype=tl.float32)
    if not VECTOR:
        dA = tl.zeros((C, C), dtype=tl.float32)
        dA_t = tl.zeros((C, C), dtype=tl.float32)
    for value_block in range(tl.cdiv(V, BV)):
        cv = value_block * BV + tl.arange(0, BV)
        state_offsets = ck[:, None] * V + cv[None, :]
        state_mask = (ck < K)[:, None] & (cv < V)[None, :]
        v = _tile(v_ptr, token0, rows, row_mask, head, H, V, cv, cv < V).to(DOT_DTYPE)
        do = _tile(do_ptr, token0, rows, row_mask, head, H, V, cv, cv < V).to(DOT_DTYPE)
        state = tl.load(chunk_states_ptr + state_offsets, mask=state_mask, other=0.0)
        dstate = tl.load(chunk_grads_ptr + state_offsets, mask=state_mask, other=0.0)
        state_dot, dstate_dot = state.to(DOT_DTYPE), dstate.to(DOT_DTYPE)
        dq += tl.dot(do, tl.trans(state_dot), input_precision=PRECISION)
        dk_state += tl.dot(v, tl.trans(dstate_dot), input_precision=PRECISION)
        if EXACT_STATES:  # and what rounding them to DOT_DTYPE left (do and v are exact in it)
            dq += tl.dot(do, tl.trans((state - state_dot.to(tl.float32)).to(DOT_DTYPE)), input_precision=PRECISION)
            dk_state += tl.dot(v, tl.trans((dstate - dstate_dot.to(tl.float32)).to(DOT_DTYPE)),
                               input_precision=PRECISION)
        if not VECTOR:
            dA += tl.dot(do, tl.trans(v), input_precision=PRECISION)
            dA_t += tl.dot(v, tl.trans(do), input_precision=PRECISION)
        if DECAY_GRAD:
            across += tl.sum(state.to(tl.float32) * dstate.to(tl.float32), axis=1)
    q_unscaled = _tile(q_ptr, token0, rows, row_mask, head, H, K, ck, ck < K)
    q = q_unscaled * scale
    k = _tile(k_ptr, token0, rows, row_mask, head, H, K, ck, ck < K)
    b, total = _chunk_decay(b_ptr, chunk, head, H, K, ck, C, DECAY)
    offsets = ((token0 + rows[:, None]) * H + head) * K + ck[None, :]
    mask = row_mask[:, None] & (ck < K)[None, :]
    if VECTOR:
        dq_intra = tl.load(dq_intra_ptr + offsets, mask=mask, other=0.0)
        dk_intra = tl.load(dk_intra_ptr + offsets, mask=mask, other=0.0)
        own = tl.load(dA_ptr + (chunk * H + head) * C * C + rows * (C + 1))[:, None]  # dA_ii, undecayed
    else:
        dA = tl.where(i >= j, dA, 0.0)
        decay = _pair_decay(b)
        dq_intra, dk_intra = _intra_grads(q, k, b, decay, dA, tl.where(i <= j, dA_t, 0.0), GRAD_PRECISION)
        own = tl.sum(tl.where(i == j, dA, 0.0), axis=1)[:, None]
    dq_state = dq * _row_decay(b, VECTOR)
    dk_state = dk_state * _to_end(b, total, VECTOR)
    tl.store(dq_ptr + offsets, ((dq_state + dq_intra + own * k) * scale).to(dq_ptr.dtype.element_ty), mask=mask)
    tl.store(dk_ptr + offsets, (dk_state + dk_intra + own * q).to(dk_ptr.dtype.element_ty), mask=mask)
    if DECAY_GRAD:
        earlier = k * dk_state
        if VECTOR:
            later = q * (dq_state + dq_intra) - k * dk_intra
            dg = tl.cumsum(later, axis=0, reverse=True) + (tl.cumsum(earlier, axis=0) - earlier)
            tl.store(dg_ptr + offsets, dg + (across * tl.exp(total))[None, :], mask=mask)
        else:
            later_sum = tl.sum(q * dq_state, axis=1)
            earlier_sum = tl.sum(earlier, axis=1)
            # row sums instead of a [C] scan (Triton 3.6 fails to lower tl.cumsum over [C, 1] at 8 warps)
            dg = tl.sum(tl.where(j >= i, later_sum[None, :], 0.0), axis=1)
            dg += tl.sum(tl.where(j < i, earlier_sum[None, :], 0.0), axis=1)
            dg += tl.sum(across, axis=0) * tl.exp(total)
            dg += _straddling_pairs(q_unscaled, k, decay, dA, scale, DOT_DTYPE, PRECISION)
            tl.store(dg_ptr + (key_block * T + token0 + rows) * H + head, dg, mask=row_mask)


# ----------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------


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
                   output_final_state: bool, keep: bool,
                   exact_states: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunked recurrence's forward (module docstring): (o, the final states [N, H, K, V] fp32 or, unless
    `output_final_state`, an empty tensor, and for `_chunk_backward` the chunk states [chunks, H, K, V] in
    `_state_dtype`, and when `keep` the chunks' scores [chunks, H, C, C] in `_kept_dtype` and the cumulative log λ
    (`_cumulative_decay`, fp32), else empty; chunks: `_num_chunks`)."""
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    decay = _decay_kind(log_decay, key_dim)
    layout = _chunk_layout(cu_seqlens, batch, length, q.device)
    num_sequences = layout[0].numel() - 1
    q, k, v = (x.contiguous() for x in (q, k, v))
    g = log_decay.float().contiguous() if log_decay is not None else q.new_zeros(1, dtype=torch.float32)
    initial = initial_state.float().contiguous() if initial_state is not None else None
    o = v.new_empty(v.shape)
    b = _cumulative_decay(g, layout, decay, heads, key_dim)
    chunks = layout[2].numel()
    states, final = _forward_states(k, v, b, initial, layout, decay, heads, key_dim, value_dim, num_sequences,
                                    cdiv(length, CHUNK), output_final_state,
                                    _spare_chunks(chunks, length, cu_seqlens is not None), exact_states)
    dot_dtype, precision, _, _ = _dot_settings(q.dtype)
    scores = q.new_empty(chunks if keep else 0, heads, CHUNK, CHUNK, dtype=_kept_dtype(q.dtype))
    block_k, block_v, launch = _launch("output", key_dim, value_dim, dot_dtype, decay)
    value_blocks = cdiv(value_dim, block_v) if decay == DECAY_VECTOR else 1  # value blocks per program
    _chunk_output_kernel[(chunks, heads, cdiv(cdiv(value_dim, block_v), value_blocks))](
        q, k, v, b, states, o, scores, layout[0], layout[2], layout[3], scale, heads, key_dim, value_dim, block_k,
        block_v, CHUNK, CHUNK_LEVELS, decay, keep, dot_dtype, precision, value_blocks, **launch)
    kept_decay = b if keep and decay != DECAY_NONE else g.new_empty(0)
    return o, final if final is not None else g.new_empty(0), states, scores, kept_decay


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
            q.new_empty(chunks, heads, key_dim, value_dim, dtype=_state_dtype(q.dtype, exact_states)),
            q.new_empty(chunks if keep else 0, heads, CHUNK, CHUNK, dtype=kept), kept_decay)


def _chunk_backward(do: torch.Tensor, final_grad: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, log_decay: torch.Tensor | None, initial_state: torch.Tensor | None,
                    states: torch.Tensor, scores: torch.Tensor, kept_decay: torch.Tensor,
                    cu_seqlens: torch.Tensor | None, scale: float, decay_grad: bool,
                    initial_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunked recurrence's backward from `_chunk_forward`'s inputs, what it kept (chunk states, scores,
    cumulative log λ) and the gradients of o and (or None) of the final states: (dq, dk, dv, d log λ, ∂L/∂S_0), each
    in its input's shape and dtype; d log λ only when `decay_grad` and ∂L/∂S_0 only when `initial_grad`, else empty
    tensors."""
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
    spare = _spare_chunks(states.shape[0], length, cu_seqlens is not None)
    if spare > 0:
        state_grads[-spare:].zero_()
    initial_grad = (q.new_empty(num_sequences, heads, key_dim, value_dim, dtype=torch.float32)
                    if initial_grad and initial_state is not None else None)
    final_grad = final_grad.float().contiguous() if final_grad is not None else None
    block_k_split, block_v, launch = _launch("state_grads", key_dim, value_dim, dot_dtype, decay)
    blocks = (cdiv(key_dim, block_k_split), cdiv(value_dim, block_v))

    def state_grads_walk(walk, segments, segment_chunks, segment_state, segment_decay):
        _chunk_state_grads_kernel[(*blocks, num_sequences * heads * segments)](
            q, do, b, final_grad, state_grads, initial_grad, segment_state, segment_decay, layout[0], layout[1],
            scale, segments, segment_chunks, heads, key_dim, value_dim, block_k_split, block_v, CHUNK, decay,
            final_grad is not None, initial_grad is not None, walk, dot_dtype, precision, **launch)

    _state_walk(state_grads_walk, blocks, block_k_split, block_v, num_sequences, heads, cdiv(length, CHUNK), key_dim,
                value_dim, decay, final_grad, initial_grad, layout[0], q.device, reverse=True)
    chunks = layout[2].numel()
    vector = decay == DECAY_VECTOR
    dv = torch.empty_like(v)
    # dA = do vᵀ: stored for vector decay's own-pair kernel; the key-gradient kernel forms it itself for the others
    dA = q.new_empty(chunks, heads, CHUNK, CHUNK, dtype=torch.float32) if vector else None
    block_k, block_v, launch = _launch("value_grads", key_dim, value_dim, dot_dtype)
    _chunk_value_grads_kernel[(chunks, heads)](
        k, v, b, do, scores, state_grads, dv, dA, layout[0], layout[2], layout[3], heads, key_dim, value_dim,
        block_k, block_v, CHUNK, decay, dot_dtype, precision, **launch)
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    dq_intra = dk_intra = None
    if vector:  # the chunks' own pairs by sub-chunks, at fp32 accuracy where d log λ is summed from them
        dq_intra, dk_intra = (q.new_empty(q.shape, dtype=torch.float32) for _ in range(2))
        block_k, _, launch = _launch("intra_grads", key_dim, value_dim, dot_dtype)
        _chunk_intra_grads_kernel[(chunks * CHUNK // SUB_CHUNK, heads, cdiv(key_dim, block_k))](
            q, k, b, dA, dq_intra, dk_intra, layout[0], layout[2], layout[3], scale, heads, key_dim, block_k,
            CHUNK, SUB_CHUNK, SUB_CHUNK.bit_length() - 1, exact_precision if needs_decay_grad else fp32_precision,
            **launch)
    block_k, block_v, launch = _launch("key_grads", key_dim, value_dim, dot_dtype, decay)
    key_blocks = cdiv(key_dim, block_k)
    d_log_decay = None
    if needs_decay_grad:  # scalar and static decay: a partial sum per key block
        d_log_decay = q.new_empty(*(() if vector else (key_blocks,)), batch, length, heads,
                                  *((key_dim,) if vector else ()), dtype=torch.float32)
    _chunk_key_grads_kernel[(chunks, heads, key_blocks)](
        q, k, v, b, do, states, state_grads, dA, dq_intra, dk_intra, dq, dk, d_log_decay, layout[0], layout[2],
        layout[3], scale, batch * length, heads, key_dim, value_dim, block_k, block_v, CHUNK, decay,
        needs_decay_grad, dot_dtype, precision, fp32_precision, **launch)
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


def _chunk_backward_fake(do, final_grad, q, k, v, log_decay, initial_state, states, scores, kept_decay, cu_seqlens,
                         scale, decay_grad, initial_grad):
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
    states (instead of a second walk), the scores and the cumulative log λ."""
    q, k, v, log_decay, initial_state, cu_seqlens, scale, output_final_state, keep, exact_states = inputs
    _, _, states, scores, kept_decay = output
    ctx.save_for_backward(q, k, v, log_decay, initial_state, states, scores, kept_decay, cu_seqlens)
    ctx.mark_non_differentiable(states, scores, kept_decay)
    ctx.set_materialize_grads(False)
    ctx.scale, ctx.output_final_state = scale, output_final_state


def _gradients(ctx, do, final_grad, backward):
    """The inputs' gradients through `backward` (the op `chunk_backward`, or `_chunk_backward` itself in eager)."""
    q, k, v, log_decay, initial_state, states, scores, kept_decay, cu_seqlens = ctx.saved_tensors
    wants_decay_grad, wants_initial_grad = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
    if do is None:  # only the final states reach the loss
        do = torch.zeros_like(v)
    dq, dk, dv, d_log_decay, initial_grad = backward(
        do, final_grad if ctx.output_final_state else None, q, k, v, log_decay, initial_state, states, scores,
        kept_decay, cu_seqlens, ctx.scale, wants_decay_grad, wants_initial_grad)
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


def _key_block(key_dim):
    return max(16, next_power_of_2(key_dim))


# Launch settings per kernel (and, where vector decay differs, per kernel for vector decay): key and value blocks
# (capped by the head dims; the state walks and the gradient kernels split the key dim over programs, the output and
# value-gradient kernels loop over its blocks), warps, pipeline stages. Chosen by sweeps on an H100 at the three
# shapes of BENCHMARKS.md's kernel table: e.g. the scalar / static state walks at 4 warps and 3 stages, 0.76 ms
# forward at 2×16384×16×128 against 0.88 at 8 warps and 2 stages (vector decay's walks stay at 8 warps, 2 stages: 1.05
# against 1.09 ms at 8×2048×16×128); vector decay's output at 3 stages, 0.94 ms forward against 1.05 at 2; its
# own-pair gradients in sub-chunks × 32 channels at 4 warps, 3.63 ms forward+backward against 3.71 at 64 channels and
# 8 warps.
TUNING = {
    "states": dict(block_k=64, block_v=64, num_warps=4, num_stages=3),
    "states_vector": dict(block_k=64, block_v=64, num_warps=8, num_stages=2),
    "output": dict(block_k=128, block_v=64, num_warps=4, num_stages=2),
    "output_vector": dict(block_k=128, block_v=64, num_warps=8, num_stages=3),
    "state_grads": dict(block_k=64, block_v=64, num_warps=4, num_stages=3),
    "state_grads_vector": dict(block_k=64, block_v=64, num_warps=8, num_stages=2),
    "value_grads": dict(block_k=64, block_v=64, num_warps=8, num_stages=2),
    "intra_grads": dict(block_k=32, block_v=64, num_warps=4, num_stages=3),
    "key_grads": dict(block_k=64, block_v=64, num_warps=4, num_stages=2),
    "key_grads_vector": dict(block_k=32, block_v=64, num_warps=8, num_stages=2),
}


def _launch(kernel, key_dim, value_dim, dot_dtype, decay=None):
    """(key block, value block, launch kwargs) of one kernel (for decay kind `decay` where its settings differ).
    `TUNING` is for bf16 dot operands; fp32 operands (fp16 and fp32 inputs) make every pipelined tile twice as large,
    so they run at most two stages (vector decay's output at K = 128 would need 272 KiB of shared memory at three)."""
    settings = dict(TUNING.get(f"{kernel}_vector" if decay == DECAY_VECTOR else kernel, TUNING[kernel]))
    if dot_dtype == tl.float32:
        settings["num_stages"] = min(settings["num_stages"], 2)
    block_k = settings.pop("block_k")
    if key_dim <= settings.pop("whole_key_dim_to", 0):
        block_k = _key_block(key_dim)
    block_k = min(block_k, _key_block(key_dim))
    block_v = min(settings.pop("block_v"), _key_block(value_dim))
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


def _forward_states(k, v, b, initial, layout, decay, heads, key_dim, value_dim, num_sequences, max_chunks,
                    output_final_state, spare=0, exact_states=False):
    """States at every chunk start ([chunks, H, K, V], in `_state_dtype`) and the final states (fp32) or None
    (`_state_walk`; max_chunks: a bound on a sequence's chunks, ⌈T / C⌉); the last `spare` chunks zeroed first
    (`_spare_chunks`)."""
    cu_seqlens, chunk_offsets, chunk_seq, _ = layout
    dot_dtype, precision, _, _ = _dot_settings(k.dtype)
    states = k.new_empty(chunk_seq.numel(), heads, key_dim, value_dim, dtype=_state_dtype(k.dtype, exact_states))
    if spare > 0:
        states[-spare:].zero_()
    final = (k.new_empty(num_sequences, heads, key_dim, value_dim, dtype=torch.float32) if output_final_state
             else None)
    block_k, block_v, launch = _launch("states", key_dim, value_dim, dot_dtype, decay)
    blocks = (cdiv(key_dim, block_k), cdiv(value_dim, block_v))

    def states_walk(walk, segments, segment_chunks, segment_state, segment_decay):
        _chunk_states_kernel[(*blocks, num_sequences * heads * segments)](
            k, v, b, initial, states, final, segment_state, segment_decay, cu_seqlens, chunk_offsets, segments,
            segment_chunks, heads, key_dim, value_dim, block_k, block_v, CHUNK, decay, initial is not None,
            output_final_state, walk, dot_dtype, precision, **launch)

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
    # scalar and static decay: fp32 chunk states where d log λ will be summed from them (`_state_dtype`)
    exact_states = keep and log_decay is not None and log_decay.requires_grad and log_decay.dim() != 4
    o, final, *_ = forward(q, k, v, log_decay, initial_state, cu_seqlens, float(scale), output_final_state, keep,
                           exact_states)
    return o, final if output_final_state else None


__all__ = ["triton_chunked_recurrence"]
