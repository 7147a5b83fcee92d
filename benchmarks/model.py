"""Whole-model speed: our LinearDecayForCausalLM against transformers' LlamaForCausalLM (sdpa) of the same
width, depth, MLP and vocabulary, in one run on one GPU.

Sections (`--sections`, default all):
  train     training tokens/s of forward + backward + AdamW step, bf16 weights, at B×T = 8×2048 and 1×16384
            (`--train-shapes`), and the peak memory; each model built fresh, 2 warm-up steps, the median of 5 timed.
            `--compile` runs every model (ours and the Llama alike) under torch.compile, as the HF Trainer's
            `torch_compile=True` does: fewer launches and Python per step for both.
            `--single-thread-backward` runs every model's backward on the calling thread instead of autograd's CUDA
            device thread (`torch.autograd.set_multithreading_enabled(False)`); the hand-off to that thread makes
            the host's share of an eager step slower.
  generate  generate() tokens/s (new tokens / wall time, greedy, exactly `--new-tokens` new tokens) and peak memory at
            batch 16 with a 2048-token and a 32768-token random prompt; every model with transformers' chunked
            prefill of `--prefill-chunk` tokens (0: one prefill call); the Llama with its default (dynamic) cache and
            with `cache_implementation="static"` (its decoding step compiled; `--llama-caches`). `--fit-batch`
            halves the batch where a model runs out of memory and runs every model at the batch that fits. Our rows
            also time their prefill alone; one more row, our model cut to one 64-wide layer with the same vocabulary,
            is what generate() itself costs at those shapes (`--no-generate-floor` leaves it out).
  decode    our models' one-token decoding step at batch 16 after a 2048-token prompt: median ms per step (50 steps)
            against its memory floor (the weights read once, the recurrent states read and written, at the device's
            measured copy bandwidth), and what one step launches (CUDA kernels: count, device time, the longest).
  profile   one training step of each model at the first training shape under torch.profiler (after the warm-up
            steps): the operators / kernels with the most device time, the table that says where a step's time goes.
  cold      time from a cold process (empty Triton cache) to the end of the first training step: runs
            `benchmarks/bench_kernels.py --only model` for each of our decays (its `model` section measures exactly
            that); not run with --device cpu.

    PYTHONPATH=. python3 benchmarks/model.py --json model.json            (H200: 410m preset = 24 layers, d 1024)
    PYTHONPATH=. python3 benchmarks/model.py --sections profile --decays mamba2:vector
    PYTHONPATH=. python3 benchmarks/model.py --device cpu --quick          (a smoke run of every code path)

Prints one table with ours / Llama ratios; `--json` writes every row. A row that fails (e.g. out of memory) records its
error and the run goes on.
"""

import argparse
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_DECAYS = "mamba2:vector,gla:vector,simple:scalar"


def build_ours(preset, decay, vocab, overrides):
    from linear_decay import LinearDecayConfig, LinearDecayForCausalLM

    decay_type, _, granularity = decay.partition(":")
    config = LinearDecayConfig.from_preset(preset, vocab_size=vocab, decay_type=decay_type, **overrides,
                                           **({"decay_granularity": granularity} if granularity else {}))
    return LinearDecayForCausalLM(config)


def build_llama(reference_config, max_positions):
    """transformers' Llama with our width, depth, heads, SwiGLU width and vocabulary; sdpa attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = reference_config
    config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_heads,
                         num_key_value_heads=c.num_heads, max_position_embeddings=max_positions,
                         rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def models(args):
    """(name, builder) for every model of the run; the Llama is shaped like our first decay's model."""
    overrides = dict(args.overrides)
    entries = [(f"ours {decay}", lambda decay=decay: build_ours(args.preset, decay, args.vocab, overrides))
               for decay in args.decays.split(",")]
    reference = build_ours(args.preset, args.decays.split(",")[0], args.vocab, overrides).config
    max_positions = max([t for _, t in args.train_shapes] + [p + args.new_tokens for p in args.prompts])
    if not args.no_llama:
        entries.append(("llama sdpa", lambda: build_llama(reference, max_positions)))
    return entries


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def reset_memory(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device):
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def on_device(builder, device, dtype):
    model = builder()
    return model.to(device=device, dtype=dtype)


