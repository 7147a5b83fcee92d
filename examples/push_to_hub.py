"""Share a trained checkpoint directory on the Hub: model, tokenizer, generation config, code and model card.

    python examples/push_to_hub.py outputs/tiny-gla your-name/tiny-gla [--private] [--revision main]

The card (README.md) is refreshed for the repo id (a hand-written README.md is uploaded unchanged), keeping the training record (`linear_decay_training.json`) and
eval results (`lm_eval_results.json`) of the directory; intermediate `checkpoint-*` folders, optimizer states and logs
stay local. The endpoint is the one huggingface_hub uses (`HF_ENDPOINT`), the token `--token` or your login.
"""

import argparse
import json
import os
import sys
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi

from linear_decay.model_card import is_generated, render_model_card_for_directory

SKIPPED = ("checkpoint-", "runs", ".git", "optimizer.pt", "scheduler.pt", "rng_state", "training_args.bin")
REQUIRED = ("config.json",)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a directory written by save_pretrained / run_clm.py")
    parser.add_argument("repo_id", help="namespace/name on the Hub")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", default=None, help="branch to push to")
    parser.add_argument("--commit_message", default="Upload linear-decay model")
    parser.add_argument("--token", default=None)
    return parser.parse_args(argv)


def files_to_upload(directory):
    directory = Path(directory)
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if path.is_file() and not any(part.startswith(SKIPPED) for part in relative.parts) and path.name != "README.md":
            yield relative.as_posix(), path


def check_checkpoint(name):
    directory = Path(name).expanduser()
    if not directory.is_dir():  # the source is always a local folder: never looked up on the Hub
        sys.exit(f"push_to_hub.py: error: no such folder: {name}")
    missing = [name for name in REQUIRED if not (directory / name).is_file()]
    if missing or not list(directory.glob("*.safetensors")):
        sys.exit(f"push_to_hub.py: error: {directory} is not a saved model (needs config.json and *.safetensors)")
    model_type = json.loads((directory / "config.json").read_text()).get("model_type")
    if model_type != "linear_decay":
        sys.exit(f"push_to_hub.py: error: {directory} holds a {model_type!r} model, not linear_decay")
    if not (directory / "tokenizer_config.json").is_file():
        print(f"warning: {directory} has no tokenizer; users will need to bring their own", file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    check_checkpoint(args.checkpoint)
    args.checkpoint = os.path.expanduser(args.checkpoint)
    api = HfApi(token=args.token)
    repo_id = api.create_repo(args.repo_id, private=args.private, exist_ok=True).repo_id
    readme = Path(args.checkpoint) / "README.md"
    card = (render_model_card_for_directory(args.checkpoint, repo_id=repo_id) if is_generated(readme)
            else readme.read_text(encoding="utf-8"))  # a hand-written card is uploaded as it is
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                  for name, path in files_to_upload(args.checkpoint)]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
    commit = api.create_commit(repo_id=repo_id, operations=operations, commit_message=args.commit_message,
                               revision=args.revision)
    print(f"pushed {len(operations)} files to {repo_id}: {commit.commit_url}")
    return commit


if __name__ == "__main__":
    main()
