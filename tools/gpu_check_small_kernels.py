"""GPU check and timing of the two small Triton kernels (CUDA only; DESIGN.md §1, §7).

1. Correctness in fp32 / fp16 / bf16 against fp64 references written out here:
   - `triton_fused_recurrent` (decoding): o and the final state, vector / scalar / static / no decay, T = 1 and 5,
     K = V = 128 and non-power-of-two K = 96, V = 80; the state must be updated in place.
   - `gated_rms_norm`: y and the gradients to o, gate_logits and weight (DESIGN §7: every backward is checked on the
     GPU, here against fp64), hidden 2048 and 1000.
   Thresholds on the relative error ‖x − ref‖ / ‖ref‖: fp32 1e-5, fp16 3e-3, bf16 1.5e-2.
2. Timing (triton.testing.do_bench, median):
   - decoding at B=64, H=16, K=V=128, T=1: the kernel vs the PyTorch `fused_recurrent`;
   - output gate + norm at [8·2048, 2048] bf16, forward and forward+backward: the kernel vs the model's two-step
     torch code (o * sigmoid(z), then LinearDecayRMSNorm).

    PYTHONPATH=. python3 tools/gpu_check_small_kernels.py    (from the repository root)

Exits with status 1 if any check fails.
"""

import sys

import torch

TOLERANCES = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def relative_error(actual, expected):
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp(min=1e-30))


# ---------------------------------------------------------------------------------------------------------------
# fp64 references
# ---------------------------------------------------------------------------------------------------------------


def recurrence_fp64(q, k, v, log_decay, scale, initial_state):
    """S_t = diag(λ_t) S_{t-1} + k_t v_tᵀ, o_t = scale · S_tᵀ q_t, step by step in fp64."""
    batch, length, heads, key_dim = q.shape
    if log_decay is None:
        decay = torch.ones(batch, length, heads, key_dim, dtype=torch.float64, device=q.device)
    elif log_decay.dim() == 1:
        decay = log_decay.double().exp()[None, None, :, None].expand(batch, length, heads, key_dim)
    elif log_decay.dim() == 3:
        decay = log_decay.double().exp()[..., None].expand(batch, length, heads, key_dim)
    else:
        decay = log_decay.double().exp()
    q, k, v, state = q.double(), k.double(), v.double(), initial_state.double()
    outputs = []
    for t in range(length):
        state = decay[:, t, :, :, None] * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    return torch.stack(outputs, dim=1), state


def gated_rms_norm_fp64(o, gate_logits, weight, eps):
    gated = o.double() * torch.sigmoid(gate_logits.double())
    return weight.double() * gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + eps)


# ---------------------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------------------


def decode_inputs(kind, batch, length, heads, key_dim, value_dim, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)

    q = (randn(batch, length, heads, key_dim) * key_dim**-0.5).to(dtype)
    k = (randn(batch, length, heads, key_dim) * key_dim**-0.5).to(dtype)
    v = randn(batch, length, heads, value_dim).to(dtype)
    shape = {"vector": (batch, length, heads, key_dim), "scalar": (batch, length, heads), "static": (heads,),
             "none": None}[kind]
    log_decay = None if shape is None else -torch.rand(*shape, device="cuda", generator=gen)
    state = randn(batch, heads, key_dim, value_dim)
    return q, k, v, log_decay, state


def check_decode(rows):
    from linear_decay.ops_recurrent import triton_fused_recurrent

    ok = True
    for dtype in DTYPES:
        for key_dim, value_dim in ((128, 128), (96, 80)):
            for kind in ("vector", "scalar", "static", "none"):
                for length in (1, 5):
                    q, k, v, log_decay, state = decode_inputs(kind, 4, length, 8, key_dim, value_dim, dtype)
                    o_ref, state_ref = recurrence_fp64(q, k, v, log_decay, 0.5, state)
                    buffer = state.clone()
                    with torch.no_grad():
                        o, final = triton_fused_recurrent(q, k, v, log_decay, scale=0.5, initial_state=buffer,
                                                          output_final_state=True)
                    errors = {"o": relative_error(o, o_ref), "state": relative_error(final, state_ref)}
                    passed = (final is buffer and o.dtype == dtype
                              and all(e <= TOLERANCES[dtype] for e in errors.values()))
                    ok &= passed
                    rows.append(("decode", str(dtype).removeprefix("torch."), f"{kind} T={length} K={key_dim} "
                                 f"V={value_dim}", errors, TOLERANCES[dtype], passed))
    return ok


