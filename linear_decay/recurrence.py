"""The decay linear attention recurrence (DESIGN.md §1) behind one signature, in three implementations.

    o, final_state = fn(q, k, v, log_decay, scale=1.0, initial_state=None, output_final_state=False)

    q, k        [B, T, H, K]       any float dtype (computed in fp32 here)
    v           [B, T, H, V]
    log_decay   [B, T, H, K]  vector decay (one log λ per key channel)
                [B, T, H]     scalar data-dependent decay (one per head)
                [H]           static per-head decay (tnl, tnl_l, none)
                None          no decay
    initial_state [B, H, K, V] fp32 or None; final_state likewise (None unless output_final_state)
    o           [B, T, H, V]  in v's dtype

    S_t = diag(λ_t) S_{t-1} + k_t v_tᵀ,   o_t = scale · S_tᵀ q_t

- `naive_recurrence`: the step-by-step oracle (tests only), fp32 or float64.
- `chunked_recurrence`: the vectorised chunkwise form, the CPU training/prefill path.
- `fused_recurrent`: token-by-token state update for decoding (a few tokens per call).
`linear_decay_attention` (training / prefill, optionally on packed sequences with `cu_seqlens`) and `recurrent_step`
(decoding) dispatch between backends (torch | triton | naive | auto, a model's `config.kernel_backend`, which
$LINEAR_DECAY_BACKEND overrides; auto: Triton for CUDA tensors, PyTorch for CPU tensors). The Triton kernels
(`ops_chunk`, `ops_recurrent`) register themselves when `triton` imports; `triton` forces them, on CPU tensors too
under TRITON_INTERPRET=1.
"""

import os

import torch

from .ops_host import per_tensor

BACKENDS = {}


def _broadcast_decay(log_decay, batch, length, heads, key_dim, device, dtype=torch.float32):
    """Return log λ as `dtype` (fp32 unless asked) [B, T, H, K'] with K' ∈ {1, K} (scalar decay keeps a broadcast
    dim)."""
    if log_decay is None:
        return torch.zeros(batch, length, heads, 1, device=device, dtype=dtype)
    log_decay = log_decay.to(dtype)
    if log_decay.dim() == 1:
        return log_decay.view(1, 1, heads, 1).expand(batch, length, heads, 1)
    if log_decay.dim() == 3:
        return log_decay.unsqueeze(-1)
    return log_decay


def naive_recurrence(q, k, v, log_decay=None, scale=1.0, initial_state=None, output_final_state=False):
    """Oracle: the recurrence one token at a time, in fp32, or in float64 when any input is float64 (the reference
    that tests hold the fp32 and bf16 paths to)."""
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    out_dtype = v.dtype
    inputs = [x for x in (q, k, v, log_decay, initial_state) if x is not None]
    dtype = torch.float64 if any(x.dtype == torch.float64 for x in inputs) else torch.float32
    decay = _broadcast_decay(log_decay, batch, length, heads, key_dim, q.device, dtype).exp()
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    state = q.new_zeros(batch, heads, key_dim, value_dim) if initial_state is None else initial_state.to(dtype)
    outputs = []
    for t in range(length):
        state = decay[:, t, :, :, None] * state + torch.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state) * scale)
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(batch, 0, heads, value_dim)
    return o.to(out_dtype), (state if output_final_state else None)


def fused_recurrent(q, k, v, log_decay=None, scale=1.0, initial_state=None, output_final_state=False):
    """Decoding path: fold each new token into the state, then read it out (DESIGN §1, current token undecayed)."""
    batch, length, heads, key_dim = q.shape
    decay = _broadcast_decay(log_decay, batch, length, heads, key_dim, q.device).exp()
    state = (
        q.new_zeros(batch, heads, key_dim, v.shape[-1], dtype=torch.float32)
        if initial_state is None
        else initial_state.float()
    )
    outputs = []
    for t in range(length):
        k_t, v_t = k[:, t].float(), v[:, t].float()
        state = state * decay[:, t].unsqueeze(-1) + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
        outputs.append((state * q[:, t].float().unsqueeze(-1)).sum(-2))
    o = torch.stack(outputs, dim=1) * scale
    return o.to(v.dtype), (state if output_final_state else None)


# Largest in-chunk cumulative decay |b| for which the factorised intra-chunk form q e^{b} · (k e^{−b})ᵀ stays exact in
# fp32 (e^{±60} is far from over/underflow). Chunks with stronger decay take the pairwise form.
FACTORISED_DECAY_LIMIT = 60.0


