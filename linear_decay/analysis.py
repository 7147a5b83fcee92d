"""Decay analysis (DESIGN.md §5): per-layer statistics of λ = exp(log λ) over all real tokens × decay channels.

`decay_statistics(model, input_ids, attention_mask=None)` runs one forward pass and reads each layer's log λ at the
output of its decay unit (so HGRN2's lower bound and LightNet's position-dependent decay are included; static decays
count once per token and head). Padded positions are left out.

Command line — several checkpoints on one text, one figure of median λ per layer (the paper's figures):

    python -m linear_decay.analysis CHECKPOINT [CHECKPOINT ...] [--text FILE] [--tokens 2048] [--labels A,B]
                                    [--plot decay.png] [--json stats.json]

Without `--text` the text is the held-out tail of the bundled corpus (what the quickstart does not train on).
`--plot` needs matplotlib (`pip install matplotlib`).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from .decay_linear_decay import DecayParameterization

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
        unit.register_forward_hook(lambda module, args, output, i=i: captured.__setitem__(i, output[0]))
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


def plot_statistics(stats_by_model, path, title="Median decay per layer"):
    """One line per model: median λ against layer index, the 25th–75th percentile band shaded (DESIGN §5)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise SystemExit("linear_decay.analysis: error: --plot needs matplotlib (pip install matplotlib)") from error
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for label, stats in stats_by_model.items():
        layers = [row["layer"] for row in stats]
        line, = axes.plot(layers, [row["median"] for row in stats], marker="o", label=label)
        axes.fill_between(layers, [row["p25"] for row in stats], [row["p75"] for row in stats],
                          color=line.get_color(), alpha=0.15)
    axes.set_xlabel("layer")
    axes.set_ylabel("median λ (band: 25th–75th percentile)")
    axes.set_ylim(0.0, 1.02)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=150)
    plt.close(figure)


def held_out_text():
    """The last 1.5 % of the bundled corpus: inside the 2 % the quickstart does not train on."""
    corpus = Path(__file__).resolve().parent / "data" / "corpus.txt"
    text = corpus.read_text(encoding="utf-8")
    return text[int(len(text) * 0.985):]


def _load(checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer  # the package import registered the Auto classes

    path = Path(checkpoint)
    if path.exists() and not (path / "config.json").is_file():
        raise SystemExit(f"linear_decay.analysis: error: {checkpoint} has no config.json")
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    if getattr(model.config, "model_type", None) != "linear_decay":
        raise SystemExit(f"linear_decay.analysis: error: {checkpoint} is a {model.config.model_type!r} model, "
                         "not linear_decay")
    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    except (OSError, ValueError):
        tokenizer = AutoTokenizer.from_pretrained(Path(__file__).resolve().parent / "data" / "tokenizer")
    return model, tokenizer


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
    text = Path(args.text).read_text(encoding="utf-8") if args.text else held_out_text()

    results = {}
    for label, checkpoint in zip(labels, args.checkpoints):
        model, tokenizer = _load(checkpoint)
        input_ids = tokenizer(text, return_tensors="pt").input_ids[:, :args.tokens]
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


__all__ = ["decay_statistics", "format_statistics", "plot_statistics", "STATISTICS"]


if __name__ == "__main__":
    sys.exit(main())
