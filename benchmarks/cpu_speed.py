"""CPU speed of the PyTorch path.

At B=2, T=2048, hidden 512 (8 heads of 64), 4 layers, forward+backward, in one process:
  - the recurrence alone: chunked PyTorch path vs the naive fp32 oracle (target: chunked ≥ 20× faster);
  - the whole model on the chunked path vs transformers' LlamaForCausalLM (sdpa) of the same width, depth, SwiGLU
    width and vocabulary (target: ≤ 1.5× Llama's time), and for the --naive_models rows the whole model on the oracle.

    python benchmarks/cpu_speed.py [--models mamba2:vector simple:scalar] [--repeats 3]
"""

import argparse
import platform
import statistics
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from linear_decay import LinearDecayConfig, LinearDecayForCausalLM
from linear_decay.recurrence import chunked_recurrence, naive_recurrence


def time_fwd_bwd(model, input_ids, repeats, warmup=1):
    times = []
    for i in range(warmup + repeats):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times)


def time_recurrence(fn, shape_decay, batch, length, heads, dim, repeats, strongest=0.5):
    """The recurrence alone, forward+backward, on random inputs, log λ uniform in (−strongest, 0] (median seconds)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, length, heads, dim, requires_grad=True) for _ in range(3))
    log_decay = (-torch.rand(shape_decay) * strongest).requires_grad_()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        o, _ = fn(q, k, v, log_decay)
        o.square().sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["mamba2:vector", "gla:vector", "simple:scalar", "tnl:scalar"],
                        help="decay_type:granularity of the whole-model rows")
    parser.add_argument("--naive_models", nargs="+", default=["mamba2:vector"],
                        help="rows that also time the whole model on the naive oracle (slow)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    heads = args.hidden // 64
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.machine()}, "
          f"{torch.get_num_threads()} threads; B={args.batch} T={args.length} hidden={args.hidden} "
          f"layers={args.layers} heads={heads} vocab={args.vocab}; forward+backward, fp32, median of {args.repeats}")

    print("\nrecurrence alone (q, k, v [B, T, H, 64]; log λ uniform in (-0.5, 0], strong: (-30, 0]):")
    vector_shape, scalar_shape = (args.batch, args.length, heads, 64), (args.batch, args.length, heads)
    for name, decay_shape, strongest in (("vector", vector_shape, 0.5), ("scalar", scalar_shape, 0.5),
                                         ("vector, strong", vector_shape, 30.0)):
        chunked = time_recurrence(chunked_recurrence, decay_shape, args.batch, args.length, heads, 64, args.repeats,
                                  strongest)
        naive = time_recurrence(naive_recurrence, decay_shape, args.batch, args.length, heads, 64, 1, strongest)
        print(f"  {name:<14} chunked {chunked * 1e3:8.1f} ms, naive {naive * 1e3:9.1f} ms -> naive/chunked "
              f"{naive / chunked:6.1f}x (target >= 20)")

    torch.manual_seed(0)
    input_ids = torch.randint(0, args.vocab, (args.batch, args.length))
    common = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers, num_heads=heads)
    intermediate = LinearDecayConfig(**common).intermediate_size
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=heads,
        num_key_value_heads=heads, intermediate_size=intermediate, max_position_embeddings=args.length,
        attn_implementation="sdpa",
    ))
    llama_time = time_fwd_bwd(llama, input_ids, args.repeats)
    print(f"\nwhole model (SwiGLU {intermediate}):\n  {'llama (sdpa)':<18} {llama_time * 1e3:8.1f} ms")
    for row in args.models:
        decay_type, granularity = row.split(":")
        config = LinearDecayConfig(**common, decay_type=decay_type, decay_granularity=granularity,
                                   kernel_backend="torch")
        model = LinearDecayForCausalLM(config)
        chunked = time_fwd_bwd(model, input_ids, args.repeats)
        line = f"  {row:<18} {chunked * 1e3:8.1f} ms chunked -> ours/llama {chunked / llama_time:4.2f}x (target <= 1.5)"
        if row in args.naive_models:  # the same weights on the token-by-token recurrence
            config.kernel_backend = "naive"
            naive_model = LinearDecayForCausalLM(config)
            naive_model.load_state_dict(model.state_dict())
            naive = time_fwd_bwd(naive_model, input_ids, 1, warmup=0)
            line += f"; naive {naive * 1e3:8.1f} ms -> naive/chunked {naive / chunked:5.1f}x"
        print(line)


if __name__ == "__main__":
    main()