def chunked_recurrence(q, k, v, log_decay=None, scale=1.0, initial_state=None, output_final_state=False,
                       chunk_size=None):
    """Chunkwise parallel form (GLA / simple-GLA style) in fp32; in-chunk cumulative log-decay b in fp64.

    Intra-chunk scores A[t, s] = Σ_c q_tc k_sc e^{b_tc − b_sc} (s ≤ t). Scalar decay forms e^{b_t − b_s} per pair.
    Vector decay uses the matmul (q ⊙ e^{b})(k ⊙ e^{−b})ᵀ, exact while |b| ≤ FACTORISED_DECAY_LIMIT; chunks whose
    decay is stronger are recomputed in sub-chunks (`_subchunk_scores`), which never form a positive exponent; eager
    mode asks the host whether any chunk is that strong, torch.compile / torch.export compute the sub-chunk scores of
    every chunk and select them with torch.where (no device value read, the same numbers).
    Across chunks the state is carried by a short loop over chunks. Autocast is off inside: the recurrence is
    computed in fp32 whatever the caller's autocast (Trainer's --bf16) asks for, as the Triton kernels do.
    """
    with torch.autocast(q.device.type, enabled=False):
        return _chunked_recurrence(q, k, v, log_decay, scale, initial_state, output_final_state, chunk_size)


def _chunked_recurrence(q, k, v, log_decay, scale, initial_state, output_final_state, chunk_size):
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    out_dtype = v.dtype
    g = _broadcast_decay(log_decay, batch, length, heads, key_dim, q.device)
    vector = g.shape[-1] != 1
    chunk = min(chunk_size or (32 if vector else 64), max(length, 1))
    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length

    def to_chunks(x, dtype=torch.float32):  # [B, T, H, D] -> [B, H, N, C, D], zero-padded (k = 0, log λ = 0: S kept)
        x = x.to(dtype)
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
        return x.view(batch, num_chunks, chunk, heads, x.shape[-1]).permute(0, 3, 1, 2, 4)

    q, k, v = to_chunks(q), to_chunks(k), to_chunks(v)
    b = to_chunks(g, torch.float64).cumsum(dim=-2)  # inclusive, ≤ 0, [B, H, N, C, K'|1]; fp64 keeps differences exact
    b_last = b[..., -1:, :]
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    q_decayed = q * b.exp().float()  # q_t e^{b_t}: reads the state at the chunk start

    if vector:
        k_grown = k * (-b).clamp(max=FACTORISED_DECAY_LIMIT).exp().float()
        scores = (q_decayed @ k_grown.transpose(-1, -2)).masked_fill(~causal, 0.0)
        strong = b_last[..., 0, :].amin(-1) < -FACTORISED_DECAY_LIMIT  # [B, H, N]
        if torch.compiler.is_compiling():  # traced graphs read no device value: every chunk's exact scores, selected
            exact = _subchunk_scores(q.flatten(0, 2), k.flatten(0, 2), b.flatten(0, 2)).view_as(scores)
            scores = torch.where(strong[..., None, None], exact, scores)
        elif bool(strong.any()):
            scores = scores.masked_scatter(strong[..., None, None].expand_as(scores),
                                           _subchunk_scores(q[strong], k[strong], b[strong]))
    else:
        scores = (q @ k.transpose(-1, -2)) * _pairwise_decay(b[..., 0], causal)
    o = scores @ v

    # Inter-chunk: each chunk's contribution to the state at its end, then a scan over chunks.
    chunk_updates = (k * (b_last - b).exp().float()).transpose(-1, -2) @ v  # [B, H, N, K, V]
    chunk_decay = b_last.exp().float().transpose(-1, -2)  # [B, H, N, K'|1, 1]
    state = q.new_zeros(batch, heads, key_dim, value_dim) if initial_state is None else initial_state.float()
    states_before = []
    for decay_n, update_n in zip(chunk_decay.unbind(2), chunk_updates.unbind(2)):  # unbind: one cheap backward
        states_before.append(state)
        state = decay_n * state + update_n
    o = o + q_decayed @ torch.stack(states_before, dim=2)

    o = (o * scale).permute(0, 2, 3, 1, 4).reshape(batch, num_chunks * chunk, heads, value_dim)[:, :length]
    return o.to(out_dtype), (state if output_final_state else None)


def _pairwise_decay(b, causal):
    """e^{b_t − b_s} for s ≤ t, else 0; b [..., C] fp64 -> [..., C, C] fp32."""
    return (b.unsqueeze(-1) - b.unsqueeze(-2)).masked_fill(~causal, float("-inf")).exp().float()


SUB_CHUNK = 8  # sub-chunk length of `_subchunk_scores`


