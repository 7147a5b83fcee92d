"""The chunk kernels' forward stages (`ops_chunk`'s docstring has the algorithm): the cumulative log λ of every
chunk, the state walk to every chunk start (with its segment join), vector decay's chunk scores, and the output."""

try:
    import triton
    import triton.language as tl
except ImportError as error:  # CPU-only torch ships without Triton: recurrence keeps the PyTorch path
    raise ImportError("Triton is not installed") from error

from .ops_chunk_common import (_advance_state, _chunk_decay, _chunk_rows, _intra_scores, _last_row, _load_log_decay,
                               _row_decay, _store_chunk_state, _store_segment, _tile, _to_end, _walk_start)


@triton.jit
def _cumulative_decay_kernel(g_ptr, b_ptr, cu_seqlens_ptr, chunk_seq_ptr, chunk_token_ptr, H: tl.constexpr,
                             K: tl.constexpr, BK: tl.constexpr, C: tl.constexpr, DECAY: tl.constexpr):
    """log λ cumulated within each chunk (inclusive), chunk-major: b [chunks, C, H, K] for vector decay, [chunks, C, H]
    for scalar and static decay; rows past a sequence's end repeat its last value."""
    chunk, head = tl.program_id(0), tl.program_id(1)
    token0, rows, row_mask = _chunk_rows(chunk, chunk_seq_ptr, chunk_token_ptr, cu_seqlens_ptr, C)
    ck = tl.arange(0, BK)
    b = tl.cumsum(_load_log_decay(g_ptr, token0, rows, row_mask, head, H, K, ck, DECAY), axis=0)
    if DECAY == "vector":
        tl.store(b_ptr + ((chunk * C + rows[:, None]) * H + head) * K + ck[None, :], b, mask=(ck < K)[None, :])
    else:
        tl.store(b_ptr + (chunk * C + rows) * H + head, b)


