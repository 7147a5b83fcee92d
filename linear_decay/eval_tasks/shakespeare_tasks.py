"""Dataset builders for the offline `shakespeare` lm-eval task pack (see README.md beside this file).

Every item comes from the held-out end of the bundled public-domain corpus (`linear_decay/data/corpus.txt`): the
last 2 % of its characters, starting at the first blank line after that point. The quickstart trains on the first
98 % of the corpus *tokens*, which ends before this point (1.5 M tokens; the held-out tail is The Winter's Tale from
Act III on), so no item was seen in training. The builders are pure functions of the corpus text: no randomness
outside a seeded `random.Random`, no hub access, no dependence on the working directory.

lm-eval calls the `*_dataset` functions through `custom_dataset: !function shakespeare_tasks.<name>` with the task's
metadata (and the model arguments) as keyword arguments, which are ignored. The `build_*` functions return plain lists
of dicts and need neither lm-eval nor `datasets`.
"""

import random
import re
from pathlib import Path

CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus.txt"
HELD_OUT_FRACTION = 0.02
SEED = 1234
NUM_ITEMS = {"next_line": 100, "cloze": 100, "continuation": 100}
NUM_CHOICES = 4
DOCUMENT_CHARS = 2000  # rolling-perplexity documents: consecutive paragraphs of at least this many characters
CONTEXT_LINES = 6  # at most this many lines (speaker heading included) before a next-line / continuation target
CLOZE_LINES = 10  # at most this many lines of a speech in a cloze passage
CLOZE_MIN_WORDS = 20

_HEADING = re.compile(r"^[A-Z][A-Z' ,&-]*\.$")  # speaker heading: "LEONTES.", "FIRST LORD.", "OLD SHEPHERD."
_LAST_WORD = re.compile(r" ([A-Za-z]+(?:'[A-Za-z]+)?)[^A-Za-z]*$")  # last word of a passage, after a space


def read_corpus(path=CORPUS):
    return Path(path).read_text(encoding="utf-8")


def held_out(corpus=None):
    """(offset, text): the held-out tail of the corpus and where it starts (a character offset into the corpus)."""
    corpus = read_corpus() if corpus is None else corpus
    start = corpus.index("\n\n", int(len(corpus) * (1 - HELD_OUT_FRACTION))) + 2
    return start, corpus[start:].rstrip("\n")


def _blocks(offset, text):
    """Paragraphs (runs of non-empty lines) as lists of (corpus offset, line)."""
    blocks, current = [], []
    for line in text.split("\n"):
        if line:
            current.append((offset, line))
        elif current:
            blocks.append(current)
            current = []
        offset += len(line) + 1
    if current:
        blocks.append(current)
    return blocks


def _speeches(offset, text):
    """Speeches: (heading, [(offset, line, clean)]) where `clean` marks a line of plain speech, i.e. not indented
    (a verse line shared with the previous speaker), outside any [stage direction] and containing letters."""
    speeches = []
    for block in _blocks(offset, text):
        heading = block[0][1]
        if len(block) < 2 or not _HEADING.match(heading) or heading.startswith(("ACT ", "SCENE ")):
            continue
        lines, depth = [], 0
        for line_offset, line in block[1:]:
            clean = depth == 0 and "[" not in line and "]" not in line and not line[0].isspace()
            clean = clean and any(c.isalpha() for c in line)
            depth = max(0, depth + line.count("[") - line.count("]"))
            lines.append((line_offset, line, clean))
        speeches.append((heading, lines))
    return speeches


def _context(heading, lines, end):
    """The text before line `end` of a speech: at most CONTEXT_LINES lines, the speaker heading first if it fits."""
    return "\n".join(([heading] + [line for _, line, _ in lines[:end]])[-CONTEXT_LINES:])


