"""The main job on the bundled default: train a tiny decay linear attention model on CPU with `Trainer`, save it,
reload it through `AutoModelForCausalLM`, generate a sample and print the per-layer median decay (DESIGN.md §5).

    python -m linear_decay.quickstart [--decay_type gla] [--max_steps 150] [--output_dir outputs/quickstart]

Any config field can be overridden with --set FIELD=VALUE (repeatable), e.g. --set decay_granularity=scalar.
"""

import argparse
import ast
import json
import math
import os
import time
from pathlib import Path

import torch

DATA_DIR = Path(__file__).resolve().parent / "data"
CORPUS = DATA_DIR / "corpus.txt"
TOKENIZER = DATA_DIR / "tokenizer"


class TokenBlocks(torch.utils.data.Dataset):
    """Consecutive fixed-length blocks of a token stream, as causal LM examples (labels = inputs)."""

    def __init__(self, token_ids, block_size):
        usable = (len(token_ids) // block_size) * block_size
        self.blocks = torch.tensor(token_ids[:usable], dtype=torch.long).view(-1, block_size)

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, index):
        block = self.blocks[index]
        return {"input_ids": block, "labels": block.clone()}


def load_bundled_tokens(tokenizer):
    """Tokenize the bundled corpus as one stream: its works (separated by two blank lines) each end with EOS."""
    works = CORPUS.read_text(encoding="utf-8").split("\n\n\n")
    encoded = tokenizer(works, add_special_tokens=False, verbose=False)["input_ids"]
    return [token for ids in encoded for token in ids + [tokenizer.eos_token_id]]


def parse_overrides(pairs):
    overrides = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--set expects FIELD=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    return overrides


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decay_type", default="mamba2")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="config override")
    parser.add_argument("--max_steps", type=int, default=150)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="outputs/quickstart")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed

    from linear_decay import LinearDecayConfig, LinearDecayForCausalLM
    from linear_decay.analysis import decay_statistics, format_statistics

    set_seed(args.seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    started = time.time()
    tokens = load_bundled_tokens(tokenizer)
    split = int(len(tokens) * 0.98)
    train_set, eval_set = TokenBlocks(tokens[:split], args.block_size), TokenBlocks(tokens[split:], args.block_size)
    print(f"corpus: {len(tokens):,} tokens ({len(train_set)} train / {len(eval_set)} eval blocks of "
          f"{args.block_size}), tokenized in {time.time() - started:.1f}s")

    config = LinearDecayConfig.from_preset(
        "tiny", vocab_size=len(tokenizer), decay_type=args.decay_type, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **parse_overrides(args.set),
    )
    model = LinearDecayForCausalLM(config)
    print(f"model: decay_type={config.decay_type} granularity={config.decay_granularity} "
          f"share={config.share_decay} position={config.position_encoding}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")

    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=args.learning_rate, lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 20), weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0,
        logging_steps=max(1, args.max_steps // 10), save_strategy="no", report_to=[], use_cpu=True,
        seed=args.seed, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set, eval_dataset=eval_set)
    trainer.train()
    eval_loss = trainer.evaluate()["eval_loss"]
    print(f"eval loss {eval_loss:.4f}, perplexity {math.exp(eval_loss):.2f}")

    model.config.use_cache = True  # Trainer may have switched it off; decoding wants the recurrent cache
    model.generation_config.use_cache = True
    trainer.save_model(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)

    reloaded = AutoModelForCausalLM.from_pretrained(args.output_dir).eval()
    prompt = "The king"
    inputs = tokenizer(prompt, return_tensors="pt")
    sample = reloaded.generate(**inputs, max_new_tokens=40, do_sample=True, top_k=40, temperature=0.8,
                               pad_token_id=tokenizer.pad_token_id)
    print("sample:", tokenizer.decode(sample[0], skip_special_tokens=True))

    text_ids = torch.tensor([tokens[split: split + 2048]])
    stats = decay_statistics(reloaded, text_ids)
    print("per-layer decay λ over a 2048-token text (DESIGN §5):")
    print(format_statistics(stats))
    with open(Path(args.output_dir) / "decay_statistics.json", "w") as f:
        json.dump(stats, f, indent=2)
    print(f"saved to {args.output_dir} ({time.time() - started:.0f}s in all)")


if __name__ == "__main__":
    main()