def check_norm(rows):
    from linear_decay.ops_norm import gated_rms_norm

    ok = True
    eps = 1e-5
    for dtype in DTYPES:
        for shape in ((4096, 2048), (2, 333, 1000)):
            gen = torch.Generator(device="cuda").manual_seed(1)
            o = torch.randn(*shape, device="cuda", generator=gen).to(dtype)
            gate_logits = (2 * torch.randn(*shape, device="cuda", generator=gen)).to(dtype)
            weight = (1 + 0.3 * torch.randn(shape[-1], device="cuda", generator=gen)).to(dtype)
            grad_y = torch.randn(*shape, device="cuda", generator=gen).to(dtype)  # the reference gets the same values

            leaves = [t.clone().requires_grad_() for t in (o, gate_logits, weight)]
            y = gated_rms_norm(*leaves, eps)
            y.backward(grad_y)
            leaves_ref = [t.double().requires_grad_() for t in (o, gate_logits, weight)]
            y_ref = gated_rms_norm_fp64(*leaves_ref, eps)
            y_ref.backward(grad_y.double())

            errors = {"y": relative_error(y, y_ref)}
            for name, leaf, leaf_ref in zip(("do", "dgate", "dweight"), leaves, leaves_ref):
                errors[name] = relative_error(leaf.grad, leaf_ref.grad)
            passed = y.dtype == dtype and all(e <= TOLERANCES[dtype] for e in errors.values())
            ok &= passed
            rows.append(("gate+norm", str(dtype).removeprefix("torch."), "x".join(map(str, shape)), errors,
                         TOLERANCES[dtype], passed))
    return ok


def print_checks(rows):
    print(f"{'kernel':<10} {'dtype':<9} {'case':<28} {'tolerance':>9}  result  relative errors")
    for kernel, dtype, case, errors, tolerance, passed in rows:
        details = "  ".join(f"{name}={error:.1e}" for name, error in errors.items())
        print(f"{kernel:<10} {dtype:<9} {case:<28} {tolerance:>9.0e}  {'ok' if passed else 'FAIL':<6}  {details}")


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------


def median_ms(fn, grad_to_none=None):
    from triton.testing import do_bench

    return do_bench(fn, grad_to_none=grad_to_none, return_mode="median")


def time_decode():
    from linear_decay.ops_recurrent import triton_fused_recurrent
    from linear_decay.recurrence import fused_recurrent

    print("\ndecoding step, B=64 H=16 K=V=128 T=1, bf16 q/k/v, fp32 state (median ms)")
    print(f"{'decay':<8} {'torch':>9} {'triton':>9} {'speedup':>8}")
    for kind in ("vector", "scalar"):
        q, k, v, log_decay, state = decode_inputs(kind, 64, 1, 16, 128, 128, torch.bfloat16)
        with torch.no_grad():
            torch_ms = median_ms(lambda: fused_recurrent(q, k, v, log_decay, initial_state=state,
                                                         output_final_state=True))
            triton_ms = median_ms(lambda: triton_fused_recurrent(q, k, v, log_decay, initial_state=state,
                                                                 output_final_state=True))  # in place
        print(f"{kind:<8} {torch_ms:>9.4f} {triton_ms:>9.4f} {torch_ms / triton_ms:>7.1f}x")


def time_norm():
    from linear_decay.ops_norm import gated_rms_norm
    from linear_decay.modeling_linear_decay import LinearDecayRMSNorm

    rows, hidden, dtype = 8 * 2048, 2048, torch.bfloat16
    norm = LinearDecayRMSNorm(hidden).to(device="cuda", dtype=dtype)
    o = torch.randn(rows, hidden, device="cuda", dtype=dtype, requires_grad=True)
    gate_logits = torch.randn(rows, hidden, device="cuda", dtype=dtype, requires_grad=True)
    grad_y = torch.randn(rows, hidden, device="cuda", dtype=dtype)
    leaves = [o, gate_logits, norm.weight]

    def two_step():
        return norm(o * torch.sigmoid(gate_logits))

    def fused():
        return gated_rms_norm(o, gate_logits, norm.weight, norm.eps)

    print(f"\noutput gate + RMSNorm, [{rows}, {hidden}] bf16 (median ms)")
    print(f"{'pass':<8} {'torch':>9} {'triton':>9} {'speedup':>8}")
    with torch.no_grad():
        torch_ms, triton_ms = median_ms(two_step), median_ms(fused)
    print(f"{'fwd':<8} {torch_ms:>9.4f} {triton_ms:>9.4f} {torch_ms / triton_ms:>7.1f}x")
    torch_ms = median_ms(lambda: two_step().backward(grad_y), grad_to_none=leaves)
    triton_ms = median_ms(lambda: fused().backward(grad_y), grad_to_none=leaves)
    print(f"{'fwd+bwd':<8} {torch_ms:>9.4f} {triton_ms:>9.4f} {torch_ms / triton_ms:>7.1f}x")


def main():
    if not torch.cuda.is_available():
        sys.exit("gpu_check_small_kernels.py needs a CUDA GPU (on CPU the kernels are tested under TRITON_INTERPRET=1 "
                 "by tests/test_ops_recurrent.py and tests/test_ops_norm.py)")
    import triton

    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}\n")
    rows = []
    ok = check_decode(rows)
    ok &= check_norm(rows)
    print_checks(rows)
    print(f"\n{'all checks passed' if ok else 'SOME CHECKS FAILED'}")
    time_decode()
    time_norm()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
