"""Fused recurrent Triton kernel for decoding (DESIGN.md §1): a few new tokens folded into the recurrent state.

    o, final_state = triton_fused_recurrent(q, k, v, log_decay, scale=1.0, initial_state=None,
                                            output_final_state=False)

Exactly the contract of `recurrence.fused_recurrent` (shapes, decay forms, fp32 state, o in v's dtype):

    S_t = diag(λ_t) S_{t-1} + k_t v_tᵀ,   o_t = scale · S_tᵀ q_t   (the current token is not decayed)

with two additions:

- The state is updated in place. When `initial_state` is an fp32 contiguous [B, H, K, V] tensor and
  `output_final_state=True`, the new state is written into it and that same tensor is returned as the final state.
  Any other initial state (another dtype or layout) is copied to fp32 first and the copy is returned. With
  `output_final_state=False` nothing is written and `initial_state` is left untouched.
- The kernel runs as the custom op `linear_decay::recurrent_step` (state declared mutated, o returned), so
  torch.compile and torch.export trace through it with no graph break; the in-place contract above holds there too.
- Inference only: there is no backward. The caller routes calls that need gradients to the PyTorch path; a call with
  grad mode on and an input that requires grad raises `RuntimeError`.

One program per (batch·head, block of value channels) keeps its [K, BV] state tile in registers and loops over the T
tokens; the whole key dim sits in one tile (K, V ≤ 256, any size: masked to the next power of two). The head dims are
compile-time constants (one compilation per model's K, V), which keeps the tile's addressing out of registers. Decay
arithmetic is fp32 whatever the dtype of q, k, v and log λ.

Under `TRITON_INTERPRET=1` (set before this module is imported) the kernel runs on CPU tensors (DESIGN §7).
"""

try:
    import triton
    import triton.language as tl
except ImportError as error:  # CPU-only torch ships without Triton: the PyTorch path is used instead
    raise ImportError("Triton is not installed") from error

import torch

from .ops_host import cdiv, next_power_of_2, op_name

MAX_HEAD_DIM = 256
# fp32 state elements one program keeps in registers, 32 per thread (K=128 -> BV=64 at 8 warps: 64 registers a
# thread for sm_90, no spills; 64 elements a thread spilled).
STATE_TILE_ELEMENTS = 8192
STATE_ELEMENTS_PER_THREAD = 32
# Below this many programs, value blocks are split further so that small decoding batches still fill the GPU.
MIN_PROGRAMS = 256


