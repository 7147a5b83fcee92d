#!/usr/bin/env python
"""Train the project's bundled byte-level BPE tokenizer on the bundled corpus.

Reads ``linear_decay/data/corpus.txt`` and writes a ``transformers`` tokenizer
(``tokenizer.json`` + ``tokenizer_config.json``) to ``linear_decay/data/tokenizer/``.

* Byte-level BPE (GPT-2 style): ByteLevel pre-tokenizer (``add_prefix_space=False``),
  ByteLevel decoder and post-processor, full 256-byte initial alphabet, so every
  input string is encodable and ``decode(encode(x)) == x`` holds exactly.
* Vocabulary: 8192 ids in total, id 0 = ``<|endoftext|>`` (the only special token),
  used as bos / eos / pad / unk. Nothing is added automatically on encode (as GPT-2):
  the caller appends ``eos_token_id`` between documents.
* Deterministic: same corpus + same ``tokenizers`` version -> byte-identical files.
  The script checks this itself by training twice unless ``--no-check`` is given.

Usage (from the repository root)::

    python scripts/build_tokenizer.py [--corpus PATH] [--out DIR] [--no-check]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "linear_decay" / "data"
DEFAULT_CORPUS = DATA_DIR / "corpus.txt"
DEFAULT_OUT = DATA_DIR / "tokenizer"

VOCAB_SIZE = 8192
SPECIAL_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 2048
# The corpus separates works with two blank lines ("\n\n\n"); inside a work there is
# at most one blank line between paragraphs.
DOC_SEPARATOR = "\n\n\n"


def read_corpus(path: Path) -> str:
    with open(path, "r", encoding="utf-8", newline="") as f:
        return f.read()


def corpus_pieces(text: str) -> list[str]:
    """Split the corpus at work boundaries; the pieces concatenate back to ``text`` exactly."""
    parts = text.split(DOC_SEPARATOR)
    pieces = [p + DOC_SEPARATOR for p in parts[:-1]] + [parts[-1]]
    assert "".join(pieces) == text
    return [p for p in pieces if p]


def train_backend(text: str) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[SPECIAL_TOKEN],  # -> id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    pieces = corpus_pieces(text)
    tok.train_from_iterator(pieces, trainer=trainer, length=len(pieces))
    return tok


def wrap(tok: Tokenizer):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKEN,
        eos_token=SPECIAL_TOKEN,
        pad_token=SPECIAL_TOKEN,
        unk_token=SPECIAL_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )


def dir_digest(path: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.iterdir())
        if p.is_file()
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--no-check", action="store_true", help="skip the train-twice determinism check")
    args = ap.parse_args(argv)

    text = read_corpus(args.corpus)
    print(f"corpus: {args.corpus} ({len(text.encode('utf-8')):,} bytes, {len(text):,} chars)")

    t0 = time.perf_counter()
    backend = train_backend(text)
    train_s = time.perf_counter() - t0
    print(f"trained byte-level BPE: vocab={backend.get_vocab_size()} in {train_s:.2f}s")
    assert backend.get_vocab_size() == VOCAB_SIZE, backend.get_vocab_size()
    assert backend.token_to_id(SPECIAL_TOKEN) == 0

    if not args.no_check:
        again = train_backend(text)
        if again.to_str() != backend.to_str():
            print("ERROR: training is not deterministic", file=sys.stderr)
            return 1
        print("determinism check: second training run is identical")

    hf_tok = wrap(backend)
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (args.out / stale).exists():
            (args.out / stale).unlink()
    hf_tok.save_pretrained(str(args.out))
    # transformers 5 records its internal class name ("TokenizersBackend"); store the public
    # alias instead so the folder also loads with transformers 4.x (v5 maps it back).
    cfg_path = args.out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")

    # Sanity: exact round trip and token count on the whole corpus.
    ids = backend.encode(text).ids
    if backend.decode(ids, skip_special_tokens=False) != text:
        print("ERROR: corpus does not round-trip", file=sys.stderr)
        return 1
    print(f"corpus encodes to {len(ids):,} tokens ({len(text.encode('utf-8')) / len(ids):.2f} bytes/token)")
    for name, digest in dir_digest(args.out).items():
        size = os.path.getsize(args.out / name)
        print(f"wrote {args.out / name} ({size:,} bytes, sha256 {digest[:16]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
