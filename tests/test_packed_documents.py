"""Packed documents (transformers' DataCollatorWithFlattening convention: position_ids restart at 0 where a document
starts inside a row): every document must behave exactly as if it ran alone — logits and gradients against each
document run separately as its own batch of one (the independent reference), for every kind of decay, the
position-dependent LightNet decay, sharing and each position encoding; on the PyTorch path and on the Triton kernels
(interpreter on CPU)."""

import pytest
import torch

from conftest import perturbed_model, relative_error, tiny_config

COMBOS = [
    ("mamba2", "vector", False, "none"),
    ("gla", "scalar", False, "rope"),
    ("lightnet", "vector", False, "lrpe"),
    ("lightnet", "vector", True, "none"),
    ("lightnet", "scalar", False, "rope"),
    ("hgrn2", "vector", False, "none"),
    ("tnl", "scalar", False, "tpe"),
    ("simple", "vector", True, "rope"),
    ("none", "scalar", False, "none"),
]
ROWS = [[10, 19], [7, 5, 17]]  # document lengths per row: rows of 29 tokens


def packed_batch(seed):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (len(ROWS), sum(ROWS[0])), generator=generator)
    position_ids = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in ROWS])
    return ids, position_ids


def documents(ids):
    """(row, start, length) of every document."""
    out = []
    for r, row in enumerate(ROWS):
        start = 0
        for n in row:
            out.append((r, start, n))
            start += n
    return out


def logits_and_grads(model, runs):
    """Logits of every run, and the gradients of one random projection of all of them (so the backward of the packed
    path is compared too)."""
    model.zero_grad(set_to_none=True)
    logits = [model(use_cache=False, **run).logits for run in runs]
    generator = torch.Generator().manual_seed(0)
    projection = sum((l * torch.randn(l.shape, generator=generator)).sum() for l in logits)
    projection.backward()
    return logits, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# the interpreter is slow: on the kernels, three combinations cover vector, lightnet and static decay with TPE
CASES = [(combo, "torch") for combo in COMBOS] + [(combo, "triton") for combo in (COMBOS[0], COMBOS[2], COMBOS[6])]


@pytest.mark.parametrize("combo,backend_name", CASES, ids=lambda c: "-".join(map(str, c)) if isinstance(c, tuple) else c)
def test_packed_documents_equal_separate_runs(combo, backend_name, backend):
    if backend_name == "triton":
        pytest.importorskip("triton")
    backend(backend_name)
    decay_type, granularity, share, position = combo
    model = perturbed_model(tiny_config(decay_type=decay_type, decay_granularity=granularity, share_decay=share,
                                        position_encoding=position), seed=5)
    ids, position_ids = packed_batch(seed=6)
    # the reference: each document alone, as a batch of one (its positions start at 0)
    separate = [dict(input_ids=ids[r:r + 1, s:s + n]) for r, s, n in documents(ids)]
    packed_logits = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits
    expected_logits, expected_grads = logits_and_grads(model, separate)
    for (r, s, n), expected in zip(documents(ids), expected_logits):
        error = relative_error(packed_logits[r:r + 1, s:s + n], expected)
        assert error <= 1e-5, ((r, s, n), error)

    # gradients: the same projection, applied to the packed logits' slices
    model.zero_grad(set_to_none=True)
    packed_logits = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits
    generator = torch.Generator().manual_seed(0)
    projection = sum((packed_logits[r:r + 1, s:s + n] * torch.randn((1, n, 64), generator=generator)).sum()
                     for r, s, n in documents(ids))
    projection.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        assert relative_error(grads[name], grad) <= 1e-4, (name, relative_error(grads[name], grad))


def test_one_document_per_row_is_the_usual_path():
    """position_ids 0..T-1 in every row (what transformers passes by default) change nothing."""
    model = perturbed_model(tiny_config(decay_type="gla", position_encoding="rope"), seed=7).eval()
    ids, _ = packed_batch(seed=8)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, position_ids=positions, use_cache=False).logits,
                           model(input_ids=ids, use_cache=False).logits)


def test_packed_documents_refuse_a_cache_and_leave_padded_positions_alone():
    model = perturbed_model(tiny_config(decay_type="mamba2", position_encoding="rope"), seed=9).eval()
    ids, position_ids = packed_batch(seed=10)
    with pytest.raises(ValueError, match="packed documents"):
        model(input_ids=ids, position_ids=position_ids, use_cache=True)
    # eval mode without use_cache: packed documents run uncached (no error), same as use_cache=False
    with torch.no_grad():
        default = model(input_ids=ids, position_ids=position_ids)
        uncached = model(input_ids=ids, position_ids=position_ids, use_cache=False)
    assert default.past_key_values is None and torch.equal(default.logits, uncached.logits)
    # with a padding mask, repeated zeros in position_ids are left padding, not document starts
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        with_positions = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        without = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.allclose(with_positions, without, atol=1e-6)


@pytest.mark.parametrize("source", ["padding", "documents"])
def test_packing_is_read_to_the_host_once_per_forward(monkeypatch, source):
    """On the varlen (Triton) backend the packing plan of a padded batch is derived on the host, and the chunk layout
    of packed sequences on the device, once per forward and backward, not once per layer: the count of ops that read
    a device value to the host does not grow with the depth, and the layout is built once."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import linear_decay.ops_chunk as kernels

    monkeypatch.setenv("LINEAR_DECAY_BACKEND", "triton")
    layouts = []
    build = kernels._packed_chunk_layout
    monkeypatch.setattr(kernels, "_packed_chunk_layout",
                        lambda cu_seqlens, length: layouts.append(1) or build(cu_seqlens, length))

    class CountReads(TorchDispatchMode):
        reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name in ("aten::_local_scalar_dense", "aten::nonzero", "aten::item"):
                self.reads += 1
            return func(*args, **(kwargs or {}))

    ids, position_ids = packed_batch(seed=3)
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0  # 9 of 58 tokens: past PACK_MIN_PADDING
    inputs = dict(attention_mask=mask) if source == "padding" else dict(position_ids=position_ids)
    reads = []
    for layers in (1, 3):
        layouts.clear()
        model = perturbed_model(tiny_config(decay_type="gla", num_hidden_layers=layers))
        with CountReads() as counter:
            model(input_ids=ids, labels=ids, use_cache=False, **inputs).loss.backward()
        reads.append(counter.reads)
        assert len(layouts) == 1
    assert reads[0] == reads[1] > 0