@triton.jit
def _fused_recurrent_kernel(
    q_ptr, k_ptr, v_ptr, log_decay_ptr, state_ptr, o_ptr,
    length, heads, scale,
    stride_q_b, stride_q_t, stride_q_h, stride_q_k,
    stride_k_b, stride_k_t, stride_k_h, stride_k_k,
    stride_v_b, stride_v_t, stride_v_h, stride_v_v,
    stride_g_b, stride_g_t, stride_g_h, stride_g_k,
    stride_o_b, stride_o_t, stride_o_h,
    DECAY: tl.constexpr,  # "vector" [B,T,H,K] | "scalar" [B,T,H] | "static" [H] | "none"
    HAS_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
    KEY_DIM: tl.constexpr,  # head dims as constants: the state tile's addresses fold into immediates (no spills)
    VALUE_DIM: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    batch_head = tl.program_id(0)
    value_block = tl.program_id(1)
    batch = (batch_head // heads).to(tl.int64)
    head = (batch_head % heads).to(tl.int64)

    keys = tl.arange(0, BLOCK_K)
    values = value_block * BLOCK_V + tl.arange(0, BLOCK_V)
    key_mask = keys < KEY_DIM
    value_mask = values < VALUE_DIM

    # The state tile S[b, h, :, value block] of the fp32 contiguous [B, H, K, V] state.
    if HAS_INITIAL_STATE or STORE_FINAL_STATE:
        state_base = state_ptr + batch_head.to(tl.int64) * (KEY_DIM * VALUE_DIM)
    if HAS_INITIAL_STATE:
        state = tl.load(state_base + keys[:, None] * VALUE_DIM + values[None, :],
                        mask=key_mask[:, None] & value_mask[None, :], other=0.0)
    else:
        state = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)

    # Scalar pointers to token 0 of this (batch, head), advanced by one token stride per step (64-bit pointer
    # arithmetic: no index overflow at any T); the per-channel offsets are added at each load.
    q_token = q_ptr + batch * stride_q_b + head * stride_q_h
    k_token = k_ptr + batch * stride_k_b + head * stride_k_h
    v_token = v_ptr + batch * stride_v_b + head * stride_v_h
    o_token = o_ptr + batch * stride_o_b + head * stride_o_h
    if DECAY != "none":
        decay_token = log_decay_ptr + batch * stride_g_b + head * stride_g_h
    if DECAY == "static":
        static_decay = tl.exp(tl.load(decay_token).to(tl.float32))

    for _ in range(length):
        q = tl.load(q_token + keys * stride_q_k, mask=key_mask, other=0.0).to(tl.float32)
        k = tl.load(k_token + keys * stride_k_k, mask=key_mask, other=0.0).to(tl.float32)
        v = tl.load(v_token + values * stride_v_v, mask=value_mask, other=0.0).to(tl.float32)

        # S ← diag(λ_t) S (masked key rows are zero and stay zero).
        if DECAY == "vector":
            log_decay = tl.load(decay_token + keys * stride_g_k, mask=key_mask, other=0.0).to(tl.float32)
            state = state * tl.exp(log_decay)[:, None]
            decay_token += stride_g_t
        if DECAY == "scalar":
            state = state * tl.exp(tl.load(decay_token).to(tl.float32))
            decay_token += stride_g_t
        if DECAY == "static":
            state = state * static_decay

        # S ← S + k_t v_tᵀ, then o_t = scale · Sᵀ q_t (the current token undecayed).
        state = state + k[:, None] * v[None, :]
        o = tl.sum(state * q[:, None], axis=0) * scale
        tl.store(o_token + values, o.to(o_ptr.dtype.element_ty), mask=value_mask)

        q_token += stride_q_t
        k_token += stride_k_t
        v_token += stride_v_t
        o_token += stride_o_t

    if STORE_FINAL_STATE:
        tl.store(state_base + keys[:, None] * VALUE_DIM + values[None, :], state,
                 mask=key_mask[:, None] & value_mask[None, :])


def _decay_kind(log_decay, batch, length, heads, key_dim):
    """Classify log λ by shape (the four forms of the contract) and return (kind, its 4 strides as [B, T, H, K])."""
    if log_decay is None:
        return "none", (0, 0, 0, 0)
    shape = tuple(log_decay.shape)
    if shape == (batch, length, heads, key_dim):
        return "vector", tuple(log_decay.stride())
    if shape == (batch, length, heads):
        return "scalar", (*log_decay.stride(), 0)
    if shape == (heads,):
        return "static", (0, 0, log_decay.stride(0), 0)
    raise ValueError(
        f"log_decay of shape {shape}: expected [B, T, H, K] = {(batch, length, heads, key_dim)}, "
        f"[B, T, H] = {(batch, length, heads)}, [H] = {(heads,)} or None"
    )


def _value_block(batch_heads, key_block, value_dim):
    """Value channels per program: the state tile fits STATE_TILE_ELEMENTS, and small batches get more programs."""
    block = min(next_power_of_2(value_dim), max(16, STATE_TILE_ELEMENTS // key_block), 64)
    while block > 16 and batch_heads * cdiv(value_dim, block) < MIN_PROGRAMS:
        block //= 2
    return block


def _recurrent_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None,
                   state: torch.Tensor | None, scale: float, has_initial_state: bool,
                   store_final_state: bool) -> torch.Tensor:
    """The decoding kernel on T ≥ 1 tokens: returns o; `state` (fp32 contiguous [B, H, K, V]) is read when
    `has_initial_state` and overwritten with the final state when `store_final_state` (declared mutated either way:
    an op may not return its input, so the final state comes back through `state` itself)."""
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    decay, decay_strides = _decay_kind(log_decay, batch, length, heads, key_dim)
    o = v.new_empty(batch, length, heads, value_dim)
    block_k = max(16, next_power_of_2(key_dim))
    block_v = _value_block(batch * heads, block_k, value_dim)
    grid = (batch * heads, cdiv(value_dim, block_v))
    _fused_recurrent_kernel[grid](
        q, k, v, log_decay, state, o,
        length, heads, scale,
        *q.stride(), *k.stride(), *v.stride(), *decay_strides, *o.stride()[:3],
        DECAY=decay,
        HAS_INITIAL_STATE=has_initial_state,
        STORE_FINAL_STATE=store_final_state,
        KEY_DIM=key_dim,
        VALUE_DIM=value_dim,
        BLOCK_K=block_k,
        BLOCK_V=block_v,
        num_warps=max(1, block_k * block_v // (32 * STATE_ELEMENTS_PER_THREAD)),
    )
    return o


def _recurrent_step_fake(q, k, v, log_decay, state, scale, has_initial_state, store_final_state):
    return v.new_empty(*q.shape[:3], v.shape[-1])


recurrent_step = torch.library.custom_op(op_name("recurrent_step"), _recurrent_step, mutates_args=("state",))
recurrent_step.register_fake(_recurrent_step_fake)


def triton_fused_recurrent(q, k, v, log_decay=None, scale=1.0, initial_state=None, output_final_state=False):
    """Decoding step on the GPU (DESIGN §1); under torch.compile / torch.export through the custom op
    `recurrent_step`, one node of their graphs; see the module docstring for the contract and the in-place state.
    The checks read shapes, devices and flags only (no device value), so they hold under tracing too."""
    inputs = [t for t in (q, k, v, log_decay, initial_state) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        raise RuntimeError(
            "triton_fused_recurrent is inference-only (no backward): route calls that need gradients to the "
            "PyTorch path (recurrence.fused_recurrent / chunked_recurrence)"
        )
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k must be [B, T, H, K] and v [B, T, H, V]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    if key_dim > MAX_HEAD_DIM or value_dim > MAX_HEAD_DIM:
        raise ValueError(f"head dims K={key_dim}, V={value_dim}: the decoding kernel supports up to {MAX_HEAD_DIM}")
    if any(t.device != q.device for t in inputs):
        raise ValueError("q, k, v, log_decay and initial_state must be on one device")
    _decay_kind(log_decay, batch, length, heads, key_dim)  # raises on a log λ of no known shape

    state = None
    if initial_state is not None:
        if tuple(initial_state.shape) != (batch, heads, key_dim, value_dim):
            raise ValueError(f"initial_state of shape {tuple(initial_state.shape)}, expected "
                             f"{(batch, heads, key_dim, value_dim)}")
        state = initial_state.float().contiguous()  # itself when already fp32 contiguous: updated in place
    elif output_final_state:
        state = q.new_empty(batch, heads, key_dim, value_dim, dtype=torch.float32)  # every element is written
    if batch * heads == 0 or length == 0:  # nothing to launch (an empty o may have no valid address)
        if state is not None and initial_state is None:
            state.zero_()
        return v.new_empty(batch, length, heads, value_dim), state if output_final_state else None
    step = recurrent_step if torch.compiler.is_compiling() else _recurrent_step  # eager: without the op's dispatch
    o = step(q, k, v, log_decay, state, float(scale), initial_state is not None, output_final_state)
    return o, state if output_final_state else None


__all__ = ["triton_fused_recurrent"]
