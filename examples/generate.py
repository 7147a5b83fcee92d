"""Generate text from a linear-decay checkpoint: batched prompts (left-padded), greedy, sampling or beam search.

    python examples/generate.py outputs/quickstart --prompt "The king" --prompt "To be, or not" --max_new_tokens 60
    python examples/generate.py user/model --trust_remote_code --prompts_file prompts.txt --do_sample --top_p 0.9
"""

import argparse
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from local_paths import missing_local_folder  # examples/local_paths.py

try:  # with the package installed the Auto classes know the model; without it use --trust_remote_code
    import linear_decay  # noqa: F401
except ImportError:
    pass



def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="local directory or Hub repo id")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts_file", help="one prompt per line")
    parser.add_argument("--max_new_tokens", type=int, default=50)
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy / beam search")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=50)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--repetition_penalty", type=float, default=1.0)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--num_return_sequences", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=8, help="prompts per generate() call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--trust_remote_code", action="store_true")
    return parser.parse_args(argv)


def read_prompts(args):
    prompts = list(args.prompt)
    if args.prompts_file:
        if not os.path.isfile(args.prompts_file):
            sys.exit(f"generate.py: error: --prompts_file {args.prompts_file}: no such file")
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    return prompts or ["The king"]


def load(args):
    if missing_local_folder(args.checkpoint):
        sys.exit(f"generate.py: error: no such folder: {args.checkpoint}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.checkpoint, trust_remote_code=args.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(args.checkpoint, trust_remote_code=args.trust_remote_code,
                                                     dtype=getattr(torch, args.dtype))
    except (OSError, ValueError) as error:
        sys.exit(f"generate.py: error: cannot load {args.checkpoint}: {error}")
    tokenizer.padding_side = "left"  # decoding continues from the last position of every row
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model.to(args.device).eval()


def generate(model, tokenizer, prompts, args):
    """Completions (prompt excluded) for `prompts`, `args.num_return_sequences` per prompt, in order."""
    completions = []
    for start in range(0, len(prompts), args.batch_size):
        batch = tokenizer(prompts[start: start + args.batch_size], return_tensors="pt", padding=True)
        batch = {k: v.to(args.device) for k, v in batch.items()}
        with torch.no_grad():
            output = model.generate(
                **batch, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                temperature=args.temperature if args.do_sample else None,
                top_k=args.top_k if args.do_sample else None, top_p=args.top_p if args.do_sample else None,
                repetition_penalty=args.repetition_penalty, num_beams=args.num_beams,
                num_return_sequences=args.num_return_sequences, pad_token_id=tokenizer.pad_token_id,
            )
        new_tokens = output[:, batch["input_ids"].shape[1]:]
        completions += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return completions


def main(argv=None):
    args = parse_args(argv)
    set_seed(args.seed)
    prompts = read_prompts(args)
    tokenizer, model = load(args)
    completions = generate(model, tokenizer, prompts, args)
    per_prompt = args.num_return_sequences
    for i, prompt in enumerate(prompts):
        for completion in completions[i * per_prompt: (i + 1) * per_prompt]:
            print(f"=== {prompt!r}\n{prompt}{completion}\n")
    return completions


if __name__ == "__main__":
    main()
