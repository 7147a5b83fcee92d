"""Shared fixtures: a tiny config factory, a way to move weights away from their initialisation, and the start of
subprocess scripts that must not import the package."""

import os
import textwrap

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; it must be switched on before the first
# @triton.jit decorator runs, i.e. before linear_decay is imported (DESIGN §7).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import linear_decay  # noqa: E402  (registers the Auto classes)
from linear_decay import LinearDecayConfig, LinearDecayForCausalLM  # noqa: E402

TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=2, intermediate_size=64, decay_rank=8)


def tiny_config(**overrides):
    return LinearDecayConfig(**{**TINY, **overrides})


def combo_id(combo):
    """Readable test id of a (decay_type, granularity, share_decay, position_encoding) combination."""
    decay_type, granularity, share, position = combo
    return f"{decay_type}-{granularity}-{'shared' if share else 'own'}-{position}"


def perturbed_model(config, seed=0, scale=0.3):
    """A model whose weights are moved off their initialisation (zero-initialised projections become active), so
    that every parameter gets a non-trivial gradient and decays vary across tokens."""
    torch.manual_seed(seed)
    model = LinearDecayForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * scale * (param.std() if param.numel() > 1 else 1.0).clamp(min=0.05))
    return model


def assert_fused_kernel_matches_torch(monkeypatch, config, kernel_name, seed=5, calls_per_forward=None):
    """LINEAR_DECAY_BACKEND=triton sends the model's calls of `kernel_name` (a fused kernel the modeling module calls,
    e.g. "swiglu") through the kernel — counted: `calls_per_forward` times (default once per layer), none under
    "torch" — and gives the torch backend's logits and gradients. The recurrence under "triton" is pinned to the torch
    path so that only the fused pieces differ between the two runs."""
    import linear_decay.modeling_linear_decay as modeling
    from linear_decay.recurrence import BACKENDS, chunked_recurrence

    monkeypatch.setitem(BACKENDS, "triton", chunked_recurrence)
    kernel, calls = getattr(modeling, kernel_name), []
    monkeypatch.setattr(modeling, kernel_name, lambda *args: calls.append(1) or kernel(*args))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = perturbed_model(config).to(device)
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed)).to(device)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("LINEAR_DECAY_BACKEND", backend)
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        results[backend] = out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                  if p.grad is not None}
        expected_calls = config.num_hidden_layers if calls_per_forward is None else calls_per_forward
        assert len(calls) == (expected_calls if backend == "triton" else 0)
    (logits_torch, grads_torch), (logits_triton, grads_triton) = results["torch"], results["triton"]
    assert relative_error(logits_triton, logits_torch) <= 1e-5
    assert grads_triton.keys() == grads_torch.keys()
    bad = {n: relative_error(grads_triton[n], grads_torch[n]) for n in grads_torch}
    assert all(error <= 1e-4 for error in bad.values()), bad


# The start of a script run in a fresh interpreter (`python script.py REPO_ROOT ...`) that must not reach the package,
# only what transformers' remote-code loader copies: it drops the repository from sys.path and any editable-install
# finder, and exits with 3 if `linear_decay` is still importable. Imports os and sys for the rest of the script.
WITHOUT_PACKAGE = textwrap.dedent(
    """
    import importlib.util, os, sys

    repo_root = os.path.realpath(sys.argv[1])
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != repo_root]
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in repr(f) and "editable" not in
                        type(f).__module__]
    if importlib.util.find_spec("linear_decay") is not None:
        print("LINEAR_DECAY_IMPORTABLE", importlib.util.find_spec("linear_decay").origin)
        sys.exit(3)
    print("LINEAR_DECAY_NOT_IMPORTABLE")
    """
)


def relative_error(actual, expected):
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp(min=1e-12))


@pytest.fixture
def backend(monkeypatch):
    """Select the recurrence backend for the whole model: backend('naive') or backend('torch')."""

    def select(name):
        monkeypatch.setenv("LINEAR_DECAY_BACKEND", name)

    return select


@pytest.fixture(scope="session", autouse=True)
def single_thread():
    """Tiny models are dominated by per-op overhead: on a busy 2-core machine several intra-op threads make them an
    order of magnitude slower, so the suite runs on one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# A small model trained for a few steps on the bundled corpus, saved with the bundled tokenizer: what the ecosystem
# tests (lm-eval, hub round trip, examples) load. Trained once per session with a plain loop (deterministic).
TRAINED_CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_heads=2, intermediate_size=128, decay_rank=16)


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory):
    from transformers import AutoTokenizer

    from linear_decay.quickstart import TOKENIZER, load_bundled_tokens

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    tokens = torch.tensor(load_bundled_tokens(tokenizer)[: 64 * 8 * 128]).view(-1, 128)
    config = LinearDecayConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                               **TRAINED_CONFIG)
    torch.manual_seed(0)
    model = LinearDecayForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    for step in range(64):
        batch = tokens[step * 8: (step + 1) * 8]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    path = tmp_path_factory.mktemp("trained") / "checkpoint"
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
