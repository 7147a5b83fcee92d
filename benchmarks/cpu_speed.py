"""CPU speed of the PyTorch path (issue: core model family).

Times a whole-model forward+backward at B=2, T=2048, hidden 512, 4 layers for
  - our chunked PyTorch path (LINEAR_DECAY_BACKEND=torch),
  - our naive fp32 recurrence (LINEAR_DECAY_BACKEND=naive, the oracle),
  - transformers' LlamaForCausalLM (sdpa) of the same width, depth, SwiGLU width and vocabulary,
in the same process, and prints the ratios. Targets: chunked ≥ 20× faster than naive, ≤ 1.5× Llama's time.

    python benchmarks/cpu_speed.py [--decay_types mamba2 simple] [--repeats 3] [--naive_repeats 1]
"""

import argparse
import os
import platform
import statistics
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from linear_decay import LinearDecayConfig, LinearDecayForCausalLM


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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--decay_types", nargs="+", default=["mamba2", "gla", "simple", "tnl"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive_repeats", type=int, default=1)
    args = parser.parse_args()

    torch.manual_seed(0)
    input_ids = torch.randint(0, args.vocab, (args.batch, args.length))
    common = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers, num_heads=args.hidden // 64)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; B={args.batch} T={args.length} hidden={args.hidden} "
          f"layers={args.layers} vocab={args.vocab}; fwd+bwd, fp32, median of {args.repeats}")

    ours_config = LinearDecayConfig(**common)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
        intermediate_size=ours_config.intermediate_size, max_position_embeddings=args.length,
        attn_implementation="sdpa",
    ))
    llama_time = time_fwd_bwd(llama, input_ids, args.repeats)
    print(f"{'llama (sdpa)':<28} {llama_time * 1e3:9.1f} ms")

    rows = []
    for decay_type in args.decay_types:
        model = LinearDecayForCausalLM(LinearDecayConfig(**common, decay_type=decay_type))
        os.environ["LINEAR_DECAY_BACKEND"] = "torch"
        chunked = time_fwd_bwd(model, input_ids, args.repeats)
        os.environ["LINEAR_DECAY_BACKEND"] = "naive"
        naive = time_fwd_bwd(model, input_ids, args.naive_repeats, warmup=0)
        os.environ["LINEAR_DECAY_BACKEND"] = "torch"
        rows.append((decay_type, model.config.decay_granularity, chunked, naive))
        print(f"{decay_type + ' (' + model.config.decay_granularity + ')':<28} {chunked * 1e3:9.1f} ms chunked, "
              f"{naive * 1e3:9.1f} ms naive  -> naive/chunked {naive / chunked:5.1f}x (target >= 20), "
              f"chunked/llama {chunked / llama_time:4.2f}x (target <= 1.5)")


if __name__ == "__main__":
    main()
