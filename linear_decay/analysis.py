"""Decay analysis (DESIGN.md §5): per-layer statistics of λ = exp(log λ) over all real tokens × decay channels.

`decay_statistics(model, input_ids, attention_mask=None)` runs one forward pass and reads each layer's log λ at the
output of its decay unit (so HGRN2's lower bound and LightNet's position-dependent decay are included; static decays
count once per token and head). Padded positions are left out.
"""

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


__all__ = ["decay_statistics", "format_statistics", "STATISTICS"]
