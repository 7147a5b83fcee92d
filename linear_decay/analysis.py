"""Decay analysis (DESIGN.md §5): per-layer statistics of λ = exp(log λ) over all real tokens × decay channels.

`decay_statistics(model, input_ids, attention_mask=None)` runs one forward pass and reads each layer's log λ at the
output of its decay unit (so HGRN2's lower bound and LightNet's position-dependent decay are included; static decays
count once per token and head). Padded positions are left out.

Command line — several checkpoints on one text, one figure of median λ per layer (the paper's figures):

    python -m linear_decay.analysis CHECKPOINT [CHECKPOINT ...] [--text FILE] [--tokens 2048] [--labels A,B]
                                    [--plot decay.png] [--json stats.json]

Without `--text` the text is the held-out tail of the bundled corpus (what the quickstart does not train on).
`--plot` needs matplotlib (`pip install matplotlib`). A CHECKPOINT is a local folder or a Hub id `owner/name`; a local
path that does not exist (anything else that is not there, or `owner/name` where `owner` is a local folder) stops at
once with "no such folder" instead of being looked up on the Hub.
"""

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from .decay import DecayParameterization

STATISTICS = ("median", "p25", "p75", "mean", "min", "max")


def _summarise(values):
    quantiles = torch.quantile(values, torch.tensor([0.5, 0.25, 0.75], dtype=values.dtype))
    return dict(
        median=quantiles[0].item(), p25=quantiles[1].item(), p75=quantiles[2].item(),
        mean=values.mean().item(), min=values.min().item(), max=values.max().item(),
    )


@torch.no_grad()
def decay_statistics(model, input_ids, attention_mask=None):
    """Per-layer λ statistics: a list of dicts {layer, median, p25, p75, mean, min, max, count}."""
    backbone = getattr(model, "model", model)
    units = [layer.attn.decay for layer in backbone.layers]
    assert all(isinstance(unit, DecayParameterization) for unit in units)
    captured = {}
    hooks = [
        unit.register_forward_hook(lambda module, args, output, i=i: captured.__setitem__(i, output))
        for i, unit in enumerate(units)
    ]
    try:
        was_training = model.training
        model.eval()
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        model.train(was_training)
    finally:
        for hook in hooks:
            hook.remove()

    batch, length = input_ids.shape
    real = attention_mask.bool() if attention_mask is not None else torch.ones(batch, length, dtype=torch.bool)
    real = real.to(input_ids.device)
    stats = []
    for i in range(len(units)):
        log_decay = captured[i].float()
        if log_decay.dim() == 1:  # static per-head decay: the same λ at every token
            log_decay = log_decay.expand(batch, length, -1)
        values = log_decay[real].exp().flatten().cpu()  # [real tokens × channels]
        stats.append(dict(layer=i, count=values.numel(), **_summarise(values)))
    return stats


def format_statistics(stats):
    """A small text table of the per-layer statistics."""
    lines = ["layer  " + "  ".join(f"{name:>7}" for name in STATISTICS)]
    for row in stats:
        lines.append(f"{row['layer']:>5}  " + "  ".join(f"{row[name]:7.4f}" for name in STATISTICS))
    return "\n".join(lines)