def training_setup(args, builder, batch, length):
    """A fresh model in training mode on the device and a function that runs one training step (forward, backward,
    AdamW) on a fixed random batch and returns the loss."""
    reset_memory(args.device)
    model = on_device(builder, args.device, args.dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=args.device == "cuda")
    ids = torch.randint(0, args.vocab, (batch, length), generator=torch.Generator().manual_seed(0)).to(args.device)
    forward = torch.compile(model) if args.compile else model

    def step():
        loss = forward(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return model, step


def section_train(args, rows):
    for name, builder in models(args):
        for batch, length in args.train_shapes:
            row = dict(section="train", model=name, batch=batch, length=length, compiled=args.compile,
                       autograd_multithreading=not args.single_thread_backward)
            model = step = None
            try:
                model, step = training_setup(args, builder, batch, length)
                times, issued = [], []
                for index in range(args.warmup + args.steps):
                    synchronize(args.device)
                    start = time.perf_counter()
                    loss = step()
                    issue = time.perf_counter()  # the host has queued the whole step: host-bound if close to step
                    synchronize(args.device)
                    if index >= args.warmup:
                        times.append(time.perf_counter() - start)
                        issued.append(issue - start)
                step_s = statistics.median(times)
                row.update(step_ms=step_s * 1e3, issue_ms=statistics.median(issued) * 1e3,
                           tokens_per_s=batch * length / step_s, loss=loss.item(),
                           peak_GiB=peak_gib(args.device),
                           params_M=sum(p.numel() for p in model.parameters()) / 1e6)
            except Exception as error:  # noqa: BLE001  (a row that cannot run, e.g. out of memory)
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                traceback.print_exc()
            del model, step
            rows.append(row)
            print(f"[train] {row}", flush=True)


def section_profile(args, rows):
    from torch.profiler import ProfilerActivity, profile

    batch, length = args.train_shapes[0]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    sort_by = ("self_device_time_total" if args.device == "cuda" and args.profile_sort == "device"
               else "self_cpu_time_total")
    for name, builder in models(args):
        row = dict(section="profile", model=name, batch=batch, length=length)
        model = step = None
        try:
            model, step = training_setup(args, builder, batch, length)
            for _ in range(args.warmup):
                step()
            synchronize(args.device)
            with profile(activities=activities) as prof:
                step()
                synchronize(args.device)
            table = prof.key_averages().table(sort_by=sort_by, row_limit=args.profile_rows, max_name_column_width=70)
            print(f"[profile] {name} B={batch} T={length}\n{table}", flush=True)
            events = sorted(prof.key_averages(), key=lambda e: -getattr(e, sort_by, 0))
            row["top"] = [dict(name=e.key, self_cpu_ms=e.self_cpu_time_total / 1e3, calls=e.count,
                               **({"self_device_ms": e.self_device_time_total / 1e3} if args.device == "cuda" else {}))
                          for e in events[: args.profile_rows]]
        except Exception as error:  # noqa: BLE001
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            traceback.print_exc()
        del model, step
        rows.append(row)


# generate()'s own cost at the section's shapes: our model cut to one 64-wide layer (the same vocabulary, so the same
# head and logits), whose prefill and steps cost next to nothing: what every model's generate() call pays besides its
# own layers
GENERATE_FLOOR = "generate() floor (ours, 1 layer × 64)"
FLOOR_SIZES = dict(hidden_size=64, num_hidden_layers=1, num_heads=1)


def generate_variants(args):
    """(name, builder, generate options) of the generate section: every model with its default cache, and the Llama
    also with transformers' static cache (`cache_implementation="static"`, which compiles its decoding step): what a
    user who wants a fast Llama decode picks."""
    for name, builder in models(args):
        if name != "llama sdpa":
            yield name, builder, {}
            continue
        if "dynamic" in args.llama_caches:
            yield name, builder, {}
        if "static" in args.llama_caches:
            yield "llama static cache", builder, {"cache_implementation": "static"}
    if not args.no_generate_floor:
        yield GENERATE_FLOOR, functools.partial(build_ours, args.preset, args.decays.split(",")[0], args.vocab,
                                                dict(args.overrides, **FLOOR_SIZES)), {}


def time_generate(args, builder, batch, prompt, extra):
    """(wall seconds, new tokens, peak GiB) of one generate() call after a warm-up call at the same shapes."""
    reset_memory(args.device)
    model = on_device(builder, args.device, args.dtype).eval()
    try:
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(0, args.vocab, (batch, prompt), generator=generator).to(args.device)
        options = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                       pad_token_id=0, eos_token_id=None, prefill_chunk_size=args.prefill_chunk or None, **extra)
        with torch.no_grad():
            # warm-up at the timed prompt length: every kernel the prefill and the decoding step use is compiled
            # (or loaded, or captured) before the clock starts
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **options)
            reset_memory(args.device)
            synchronize(args.device)
            start = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **options)
            synchronize(args.device)
            wall, peak = time.perf_counter() - start, peak_gib(args.device)
            prefill = time_prefill(args, model, ids) if hasattr(model.config, "decay_type") else None
        return wall, out.shape[1] - prompt, peak, prefill
    finally:
        del model
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()