def _subchunk_scores(q, k, b, sub=SUB_CHUNK):
    """Vector-decay scores A[t, s] = Σ_c q_tc k_sc e^{b_tc − b_sc} (s ≤ t) of chunks whose decay is too strong for the
    factorised form, exactly and without a positive exponent: q, k [M, C, K] fp32, b [M, C, K] fp64 -> [M, C, C].

    Across sub-chunks (s in an earlier sub-chunk than t) the decay splits at the anchor a = b just before t's
    sub-chunk: (q_t e^{b_t − a})(k_s e^{a − b_s}), both factors ≤ 1, one matmul per sub-chunk. Inside a sub-chunk the
    decay is formed pairwise. Cost C·(C/sub + sub)·K per chunk instead of the all-pairs C²·K."""
    m, length, key_dim = q.shape
    count = length // sub
    if count * sub != length:  # a chunk length that sub does not divide: all pairs
        causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        decay = _pairwise_decay(b.transpose(-1, -2), causal).permute(0, 2, 3, 1)  # [M, C, C, K]
        return (q.unsqueeze(-2) * k.unsqueeze(-3) * decay).sum(-1)
    blocks = b.view(m, count, sub, key_dim)
    anchor = torch.cat([torch.zeros_like(blocks[:, :1, -1]), blocks[:, :-1, -1]], dim=1)  # [M, n, K]: b before block
    q_in = q.view(m, count, sub, key_dim) * (blocks - anchor.unsqueeze(2)).exp().float()  # e^{b_t − a_u} ≤ 1
    earlier = torch.arange(length, device=q.device)[None, :] < (torch.arange(count, device=q.device) * sub)[:, None]
    exponent = (anchor.unsqueeze(2) - b.unsqueeze(1)).masked_fill(~earlier[None, :, :, None], float("-inf"))
    k_out = k.unsqueeze(1) * exponent.exp().float()  # [M, n, C, K]: k_s e^{a_u − b_s} for s before block u, else 0
    across = q_in @ k_out.transpose(-1, -2)  # [M, n, sub, C]
    causal = torch.ones(sub, sub, dtype=torch.bool, device=q.device).tril()
    decay = _pairwise_decay(blocks.transpose(-1, -2), causal).permute(0, 1, 3, 4, 2)  # [M, n, sub, sub, K]
    k_blocks = k.view(m, count, sub, key_dim)
    within = (q.view(m, count, sub, key_dim).unsqueeze(-2) * k_blocks.unsqueeze(-3) * decay).sum(-1)  # [M, n, s, s]
    eye = torch.eye(count, device=q.device, dtype=within.dtype)
    within = within.unsqueeze(3) * eye[None, :, None, :, None]  # [M, n, sub, n, sub], blocks on the diagonal
    return (across + within.reshape(m, count, sub, length)).reshape(m, length, length)


BACKENDS["torch"] = chunked_recurrence
BACKENDS["naive"] = naive_recurrence  # the oracle, selectable for debugging and for tests of the whole model
DECODE_BACKENDS = {"torch": fused_recurrent, "naive": naive_recurrence}
VARLEN_BACKENDS = set()  # backends that take cu_seqlens themselves; the others run packed sequences one by one

try:  # the Triton kernels (GPU, or CPU tensors under TRITON_INTERPRET=1); absent with CPU-only torch
    from .ops_chunk import triton_chunked_recurrence

    BACKENDS["triton"] = triton_chunked_recurrence  # custom ops: torch.compile / torch.export trace through them
    VARLEN_BACKENDS.add("triton")
except ImportError:
    pass
try:
    from .ops_recurrent import triton_fused_recurrent

    DECODE_BACKENDS["triton"] = triton_fused_recurrent
except ImportError:
    pass


def resolve_backend(device_type, backend=None):
    """Pick the implementation (torch | triton | naive | auto): $LINEAR_DECAY_BACKEND where set (the one environment
    override, for debugging), else `backend` (a model's `config.kernel_backend`), else auto: Triton for CUDA tensors
    where it is installed, PyTorch otherwise."""
    override = os.environ.get("LINEAR_DECAY_BACKEND")
    source = "LINEAR_DECAY_BACKEND" if override else "kernel_backend"
    backend = override or backend or "auto"
    if backend == "auto":
        return "triton" if device_type == "cuda" and "triton" in BACKENDS else "torch"
    if backend not in ("torch", "triton", "naive"):
        raise ValueError(f"{source}={backend!r}; allowed: torch, triton, naive, auto")
    if backend not in BACKENDS:
        raise RuntimeError(f"{source}={backend!r} was requested but its kernels are not available here "
                           "(the Triton kernels need the `triton` package)")
    return backend


