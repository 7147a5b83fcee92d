"""Triton kernels for the chunked decay recurrence (DESIGN.md §1), forward and backward, on packed sequences.

    o, final_state = triton_chunked_recurrence(q, k, v, log_decay, scale, initial_state, output_final_state,
                                               cu_seqlens=None)

Same contract as `recurrence_linear_decay.chunked_recurrence` (whose docstring gives the shapes), plus `cu_seqlens`:
int32 offsets [N + 1] of N sequences packed along T of a batch of one (varlen); initial/final states are then
[N, H, K, V]. A regular batch [B, T] runs as B packed sequences of length T, so every kernel below sees packed
sequences. The oracle is `recurrence_linear_decay.naive_recurrence`; `chunked_recurrence` is the PyTorch twin.

Algorithm (per head; b = cumulative log λ, fp32 throughout; q is pre-multiplied by `scale`):

- `_cumulative_decay_kernel`: b within every chunk, once per forward and once per backward, for the state walks
  (sequential over chunks: no scan on their critical path) and the vector path choice. The per-chunk kernels scan
  log λ of their own sub-chunks in registers (reading b there instead costs registers: more spills on sm_90).
- `_chunk_states_kernel`: walks each sequence in chunks of CHUNK tokens and stores the state at every chunk start
  (S ← e^{B} ⊙ S + (k ⊙ e^{B − b})ᵀ v, B the chunk's total log-decay), kept for the backward. With few sequences
  × heads the walks (this one, the state gradients' and the finishing pass) go through segments of a sequence in
  parallel (`_segment_plan`):
  each segment from zero, `_combine_segments_kernel` joins their ends in order, and each segment again from its
  true start.
- `_chunk_output_kernel`: one program per (chunk, head, value block): o = (q ⊙ e^{b}) S + A v, A the decayed causal
  scores. Scalar decay forms e^{b_i − b_j} directly, the whole chunk in one step. Vector decay uses the factorised
  matmul (q ⊙ e^{b − c})(k ⊙ e^{c − b})ᵀ, c = half of each channel's span, so that each factor's exponent is bounded
  by half the span: when every channel's span over the chunk is under 2 · FACTORISED_DECAY_LIMIT the whole chunk
  takes it in one step (the masked entries above the diagonal may overflow; they are discarded); else, when every
  span over each half is, the two halves are walked in turn with the state carried between them; otherwise
  VECTOR_SUB_CHUNK-token sub-chunks, each factorised while its own span allows and with the explicit pairwise decay
  (exponents ≤ 0 only) when not, so strong decays stay exact (`_vector_path`).
- backward: the state gradient at every chunk end (`_chunk_state_grads_kernel`, reverse walk), then per chunk
  dk, dv (`_chunk_dk_dv_kernel`, reverse over sub-chunks) and dq (`_chunk_dq_kernel`, forward), one step or a
  sub-chunk walk as in the forward. With VALUE_LOOP (the default) one program takes every value block and writes dq,
  dk whole (fp32); else each value block writes a partial dq, dk and the parts are summed (deterministic, no
  atomics): dk's before the dq kernel runs, so that dq's parts reuse their buffer, dq's by `_finish_grads_kernel`,
  in the same pass as d log λ: the reverse cumulative sum of q ⊙ dq − k ⊙ dk plus the final-state term
  Σ_v dS_T ⊙ S_T. Without d log λ, every kind but vector decay (one step per chunk) writes dq and dk straight into
  the gradients' dtype, and the finishing pass is skipped.

Triton ≥ 3.4 and < 3.7.1 miscompiles `tl.dot(tl.trans(x), y)` on Hopper when x is a down-cast dot result (DESIGN §7):
transposed operands here are always loaded or elementwise tensors; results wanted transposed are computed as
`dot(state, trans(loaded))` and transposed in registers.
"""

import functools
import os

import torch

from .kernels_host_linear_decay import cdiv, next_power_of_2, per_tensor, sm_count
from .kernels_launch_linear_decay import fast_launch

try:
    import triton
    import triton.language as tl
except ImportError as error:  # CPU-only torch ships without Triton: recurrence_linear_decay keeps the PyTorch path
    raise ImportError("Triton is not installed") from error

CHUNK = 64
# sub-chunk length inside a chunk: vector decay walks short sub-chunks in chunks whose decay span is too large for the
# factorised form (short diagonal blocks keep the pairwise fallback small); scalar decay takes the chunk at once
VECTOR_SUB_CHUNK, SCALAR_SUB_CHUNK = 16, 64
FACTORISED_DECAY_LIMIT = 60.0  # as in recurrence_linear_decay: e^{±60} is far from fp32/bf16 over- and underflow;
# the kernels centre the factors (`_decayed_scores`), so a span of twice this takes one factorised step
MAX_HEAD_DIM = 256
STATE_KEY_BLOCK = 64  # the state walks split the key dim over programs; the chunk kernels hold all of it

DECAY_NONE, DECAY_STATIC, DECAY_SCALAR, DECAY_VECTOR = 0, 1, 2, 3


# ----------------------------------------------------------------------------------------------------------------
# Shared device functions
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_log_decay(g_ptr, token0, rows, row_mask, head, H: tl.constexpr, K: tl.constexpr, cols,
                    DECAY: tl.constexpr):
    """log λ of `rows` (token offsets from token0) at key channels `cols` as fp32: [R, len(cols)] for vector decay,
    [R] otherwise; 0 where masked."""
    if DECAY == 3:
        ptrs = g_ptr + ((token0 + rows[:, None]) * H + head) * K + cols[None, :]
        return tl.load(ptrs, mask=row_mask[:, None] & (cols[None, :] < K), other=0.0).to(tl.float32)
    elif DECAY == 2:
        return tl.load(g_ptr + (token0 + rows) * H + head, mask=row_mask, other=0.0).to(tl.float32)
    elif DECAY == 1:
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
    if DECAY == 3:
        base = b_ptr + (chunk * C * H + head) * K  # row r at base + r·H·K
        b = tl.load(base + rows[:, None] * H * K + cols[None, :], mask=(cols < K)[None, :], other=0.0)
        return b, tl.load(base + (C - 1) * H * K + cols, mask=cols < K, other=0.0)
    elif DECAY == 0:
        b = tl.zeros((C,), dtype=tl.float32)
        return b, tl.sum(b, axis=0)
    else:
        base = b_ptr + chunk * C * H + head  # row r at base + r·H
        return tl.load(base + rows * H), tl.load(base + (C - 1) * H)


@triton.jit
def _last_row(b, R: tl.constexpr, VECTOR: tl.constexpr):
    """The last of R rows of a cumulative log λ: the block's total log-decay exactly as every kernel's cumulative sum
    has it (e^{total − b} is 1 at the last row), so that all kernels agree on it to the bit."""
    last = tl.arange(0, R) == R - 1
    if VECTOR:
        total = tl.sum(tl.where(last[:, None], b, 0.0), axis=0)
    else:
        total = tl.sum(tl.where(last, b, 0.0), axis=0)
    return total


@triton.jit
def _row_decay(b, VECTOR: tl.constexpr):
    """e^{b} shaped to multiply a [R, K] tile."""
    if VECTOR:
        decay = tl.exp(b)
    else:
        decay = tl.exp(b)[:, None]
    return decay


