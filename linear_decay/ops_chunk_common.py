"""The chunk kernels' shared pieces (`ops_chunk`'s docstring has the algorithm): the chunk constants and decay kinds,
and the device functions every stage uses (decay tiles, the dyadic factorisation of vector decay's pairs, the state
walks' starts and segment ends)."""

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


@triton.jit
def _chunk_rows(chunk, chunk_seq_ptr, chunk_token_ptr, cu_seqlens_ptr, C: tl.constexpr):
    """(first token, row offsets 0 … C − 1, which rows belong to the chunk's sequence) of chunk `chunk` of the layout
    (`ops_chunk._chunk_layout`): a sequence's last chunk may end before C rows."""
    seq, token0 = tl.load(chunk_seq_ptr + chunk), tl.load(chunk_token_ptr + chunk)
    rows = tl.arange(0, C)
    return token0, rows, token0 + rows < tl.load(cu_seqlens_ptr + seq + 1)


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
        return b, _chunk_total(b_ptr, chunk, head, H, K, cols, C)
    elif DECAY == "none":
        b = tl.zeros((C,), dtype=tl.float32)
        return b, tl.sum(b, axis=0)
    else:
        base = b_ptr + chunk * C * H + head  # row r at base + r·H
        return tl.load(base + rows * H), tl.load(base + (C - 1) * H)


@triton.jit
def _last_row(b):
    """The last row of a [C, K] tile held in registers (vector decay's chunk total from its cumulative log λ b)."""
    rows = tl.arange(0, b.shape[0])
    return tl.sum(tl.where((rows == b.shape[0] - 1)[:, None], b, 0.0), axis=0)


@triton.jit
def _chunk_total(b_ptr, chunk, head, H: tl.constexpr, K: tl.constexpr, cols, C: tl.constexpr):
    """Vector decay: a chunk's total log-decay [len(cols)], the last row of its cumulative log λ."""
    return tl.load(b_ptr + ((chunk * C + C - 1) * H + head) * K + cols, mask=cols < K, other=0.0)


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
def _bf16_parts(a):
    """(fp32 a rounded to bf16, what the rounding left, in bf16): together exact to about 2^-16 of a."""
    high = a.to(tl.bfloat16)
    return high, (a - high.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def _store_chunk_state(high_ptr, low_ptr, offsets, state, mask, PLANES: tl.constexpr):
    """A walk's value at one chunk (a state or its gradient) into what the backward keeps: in high_ptr's dtype, or
    with PLANES as two planes of it (`ops_chunk._state_planes`), the value rounded and what the rounding left."""
    high = state.to(high_ptr.dtype.element_ty)
    tl.store(high_ptr + offsets, high, mask=mask)
    if PLANES:  # as `_bf16_parts`, the first plane stored before the second is formed
        tl.store(low_ptr + offsets, (state - high.to(tl.float32)).to(low_ptr.dtype.element_ty), mask=mask)


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
                  LEVELS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Vector decay: A[i, j] = Σ_c q_ic k_jc e^{b_ic − b_jc} for j ≤ i, else 0, the chunk's causal decayed scores
    [C, C], fp32, whatever the decay's strength (DESIGN §1, "chunked form"), by halving: every pair j < i is split by
    exactly one level (`_level_factors`, C = 2^LEVELS), the one whose block holds both with j in its first half and i
    in its second; there it factorises about the block's middle row into two factors ≤ 1, one dot per level. Each token
    with itself has no decay: Σ_c q_ic k_ic. (Scalar and static decay's scores are (q kᵀ) ⊙ e^{b_i − b_j}, formed in
    `_chunk_output_kernel` itself.)"""
    i = tl.arange(0, C)[:, None]
    j = tl.arange(0, C)[None, :]
    rows = tl.arange(0, C)
    scores = tl.where(i == j, tl.sum(q * k, axis=1)[:, None], 0.0)
    for level in tl.static_range(LEVELS):
        q_factor, k_factor = _level_factors(b, b_ptr, chunk, 0, rows, head, H, K, cols, C, C >> (level + 1))
        part = tl.dot((q * q_factor).to(DOT_DTYPE), tl.trans((k * k_factor).to(DOT_DTYPE)), input_precision=PRECISION)
        scores += tl.where(_same_block(C >> (level + 1), C), part, 0.0)
    return scores


@triton.jit
def _walk_start(boundary_ptr, segment_state_ptr, cu_seqlens_ptr, chunk_offsets_ptr, segments, segment_chunks,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                C: tl.constexpr, HAS_BOUNDARY: tl.constexpr, WALK: tl.constexpr, REVERSE: tl.constexpr):
    """What a state walk's program (`_chunk_states_kernel`, `_chunk_state_grads_kernel`; grid: key blocks, value
    blocks, sequences × heads × segments) walks: (program, sequence × head, head, the sequence's first token and end,
    its first chunk in the layout, the key and value channels, the state tile's offsets and mask, first chunk, end
    chunk, starting value). WALK 0 the whole sequence from its boundary value (the initial state, or ∂L/∂S_T when
    REVERSE) or zero; else one segment, from the combined start (WALK 2) or from zero, the boundary value added on the
    segment at the walk's starting end (the first segment; REVERSE: the last, or an empty sequence's only one)."""
    k_block, v_block, program = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_head, segment = program // segments, program % segments
    seq, head = seq_head // H, seq_head % H
    bos, eos = tl.load(cu_seqlens_ptr + seq), tl.load(cu_seqlens_ptr + seq + 1)
    first_chunk = tl.load(chunk_offsets_ptr + seq)
    ck = k_block * BK + tl.arange(0, BK)  # key channels evolve independently: split over programs
    cv = v_block * BV + tl.arange(0, BV)
    state_offsets = ck[:, None] * V + cv[None, :]
    state_mask = (ck < K)[:, None] & (cv < V)[None, :]
    num_chunks = tl.cdiv(eos - bos, C)
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
    return program, seq_head, head, bos, eos, first_chunk, ck, cv, state_offsets, state_mask, first, last, state


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