def decay_figure(stats_by_model, title="Median decay per layer"):
    """The matplotlib figure of `plot_statistics` (the caller closes it): median λ against the layer index, whose axis
    is marked at whole layers only."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError as error:
        raise SystemExit("linear_decay.analysis: error: --plot needs matplotlib (pip install matplotlib)") from error
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for label, stats in stats_by_model.items():
        layers = [row["layer"] for row in stats]
        line, = axes.plot(layers, [row["median"] for row in stats], marker="o", label=label)
        axes.fill_between(layers, [row["p25"] for row in stats], [row["p75"] for row in stats],
                          color=line.get_color(), alpha=0.15)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers: no tick at 0.5, 1.5
    axes.set_xlabel("layer")
    axes.set_ylabel("median λ (band: 25th–75th percentile)")
    axes.set_ylim(0.0, 1.02)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    return figure


def plot_statistics(stats_by_model, path, title="Median decay per layer"):
    """One line per model: median λ against layer index, the 25th–75th percentile band shaded (DESIGN §5)."""
    import matplotlib.pyplot as plt

    figure = decay_figure(stats_by_model, title)
    try:
        figure.savefig(path, dpi=150)
    finally:
        plt.close(figure)


def held_out_text():
    """The last 1.5 % of the bundled corpus: inside the 2 % the quickstart does not train on."""
    corpus = Path(__file__).resolve().parent / "data" / "corpus.txt"
    text = corpus.read_text(encoding="utf-8")
    return text[int(len(text) * 0.985):]


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9_][\w.-]*")


def missing_folder(checkpoint):
    """Why `checkpoint` cannot be a model folder here ("no such folder: ...", "not a folder: ..."), or None: it is an
    existing folder, or a Hub id `owner/name` (whose `owner` is no local folder), which from_pretrained looks up.
    Anything else that does not exist is a mistyped local path, reported at once rather than tried on the Hub."""
    path = Path(checkpoint).expanduser()
    if path.exists():
        return None if path.is_dir() else f"not a folder: {checkpoint}"
    if HUB_ID.fullmatch(checkpoint) and ".." not in checkpoint and not Path(checkpoint.split("/")[0]).is_dir():
        return None
    return f"no such folder: {checkpoint}"


def _load(checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer  # the package import registered the Auto classes

    path = Path(checkpoint).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        raise SystemExit(f"linear_decay.analysis: error: {checkpoint} has no config.json")
    source = str(path) if path.exists() else checkpoint
    try:
        model = AutoModelForCausalLM.from_pretrained(source)
    except (OSError, ValueError) as error:  # not on the Hub / offline, not a linear_decay config, config ≠ weights
        message = " ".join(str(error).split())
        raise SystemExit(f"linear_decay.analysis: error: cannot load {checkpoint}: {message}") from None
    if getattr(model.config, "model_type", None) != "linear_decay":
        raise SystemExit(f"linear_decay.analysis: error: {checkpoint} is a {model.config.model_type!r} model, "
                         "not linear_decay")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        tokenizer = AutoTokenizer.from_pretrained(Path(__file__).resolve().parent / "data" / "tokenizer")
    return model, tokenizer


def first_tokens(tokenizer, text, count):
    """The first `count` tokens of `text`, [1, ≤ count]. Tokenized with truncation to `count`: the text may be far
    longer than the tokenizer's `model_max_length` (a recurrent model has no length limit, and only the first
    `count` tokens are run), which an untruncated call would warn about."""
    tokenizer.truncation_side = "right"
    return tokenizer(text, return_tensors="pt", truncation=True, max_length=count).input_ids


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m linear_decay.analysis",
                                     description="Per-layer decay statistics of one or more checkpoints (DESIGN §5).")
    parser.add_argument("checkpoints", nargs="+", help="folders written by save_pretrained (or hub ids)")
    parser.add_argument("--text", default=None, help="a UTF-8 text file (default: held-out bundled corpus)")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens of the text to run (default: %(default)s)")
    parser.add_argument("--labels", default=None, help="comma-separated names for the models (default: folder names)")
    parser.add_argument("--plot", default=None, help="write the median-vs-layer figure here (png, pdf, svg)")
    parser.add_argument("--json", default=None, help="write {label: per-layer statistics} here")
    args = parser.parse_args(argv)

    if args.text is not None and not Path(args.text).is_file():
        parser.error(f"--text {args.text}: no such file")
    labels = args.labels.split(",") if args.labels else [Path(c).name or c for c in args.checkpoints]
    if len(labels) != len(args.checkpoints):
        parser.error(f"--labels names {len(labels)} models, but {len(args.checkpoints)} checkpoints were given")
    if args.tokens < 1:
        parser.error("--tokens must be positive")
    for checkpoint in args.checkpoints:  # every mistyped path at once, before any model is loaded
        problem = missing_folder(checkpoint)
        if problem is not None:
            sys.exit(f"linear_decay.analysis: error: {problem}")
    text = Path(args.text).read_text(encoding="utf-8") if args.text else held_out_text()

    results = {}
    for label, checkpoint in zip(labels, args.checkpoints):
        model, tokenizer = _load(checkpoint)
        input_ids = first_tokens(tokenizer, text, args.tokens)
        if input_ids.numel() == 0:
            parser.error("the text gives no tokens")
        results[label] = decay_statistics(model, input_ids.to(model.device))
        print(f"{label} ({checkpoint}: {model.config.decay_type}, {model.config.decay_granularity}, "
              f"{input_ids.shape[1]} tokens)\n{format_statistics(results[label])}\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        print(f"statistics: {args.json}")
    if args.plot:
        plot_statistics(results, args.plot)
        print(f"figure: {args.plot}")
    return 0


__all__ = ["decay_statistics", "format_statistics", "plot_statistics", "decay_figure", "missing_folder", "STATISTICS"]


if __name__ == "__main__":
    sys.exit(main())