# A padded batch ([B, T] mask) runs as packed sequences on a varlen backend once at least this share of its tokens is
# padding: the kernels then skip the padding instead of carrying it through the state (not yet timed on the GPU).
PACK_MIN_PADDING = 0.125


def linear_decay_attention(q, k, v, log_decay=None, scale=1.0, initial_state=None, output_final_state=False,
                           cu_seqlens=None, backend=None, mask=None):
    """Chunked training / prefill form on the selected backend. `cu_seqlens` (int32 [N + 1]): N sequences packed
    along T of a batch of one, with states [N, H, K, V]. `mask` ([B, T] bool, True = real token; the caller has
    already made padded positions leave the state untouched, DESIGN §1) lets a varlen backend drop the padding;
    outputs at padded positions are then 0. The packing is decided on the host, so torch.compile / torch.export
    trace the padded batch as it is instead."""
    name = resolve_backend(q.device.type, backend)
    fn = BACKENDS[name]
    if mask is not None and cu_seqlens is None and name in VARLEN_BACKENDS and not torch.compiler.is_compiling():
        plan = per_tensor(mask, _packing_plan)  # once per forward: every layer gets the model's one mask
        if plan is not None:
            return _packed_by_mask(fn, q, k, v, log_decay, scale, initial_state, output_final_state, *plan)
    if cu_seqlens is None or name in VARLEN_BACKENDS:
        kwargs = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
        return fn(q, k, v, log_decay, scale=scale, initial_state=initial_state,
                  output_final_state=output_final_state, **kwargs)
    return _per_sequence(fn, q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens)


def recurrent_step(q, k, v, log_decay=None, scale=1.0, initial_state=None, output_final_state=False, backend=None):
    """Decoding: a few tokens folded into the state. The Triton kernel updates `initial_state` in place; calls that
    need gradients take the PyTorch path."""
    name = resolve_backend(q.device.type, backend)
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, log_decay, initial_state))
    fn = DECODE_BACKENDS.get("torch" if needs_grad else name, fused_recurrent)
    return fn(q, k, v, log_decay, scale=scale, initial_state=initial_state, output_final_state=output_final_state)


def _packing_plan(mask):
    """(flat indices of the real tokens, cu_seqlens of the rows' real tokens) when at least PACK_MIN_PADDING of the
    batch is padding, else None."""
    if 1.0 - mask.float().mean().item() < PACK_MIN_PADDING:
        return None
    real = mask.reshape(-1).nonzero().squeeze(1)
    return real, torch.nn.functional.pad(mask.sum(1).cumsum(0), (1, 0)).to(torch.int32)


def _packed_by_mask(fn, q, k, v, log_decay, scale, initial_state, output_final_state, real, cu_seqlens):
    """Run the real tokens of each row (`_packing_plan`: their flat indices and cu_seqlens) as one packed sequence
    and scatter the outputs back."""
    batch, length, heads, _ = q.shape

    def pack(x):
        return x.reshape(batch * length, *x.shape[2:]).index_select(0, real).unsqueeze(0)

    if log_decay is not None and log_decay.dim() == 1:
        packed_decay = log_decay
    else:
        packed_decay = pack(log_decay) if log_decay is not None else None
    o, final = fn(pack(q), pack(k), pack(v), packed_decay, scale=scale, initial_state=initial_state,
                  output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    out = o.new_zeros(batch * length, heads, o.shape[-1]).index_copy(0, real, o[0])
    return out.view(batch, length, heads, o.shape[-1]), final


def _per_sequence(fn, q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens):
    """Varlen through a backend without it: each packed sequence on its own."""
    if q.shape[0] != 1:
        raise ValueError(f"cu_seqlens needs the sequences packed into a batch of one; got batch {q.shape[0]}")
    bounds = cu_seqlens.tolist()
    outputs, finals = [], []
    for index, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        decay = log_decay if log_decay is None or log_decay.dim() == 1 else log_decay[:, start:end]
        state = initial_state[index:index + 1] if initial_state is not None else None
        o, final = fn(q[:, start:end], k[:, start:end], v[:, start:end], decay, scale=scale, initial_state=state,
                      output_final_state=output_final_state)
        outputs.append(o)
        finals.append(final)
    return torch.cat(outputs, dim=1), (torch.cat(finals, dim=0) if output_final_state else None)


__all__ = ["naive_recurrence", "chunked_recurrence", "fused_recurrent", "linear_decay_attention", "recurrent_step",
           "BACKENDS"]