@triton.jit
def _tile(ptr, token0, rows, row_mask, head, H: tl.constexpr, D: tl.constexpr, cols, col_mask):
    """Rows `token0 + rows` of a [T, H, D] tensor at columns `cols` as fp32 [R, len(cols)]; 0 where masked."""
    ptrs = ptr + ((token0 + rows[:, None]) * H + head) * D + cols[None, :]
    return tl.load(ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _decayed_scores(x, y, b, S: tl.constexpr, VECTOR: tl.constexpr, PAIRWISE: tl.constexpr,
                    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """M[i, j] = Σ_c x_ic y_jc e^{b_ic − b_jc} for j ≤ i, else 0 (x, y [S, K] fp32, b sub-chunk-local, ≤ 0).

    Vector decay: the factorised matmul (x ⊙ e^{b − c})(y ⊙ e^{c − b})ᵀ, c = half the last row of b (half of each
    channel's span), when the span is ≤ 120 so that every factor is within e^{±60} (always, when not PAIRWISE: the
    caller has checked the span; entries above the diagonal may overflow and are discarded), else column by column
    with the pairwise decay (exponents ≤ 0 only). Scalar decay: (x yᵀ) ⊙ e^{b_i − b_j}."""
    i = tl.arange(0, S)[:, None]
    j = tl.arange(0, S)[None, :]
    if VECTOR:
        centre = _last_row(b, S, VECTOR) * 0.5  # b of the last row is the lowest
        if not PAIRWISE or -tl.min(centre, axis=0) <= 60.0:
            scores = tl.dot((x * tl.exp(b - centre[None, :])).to(DOT_DTYPE),
                            tl.trans((y * tl.exp(centre[None, :] - b)).to(DOT_DTYPE)), input_precision=PRECISION)
        else:
            scores = tl.zeros((S, S), dtype=tl.float32)
            for col in tl.static_range(S):
                y_col = tl.sum(tl.where(i == col, y, 0.0), axis=0)
                b_col = tl.sum(tl.where(i == col, b, 0.0), axis=0)
                decay = tl.exp(tl.where(i >= col, b - b_col[None, :], float("-inf")))
                scores = tl.where(j == col, tl.sum(x * y_col[None, :] * decay, axis=1)[:, None], scores)
        scores = tl.where(i >= j, scores, 0.0)
    else:
        scores = tl.dot(x.to(DOT_DTYPE), tl.trans(y.to(DOT_DTYPE)), input_precision=PRECISION)
        scores = tl.where(i >= j, scores * tl.exp(tl.where(i >= j, b[:, None] - b[None, :], float("-inf"))), 0.0)
    return scores


@triton.jit
def _decayed_mix(m, y, b, S: tl.constexpr, REVERSE: tl.constexpr, VECTOR: tl.constexpr, PAIRWISE: tl.constexpr,
                 DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """R_i = Σ_{j ≤ i} m_ij e^{b_i − b_j} ⊙ y_j (REVERSE: R_j = Σ_{i ≥ j} m_ij e^{b_i − b_j} ⊙ y_i), m [S, S] already
    causally masked, y [S, K] fp32 -> [S, K] fp32. The dq / dk intra-sub-chunk terms; vector decay factorised about
    c as in `_decayed_scores` (m is masked first: nothing overflows)."""
    i = tl.arange(0, S)[:, None]
    j = tl.arange(0, S)[None, :]
    # one exit at the end: a `return` inside a branch becomes unstructured control flow, which Triton 3.6 cannot
    # lower inside the sub-chunk loop
    if VECTOR:
        centre = _last_row(b, S, VECTOR) * 0.5
        if not PAIRWISE or -tl.min(centre, axis=0) <= 60.0:
            if REVERSE:  # e^{c−b_j} Σ_i m_ij (y_i e^{b_i−c}); mᵀ is wanted, so m is passed already transposed
                result = tl.exp(centre[None, :] - b) * tl.dot(
                    m.to(DOT_DTYPE), (y * tl.exp(b - centre[None, :])).to(DOT_DTYPE), input_precision=PRECISION)
            else:
                result = tl.exp(b - centre[None, :]) * tl.dot(
                    m.to(DOT_DTYPE), (y * tl.exp(centre[None, :] - b)).to(DOT_DTYPE), input_precision=PRECISION)
        else:
            result = tl.zeros(y.shape, dtype=tl.float32)
            for src in tl.static_range(S):
                y_src = tl.sum(tl.where(i == src, y, 0.0), axis=0)
                b_src = tl.sum(tl.where(i == src, b, 0.0), axis=0)
                weight = tl.sum(tl.where(j == src, m, 0.0), axis=1)  # column `src` of m (mᵀ row when REVERSE)
                if REVERSE:  # rows j ≤ src receive y_src e^{b_src − b_j}
                    decay = tl.exp(tl.where(i <= src, b_src[None, :] - b, float("-inf")))
                else:  # rows i ≥ src receive y_src e^{b_i − b_src}
                    decay = tl.exp(tl.where(i >= src, b - b_src[None, :], float("-inf")))
                result += weight[:, None] * y_src[None, :] * decay
    else:
        if REVERSE:
            mixed = tl.where(i <= j, m * tl.exp(tl.where(i <= j, b[None, :] - b[:, None], float("-inf"))), 0.0)
        else:
            mixed = tl.where(i >= j, m * tl.exp(tl.where(i >= j, b[:, None] - b[None, :], float("-inf"))), 0.0)
        result = tl.dot(mixed.to(DOT_DTYPE), y.to(DOT_DTYPE), input_precision=PRECISION)
    return result


@triton.jit
def _decayed_scores_transposed(x, y, b, S: tl.constexpr, VECTOR: tl.constexpr, PAIRWISE: tl.constexpr,
                               DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Mᵀ of `_decayed_scores(x, y, b)` computed directly (row j, column i ≥ j), so that it can feed a dot without a
    transpose of a dot result (DESIGN §7)."""
    j = tl.arange(0, S)[:, None]
    i = tl.arange(0, S)[None, :]
    if VECTOR:
        centre = _last_row(b, S, VECTOR) * 0.5
        if not PAIRWISE or -tl.min(centre, axis=0) <= 60.0:
            scores = tl.dot((y * tl.exp(centre[None, :] - b)).to(DOT_DTYPE),
                            tl.trans((x * tl.exp(b - centre[None, :])).to(DOT_DTYPE)), input_precision=PRECISION)
        else:
            scores = tl.zeros((S, S), dtype=tl.float32)
            for col in tl.static_range(S):
                x_col = tl.sum(tl.where(j == col, x, 0.0), axis=0)
                b_col = tl.sum(tl.where(j == col, b, 0.0), axis=0)
                decay = tl.exp(tl.where(j <= col, b_col[None, :] - b, float("-inf")))
                scores = tl.where(i == col, tl.sum(y * x_col[None, :] * decay, axis=1)[:, None], scores)
        scores = tl.where(j <= i, scores, 0.0)
    else:
        scores = tl.dot(y.to(DOT_DTYPE), tl.trans(x.to(DOT_DTYPE)), input_precision=PRECISION)
        scores = tl.where(j <= i, scores * tl.exp(tl.where(j <= i, b[None, :] - b[:, None], float("-inf"))), 0.0)
    return scores


@triton.jit
def _carried_operand(state, slot_ptrs, slot_mask, DOT_DTYPE: tl.constexpr, RELOAD_STATE: tl.constexpr):
    """The carried state (or state gradient) of a sub-chunk walk as the operand of the next sub-chunk's dots.

    RELOAD_STATE: through memory (store into the program's own slot, barrier, load), so that the operand is a loaded
    tensor, never a down-cast dot accumulator (DESIGN §7: Triton < 3.7.1 on Hopper miscompiles dot results reused as
    dot operands in some layouts; the suspect for the wrong bf16 vector-decay results in BENCHMARKS.md). The slot
    is free for this: a scratch copy of the states' shape (output kernel), the state gradients the dk/dv kernel has
    consumed (dq kernel), or the dk/dv walk's own state-gradient slot, read already and read by nothing after it."""
    if RELOAD_STATE:
        tl.store(slot_ptrs, state.to(slot_ptrs.dtype.element_ty), mask=slot_mask)
        tl.debug_barrier()
        operand = tl.load(slot_ptrs, mask=slot_mask, other=0.0).to(DOT_DTYPE)
        tl.debug_barrier()  # every thread has read the slot before any overwrites it again
    else:
        operand = state.to(DOT_DTYPE)
    return operand


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
def _vector_path(b, C: tl.constexpr):
    """How a chunk with vector decay is taken, from every key channel's decay span (−Σ log λ) over its tokens (b: the
    chunk's cumulative log λ [C, K], flat past the sequence's end):
    0 — the whole chunk in one factorised step (every span over the chunk ≤ 120: 2 · FACTORISED_DECAY_LIMIT, the
        factors centred on half the span, `_decayed_scores`);
    1 — its two halves in turn, each factorised (every span over a half ≤ 120);
    2 — VECTOR_SUB_CHUNK-token sub-chunks in turn, each factorised or pairwise by its own span."""
    rows = tl.arange(0, C)[:, None]
    end = tl.sum(tl.where(rows == C - 1, b, 0.0), axis=0)
    middle = tl.sum(tl.where(rows == C // 2 - 1, b, 0.0), axis=0)
    whole = -tl.min(end, axis=0)
    halves = tl.maximum(-tl.min(middle, axis=0), -tl.min(end - middle, axis=0))
    return tl.where(whole <= 120.0, 0, tl.where(halves <= 120.0, 1, 2))


@triton.jit
def _chunk_path(path_ptr, chunk, head, H: tl.constexpr, WHOLE_CHUNKS: tl.constexpr):
    """The vector path of a (chunk, head) as `_cumulative_decay_kernel` chose it; without WHOLE_CHUNKS the constant 2
    (the sub-chunk walk), so that the other paths are not compiled in."""
    if WHOLE_CHUNKS:
        return tl.load(path_ptr + chunk * H + head)
    else:
        return 2


# ----------------------------------------------------------------------------------------------------------------
# Forward kernels
# ----------------------------------------------------------------------------------------------------------------


@fast_launch
@triton.jit
def _cumulative_decay_kernel(g_ptr, b_ptr, path_ptr, cu_seqlens_ptr, chunk_seq_ptr, chunk_token_ptr, H: tl.constexpr,
                             K: tl.constexpr, BK: tl.constexpr, C: tl.constexpr, DECAY: tl.constexpr):
    """log λ cumulated within each chunk (inclusive), chunk-major: b [chunks, C, H, K] for vector decay, [chunks, C, H]
    for scalar and static decay; rows past a sequence's end repeat its last value. The state walks read it
    (`_chunk_decay`) instead of scanning log λ themselves. For vector decay also each (chunk, head)'s path
    (`_vector_path`, int32 [chunks, H]), which the per-chunk kernels read, so that b is freed before they run."""
    chunk, head = tl.program_id(0), tl.program_id(1)
    seq, token0 = tl.load(chunk_seq_ptr + chunk), tl.load(chunk_token_ptr + chunk)
    eos = tl.load(cu_seqlens_ptr + seq + 1)
    rows = tl.arange(0, C)
    ck = tl.arange(0, BK)
    # the same scan as the per-chunk kernels' (their b and this one round alike), at the same 8 warps
    b = tl.cumsum(_load_log_decay(g_ptr, token0, rows, token0 + rows < eos, head, H, K, ck, DECAY), axis=0)
    if DECAY == 3:
        tl.store(b_ptr + ((chunk * C + rows[:, None]) * H + head) * K + ck[None, :], b, mask=(ck < K)[None, :])
        tl.store(path_ptr + chunk * H + head, _vector_path(b, C).to(tl.int32))
    else:
        tl.store(b_ptr + (chunk * C + rows) * H + head, b)


@fast_launch
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
    VECTOR: tl.constexpr = DECAY == 3
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


@fast_launch
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


@fast_launch
@triton.jit
def _chunk_output_kernel(q_ptr, k_ptr, v_ptr, g_ptr, path_ptr, states_ptr, carry_ptr, o_ptr, cu_seqlens_ptr,
                         chunk_seq_ptr, chunk_token_ptr, scale, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                         BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, S: tl.constexpr, DECAY: tl.constexpr,
                         DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, RELOAD_STATE: tl.constexpr,
                         WHOLE_CHUNKS: tl.constexpr):
    """o of one (value block, chunk, head). Vector decay takes the whole chunk in one factorised step when its decay
    span allows, else its halves or sub-chunks of S tokens in turn (`_vector_path`, `_output_walk`), carrying the
    state through this program's slot of `carry_ptr` (shaped like the states, which the backward reads unchanged)."""
    v_block, chunk, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq, chunk_token = tl.load(chunk_seq_ptr + chunk), tl.load(chunk_token_ptr + chunk)
    eos = tl.load(cu_seqlens_ptr + seq + 1)
    ck = tl.arange(0, BK)
    cv = v_block * BV + tl.arange(0, BV)
    state_mask = (ck < K)[:, None] & (cv < V)[None, :]
    chunk_slot = (chunk * H + head) * K * V  # the walk forms its [K, BV] pointers where it uses them
    chunk_states_ptr, chunk_carry_ptr = states_ptr + chunk_slot, carry_ptr + chunk_slot
    if DECAY == 3:
        path = _chunk_path(path_ptr, chunk, head, H, WHOLE_CHUNKS)
        if path == 0:
            _output_walk(q_ptr, k_ptr, v_ptr, g_ptr, o_ptr, chunk_states_ptr, chunk_carry_ptr, state_mask, chunk_token,
                         eos, head, scale, ck, cv, H, K, V, C, C, DECAY, False, DOT_DTYPE, PRECISION, RELOAD_STATE)
        elif path == 1:
            _output_walk(q_ptr, k_ptr, v_ptr, g_ptr, o_ptr, chunk_states_ptr, chunk_carry_ptr, state_mask, chunk_token,
                         eos, head, scale, ck, cv, H, K, V, C, C // 2, DECAY, False, DOT_DTYPE, PRECISION, RELOAD_STATE)
        else:
            _output_walk(q_ptr, k_ptr, v_ptr, g_ptr, o_ptr, chunk_states_ptr, chunk_carry_ptr, state_mask, chunk_token,
                         eos, head, scale, ck, cv, H, K, V, C, S, DECAY, True, DOT_DTYPE, PRECISION, RELOAD_STATE)
    else:
        _output_walk(q_ptr, k_ptr, v_ptr, g_ptr, o_ptr, chunk_states_ptr, chunk_carry_ptr, state_mask, chunk_token,
                     eos, head, scale, ck, cv, H, K, V, C, S, DECAY, False, DOT_DTYPE, PRECISION, RELOAD_STATE)


@triton.jit
def _output_walk(q_ptr, k_ptr, v_ptr, g_ptr, o_ptr, chunk_states_ptr, chunk_carry_ptr, state_mask, chunk_token, eos,
                 head, scale, ck, cv, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                 S: tl.constexpr, DECAY: tl.constexpr, PAIRWISE: tl.constexpr, DOT_DTYPE: tl.constexpr,
                 PRECISION: tl.constexpr, RELOAD_STATE: tl.constexpr):
    """The chunk's sub-chunks of S tokens in order, the state carried in registers (and, with RELOAD_STATE, fed to
    the next dot through this program's slot of the carry buffer: see `_carried_operand`)."""
    VECTOR: tl.constexpr = DECAY == 3
    slot = ck[:, None] * V + cv[None, :]
    state = tl.load(chunk_states_ptr + slot, mask=state_mask, other=0.0).to(tl.float32)
    operand = state.to(DOT_DTYPE)
    rows = tl.arange(0, S)
    for sub in range(C // S):
        token0 = chunk_token + sub * S
        row_mask = token0 + rows < eos
        q = _tile(q_ptr, token0, rows, row_mask, head, H, K, ck, ck < K) * scale
        k = _tile(k_ptr, token0, rows, row_mask, head, H, K, ck, ck < K)
        v = _tile(v_ptr, token0, rows, row_mask, head, H, V, cv, cv < V)
        g = _load_log_decay(g_ptr, token0, rows, row_mask, head, H, K, ck, DECAY)
        b = tl.cumsum(g, axis=0)
        total = _last_row(b, S, VECTOR)
        scores = _decayed_scores(q, k, b, S, VECTOR, PAIRWISE, DOT_DTYPE, PRECISION)
        o = tl.dot((q * _row_decay(b, VECTOR)).to(DOT_DTYPE), operand, input_precision=PRECISION)
        o += tl.dot(scores.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=PRECISION)
        tl.store(o_ptr + ((token0 + rows[:, None]) * H + head) * V + cv[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & (cv < V)[None, :])
        if sub < C // S - 1:
            state = _advance_state(state, k, v, b, total, VECTOR, DOT_DTYPE, PRECISION)
            operand = _carried_operand(state, chunk_carry_ptr + slot, state_mask, DOT_DTYPE, RELOAD_STATE)


# ----------------------------------------------------------------------------------------------------------------
# Backward kernels
# ----------------------------------------------------------------------------------------------------------------


@fast_launch
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
    VECTOR: tl.constexpr = DECAY == 3
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


@fast_launch
@triton.jit
def _chunk_dq_kernel(k_ptr, v_ptr, g_ptr, path_ptr, do_ptr, states_ptr, carry_ptr, dq_ptr, cu_seqlens_ptr,
                     chunk_seq_ptr, chunk_token_ptr, scale, total_tokens, H: tl.constexpr, K: tl.constexpr,
                     V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, S: tl.constexpr,
                     DECAY: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                     RELOAD_STATE: tl.constexpr, WHOLE_CHUNKS: tl.constexpr, VALUE_LOOP: tl.constexpr):
    """dq = scale · ∂L/∂(scale·q) of one (value block, chunk, head), partial over the value block (`_dq_walk`); vector
    decay in one step, halves or sub-chunks as in `_chunk_output_kernel`. VALUE_LOOP: one program per (chunk, head)
    takes every value block in turn and writes dq whole (one part, in dq_ptr's dtype): a chunk taken in one step sums
    dA and the state part over the value blocks and mixes once (`_dq_all_values`); halves and sub-chunk walks add
    block by block (fp32 only), carrying the state through this program's slots of `carry_ptr` (shaped like the
    states, which stay unchanged)."""
    v_block, chunk, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq, chunk_token = tl.load(chunk_seq_ptr + chunk), tl.load(chunk_token_ptr + chunk)
    eos = tl.load(cu_seqlens_ptr + seq + 1)
    ck = tl.arange(0, BK)
    chunk_states_ptr = states_ptr + (chunk * H + head) * K * V
    chunk_carry_ptr = carry_ptr + (chunk * H + head) * K * V
    if DECAY == 3:
        path = _chunk_path(path_ptr, chunk, head, H, WHOLE_CHUNKS)
    else:
        path = 0  # scalar and static decay take a chunk in one step (SCALAR_SUB_CHUNK == CHUNK)
    if VALUE_LOOP:  # every value block in this program, dq in one part
        if path == 0:
            _dq_all_values(k_ptr, v_ptr, g_ptr, do_ptr, dq_ptr, chunk_states_ptr, chunk_token, eos, head, scale, ck, H,
                           K, V, C, BK, BV, DECAY, DOT_DTYPE, PRECISION)
        else:
            for block in range(tl.cdiv(V, BV)):
                tl.debug_barrier()  # the previous block's dq rows are stored before any thread adds to them
                _dq_block(k_ptr, v_ptr, g_ptr, do_ptr, dq_ptr, chunk_states_ptr, chunk_carry_ptr, chunk_token, eos,
                          head, scale, ck, path, block, block > 0, H, K, V, C, S, BV, DECAY, DOT_DTYPE, PRECISION,
                          RELOAD_STATE)
    else:  # this program's value block, into its own fp32 part
        _dq_block(k_ptr, v_ptr, g_ptr, do_ptr, dq_ptr + v_block * total_tokens * H * K, chunk_states_ptr,
                  chunk_carry_ptr, chunk_token, eos, head, scale, ck, path, v_block, False, H, K, V, C, S, BV, DECAY,
                  DOT_DTYPE, PRECISION, RELOAD_STATE)


@triton.jit
def _dq_block(k_ptr, v_ptr, g_ptr, do_ptr, dq_ptr, chunk_states_ptr, chunk_carry_ptr, chunk_token, eos, head, scale, ck,
              path, block, accumulate, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
              S: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
              RELOAD_STATE: tl.constexpr):
    """`_dq_walk` of one value block by the chunk's path (0: one step, 1: halves, 2: sub-chunks); `accumulate`
    (VALUE_LOOP): add to the dq rows the earlier blocks stored."""
    cv = block * BV + tl.arange(0, BV)
    state_mask = (ck < K)[:, None] & (cv < V)[None, :]
    if path == 0:
        _dq_walk(k_ptr, v_ptr, g_ptr, do_ptr, dq_ptr, chunk_states_ptr, chunk_carry_ptr, state_mask, chunk_token, eos,
                 head, scale, ck, cv, accumulate, H, K, V, C, C, DECAY, False, DOT_DTYPE, PRECISION, RELOAD_STATE)
    elif path == 1:
        _dq_walk(k_ptr, v_ptr, g_ptr, do_ptr, dq_ptr, chunk_states_ptr, chunk_carry_ptr, state_mask, chunk_token, eos,
                 head, scale, ck, cv, accumulate, H, K, V, C, C // 2, DECAY, False, DOT_DTYPE, PRECISION, RELOAD_STATE)
    else:
        _dq_walk(k_ptr, v_ptr, g_ptr, do_ptr, dq_ptr, chunk_states_ptr, chunk_carry_ptr, state_mask, chunk_token, eos,
                 head, scale, ck, cv, accumulate, H, K, V, C, S, DECAY, True, DOT_DTYPE, PRECISION, RELOAD_STATE)


@triton.jit
def _dq_all_values(k_ptr, v_ptr, g_ptr, do_ptr, dq_ptr, chunk_states_ptr, chunk_token, eos, head, scale, ck,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr, DECAY: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """dq of a chunk taken in one step, every value block in turn (VALUE_LOOP): dA = Σ do vᵀ and Σ S do summed over
    the value blocks, then e^{b} ⊙ (S do) plus the decayed mix of dA with k, once, as `_dq_walk` does per block;
    stored in dq_ptr's dtype (fp32 parts, or the gradient itself when no finishing pass follows)."""
    VECTOR: tl.constexpr = DECAY == 3
    rows = tl.arange(0, C)
    row_mask = chunk_token + rows < eos
    k = _tile(k_ptr, chunk_token, rows, row_mask, head, H, K, ck, ck < K)
    b = tl.cumsum(_load_log_decay(g_ptr, chunk_token, rows, row_mask, head, H, K, ck, DECAY), axis=0)
    dA = tl.zeros((C, C), dtype=tl.float32)
    dq = tl.zeros((C, BK), dtype=tl.float32)
    for block in range(tl.cdiv(V, BV)):
        cv = block * BV + tl.arange(0, BV)
        v = _tile(v_ptr, chunk_token, rows, row_mask, head, H, V, cv, cv < V)
        do = _tile(do_ptr, chunk_token, rows, row_mask, head, H, V, cv, cv < V)
        state = tl.load(chunk_states_ptr + ck[:, None] * V + cv[None, :], mask=(ck < K)[:, None] & (cv < V)[None, :],
                        other=0.0).to(DOT_DTYPE)
        dA += tl.dot(do.to(DOT_DTYPE), tl.trans(v.to(DOT_DTYPE)), input_precision=PRECISION)
        dq += tl.trans(tl.dot(state, tl.trans(do.to(DOT_DTYPE)), input_precision=PRECISION))
    dA = tl.where(rows[:, None] >= rows[None, :], dA, 0.0)
    dq = dq * _row_decay(b, VECTOR) + _decayed_mix(dA, k, b, C, False, VECTOR, False, DOT_DTYPE, PRECISION)
    tl.store(dq_ptr + ((chunk_token + rows[:, None]) * H + head) * K + ck[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_mask[:, None] & (ck < K)[None, :])


@triton.jit
def _dq_walk(k_ptr, v_ptr, g_ptr, do_ptr, dq_ptr, chunk_states_ptr, chunk_carry_ptr, state_mask, chunk_token, eos, head,
             scale, ck, cv, accumulate, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
             S: tl.constexpr, DECAY: tl.constexpr, PAIRWISE: tl.constexpr, DOT_DTYPE: tl.constexpr,
             PRECISION: tl.constexpr, RELOAD_STATE: tl.constexpr):
    """A forward walk over the sub-chunks with the state S: dq_i = scale · S_i do_i (state part e^{b_i} ⊙ S do_i,
    intra part through dA = do vᵀ), into fp32 dq_ptr; the state read from the chunk's slot of the states, carried
    through its slot of the carry buffer."""
    VECTOR: tl.constexpr = DECAY == 3
    rows = tl.arange(0, S)
    i = rows[:, None]
    j = rows[None, :]
    slot = ck[:, None] * V + cv[None, :]
    state = tl.load(chunk_states_ptr + slot, mask=state_mask, other=0.0).to(tl.float32)
    operand = state.to(DOT_DTYPE)
    for sub in range(C // S):
        token0 = chunk_token + sub * S
        row_mask = token0 + rows < eos
        k = _tile(k_ptr, token0, rows, row_mask, head, H, K, ck, ck < K)
        v = _tile(v_ptr, token0, rows, row_mask, head, H, V, cv, cv < V)
        do = _tile(do_ptr, token0, rows, row_mask, head, H, V, cv, cv < V)
        g = _load_log_decay(g_ptr, token0, rows, row_mask, head, H, K, ck, DECAY)
        b = tl.cumsum(g, axis=0)
        total = _last_row(b, S, VECTOR)
        dA = tl.where(i >= j, tl.dot(do.to(DOT_DTYPE), tl.trans(v.to(DOT_DTYPE)), input_precision=PRECISION), 0.0)
        dq = tl.trans(tl.dot(operand, tl.trans(do.to(DOT_DTYPE)), input_precision=PRECISION))
        dq = dq * _row_decay(b, VECTOR) + _decayed_mix(dA, k, b, S, False, VECTOR, PAIRWISE, DOT_DTYPE, PRECISION)
        dq = dq * scale
        dq_ptrs = dq_ptr + ((token0 + rows[:, None]) * H + head) * K + ck[None, :]
        if accumulate:  # VALUE_LOOP: the earlier value blocks' part is there already
            dq += tl.load(dq_ptrs, mask=row_mask[:, None] & (ck < K)[None, :], other=0.0)
        tl.store(dq_ptrs, dq, mask=row_mask[:, None] & (ck < K)[None, :])
        if sub < C // S - 1:
            state = _advance_state(state, k, v, b, total, VECTOR, DOT_DTYPE, PRECISION)
            operand = _carried_operand(state, chunk_carry_ptr + slot, state_mask, DOT_DTYPE, RELOAD_STATE)


@fast_launch
@triton.jit
def _chunk_dk_dv_kernel(q_ptr, k_ptr, v_ptr, g_ptr, path_ptr, do_ptr, state_grads_ptr, dk_ptr, dv_ptr, cu_seqlens_ptr,
                        chunk_seq_ptr, chunk_token_ptr, scale, total_tokens, H: tl.constexpr, K: tl.constexpr,
                        V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, S: tl.constexpr,
                        DECAY: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                        RELOAD_STATE: tl.constexpr, WHOLE_CHUNKS: tl.constexpr, VALUE_LOOP: tl.constexpr):
    """dk (partial over the value block) and dv of one (value block, chunk, head) (`_dk_dv_walk`); vector decay in
    one step, halves or sub-chunks as in `_chunk_output_kernel`. VALUE_LOOP as in `_chunk_dq_kernel`: every value
    block in one program, dk whole (`_dk_dv_all_values` for a chunk in one step: the scores once)."""
    v_block, chunk, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq, chunk_token = tl.load(chunk_seq_ptr + chunk), tl.load(chunk_token_ptr + chunk)
    eos = tl.load(cu_seqlens_ptr + seq + 1)
    ck = tl.arange(0, BK)
    chunk_grads_ptr = state_grads_ptr + (chunk * H + head) * K * V
    if DECAY == 3:
        path = _chunk_path(path_ptr, chunk, head, H, WHOLE_CHUNKS)
    else:
        path = 0  # scalar and static decay take a chunk in one step (SCALAR_SUB_CHUNK == CHUNK)
    if VALUE_LOOP:  # every value block in this program, dk in one part
        if path == 0:
            _dk_dv_all_values(q_ptr, k_ptr, v_ptr, g_ptr, do_ptr, dk_ptr, dv_ptr, chunk_grads_ptr, chunk_token, eos,
                              head, scale, ck, H, K, V, C, BK, BV, DECAY, DOT_DTYPE, PRECISION)
        else:
            for block in range(tl.cdiv(V, BV)):
                tl.debug_barrier()  # the previous block's dk rows are stored before any thread adds to them
                _dk_dv_block(q_ptr, k_ptr, v_ptr, g_ptr, do_ptr, dk_ptr, dv_ptr, chunk_grads_ptr, chunk_token, eos,
                             head, scale, ck, path, block, block > 0, H, K, V, C, S, BV, DECAY, DOT_DTYPE, PRECISION,
                             RELOAD_STATE)
    else:  # this program's value block, dk into its own fp32 part
        _dk_dv_block(q_ptr, k_ptr, v_ptr, g_ptr, do_ptr, dk_ptr + v_block * total_tokens * H * K, dv_ptr,
                     chunk_grads_ptr, chunk_token, eos, head, scale, ck, path, v_block, False, H, K, V, C, S, BV, DECAY,
                     DOT_DTYPE, PRECISION, RELOAD_STATE)


@triton.jit
def _dk_dv_block(q_ptr, k_ptr, v_ptr, g_ptr, do_ptr, dk_ptr, dv_ptr, chunk_grads_ptr, chunk_token, eos, head, scale,
                 ck, path, block, accumulate, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                 S: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr, DOT_DTYPE: tl.constexpr,
                 PRECISION: tl.constexpr, RELOAD_STATE: tl.constexpr):
    """`_dk_dv_walk` of one value block by the chunk's path, as `_dq_block` (`accumulate`: dk adds to the earlier
    blocks'; dv is each block's own)."""
    cv = block * BV + tl.arange(0, BV)
    state_ptrs = chunk_grads_ptr + ck[:, None] * V + cv[None, :]
    state_mask = (ck < K)[:, None] & (cv < V)[None, :]
    if path == 0:
        _dk_dv_walk(q_ptr, k_ptr, v_ptr, g_ptr, do_ptr, dk_ptr, dv_ptr, state_ptrs, state_mask, chunk_token, eos,
                    head, scale, ck, cv, accumulate, H, K, V, C, C, DECAY, False, DOT_DTYPE, PRECISION, RELOAD_STATE)
    elif path == 1:
        _dk_dv_walk(q_ptr, k_ptr, v_ptr, g_ptr, do_ptr, dk_ptr, dv_ptr, state_ptrs, state_mask, chunk_token, eos,
                    head, scale, ck, cv, accumulate, H, K, V, C, C // 2, DECAY, False, DOT_DTYPE, PRECISION,
                    RELOAD_STATE)
    else:
        _dk_dv_walk(q_ptr, k_ptr, v_ptr, g_ptr, do_ptr, dk_ptr, dv_ptr, state_ptrs, state_mask, chunk_token, eos,
                    head, scale, ck, cv, accumulate, H, K, V, C, S, DECAY, True, DOT_DTYPE, PRECISION, RELOAD_STATE)


@triton.jit
def _dk_dv_all_values(q_ptr, k_ptr, v_ptr, g_ptr, do_ptr, dk_ptr, dv_ptr, chunk_grads_ptr, chunk_token, eos, head,
                      scale, ck, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, DECAY: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """dk and dv of a chunk taken in one step, every value block in turn (VALUE_LOOP): the scores Aᵀ once, dv of each
    block, dAᵀ = Σ v doᵀ and dS v summed over the blocks, then dk as `_dk_dv_walk` has it per block, stored in
    dk_ptr's dtype (fp32 part, or the gradient itself when no finishing pass follows)."""
    VECTOR: tl.constexpr = DECAY == 3
    rows = tl.arange(0, C)
    row_mask = chunk_token + rows < eos
    q = _tile(q_ptr, chunk_token, rows, row_mask, head, H, K, ck, ck < K) * scale
    k = _tile(k_ptr, chunk_token, rows, row_mask, head, H, K, ck, ck < K)
    b = tl.cumsum(_load_log_decay(g_ptr, chunk_token, rows, row_mask, head, H, K, ck, DECAY), axis=0)
    total = _last_row(b, C, VECTOR)
    if VECTOR:
        to_end = tl.exp(total[None, :] - b)
    else:
        to_end = tl.exp(total - b)[:, None]
    scores_t = _decayed_scores_transposed(q, k, b, C, VECTOR, False, DOT_DTYPE, PRECISION).to(DOT_DTYPE)
    k_to_end = (k * to_end).to(DOT_DTYPE)
    dA_t = tl.zeros((C, C), dtype=tl.float32)
    dk = tl.zeros((C, BK), dtype=tl.float32)
    for block in range(tl.cdiv(V, BV)):
        cv = block * BV + tl.arange(0, BV)
        v = _tile(v_ptr, chunk_token, rows, row_mask, head, H, V, cv, cv < V).to(DOT_DTYPE)
        do = _tile(do_ptr, chunk_token, rows, row_mask, head, H, V, cv, cv < V).to(DOT_DTYPE)
        dstate = tl.load(chunk_grads_ptr + ck[:, None] * V + cv[None, :], mask=(ck < K)[:, None] & (cv < V)[None, :],
                         other=0.0).to(DOT_DTYPE)
        dA_t += tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dk += tl.trans(tl.dot(dstate, tl.trans(v), input_precision=PRECISION))
        dv = tl.dot(k_to_end, dstate, input_precision=PRECISION)
        dv += tl.dot(scores_t, do, input_precision=PRECISION)
        tl.store(dv_ptr + ((chunk_token + rows[:, None]) * H + head) * V + cv[None, :], dv.to(dv_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & (cv < V)[None, :])
    dA_t = tl.where(rows[:, None] <= rows[None, :], dA_t, 0.0)
    dk = dk * to_end + _decayed_mix(dA_t, q, b, C, True, VECTOR, False, DOT_DTYPE, PRECISION)
    tl.store(dk_ptr + ((chunk_token + rows[:, None]) * H + head) * K + ck[None, :], dk.to(dk_ptr.dtype.element_ty),
             mask=row_mask[:, None] & (ck < K)[None, :])


@triton.jit
def _dk_dv_walk(q_ptr, k_ptr, v_ptr, g_ptr, do_ptr, dk_ptr, dv_ptr, state_ptrs, state_mask, chunk_token, eos,
                head, scale, ck, cv, accumulate, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                S: tl.constexpr, DECAY: tl.constexpr, PAIRWISE: tl.constexpr, DOT_DTYPE: tl.constexpr,
                PRECISION: tl.constexpr, RELOAD_STATE: tl.constexpr):
    """A reverse walk over the sub-chunks with the state gradient dS: dk_j = dS_j v_j, dv_j = dS_jᵀ k_j (intra
    parts through dAᵀ and the scores Aᵀ)."""
    VECTOR: tl.constexpr = DECAY == 3
    rows = tl.arange(0, S)
    i = rows[:, None]
    j = rows[None, :]
    dstate = tl.load(state_ptrs, mask=state_mask, other=0.0).to(tl.float32)
    operand = dstate.to(DOT_DTYPE)
    for r in range(C // S):
        token0 = chunk_token + (C // S - 1 - r) * S
        row_mask = token0 + rows < eos
        q = _tile(q_ptr, token0, rows, row_mask, head, H, K, ck, ck < K) * scale
        k = _tile(k_ptr, token0, rows, row_mask, head, H, K, ck, ck < K)
        v = _tile(v_ptr, token0, rows, row_mask, head, H, V, cv, cv < V)
        do = _tile(do_ptr, token0, rows, row_mask, head, H, V, cv, cv < V)
        g = _load_log_decay(g_ptr, token0, rows, row_mask, head, H, K, ck, DECAY)
        b = tl.cumsum(g, axis=0)
        total = _last_row(b, S, VECTOR)
        if VECTOR:
            to_end = tl.exp(total[None, :] - b)
        else:
            to_end = tl.exp(total - b)[:, None]
        dA_t = tl.where(i <= j, tl.dot(v.to(DOT_DTYPE), tl.trans(do.to(DOT_DTYPE)), input_precision=PRECISION), 0.0)
        dk = tl.trans(tl.dot(operand, tl.trans(v.to(DOT_DTYPE)), input_precision=PRECISION)) * to_end
        dk += _decayed_mix(dA_t, q, b, S, True, VECTOR, PAIRWISE, DOT_DTYPE, PRECISION)
        dk_ptrs = dk_ptr + ((token0 + rows[:, None]) * H + head) * K + ck[None, :]
        if accumulate:  # VALUE_LOOP: the earlier value blocks' part is there already
            dk += tl.load(dk_ptrs, mask=row_mask[:, None] & (ck < K)[None, :], other=0.0)
        tl.store(dk_ptrs, dk, mask=row_mask[:, None] & (ck < K)[None, :])
        scores_t = _decayed_scores_transposed(q, k, b, S, VECTOR, PAIRWISE, DOT_DTYPE, PRECISION)
        dv = tl.dot((k * to_end).to(DOT_DTYPE), operand, input_precision=PRECISION)
        dv += tl.dot(scores_t.to(DOT_DTYPE), do.to(DOT_DTYPE), input_precision=PRECISION)
        tl.store(dv_ptr + ((token0 + rows[:, None]) * H + head) * V + cv[None, :], dv.to(dv_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & (cv < V)[None, :])
        if r < C // S - 1:
            if VECTOR:
                dstate = dstate * tl.exp(total)[:, None]
            else:
                dstate = dstate * tl.exp(total)
            q_from_start = (q * _row_decay(b, VECTOR)).to(DOT_DTYPE)
            dstate += tl.dot(tl.trans(q_from_start), do.to(DOT_DTYPE), input_precision=PRECISION)
            operand = _carried_operand(dstate, state_ptrs, state_mask, DOT_DTYPE, RELOAD_STATE)


@fast_launch
@triton.jit
def _finish_grads_kernel(q_ptr, k_ptr, dq_parts_ptr, dk_parts_ptr, carry_ptr, dq_ptr, dk_ptr, dg_ptr, totals_ptr,
                         cu_seqlens_ptr, total_tokens, segment_chunks, H: tl.constexpr, K: tl.constexpr,
                         BK: tl.constexpr, DQ_PARTS: tl.constexpr, DK_PARTS: tl.constexpr, C: tl.constexpr,
                         DECAY_GRAD: tl.constexpr, VECTOR: tl.constexpr, HAS_CARRY: tl.constexpr,
                         SEGMENTED: tl.constexpr):
    """One pass over a segment of `segment_chunks` chunks of a (sequence, head), last chunk first: dq = Σ parts,
    dk = Σ parts (the per-value-block partial sums of the dq and dk kernels), and with DECAY_GRAD d log λ_t =
    carry + Σ_{s ≥ t} (q ⊙ dq − k ⊙ dk)_s (summed over the key dim unless VECTOR; carry = Σ_v dS_T ⊙ S_T, taken by
    the sequence's last segment). SEGMENTED: the sums stop at the segment's end and its total is stored for
    `_add_segment_carry_kernel`, which adds the later segments' totals (a whole sequence per program leaves too few
    programs to fill the GPU when sequences × heads is small, e.g. one 16k-token sequence)."""
    seq_head, segment = tl.program_id(0), tl.program_id(1)
    seq, head = seq_head // H, seq_head % H
    bos, eos = tl.load(cu_seqlens_ptr + seq), tl.load(cu_seqlens_ptr + seq + 1)
    num_chunks = tl.cdiv(eos - bos, C)
    ck = tl.arange(0, BK)
    if SEGMENTED:
        first = segment * segment_chunks
        # a segment past a shorter packed sequence's end walks nothing (its total is never read); no early return:
        # the kernels keep structured control flow for Triton 3.6 on Hopper
        last = tl.minimum(first + segment_chunks, num_chunks)
    else:  # whole sequences (as compiled before segments)
        first, last = 0, num_chunks
    if DECAY_GRAD:
        if VECTOR:
            carry = tl.zeros((BK,), dtype=tl.float32)
            if HAS_CARRY:
                if last == num_chunks:  # the sequence's last segment
                    carry += tl.load(carry_ptr + seq_head * K + ck, mask=ck < K, other=0.0)
        else:
            carry = tl.zeros((1,), dtype=tl.float32)
            if HAS_CARRY:
                if last == num_chunks:
                    carry += tl.load(carry_ptr + seq_head + tl.arange(0, 1))
    backwards = C - 1 - tl.arange(0, C)  # rows read last-to-first, so that a forward cumsum is the reverse one
    part_stride = total_tokens * H * K
    for r in range(last - first):
        token0 = bos + (last - 1 - r) * C
        row_mask = token0 + backwards < eos
        mask = row_mask[:, None] & (ck < K)[None, :]
        offsets = ((token0 + backwards[:, None]) * H + head) * K + ck[None, :]
        dq = tl.zeros((C, BK), dtype=tl.float32)
        for part in tl.static_range(DQ_PARTS):
            dq += tl.load(dq_parts_ptr + part * part_stride + offsets, mask=mask, other=0.0)
        dk = tl.zeros((C, BK), dtype=tl.float32)
        for part in tl.static_range(DK_PARTS):
            dk += tl.load(dk_parts_ptr + part * part_stride + offsets, mask=mask, other=0.0)
        tl.store(dq_ptr + offsets, dq.to(dq_ptr.dtype.element_ty), mask=mask)
        tl.store(dk_ptr + offsets, dk.to(dk_ptr.dtype.element_ty), mask=mask)
        if DECAY_GRAD:
            q = tl.load(q_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            k = tl.load(k_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            local = q * dq - k * dk
            if VECTOR:
                tl.store(dg_ptr + offsets, tl.cumsum(local, axis=0) + carry[None, :], mask=mask)
                carry += tl.sum(local, axis=0)
            else:
                # a [C] prefix sum as a masked row sum: Triton 3.6 fails to lower tl.cumsum over [C, 1] at 8 warps
                local = tl.sum(local, axis=1)
                earlier = tl.arange(0, C)[None, :] <= tl.arange(0, C)[:, None]
                prefix = tl.sum(tl.where(earlier, local[None, :], 0.0), axis=1)
                tl.store(dg_ptr + (token0 + backwards) * H + head, prefix + carry, mask=row_mask)
                carry += tl.sum(local, axis=0)
    if DECAY_GRAD and SEGMENTED:
        segments = tl.num_programs(1)
        if VECTOR:
            tl.store(totals_ptr + (seq_head * segments + segment) * K + ck, carry, mask=ck < K)
        else:
            tl.store(totals_ptr + seq_head * segments + segment + tl.arange(0, 1), carry)


@fast_launch
@triton.jit
def _add_segment_carry_kernel(dg_ptr, totals_ptr, cu_seqlens_ptr, segment_chunks, segments, H: tl.constexpr,
                              K: tl.constexpr, BK: tl.constexpr, C: tl.constexpr, VECTOR: tl.constexpr):
    """d log λ of one chunk of a segment += the totals of the later segments of its sequence (`_finish_grads_kernel`
    with SEGMENTED; the last segment's total includes the final-state carry)."""
    seq_head, segment, index = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq, head = seq_head // H, seq_head % H
    bos, eos = tl.load(cu_seqlens_ptr + seq), tl.load(cu_seqlens_ptr + seq + 1)
    num_chunks = tl.cdiv(eos - bos, C)
    chunk = segment * segment_chunks + index
    own_segments = tl.cdiv(num_chunks, segment_chunks)  # a shorter packed sequence leaves later totals unwritten
    ck = tl.arange(0, BK)
    rows = tl.arange(0, C)
    token0 = bos + chunk * C
    row_mask = token0 + rows < eos  # all false for chunks past the sequence's end (token0 ≥ eos): nothing to add
    if VECTOR:
        carry = tl.zeros((BK,), dtype=tl.float32)
        for later in range(segment + 1, own_segments):
            carry += tl.load(totals_ptr + (seq_head * segments + later) * K + ck, mask=ck < K, other=0.0)
        offsets = ((token0 + rows[:, None]) * H + head) * K + ck[None, :]
        mask = row_mask[:, None] & (ck < K)[None, :]
        tl.store(dg_ptr + offsets, tl.load(dg_ptr + offsets, mask=mask, other=0.0) + carry[None, :], mask=mask)
    else:
        carry = tl.zeros((1,), dtype=tl.float32)
        for later in range(segment + 1, own_segments):
            carry += tl.load(totals_ptr + seq_head * segments + later + tl.arange(0, 1))
        offsets = (token0 + rows) * H + head
        tl.store(dg_ptr + offsets, tl.load(dg_ptr + offsets, mask=row_mask, other=0.0) + carry, mask=row_mask)


# ----------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------


def _dot_settings(dtype):
    """(dot operand dtype, dot precision): bf16 operands for bf16 inputs; fp32 otherwise (fp16 cannot hold the
    factorised e^{±b}), as TF32 for fp16 inputs and exact for fp32 inputs."""
    if dtype == torch.bfloat16:
        return tl.bfloat16, "ieee"
    return tl.float32, ("tf32" if dtype == torch.float16 else "ieee")


def _chunk_layout(cu_seqlens, batch, length, device):
    """Packed-sequence bookkeeping: (cu_seqlens, per-sequence first chunk [N + 1], chunk -> sequence, chunk -> first
    token). A regular batch needs no device-to-host copy, and its index tensors are made once per shape."""
    if cu_seqlens is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return _make_regular_layout(batch, length, device)  # a graph's private memory is not for keeping
        return _regular_layout(batch, length, device)
    # read to the host once per forward (every layer gets the model's one cu_seqlens), not once per layer
    return per_tensor(cu_seqlens.to(device), _packed_layout)


def _packed_layout(cu_seqlens):
    """`_chunk_layout` of packed sequences (one device-to-host read)."""
    device = cu_seqlens.device
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    counts = [cdiv(n, CHUNK) for n in lengths]
    starts = cu_seqlens[:-1].tolist()
    chunk_offsets = torch.tensor([0] + counts, dtype=torch.int64).cumsum(0).to(device=device, dtype=torch.int32)
    chunk_seq = torch.tensor([s for s, count in enumerate(counts) for _ in range(count)], dtype=torch.int32)
    chunk_token = torch.tensor([start + n * CHUNK for start, count in zip(starts, counts) for n in range(count)],
                               dtype=torch.int32)
    return cu_seqlens.to(torch.int32), chunk_offsets, chunk_seq.to(device), chunk_token.to(device)


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


class _ChunkedRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, initial_state, scale, cu_seqlens, output_final_state):
        batch, length, heads, key_dim = q.shape
        value_dim = v.shape[-1]
        decay = _decay_kind(log_decay, key_dim)
        layout = _chunk_layout(cu_seqlens, batch, length, q.device)
        num_sequences = layout[0].numel() - 1
        q, k, v = (x.contiguous() for x in (q, k, v))
        g = log_decay.float().contiguous() if log_decay is not None else q.new_zeros(1, dtype=torch.float32)
        initial = initial_state.float().contiguous() if initial_state is not None else None
        o = torch.empty_like(v)
        b, paths = _cumulative_decay(g, layout, decay, heads, key_dim)
        states, final = _forward_states(k, v, b, initial, layout, decay, heads, key_dim, value_dim, num_sequences,
                                        _longest_chunks(layout, batch, length), output_final_state)
        del b  # the per-chunk kernels read the paths only
        dot_dtype, precision = _dot_settings(q.dtype)
        block_v, launch = _launch("output", value_dim, decay)
        grid = (cdiv(value_dim, block_v), layout[2].numel(), heads)
        # vector decay's halves and sub-chunk walks carry the state through a slot per program: when the states are
        # kept for a backward, a scratch of their shape (freed after this kernel), else their own slots. One step
        # per chunk (every other kind) carries nothing.
        carry = torch.empty_like(states) if decay == DECAY_VECTOR and any(ctx.needs_input_grad) else states
        _chunk_output_kernel[grid](q, k, v, g, paths, states, carry, o, layout[0], layout[2], layout[3], scale, heads,
                                   key_dim, value_dim, _key_block(key_dim), block_v, CHUNK, _sub_chunk(decay), decay,
                                   dot_dtype, precision, **launch)
        del carry
        # the chunk states are kept for the backward (one [chunks, H, K, V] tensor in the dot dtype instead of a second
        # walk); b is not (fp32 [T, H, K] for vector decay): the backward recomputes it from g. The final state only
        # where d log λ may need it, as a copy (a caller may update the returned one in place, e.g. a decoding cache)
        final_for_decay_grad = final.clone() if final is not None and ctx.needs_input_grad[3] else None
        ctx.save_for_backward(q, k, v, g, initial, states, final_for_decay_grad, *layout)
        ctx.decay, ctx.scale, ctx.shape = decay, scale, (batch, length, heads, key_dim, value_dim, num_sequences)
        ctx.log_decay_shape = None if log_decay is None else log_decay.shape
        ctx.log_decay_dtype = None if log_decay is None else log_decay.dtype
        ctx.initial_dtype = None if initial_state is None else initial_state.dtype
        return o, final

    @staticmethod
    def backward(ctx, do, final_grad):
        q, k, v, g, initial, states, final, *layout = ctx.saved_tensors
        batch, length, heads, key_dim, value_dim, num_sequences = ctx.shape
        decay, scale = ctx.decay, ctx.scale
        needs_decay_grad = ctx.needs_input_grad[3] and decay != DECAY_NONE
        max_chunks = _longest_chunks(layout, batch, length)
        b, paths = _cumulative_decay(g, layout, decay, heads, key_dim)
        do = do.contiguous()
        dot_dtype, precision = _dot_settings(q.dtype)
        block_k = _key_block(key_dim)
        state_grads = torch.empty_like(states)
        initial_grad = (torch.empty(num_sequences, heads, key_dim, value_dim, device=q.device, dtype=torch.float32)
                        if initial is not None else None)
        final_grad = final_grad.float().contiguous() if final_grad is not None else None
        block_v, launch = _launch("state_grads", value_dim, decay)
        block_k_split = min(block_k, STATE_KEY_BLOCK)
        blocks = (cdiv(key_dim, block_k_split), cdiv(value_dim, block_v))

        def state_grads_walk(walk, segments, segment_chunks, segment_state, segment_decay):
            _chunk_state_grads_kernel[(*blocks, num_sequences * heads * segments)](
                q, do, b, final_grad, state_grads, initial_grad, segment_state, segment_decay, layout[0], layout[1],
                scale, segments, segment_chunks, heads, key_dim, value_dim, block_k_split, block_v, CHUNK, decay,
                final_grad is not None, initial is not None, walk, dot_dtype, precision, **launch)

        _state_walk(state_grads_walk, blocks, block_k_split, block_v, num_sequences, heads, max_chunks, key_dim,
                    value_dim, decay, final_grad, initial_grad, layout[0], q.device, reverse=True)
        del b  # freed before the dq / dk parts are allocated (the backward's peak)
        total_tokens = batch * length
        sub_chunk = _sub_chunk(decay)
        dq_block_v, dq_launch = _launch("dq", value_dim, decay)
        dk_block_v, dk_launch = _launch("dk_dv", value_dim, decay)
        # Every kind but vector decay takes each chunk in one step; with every value block in one program
        # (VALUE_LOOP) dq and dk are written whole, so without d log λ straight into the gradients (no fp32 parts,
        # no finishing pass)
        direct = (decay != DECAY_VECTOR and not needs_decay_grad and dq_launch["VALUE_LOOP"]
                  and dk_launch["VALUE_LOOP"])
        # dk and dv first: their walks carry the state gradient through its own slots, which then serve the dq walks'
        # carried state, so that the kept chunk states are read only (a second backward reads them again)
        value_blocks = 1 if dk_launch["VALUE_LOOP"] else cdiv(value_dim, dk_block_v)
        parts = (torch.empty_like(k) if direct else
                 k.new_empty(value_blocks, batch, length, heads, key_dim, dtype=torch.float32))
        dv = torch.empty_like(v)
        _chunk_dk_dv_kernel[(value_blocks, layout[2].numel(), heads)](
            q, k, v, g, paths, do, state_grads, parts, dv, layout[0], layout[2], layout[3], scale, total_tokens,
            heads, key_dim, value_dim, block_k, dk_block_v, CHUNK, sub_chunk, decay, dot_dtype, precision, **dk_launch)
        # dk's parts summed now (fp32), so that dq's parts reuse their buffer: the backward's peak holds one set
        dk_parts, spare = (parts.sum(0, keepdim=True), parts) if value_blocks > 1 else (parts, None)
        value_blocks = 1 if dq_launch["VALUE_LOOP"] else cdiv(value_dim, dq_block_v)
        if direct:
            dq_parts = torch.empty_like(q)
        elif spare is not None and spare.shape[0] >= value_blocks:
            dq_parts = spare[:value_blocks]
        else:
            dq_parts = q.new_empty(value_blocks, batch, length, heads, key_dim, dtype=torch.float32)
        del parts, spare
        _chunk_dq_kernel[(value_blocks, layout[2].numel(), heads)](
            k, v, g, paths, do, states, state_grads, dq_parts, layout[0], layout[2], layout[3], scale, total_tokens,
            heads, key_dim, value_dim, block_k, dq_block_v, CHUNK, sub_chunk, decay, dot_dtype, precision,
            **dq_launch)
        del states, state_grads
        initial_grad = initial_grad.to(ctx.initial_dtype) if initial_grad is not None else None
        if direct:
            return dq_parts, dk_parts, dv, None, initial_grad, None, None, None
        # dq, dk from their per-value-block parts, and d log λ, in one pass
        vector = decay == DECAY_VECTOR
        carry = None
        if needs_decay_grad and final_grad is not None:
            carry = (final_grad * final).sum(-1)  # Σ_v dS_T ⊙ S_T: [N, H, K]
            carry = carry.contiguous() if vector else carry.sum(-1).contiguous()
        d_log_decay = None
        if needs_decay_grad:
            d_log_decay = torch.empty(batch, length, heads, *((key_dim,) if vector else ()), device=q.device,
                                      dtype=torch.float32)
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        segments, segment_chunks = _segment_plan(num_sequences * heads, max_chunks, q.device)
        carried = needs_decay_grad and segments > 1  # d log λ sums that cross segments
        totals = (torch.empty(num_sequences * heads, segments, *((key_dim,) if vector else ()), device=q.device,
                              dtype=torch.float32) if carried else None)
        _finish_grads_kernel[(num_sequences * heads, segments)](
            q, k, dq_parts, dk_parts, carry, dq, dk, d_log_decay, totals, layout[0], total_tokens,
            segment_chunks, heads, key_dim, block_k, dq_parts.shape[0], dk_parts.shape[0], CHUNK, needs_decay_grad,
            vector, carry is not None, segments > 1, num_warps=8)
        if carried:  # the segments before a sequence's last take the sums of those after them
            _add_segment_carry_kernel[(num_sequences * heads, segments - 1, segment_chunks)](
                d_log_decay, totals, layout[0], segment_chunks, segments, heads, key_dim, block_k, CHUNK, vector,
                num_warps=4)
        if d_log_decay is not None:
            if decay == DECAY_STATIC:
                d_log_decay = d_log_decay.sum((0, 1))
            d_log_decay = d_log_decay.view(ctx.log_decay_shape).to(ctx.log_decay_dtype)
        return dq, dk, dv, d_log_decay, initial_grad, None, None, None


def _multiprocessors(device):
    """The GPU's SM count; under TRITON_INTERPRET (CPU tensors) 8, so that the CPU tests with one or two sequences
    and heads take the segmented paths meant for few programs (`_segment_plan`)."""
    return sm_count(device, cpu_value=8)


def _longest_chunks(layout, batch, length):
    """Chunks of the longest sequence; for packed sequences their total, a bound that needs no device sync."""
    return cdiv(length, CHUNK) if layout[0].numel() - 1 == batch else layout[2].numel()


def _segment_plan(programs, max_chunks, device):
    """(segments, chunks per segment) for the kernels that walk a whole sequence per program (the state walks, the
    finishing pass): whole sequences while they give at least half as many programs as the GPU has SMs (the shapes
    of BENCHMARKS.md's kernel tables, measured so), else segments for about two programs per SM — one 16k-token
    sequence of 16 heads: 16 segments of 16 chunks instead of 16 walks of 256 chunks."""
    if SEGMENT_CHUNKS is not None:  # forced (benchmarks/tune_chunk_kernels.py --segment-chunks)
        segment_chunks = max(1, min(SEGMENT_CHUNKS, max_chunks))
        return cdiv(max(max_chunks, 1), segment_chunks), segment_chunks
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


# Launch settings per kernel and decay kind: value block (capped by the head dim), warps, pipeline stages, and for
# the sub-chunk walks RELOAD_STATE (`_carried_operand`) and WHOLE_CHUNKS (vector decay: whole chunks / halves where
# the decay span allows, `_vector_path`; off = always the 16-token walk).
# benchmarks/tune_chunk_kernels.py sweeps them on the GPU; the values here are what it found best on the H200.
# WHOLE_CHUNKS passed the bf16 GPU checks on the H200 (BENCHMARKS.md, 2026-11-29) and is on;
# LINEAR_DECAY_WHOLE_CHUNKS=0 turns it off for a run (diagnose_chunk_kernels.py --whole-chunks 1,0 compares both).
# VALUE_LOOP (dq, dk/dv): one program per (chunk, head) through every value block, dq / dk in one part (no per-block
# parts: less backward memory; a chunk in one step computes its scores and decayed mix once instead of per block);
# on: 1.6-3.1x faster dk/dv and 1.3-2.9x faster dq on the H200 at both tuned shapes (BENCHMARKS.md, fifth session).
_WHOLE_CHUNKS = os.environ.get("LINEAR_DECAY_WHOLE_CHUNKS", "1") == "1"
TUNING = {
    "states": dict(block_v=64, num_warps=8, num_stages=2),
    "output": dict(block_v=64, num_warps=8, num_stages=2, RELOAD_STATE=True, WHOLE_CHUNKS=_WHOLE_CHUNKS),
    "state_grads": dict(block_v=64, num_warps=8, num_stages=2),
    "dq": dict(block_v=32, num_warps=8, num_stages=2, RELOAD_STATE=True, WHOLE_CHUNKS=_WHOLE_CHUNKS,
               VALUE_LOOP=True),
    "dk_dv": dict(block_v=32, num_warps=8, num_stages=2, RELOAD_STATE=True, WHOLE_CHUNKS=_WHOLE_CHUNKS,
                  VALUE_LOOP=True),
}
TUNING_OVERRIDES = {}  # {(kernel, decay kind): settings}, for what differs between vector and scalar decay
SEGMENT_CHUNKS = None  # None: `_segment_plan`'s rule; a number: segments of that many chunks for every walk


def _launch(kernel, value_dim, decay):
    """(value block, launch kwargs) of one kernel."""
    settings = {**TUNING[kernel], **TUNING_OVERRIDES.get((kernel, decay), {})}
    block_v = min(settings.pop("block_v"), max(16, next_power_of_2(value_dim)))
    return block_v, settings


def _sub_chunk(decay):
    return VECTOR_SUB_CHUNK if decay == DECAY_VECTOR else SCALAR_SUB_CHUNK


def _cumulative_decay(g, layout, decay, heads, key_dim):
    """(b, paths): log λ cumulated within each chunk, chunk-major, and for vector decay each (chunk, head)'s path
    (`_cumulative_decay_kernel`); without decay g itself for both (no kernel reads them)."""
    if decay == DECAY_NONE:
        return g, g
    cu_seqlens, _, chunk_seq, chunk_token = layout
    vector = decay == DECAY_VECTOR
    b = g.new_empty(chunk_seq.numel(), CHUNK, heads, *((key_dim,) if vector else ()))
    paths = torch.empty(chunk_seq.numel(), heads, device=g.device, dtype=torch.int32) if vector else b
    _cumulative_decay_kernel[(chunk_seq.numel(), heads)](g, b, paths, cu_seqlens, chunk_seq, chunk_token, heads,
                                                         key_dim, _key_block(key_dim), CHUNK, decay, num_warps=8)
    return b, paths


def _forward_states(k, v, b, initial, layout, decay, heads, key_dim, value_dim, num_sequences, max_chunks,
                    output_final_state):
    """States at every chunk start ([chunks, H, K, V], in the dot dtype) and the final states (fp32) or None
    (`_state_walk`; max_chunks: `_longest_chunks`)."""
    cu_seqlens, chunk_offsets, chunk_seq, _ = layout
    dot_dtype, precision = _dot_settings(k.dtype)
    states = k.new_empty(chunk_seq.numel(), heads, key_dim, value_dim,
                         dtype=torch.bfloat16 if dot_dtype == tl.bfloat16 else torch.float32)
    final = (k.new_empty(num_sequences, heads, key_dim, value_dim, dtype=torch.float32) if output_final_state
             else None)
    block_v, launch = _launch("states", value_dim, decay)
    block_k = min(_key_block(key_dim), STATE_KEY_BLOCK)
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
    """The chunked recurrence on the Triton kernels (module docstring); autograd to q, k, v, log λ, initial state."""
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"the Triton kernels take head dims up to {MAX_HEAD_DIM}; got K={q.shape[-1]}, "
                         f"V={v.shape[-1]}")
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"cu_seqlens needs the sequences packed into a batch of one; got batch {q.shape[0]}")
    o, final = _ChunkedRecurrence.apply(q, k, v, log_decay, initial_state, float(scale), cu_seqlens,
                                        output_final_state)
    return o, final


__all__ = ["triton_chunked_recurrence"]
