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

- `naive_recurrence`: the fp32 step-by-step oracle (tests only).
- `chunked_recurrence`: the vectorised chunkwise form, the CPU training/prefill path.
- `fused_recurrent`: token-by-token state update for decoding (a few tokens per call).
`linear_decay_attention` dispatches between backends (`LINEAR_DECAY_BACKEND=torch|triton|naive|auto`); GPU kernels register
themselves in `BACKENDS` when they are importable.
"""

import os

import torch

BACKENDS = {}


def _broadcast_decay(log_decay, batch, length, heads, key_dim, device):
    """Return log λ as fp32 [B, T, H, K'] with K' ∈ {1, K} (scalar decay keeps a broadcast dim)."""
    if log_decay is None:
        return torch.zeros(batch, length, heads, 1, device=device)
    log_decay = log_decay.float()
    if log_decay.dim() == 1:
        return log_decay.view(1, 1, heads, 1).expand(batch, length, heads, 1)
    if log_decay.dim() == 3:
        return log_decay.unsqueeze(-1)
    return log_decay


def naive_recurrence(q, k, v, log_decay=None, scale=1.0, initial_state=None, output_final_state=False):
    """Oracle: the recurrence one token at a time, fp32."""
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    decay = _broadcast_decay(log_decay, batch, length, heads, key_dim, q.device).exp()
    q, k, v = q.float(), k.float(), v.float()
    state = q.new_zeros(batch, heads, key_dim, value_dim) if initial_state is None else initial_state.float()
    outputs = []
    for t in range(length):
        state = decay[:, t, :, :, None] * state + torch.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state) * scale)
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(batch, 0, heads, value_dim)
    return o.to(v.dtype), (state if output_final_state else None)


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


def chunked_recurrence(q, k, v, log_decay=None, scale=1.0, initial_state=None, output_final_state=False,
                       chunk_size=None):
    """Chunkwise parallel form (GLA / simple-GLA style), fp32 with in-chunk cumulative log-decay.

    Within a chunk the pairwise decay exp(b_t − b_s) (s ≤ t) is formed explicitly, so no exponent is ever positive:
    stable for arbitrarily strong decays. Across chunks the state is carried by a short loop over chunks.
    """
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    out_dtype = v.dtype
    g = _broadcast_decay(log_decay, batch, length, heads, key_dim, q.device)
    vector = g.shape[-1] != 1
    chunk = chunk_size or (16 if vector else 64)
    chunk = min(chunk, max(length, 1))
    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length

    def to_chunks(x):  # [B, T, H, D] -> [B, H, N, C, D] fp32, zero-padded (k = 0 and log λ = 0 leave S untouched)
        x = x.float()
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
        return x.view(batch, num_chunks, chunk, heads, x.shape[-1]).permute(0, 3, 1, 2, 4)

    q, k, v, g = to_chunks(q), to_chunks(k), to_chunks(v), to_chunks(g)
    b = g.cumsum(dim=-2)  # inclusive in-chunk cumulative log-decay, ≤ 0, [B, H, N, C, K'|1]
    b_last = b[..., -1:, :]
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()

    # Intra-chunk: A[t, s] = Σ_c q_tc k_sc exp(b_tc − b_sc) for s ≤ t.
    if vector:
        diff = (b.unsqueeze(-2) - b.unsqueeze(-3)).masked_fill(~causal[:, :, None], float("-inf"))
        scores = (q.unsqueeze(-2) * k.unsqueeze(-3) * diff.exp()).sum(-1)
    else:
        diff = (b[..., 0].unsqueeze(-1) - b[..., 0].unsqueeze(-2)).masked_fill(~causal, float("-inf"))
        scores = (q @ k.transpose(-1, -2)) * diff.exp()
    o = scores @ v

    # Inter-chunk: each chunk's contribution to the state at its end, then a scan over chunks.
    chunk_updates = (k * (b_last - b).exp()).transpose(-1, -2) @ v  # [B, H, N, K, V]
    chunk_decay = b_last.exp().transpose(-1, -2)  # [B, H, N, K'|1, 1]
    state = q.new_zeros(batch, heads, key_dim, value_dim) if initial_state is None else initial_state.float()
    states_before = []
    for n in range(num_chunks):
        states_before.append(state)
        state = chunk_decay[:, :, n] * state + chunk_updates[:, :, n]
    o = o + (q * b.exp()) @ torch.stack(states_before, dim=2)

    o = (o * scale).permute(0, 2, 3, 1, 4).reshape(batch, num_chunks * chunk, heads, value_dim)[:, :length]
    return o.to(out_dtype), (state if output_final_state else None)


BACKENDS["torch"] = chunked_recurrence
BACKENDS["naive"] = naive_recurrence  # the oracle, selectable for debugging and for tests of the whole model


def resolve_backend(device_type, backend=None):
    """Pick the implementation: `backend` or $LINEAR_DECAY_BACKEND (torch | triton | naive | auto, default auto)."""
    backend = backend or os.environ.get("LINEAR_DECAY_BACKEND", "auto")
    if backend == "auto":
        return "triton" if device_type == "cuda" and "triton" in BACKENDS else "torch"
    if backend not in ("torch", "triton", "naive"):
        raise ValueError(f"LINEAR_DECAY_BACKEND={backend!r}; allowed: torch, triton, naive, auto")
    if backend not in BACKENDS:
        raise RuntimeError(f"LINEAR_DECAY_BACKEND={backend!r} was requested but its kernels are not available here")
    return backend


def linear_decay_attention(q, k, v, log_decay=None, scale=1.0, initial_state=None, output_final_state=False,
                           backend=None):
    """Chunked training / prefill form on the selected backend."""
    fn = BACKENDS[resolve_backend(q.device.type, backend)]
    return fn(q, k, v, log_decay, scale=scale, initial_state=initial_state, output_final_state=output_final_state)


__all__ = ["naive_recurrence", "chunked_recurrence", "fused_recurrent", "linear_decay_attention", "BACKENDS"]