@triton.jit
def _chunk_states_kernel(k_ptr, v_ptr, b_ptr, initial_ptr, states_ptr, states_low_ptr, final_ptr, segment_state_ptr,
                         segment_decay_ptr, cu_seqlens_ptr, chunk_offsets_ptr, segments, segment_chunks,
                         H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                         C: tl.constexpr, DECAY: tl.constexpr, HAS_INITIAL: tl.constexpr, STORE_FINAL: tl.constexpr,
                         WALK: tl.constexpr, PLANES: tl.constexpr, FROM_LOG_DECAY: tl.constexpr,
                         DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """The state at the start of every chunk of one (sequence, head, value block), and the final state; the states
    kept as `_store_chunk_state` says (PLANES: the second plane at states_low_ptr). FROM_LOG_DECAY: b_ptr holds
    log λ itself ([T, H, K], vector decay), cumulated here chunk by chunk, so that the walk need not wait for
    `_chunk_scores_kernel`, which writes the cumulative log λ the other stages read.

    WALK (`_segment_plan`): 0 — a whole sequence per program; with segments of `segment_chunks` chunks, 1 — each
    segment from zero (the first from the initial state), storing only its end state and total log-decay for
    `_combine_segments_kernel`, then 2 — each segment again from the state the combination gave it, storing the
    chunk states."""
    VECTOR: tl.constexpr = DECAY == "vector"
    (program, seq_head, head, bos, eos, first_chunk, ck, cv, state_offsets, state_mask, first, last,
     state) = _walk_start(
        initial_ptr, segment_state_ptr, cu_seqlens_ptr, chunk_offsets_ptr, segments, segment_chunks, H, K, V, BK, BV,
        C, HAS_INITIAL, WALK, False)
    if WALK == 1:
        decay_sum = tl.zeros((BK,) if VECTOR else (1,), dtype=tl.float32)
    rows = tl.arange(0, C)
    for n in range(first, last):
        if WALK != 1:
            _store_chunk_state(states_ptr, states_low_ptr, ((first_chunk + n) * H + head) * K * V + state_offsets,
                               state, state_mask, PLANES)
        token0 = bos + n * C
        row_mask = token0 + rows < eos
        k = _tile(k_ptr, token0, rows, row_mask, head, H, K, ck, ck < K)
        v = _tile(v_ptr, token0, rows, row_mask, head, H, V, cv, cv < V)
        if FROM_LOG_DECAY:
            b = tl.cumsum(_load_log_decay(b_ptr, token0, rows, row_mask, head, H, K, ck, DECAY), axis=0)
            total = _last_row(b)  # as b has it
        else:
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
def _chunk_scores_kernel(q_ptr, k_ptr, g_ptr, b_ptr, scores_ptr, q_decayed_ptr, k_decayed_ptr, cu_seqlens_ptr,
                         chunk_seq_ptr, chunk_token_ptr, scale, H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
                         C: tl.constexpr, LEVELS: tl.constexpr, STORE_KEYS: tl.constexpr, DOT_DTYPE: tl.constexpr,
                         PRECISION: tl.constexpr):
    """Vector decay: the cumulative log λ of one (chunk, head), as `_cumulative_decay_kernel` writes it, the causal
    decayed scores A [C, C] (`_intra_scores`, summed over key blocks of BK channels), and the decayed dot operands of
    the later stages, q ⊙ e^{b} (scaled) and (STORE_KEYS, for a backward) k ⊙ e^{B − b} in q's layout, all stored in
    their pointers' dtype (the dot operand dtype): the output and the state-gradient walk read the first, the value
    gradients the second, instead of q or k with b. Needs no state, so it runs beside the state walk
    (`ops_chunk._walk_stream`)."""
    chunk, head = tl.program_id(0), tl.program_id(1)
    token0, rows, row_mask = _chunk_rows(chunk, chunk_seq_ptr, chunk_token_ptr, cu_seqlens_ptr, C)
    scores = tl.zeros((C, C), dtype=tl.float32)
    for key_block in tl.range(0, tl.cdiv(K, BK), num_stages=1):  # not pipelined: six levels' tiles per stage
        ck = key_block * BK + tl.arange(0, BK)
        b = tl.cumsum(_load_log_decay(g_ptr, token0, rows, row_mask, head, H, K, ck, "vector"), axis=0)
        tl.store(b_ptr + ((chunk * C + rows[:, None]) * H + head) * K + ck[None, :], b, mask=(ck < K)[None, :])
        tl.debug_barrier()  # `_intra_scores` reads its anchor rows back from b_ptr
        q = _tile(q_ptr, token0, rows, row_mask, head, H, K, ck, ck < K) * scale
        k = _tile(k_ptr, token0, rows, row_mask, head, H, K, ck, ck < K)
        scores += _intra_scores(q, k, b, b_ptr, chunk, head, H, K, ck, C, LEVELS, DOT_DTYPE, PRECISION)
        offsets = ((token0 + rows[:, None]) * H + head) * K + ck[None, :]
        mask = row_mask[:, None] & (ck < K)[None, :]
        tl.store(q_decayed_ptr + offsets, (q * _row_decay(b, True)).to(q_decayed_ptr.dtype.element_ty), mask=mask)
        if STORE_KEYS:
            total = _last_row(b)  # as b_ptr has it
            tl.store(k_decayed_ptr + offsets, (k * _to_end(b, total, True)).to(k_decayed_ptr.dtype.element_ty),
                     mask=mask)
    tl.store(scores_ptr + (chunk * H + head) * C * C + rows[:, None] * C + rows[None, :],
             scores.to(scores_ptr.dtype.element_ty))


@triton.jit
def _chunk_output_kernel(q_ptr, k_ptr, v_ptr, b_ptr, states_ptr, o_ptr, scores_ptr, q_decayed_ptr, cu_seqlens_ptr,
                         chunk_seq_ptr, chunk_token_ptr, scale, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                         BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, DECAY: tl.constexpr,
                         STORE_SCORES: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                         VALUE_BLOCKS: tl.constexpr):
    """o of one (chunk, head, VALUE_BLOCKS blocks of BV value channels): o = (q ⊙ e^{b}) S + A v, A the causal decayed
    scores. The programs of one chunk are adjacent in the grid, so that they share its q and k in L2.

    Vector decay: A and q ⊙ e^{b} read from `_chunk_scores_kernel`, then each value block. Scalar, static and no
    decay (one value block per program): q kᵀ and q S in one pass over the key channels, e^{b}, e^{b_i − b_j} and the
    scale applied to the fp32 sums, A kept for the backward when STORE_SCORES."""
    VALUE_PROGRAMS: tl.constexpr = ((V + BV - 1) // BV + VALUE_BLOCKS - 1) // VALUE_BLOCKS
    program, head = tl.program_id(0), tl.program_id(1)  # a chunk's programs adjacent: they share q, k in L2
    chunk, value_program = program // VALUE_PROGRAMS, program % VALUE_PROGRAMS
    token0, rows, row_mask = _chunk_rows(chunk, chunk_seq_ptr, chunk_token_ptr, cu_seqlens_ptr, C)
    chunk_states_ptr = states_ptr + (chunk * H + head) * K * V
    if DECAY == "vector":
        ONE_KEY_BLOCK: tl.constexpr = BK >= K  # q ⊙ e^{b} then loaded once, for every value block
        scores = tl.load(scores_ptr + (chunk * H + head) * C * C + rows[:, None] * C + rows[None, :]).to(DOT_DTYPE)
        if ONE_KEY_BLOCK:
            ck = tl.arange(0, BK)
            q_decayed = _tile(q_decayed_ptr, token0, rows, row_mask, head, H, K, ck, ck < K).to(DOT_DTYPE)
        for value_block in range(value_program * VALUE_BLOCKS, tl.minimum((value_program + 1) * VALUE_BLOCKS,
                                                                           tl.cdiv(V, BV))):
            cv = value_block * BV + tl.arange(0, BV)
            v = _tile(v_ptr, token0, rows, row_mask, head, H, V, cv, cv < V).to(DOT_DTYPE)
            o = tl.dot(scores, v, input_precision=PRECISION)
            for key_block in range(tl.cdiv(K, BK)):
                ck = key_block * BK + tl.arange(0, BK)
                if not ONE_KEY_BLOCK:
                    q_decayed = _tile(q_decayed_ptr, token0, rows, row_mask, head, H, K, ck, ck < K).to(DOT_DTYPE)
                state = tl.load(chunk_states_ptr + ck[:, None] * V + cv[None, :],
                                mask=(ck < K)[:, None] & (cv < V)[None, :], other=0.0).to(DOT_DTYPE)
                o += tl.dot(q_decayed, state, input_precision=PRECISION)
            tl.store(o_ptr + ((token0 + rows[:, None]) * H + head) * V + cv[None, :], o.to(o_ptr.dtype.element_ty),
                     mask=row_mask[:, None] & (cv < V)[None, :])
    else:
        cv = value_program * BV + tl.arange(0, BV)
        qk = tl.zeros((C, C), dtype=tl.float32)
        qs = tl.zeros((C, BV), dtype=tl.float32)
        for key_block in range(tl.cdiv(K, BK)):
            ck = key_block * BK + tl.arange(0, BK)
            q = _tile(q_ptr, token0, rows, row_mask, head, H, K, ck, ck < K).to(DOT_DTYPE)
            k = _tile(k_ptr, token0, rows, row_mask, head, H, K, ck, ck < K).to(DOT_DTYPE)
            state = tl.load(chunk_states_ptr + ck[:, None] * V + cv[None, :],
                            mask=(ck < K)[:, None] & (cv < V)[None, :], other=0.0).to(DOT_DTYPE)
            qk = tl.dot(q, tl.trans(k), qk, input_precision=PRECISION)
            qs = tl.dot(q, state, qs, input_precision=PRECISION)
        b, _ = _chunk_decay(b_ptr, chunk, head, H, K, rows, C, DECAY)
        i = rows[:, None]
        j = rows[None, :]
        scores = tl.where(i >= j, qk * scale * tl.exp(tl.where(i >= j, b[:, None] - b[None, :], float("-inf"))), 0.0)
        scores = scores.to(DOT_DTYPE)
        if STORE_SCORES and value_program == 0:
            tl.store(scores_ptr + (chunk * H + head) * C * C + i * C + j, scores)
        v = _tile(v_ptr, token0, rows, row_mask, head, H, V, cv, cv < V).to(DOT_DTYPE)
        o = tl.dot(scores, v, qs * (scale * tl.exp(b))[:, None], input_precision=PRECISION)
        tl.store(o_ptr + ((token0 + rows[:, None]) * H + head) * V + cv[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & (cv < V)[None, :])
