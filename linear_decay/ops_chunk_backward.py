"""The chunk kernels' backward stages (`ops_chunk`'s docstring has the algorithm): the reverse walk of the state
gradients, the value gradients, vector decay's scores' gradient and own-pair gradients per sub-chunk, and the key
gradients with d log λ."""

try:
    import triton
    import triton.language as tl
except ImportError as error:  # CPU-only torch ships without Triton: recurrence keeps the PyTorch path
    raise ImportError("Triton is not installed") from error

from .ops_chunk_common import (_bf16_parts, _chunk_decay, _chunk_rows, _chunk_total, _level_factors, _row_decay,
                               _same_block, _store_chunk_state, _store_segment, _tile, _to_end, _walk_start)


@triton.jit
def _chunk_state_grads_kernel(q_ptr, q_decayed_ptr, do_ptr, b_ptr, final_grad_ptr, state_grads_ptr, state_grads_low_ptr,
                              initial_grad_ptr, segment_state_ptr, segment_decay_ptr, cu_seqlens_ptr, chunk_offsets_ptr,
                              scale, segments, segment_chunks, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                              BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, DECAY: tl.constexpr,
                              HAS_FINAL_GRAD: tl.constexpr, STORE_INITIAL_GRAD: tl.constexpr, WALK: tl.constexpr,
                              PLANES: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """∂L/∂S at the end of every chunk (reverse walk): dS ← e^{B} ⊙ dS + (q ⊙ e^{b})ᵀ do; ∂L/∂S_0 last. WALK and
    PLANES as in `_chunk_states_kernel`, segments walked last to first (the sequence's last segment from ∂L/∂S_T).
    Vector decay reads q ⊙ e^{b} as the forward's scores kernel stored it (q_decayed_ptr) and only the chunk's total
    of b: a third of the bytes per chunk of q and b, on a walk whose chunks go one after another."""
    VECTOR: tl.constexpr = DECAY == "vector"
    (program, seq_head, head, bos, eos, first_chunk, ck, cv, state_offsets, state_mask, first, last,
     dstate) = _walk_start(
        final_grad_ptr, segment_state_ptr, cu_seqlens_ptr, chunk_offsets_ptr, segments, segment_chunks, H, K, V, BK,
        BV, C, HAS_FINAL_GRAD, WALK, True)
    if WALK == 1:
        decay_sum = tl.zeros((BK,) if VECTOR else (1,), dtype=tl.float32)
    rows = tl.arange(0, C)
    for r in range(last - first):
        n = last - 1 - r
        if WALK != 1:
            _store_chunk_state(state_grads_ptr, state_grads_low_ptr,
                               ((first_chunk + n) * H + head) * K * V + state_offsets, dstate, state_mask, PLANES)
        token0 = bos + n * C
        row_mask = token0 + rows < eos
        do = _tile(do_ptr, token0, rows, row_mask, head, H, V, cv, cv < V)
        if VECTOR:
            q_from_start = _tile(q_decayed_ptr, token0, rows, row_mask, head, H, K, ck, ck < K).to(DOT_DTYPE)
            total = _chunk_total(b_ptr, first_chunk + n, head, H, K, ck, C)
            dstate = dstate * tl.exp(total)[:, None]
        else:
            q = _tile(q_ptr, token0, rows, row_mask, head, H, K, ck, ck < K) * scale
            b, total = _chunk_decay(b_ptr, first_chunk + n, head, H, K, ck, C, DECAY)
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
def _chunk_score_grads_kernel(v_ptr, do_ptr, dA_ptr, cu_seqlens_ptr, chunk_seq_ptr, chunk_token_ptr, H: tl.constexpr,
                              V: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, DOT_DTYPE: tl.constexpr,
                              PRECISION: tl.constexpr):
    """Vector decay: the scores' gradient dA = do vᵀ of one (chunk, head), causal, fp32, for
    `_chunk_intra_grads_kernel` and the key gradients' own pairs (the key-gradient kernel forms it itself for the
    other decays). Needs no state gradient, so it and the own-pair gradients run beside the state-gradient walk
    (`ops_chunk._walk_stream`)."""
    chunk, head = tl.program_id(0), tl.program_id(1)
    token0, rows, row_mask = _chunk_rows(chunk, chunk_seq_ptr, chunk_token_ptr, cu_seqlens_ptr, C)
    i = rows[:, None]
    j = rows[None, :]
    dA = tl.zeros((C, C), dtype=tl.float32)
    for value_block in range(tl.cdiv(V, BV)):
        cv = value_block * BV + tl.arange(0, BV)
        v = _tile(v_ptr, token0, rows, row_mask, head, H, V, cv, cv < V).to(DOT_DTYPE)
        do = _tile(do_ptr, token0, rows, row_mask, head, H, V, cv, cv < V).to(DOT_DTYPE)
        dA += tl.dot(do, tl.trans(v), input_precision=PRECISION)
    tl.store(dA_ptr + (chunk * H + head) * C * C + i * C + j, tl.where(i >= j, dA, 0.0))


@triton.jit
def _chunk_value_grads_kernel(k_ptr, k_decayed_ptr, v_ptr, b_ptr, do_ptr, scores_ptr, state_grads_ptr, dv_ptr,
                              cu_seqlens_ptr, chunk_seq_ptr, chunk_token_ptr, H: tl.constexpr, K: tl.constexpr,
                              V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                              DECAY: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """dv of one (chunk, head), dv = Aᵀ do + (k ⊙ e^{B − b}) dS (A: the scores the forward kept, dS: ∂L/∂S at the
    chunk's end), value block by value block; vector decay's k ⊙ e^{B − b} as the forward's scores kernel stored it
    (k_decayed_ptr)."""
    chunk, head = tl.program_id(0), tl.program_id(1)
    token0, rows, row_mask = _chunk_rows(chunk, chunk_seq_ptr, chunk_token_ptr, cu_seqlens_ptr, C)
    i = rows[:, None]
    j = rows[None, :]
    chunk_scores_ptr = scores_ptr + (chunk * H + head) * C * C
    scores_t = tl.load(chunk_scores_ptr + j * C + i)  # Aᵀ, loaded transposed
    chunk_grads_ptr = state_grads_ptr + (chunk * H + head) * K * V
    for value_block in range(tl.cdiv(V, BV)):
        cv = value_block * BV + tl.arange(0, BV)
        do = _tile(do_ptr, token0, rows, row_mask, head, H, V, cv, cv < V).to(DOT_DTYPE)
        dv = tl.dot(scores_t, do, input_precision=PRECISION)
        for key_block in range(tl.cdiv(K, BK)):
            ck = key_block * BK + tl.arange(0, BK)
            if DECAY == "vector":
                k_to_end = _tile(k_decayed_ptr, token0, rows, row_mask, head, H, K, ck, ck < K)
            else:
                b, total = _chunk_decay(b_ptr, chunk, head, H, K, ck, C, DECAY)
                k_to_end = _tile(k_ptr, token0, rows, row_mask, head, H, K, ck, ck < K) * _to_end(b, total, False)
            dstate = tl.load(chunk_grads_ptr + ck[:, None] * V + cv[None, :],
                             mask=(ck < K)[:, None] & (cv < V)[None, :], other=0.0).to(DOT_DTYPE)
            dv += tl.dot(k_to_end.to(DOT_DTYPE), dstate, input_precision=PRECISION)
        tl.store(dv_ptr + ((token0 + rows[:, None]) * H + head) * V + cv[None, :], dv.to(dv_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & (cv < V)[None, :])


@triton.jit
def _pair_decay(b):
    """Scalar, static and no decay: [C, C], e^{b_i − b_j} at row i, column j for j < i, else 0."""
    i = tl.arange(0, b.shape[0])[:, None]
    j = tl.arange(0, b.shape[0])[None, :]
    return tl.exp(tl.where(i > j, b[:, None] - b[None, :], float("-inf")))


@triton.jit
def _intra_grads(q, k, b, pairs, dA_t, TRANSPOSED_PAIRS: tl.constexpr, GRAD_PRECISION: tl.constexpr):
    """Scalar, static and no decay: the chunk's own part of dq and dk, fp32, without the diagonal (each token with
    itself): dq_i = Σ_{j < i} dA_ij k_j e^{b_i − b_j}, dk_j = Σ_{i > j} dA_ij q_i e^{b_i − b_j}; pairs = dA ⊙
    `_pair_decay` [C, C]. dk from the transpose of pairs where TRANSPOSED_PAIRS, else from dA_t (dA transposed,
    formed by its own dot) and the transposed decay. Vector decay: `_chunk_intra_grads_kernel`."""
    dq = tl.dot(pairs, k, input_precision=GRAD_PRECISION)
    if TRANSPOSED_PAIRS:
        dk = tl.dot(tl.trans(pairs), q, input_precision=GRAD_PRECISION)
    else:
        i = tl.arange(0, pairs.shape[0])[:, None]
        j = tl.arange(0, pairs.shape[0])[None, :]
        decay_t = tl.exp(tl.where(i < j, b[None, :] - b[:, None], float("-inf")))  # `_pair_decay` at row j, column i
        dk = tl.dot(tl.where(i < j, dA_t, 0.0) * decay_t, q, input_precision=GRAD_PRECISION)
    return dq, dk


@triton.jit
def _straddling_pairs(q, k, pairs, scale, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Scalar and static decay: the chunk's own pairs' part of d log λ, [C] — at position r, Σ over the pairs
    s < r ≤ t of dA_ts A_ts (A_ts = q_t·k_s e^{b_t − b_s}: the scores summed over the channels of q and k, given
    unscaled and bf16-exact; pairs = dA ⊙ `_pair_decay`), each pair counted where its decay spans r. All terms fp32,
    none cancels another."""
    i = tl.arange(0, pairs.shape[0])[:, None]
    j = tl.arange(0, pairs.shape[0])[None, :]
    scores = tl.dot(q.to(DOT_DTYPE), tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION) * scale
    before = _masked_sum_dot(pairs * scores, i < j, DOT_DTYPE, PRECISION)  # [t, r]: Σ_{s < r} of row t
    return tl.sum(tl.where(i >= j, before, 0.0), axis=0)  # [r]: Σ_{t ≥ r}


@triton.jit
def _masked_sum_dot(a, mask, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """a @ mask for fp32 a and a 0/1 mask, at fp32 accuracy on tensor cores: for bf16 operands a's bf16 high part and
    what it leaves, two products (the mask is exact in bf16); for fp32 operands three TF32 products unless PRECISION
    is already exact."""
    if DOT_DTYPE == tl.bfloat16:
        ones = tl.where(mask, 1.0, 0.0).to(tl.bfloat16)
        a_high, a_low = _bf16_parts(a)
        return tl.dot(a_high, ones, tl.dot(a_low, ones))
    else:
        return tl.dot(a, tl.where(mask, 1.0, 0.0), input_precision="ieee" if PRECISION == "ieee" else "tf32x3")


@triton.jit
def _grad_dot(a, b, GRAD_PRECISION: tl.constexpr):
    """a @ b for fp32 a, b at GRAD_PRECISION: "bf16x3" splits each operand into bf16 high and low parts and sums three
    bf16 products (the two low parts' product dropped: ~2^-16 relative, on bf16 tensor cores at twice TF32's rate);
    otherwise tl.dot's own input precisions ("tf32x3", "tf32", "ieee")."""
    if GRAD_PRECISION == "bf16x3":
        a_high, a_low = _bf16_parts(a)
        b_high, b_low = _bf16_parts(b)
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
    KEY_BLOCKS: tl.constexpr = (K + BK - 1) // BK
    program, head = tl.program_id(0), tl.program_id(1)  # a chunk's programs adjacent: they share its tiles in L2
    chunk, sub, key_block = program // (SUBS * KEY_BLOCKS), program // KEY_BLOCKS % SUBS, program % KEY_BLOCKS
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
def _key_block_tiles(q_ptr, k_ptr, b_ptr, chunk, token0, rows, row_mask, head, ck, scale, H: tl.constexpr,
                     K: tl.constexpr, C: tl.constexpr, DECAY: tl.constexpr):
    """`_chunk_key_grads_kernel`'s tiles of its key block: (q, q scaled, k, b, total, offsets and mask of a [C, BK]
    tile of q's layout)."""
    q_unscaled = _tile(q_ptr, token0, rows, row_mask, head, H, K, ck, ck < K)
    q = q_unscaled * scale
    k = _tile(k_ptr, token0, rows, row_mask, head, H, K, ck, ck < K)
    b, total = _chunk_decay(b_ptr, chunk, head, H, K, ck, C, DECAY)
    offsets = ((token0 + rows[:, None]) * H + head) * K + ck[None, :]
    mask = row_mask[:, None] & (ck < K)[None, :]
    return q_unscaled, q, k, b, total, offsets, mask


@triton.jit
def _chunk_key_grads_kernel(q_ptr, k_ptr, v_ptr, b_ptr, do_ptr, states_ptr, states_low_ptr, state_grads_ptr,
                            state_grads_low_ptr, dA_ptr, dq_intra_ptr, dk_intra_ptr, dq_ptr, dk_ptr, dg_ptr,
                            cu_seqlens_ptr, chunk_seq_ptr, chunk_token_ptr, scale, T, H: tl.constexpr, K: tl.constexpr,
                            V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, DECAY: tl.constexpr,
                            DECAY_GRAD: tl.constexpr, PLANES: tl.constexpr, TRANSPOSED_PAIRS: tl.constexpr,
                            DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, GRAD_PRECISION: tl.constexpr):
    """dq, dk and (DECAY_GRAD) d log λ of one (chunk, head, block of BK key channels), from the state S at the chunk's
    start, ∂L/∂S at its end (dS) and dA = do vᵀ (vector decay: from `_chunk_score_grads_kernel`; the others form it
    here, beside do Sᵀ, from the same tiles): dq = e^{b} ⊙ (do Sᵀ) + intra,
    dk = e^{B − b} ⊙ (v dSᵀ) + intra; the intra parts from `_chunk_intra_grads_kernel` (vector decay) or
    `_intra_grads` (TRANSPOSED_PAIRS as there), then each token with itself (dA_ii, undecayed).

    d log λ within the chunk, from fp32 terms that are each a part of the gradient (nothing cancels across chunks):
    d log λ_r = Σ_{t ≥ r} (q ⊙ dq − k ⊙ dk_intra)_t + Σ_{s < r} (k ⊙ dk_state)_s + e^{B} ⊙ Σ_v S ⊙ dS, the pairs of
    tokens (s < r ≤ t) inside the chunk, from before it to inside, from inside to after it, and across it; dq and
    dk_intra here without each token's pair with itself, which has no decay to differentiate. Scalar and static
    decay sum it over the block's channels, the chunk's own pairs straddling r directly (`_straddling_pairs`): one
    partial sum per key block, [T, H] each, added on the host. S and dS are exact where d log λ is summed from them:
    fp32, or two planes (PLANES, `_store_chunk_state`), each dot taken with both parts."""
    KEY_BLOCKS: tl.constexpr = (K + BK - 1) // BK
    program, head = tl.program_id(0), tl.program_id(1)  # a chunk's key blocks adjacent: they share v, do in L2
    chunk, key_block = program // KEY_BLOCKS, program % KEY_BLOCKS
    seq, token0 = tl.load(chunk_seq_ptr + chunk), tl.load(chunk_token_ptr + chunk)
    eos = tl.load(cu_seqlens_ptr + seq + 1)
    VECTOR: tl.constexpr = DECAY == "vector"
    # exact states (`ops_chunk._state_dtype`, `_state_planes`) with narrower dot operands: d log λ sees their values
    EXACT_STATES: tl.constexpr = DECAY_GRAD and (PLANES or states_ptr.dtype.element_ty != DOT_DTYPE)
    rows = tl.arange(0, C)
    i = rows[:, None]
    j = rows[None, :]
    row_mask = token0 + rows < eos
    ck = key_block * BK + tl.arange(0, BK)
    chunk_offset = (chunk * H + head) * K * V
    dq = tl.zeros((C, BK), dtype=tl.float32)
    dk_state = tl.zeros((C, BK), dtype=tl.float32)
    across = tl.zeros((BK,), dtype=tl.float32)
    if VECTOR:  # before the value loop, which hides their loads' latency (the others' registers are full there)
        q_unscaled, q, k, b, total, offsets, mask = _key_block_tiles(q_ptr, k_ptr, b_ptr, chunk, token0, rows, row_mask,
                                                                     head, ck, scale, H, K, C, DECAY)
        dq_intra = tl.load(dq_intra_ptr + offsets, mask=mask, other=0.0)
        dk_intra = tl.load(dk_intra_ptr + offsets, mask=mask, other=0.0)
    else:
        dA = tl.zeros((C, C), dtype=tl.float32)
        dA_t = tl.zeros((C, C), dtype=tl.float32)
    for value_block in range(tl.cdiv(V, BV)):
        cv = value_block * BV + tl.arange(0, BV)
        state_offsets = chunk_offset + ck[:, None] * V + cv[None, :]
        state_mask = (ck < K)[:, None] & (cv < V)[None, :]
        v = _tile(v_ptr, token0, rows, row_mask, head, H, V, cv, cv < V).to(DOT_DTYPE)
        do = _tile(do_ptr, token0, rows, row_mask, head, H, V, cv, cv < V).to(DOT_DTYPE)
        state = tl.load(states_ptr + state_offsets, mask=state_mask, other=0.0)
        dstate = tl.load(state_grads_ptr + state_offsets, mask=state_mask, other=0.0)
        state_dot, dstate_dot = state.to(DOT_DTYPE), dstate.to(DOT_DTYPE)
        dq += tl.dot(do, tl.trans(state_dot), input_precision=PRECISION)
        dk_state += tl.dot(v, tl.trans(dstate_dot), input_precision=PRECISION)
        if EXACT_STATES:  # and what rounding them to DOT_DTYPE left (do and v are exact in it)
            if PLANES:
                state_low = tl.load(states_low_ptr + state_offsets, mask=state_mask, other=0.0)
                dstate_low = tl.load(state_grads_low_ptr + state_offsets, mask=state_mask, other=0.0)
            else:
                state_low = (state - state_dot.to(tl.float32)).to(DOT_DTYPE)
                dstate_low = (dstate - dstate_dot.to(tl.float32)).to(DOT_DTYPE)
            dq += tl.dot(do, tl.trans(state_low), input_precision=PRECISION)
            dk_state += tl.dot(v, tl.trans(dstate_low), input_precision=PRECISION)
        if not VECTOR:
            dA += tl.dot(do, tl.trans(v), input_precision=PRECISION)
            if not TRANSPOSED_PAIRS:
                dA_t += tl.dot(v, tl.trans(do), input_precision=PRECISION)
        if DECAY_GRAD:
            if EXACT_STATES and PLANES:  # the planes' sums: the states as the walks had them
                across += tl.sum((state.to(tl.float32) + state_low.to(tl.float32))
                                 * (dstate.to(tl.float32) + dstate_low.to(tl.float32)), axis=1)
            else:
                across += tl.sum(state.to(tl.float32) * dstate.to(tl.float32), axis=1)
    if VECTOR:
        own = tl.load(dA_ptr + (chunk * H + head) * C * C + rows * (C + 1))[:, None]  # dA_ii, undecayed
    else:
        q_unscaled, q, k, b, total, offsets, mask = _key_block_tiles(q_ptr, k_ptr, b_ptr, chunk, token0, rows, row_mask,
                                                                     head, ck, scale, H, K, C, DECAY)
        own = tl.sum(tl.where(i == j, dA, 0.0), axis=1)[:, None]
        pairs = dA * _pair_decay(b)
        dq_intra, dk_intra = _intra_grads(q, k, b, pairs, dA_t, TRANSPOSED_PAIRS, GRAD_PRECISION)
        if DECAY_GRAD:
            straddling = _straddling_pairs(q_unscaled, k, pairs, scale, DOT_DTYPE, PRECISION)
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
            dg += straddling
            tl.store(dg_ptr + (key_block * T + token0 + rows) * H + head, dg, mask=row_mask)