def time_prefill(args, model, ids):
    """Seconds of our model's prefill alone, as generate() runs it: the prompt in chunks of `--prefill-chunk` tokens
    into one cache, the last position's logits kept (a warm-up run, then the timed one)."""
    from linear_decay.modeling_linear_decay import CACHE_FIELD

    size = args.prefill_chunk or ids.shape[1]
    for _ in range(2):
        synchronize(args.device)
        start, cache = time.perf_counter(), None
        for first in range(0, ids.shape[1], size):
            out = model(input_ids=ids[:, first:first + size], use_cache=True, logits_to_keep=1,
                        **({CACHE_FIELD: cache} if cache is not None else {}))
            cache = getattr(out, CACHE_FIELD)
        synchronize(args.device)
    return time.perf_counter() - start


def section_generate(args, rows):
    """generate() at args.generate_batch for every prompt length; with --fit-batch, a prompt at which a model runs
    out of memory is retried at half the batch until it fits, and the other models are run at that batch too."""
    variants = list(generate_variants(args))
    for prompt in args.prompts:
        batches = [args.generate_batch]
        while batches:
            batch = batches.pop(0)
            for name, builder, extra in variants:
                row = dict(section="generate", model=name, batch=batch, prompt=prompt, new_tokens=args.new_tokens,
                           prefill_chunk=args.prefill_chunk)
                try:
                    wall, generated, peak, prefill = time_generate(args, builder, batch, prompt, extra)
                    row.update(wall_s=wall, generated=generated, new_tokens_per_s=batch * generated / wall,
                               peak_GiB=peak, **({} if prefill is None else {"prefill_s": prefill}))
                except Exception as error:  # noqa: BLE001  (e.g. out of memory)
                    row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                    if args.fit_batch and isinstance(error, torch.OutOfMemoryError) and batch > 1 \
                            and batch // 2 not in batches:
                        batches.append(batch // 2)
                    else:
                        traceback.print_exc()
                rows.append(row)
                print(f"[generate] {row}", flush=True)


def copy_bandwidth(device):
    """Bytes per second the device moves in a copy of 1 GiB (its read and its write counted): the rate the decoding
    step's memory floor is taken at."""
    source = torch.empty(2 ** 28 if device == "cuda" else 2 ** 22, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        target.copy_(source)
    synchronize(device)
    return 2 * source.numel() * source.element_size() * 10 / (time.perf_counter() - start)


def section_decode(args, rows):
    """Our models' one-token decoding step at `--generate-batch`-sized batches after a prompt of the first prompt
    length: the median time of a step (the model's own step, a CUDA graph replay where config.decode_cuda_graphs),
    against its memory floor, the bytes a step must move at the measured copy bandwidth: every weight read once but
    the input embedding (only the batch's rows are gathered), and every recurrent state read and written."""
    from linear_decay.modeling_linear_decay import CACHE_FIELD

    bandwidth = copy_bandwidth(args.device)
    prompt, batch = args.prompts[0], args.generate_batch
    for name, builder in models(args):
        if name.startswith("llama"):
            continue
        row = dict(section="decode", model=name, batch=batch, prompt=prompt, bandwidth_GBps=bandwidth / 1e9)
        model = None
        try:
            reset_memory(args.device)
            model = on_device(builder, args.device, args.dtype).eval()
            generator = torch.Generator().manual_seed(2)
            ids = torch.randint(0, args.vocab, (batch, prompt), generator=generator).to(args.device)
            with torch.no_grad():
                out = model(input_ids=ids, use_cache=True)
                cache, token = getattr(out, CACHE_FIELD), out.logits[:, -1:].argmax(-1)
                times = []
                for index in range(args.warmup + args.decode_steps):
                    synchronize(args.device)
                    start = time.perf_counter()
                    out = model(input_ids=token, use_cache=True, **{CACHE_FIELD: cache})
                    synchronize(args.device)
                    if index >= args.warmup:
                        times.append(time.perf_counter() - start)
                    cache, token = getattr(out, CACHE_FIELD), out.logits[:, -1:].argmax(-1)
            embedding = model.get_input_embeddings().weight
            weights = sum(p.numel() * p.element_size() for p in model.parameters() if p is not embedding)
            if model.get_output_embeddings().weight is embedding:  # tied: the head reads it whole
                weights += embedding.numel() * embedding.element_size()
            states = sum(t.numel() * t.element_size() for t in cache.state_tensors())
            floor = (weights + 2 * states) / bandwidth
            step = statistics.median(times)
            row.update(step_ms=step * 1e3, floor_ms=floor * 1e3, step_over_floor=step / floor,
                       weight_GB=weights / 1e9, state_GB=states / 1e9)
            with torch.no_grad():
                one_step = functools.partial(model, input_ids=token, use_cache=True, **{CACHE_FIELD: cache})
                row.update(step_launches(one_step, args.device))
        except Exception as error:  # noqa: BLE001
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            traceback.print_exc()
        del model
        rows.append(row)
        print(f"[decode] {row}", flush=True)


def step_launches(run, device, top=16):
    """What one decoding step launches, under torch.profiler: on CUDA its kernels (count, device ms, the `top` longest
    by name), on CPU its ATen operators — the step's count of launches is what its time over the floor is made of."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        run()
        synchronize(device)
    if cuda:
        events = [(e.key, e.count, e.self_device_time_total / 1e3) for e in prof.key_averages()
                  if e.self_device_time_total > 0]
    else:
        events = [(e.key, e.count, e.self_cpu_time_total / 1e3) for e in prof.key_averages()
                  if e.key.startswith("aten::")]
    events.sort(key=lambda event: -event[2])
    return dict(launches=sum(count for _, count, _ in events), launched_ms=sum(ms for _, _, ms in events),
                top_launches=[[name[:60], count, round(ms, 4)] for name, count, ms in events[:top]])


def section_cold(args, rows):
    """bench_kernels.py's model section: a child process with an empty Triton cache, model creation to the end of
    the first forward+backward (with the Triton backend), per decay."""
    for decay in args.decays.split(","):
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "cold.json")
            command = [sys.executable, str(HERE / "bench_kernels.py"), "--only", "model", "--model-preset",
                       args.preset, "--model-decay", decay, "--model-backends", "triton", "--json", path]
            start = time.perf_counter()
            proc = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
            row = dict(section="cold", model=f"ours {decay}", process_s=time.perf_counter() - start)
            try:
                child = json.load(open(path))["model"][0]
                row.update({k: child.get(k) for k in ("create_to_first_step_end_s", "first_step_s", "steady_step_s",
                                                      "error") if child.get(k) is not None})
            except Exception:  # noqa: BLE001
                row["error"] = f"rc={proc.returncode}: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
        rows.append(row)
        print(f"[cold] {row}", flush=True)


def print_table(args, rows):
    def value(row, key, spec):
        return "error: " + row["error"][:60] if "error" in row else format(row[key], spec)

    def peak(row):
        return "" if row.get("peak_GiB") is None else f"  peak {row['peak_GiB']:.1f} GiB"

    print(f"\nmodel benchmark: preset {args.preset}, {args.dtype}, device "
          f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, torch {torch.__version__}")
    llama = {(r["section"], r.get("batch"), r.get("length"), r.get("prompt")): r for r in rows
             if r["model"] == "llama sdpa" and "error" not in r}
    llama_static = {(r["batch"], r["prompt"]): r for r in rows
                    if r["model"] == "llama static cache" and "error" not in r}
    for row in rows:
        key = (row["section"], row.get("batch"), row.get("length"), row.get("prompt"))
        if row["section"] == "train":
            ref = llama.get(key)
            ratio = f"  ours/llama {row['tokens_per_s'] / ref['tokens_per_s']:.2f}×" if ref and "error" not in row \
                and row["model"] != "llama sdpa" else ""
            compiled = " (compiled)" if row.get("compiled") else ""
            host = (f"  step {row['step_ms']:.1f} ms, queued in {row['issue_ms']:.1f}" if "step_ms" in row else "")
            print(f"train    {row['model']:22s} B={row['batch']:<3d} T={row['length']:<6d} "
                  f"{value(row, 'tokens_per_s', ',.0f')} tokens/s{peak(row)}{ratio}{compiled}{host}")
        elif row["section"] == "generate":
            ref = llama.get(key)
            ours = "error" not in row and row["model"].startswith("ours")
            ratio = f"  ours/llama {row['new_tokens_per_s'] / ref['new_tokens_per_s']:.2f}×" if ref and ours else ""
            ref = llama_static.get((row["batch"], row["prompt"]))
            ratio += (f"  ours/llama static cache {row['new_tokens_per_s'] / ref['new_tokens_per_s']:.2f}×"
                      if ref and ours else "")
            wall = "" if "error" in row else f"  {row['wall_s']:.3f} s" + (
                f" (prefill alone {row['prefill_s']:.3f} s)" if "prefill_s" in row else "")
            print(f"generate {row['model']:22s} B={row['batch']:<3d} prompt={row['prompt']:<6d} "
                  f"{value(row, 'new_tokens_per_s', ',.1f')} new tokens/s{wall}{peak(row)}{ratio}")
        elif row["section"] == "decode":
            floor = "" if "error" in row else (f"  floor {row['floor_ms']:.3f} ms ({row['weight_GB']:.2f} GB weights, "
                                               f"{row['state_GB']:.3f} GB states at {row['bandwidth_GBps']:,.0f} GB/s)"
                                               f"  step / floor {row['step_over_floor']:.1f}×"
                                               f"  {row['launches']} launches, {row['launched_ms']:.3f} ms in them")
            print(f"decode   {row['model']:22s} B={row['batch']:<3d} prompt={row['prompt']:<6d} "
                  f"{value(row, 'step_ms', '.3f')} ms per step{floor}")
        elif row["section"] == "cold":
            print(f"cold     {row['model']:22s} create → end of first step "
                  f"{value(row, 'create_to_first_step_end_s', '.1f')} s (process {row['process_s']:.1f} s)")


def _number(text):
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="train,generate,decode,cold")
    parser.add_argument("--preset", default="410m")
    parser.add_argument("--decays", default=DEFAULT_DECAYS, help="decay_type[:granularity], comma separated")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (2 layers, d 64, short sequences): checks that every path runs")
    parser.add_argument("--json", help="write every row to this path")
    parser.add_argument("--prefill-chunk", type=int, default=2048, help="generate(prefill_chunk_size=...); 0: off")
    parser.add_argument("--compile", action="store_true", help="train section: torch.compile every model")
    parser.add_argument("--llama-caches", default="dynamic,static",
                        help="generate section: the Llama's caches, dynamic (transformers' default) and/or static")
    parser.add_argument("--no-generate-floor", action="store_true",
                        help="generate section: leave out the row of a 1-layer, 64-wide model of the same vocabulary "
                             "(generate()'s own cost at those shapes)")
    parser.add_argument("--fit-batch", action="store_true",
                        help="generate section: halve the batch of a prompt length at which a model runs out of "
                             "memory until it fits, and run every model at that batch too")
    parser.add_argument("--train-shapes", dest="train_shapes_text",
                        help="BxT of the train section, comma separated (default 8x2048,1x16384; --quick: 2x64,1x130); "
                             "the profile section takes the first")
    parser.add_argument("--prompts", dest="prompts_text",
                        help="prompt lengths of the generate section, comma separated (default 2048,32768); the decode "
                             "section takes the first")
    parser.add_argument("--no-llama", action="store_true", help="our models only (no reference row, no ratios)")
    parser.add_argument("--single-thread-backward", action="store_true",
                        help="every model's backward on the calling thread (torch.autograd.set_multithreading_enabled"
                             "(False)) instead of autograd's device thread")
    parser.add_argument("--unfused-decay", action="store_true",
                        help="our decay units in PyTorch (log_decay) instead of the fused softplus kernel: an A/B")
    parser.add_argument("--profile-sort", default="device", choices=("device", "cpu"),
                        help="profile section: rows by self device time, or by self host (CPU) time")
    parser.add_argument("--ours-overrides", default="",
                        help="config overrides of our models, e.g. loss_chunk_size=4096,decode_cuda_graphs=True "
                             "(comma separated key=value)")
    args = parser.parse_args(argv)
    args.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    args.vocab = 50304
    args.overrides = {key: _number(value) for key, _, value in
                      (item.partition("=") for item in args.ours_overrides.split(",") if item)}
    args.train_shapes, args.prompts = [(8, 2048), (1, 16384)], [2048, 32768]
    args.generate_batch, args.new_tokens, args.warmup, args.steps, args.decode_steps = 16, 128, 2, 5, 50
    args.profile_rows = 30
    if args.quick:
        args.preset, args.vocab = "tiny", 512
        args.overrides = dict(hidden_size=64, num_hidden_layers=2, num_heads=2, **args.overrides)
        args.train_shapes, args.prompts = [(2, 64), (1, 130)], [16, 40]
        args.generate_batch, args.new_tokens, args.warmup, args.steps, args.decode_steps = 2, 4, 1, 2, 3
        args.prefill_chunk = min(args.prefill_chunk, 16)
    if args.train_shapes_text:
        args.train_shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.train_shapes_text.split(",")]
    if args.prompts_text:
        args.prompts = [int(n) for n in args.prompts_text.split(",")]
    if args.device == "cpu":
        args.sections = ",".join(s for s in args.sections.split(",") if s != "cold")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.unfused_decay:
        import linear_decay.modeling_linear_decay as modeling

        modeling.softplus_decay = None
    rows = []
    # thread-local: this thread's backward calls, for every model alike; the previous setting is restored after
    with torch.autograd.set_multithreading_enabled(not args.single_thread_backward):
        for section in args.sections.split(","):
            {"train": section_train, "generate": section_generate, "decode": section_decode,
             "profile": section_profile, "cold": section_cold}[section](args, rows)
    print_table(args, rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