def _spread(candidates, count):
    """`count` candidates evenly spread over the whole list (all of them if there are fewer)."""
    if len(candidates) <= count:
        return list(candidates)
    return [candidates[(k * len(candidates)) // count] for k in range(count)]


def build_next_line(corpus=None, count=NUM_ITEMS["next_line"]):
    """Multiple choice: after a few lines of a speech, which of NUM_CHOICES lines comes next? The distractors are
    other held-out lines of plain speech of at least four words whose first letter has the target's case."""
    offset, text = held_out(corpus)
    speeches = _speeches(offset, text)
    pool = sorted({line for _, lines in speeches for _, line, clean in lines if clean and len(line.split()) >= 4})
    candidates = [(heading, lines, j) for heading, lines in speeches for j in range(2, len(lines))
                  if lines[j][2] and len(lines[j][1].split()) >= 4]
    rng = random.Random(SEED)
    items = []
    for index, (heading, lines, j) in enumerate(_spread(candidates, count)):
        target = lines[j][1]
        # same capitalisation of the first letter as the target, so that verse/prose alone does not give it away
        distractors = rng.sample([line for line in pool if line != target and line[0].isupper() == target[0].isupper()],
                                 NUM_CHOICES - 1)
        choices = [target] + distractors
        rng.shuffle(choices)
        items.append({"id": index, "offset": lines[j][0], "context": _context(heading, lines, j),
                      "choices": choices, "label": choices.index(target)})
    return items


def build_cloze(corpus=None, count=NUM_ITEMS["cloze"]):
    """Lambada-style cloze: a speech (its last CLOZE_LINES lines at most) without its last word; the target is that
    word, with its leading space. Only speeches that end in a line of plain speech, with a last word of at least three
    letters (apostrophes allowed inside) after a space and at least CLOZE_MIN_WORDS words before it."""
    offset, text = held_out(corpus)
    candidates = []
    for heading, lines in _speeches(offset, text):
        if not lines[-1][2]:
            continue
        passage = "\n".join(([heading] + [line for _, line, _ in lines])[-CLOZE_LINES:])
        match = _LAST_WORD.search(passage)
        if match is None or len(match.group(1).replace("'", "")) < 3:
            continue
        context = passage[: match.start()]
        if len(context.split()) - (1 if context.startswith(heading + "\n") else 0) < CLOZE_MIN_WORDS:
            continue
        word_offset = lines[-1][0] + len(lines[-1][1]) - (len(passage) - match.start(1))
        candidates.append({"offset": word_offset, "context": context, "target": " " + match.group(1)})
    return [{"id": index, **item} for index, item in enumerate(_spread(candidates, count))]


def build_perplexity(corpus=None, min_chars=DOCUMENT_CHARS):
    """Rolling perplexity: the whole held-out text cut at paragraph boundaries into documents of at least
    `min_chars` characters (a short remainder joins the last document)."""
    offset, text = held_out(corpus)
    documents, current, start = [], [], offset
    for block in _blocks(offset, text):
        if not current:
            start = block[0][0]
        current.append("\n".join(line for _, line in block))
        if sum(len(paragraph) + 2 for paragraph in current) - 2 >= min_chars:
            documents.append((start, "\n\n".join(current)))
            current = []
    if current:
        if documents and len("\n\n".join(current)) < min_chars // 2:
            documents[-1] = (documents[-1][0], documents[-1][1] + "\n\n" + "\n\n".join(current))
        else:
            documents.append((start, "\n\n".join(current)))
    return [{"id": index, "offset": start, "text": document} for index, (start, document) in enumerate(documents)]


def build_continuation(corpus=None, count=NUM_ITEMS["continuation"]):
    """Generation: a few lines of a speech and the first half of the next line (split at the middle word); the
    target is the rest of that line. Lines of plain speech with at least six words."""
    offset, text = held_out(corpus)
    candidates = []
    for heading, lines in _speeches(offset, text):
        for j in range(1, len(lines)):
            line_offset, line, clean = lines[j]
            words = line.split(" ")
            if not clean or len(line.split()) < 6:
                continue
            cut = len(words) // 2
            prompt, rest = " ".join(words[:cut]), " ".join(words[cut:])
            candidates.append({"offset": line_offset, "context": _context(heading, lines, j) + "\n" + prompt,
                               "target": rest.strip()})
    return [{"id": index, **item} for index, item in enumerate(_spread(candidates, count))]


def _as_dataset(items):
    from datasets import Dataset, DatasetDict

    return DatasetDict({"test": Dataset.from_list(items)})


def next_line_dataset(**kwargs):
    return _as_dataset(build_next_line())


def cloze_dataset(**kwargs):
    return _as_dataset(build_cloze())


def perplexity_dataset(**kwargs):
    return _as_dataset(build_perplexity())


def continuation_dataset(**kwargs):
    return _as_dataset(build_continuation())
