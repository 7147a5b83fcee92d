"""The model card README.md that save_pretrained writes (linear_decay.model_card, model_cards/template.md)."""

import json

import pytest
import torch
from huggingface_hub import ModelCard

from conftest import tiny_config
from linear_decay import LinearDecayForCausalLM
from linear_decay.decay import DECAY_REGISTRY
from linear_decay.model_card import GENERATED_MARKER, LM_EVAL_FILE, TRAINING_FILE, count_parameters, write_model_card

DESIGNS = [
    dict(decay_type="mamba2"),
    dict(decay_type="gla", decay_granularity="scalar", position_encoding="rope"),
    dict(decay_type="hgrn2", share_decay=True),
    dict(decay_type="tnl_l", position_encoding="tpe"),
    dict(decay_type="simple", simple_decay_init=0.9, position_encoding="lrpe"),
]


def saved(tmp_path, **overrides):
    model = LinearDecayForCausalLM(tiny_config(**overrides))
    model.save_pretrained(tmp_path)
    return model, ModelCard.load(tmp_path / "README.md")


@pytest.mark.parametrize("design", DESIGNS, ids=lambda d: "-".join(map(str, d.values())))
def test_card_metadata_and_body_describe_the_design(tmp_path, design):
    model, card = saved(tmp_path, **design)
    config = model.config
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.license == "apache-2.0"
    expected_tags = {"linear-decay", "linear-attention", f"decay-{config.decay_type.replace('_', '-')}",
                     f"{config.decay_granularity}-decay", f"position-{config.position_encoding}",
                     "shared-decay" if config.share_decay else "separate-decay"}
    assert expected_tags <= set(card.data.tags)
    formula = DECAY_REGISTRY[config.decay_type].module.__doc__.strip().splitlines()[0]
    assert f"| `decay_type` | `{config.decay_type}` | {formula} |" in card.text
    assert f"| `decay_granularity` | `{config.decay_granularity}` |" in card.text
    assert f"| `position_encoding` | `{config.position_encoding}` |" in card.text
    assert f"{model.num_parameters() / 1e6:.2f}M" in card.text
    assert "trust_remote_code=True" in card.text and "arXiv 2509.05282" in card.text
    assert card.content.rstrip().endswith(GENERATED_MARKER)


@pytest.mark.parametrize("tie", [False, True])
def test_parameter_count_is_read_from_the_weights(tmp_path, tie):
    model = LinearDecayForCausalLM(tiny_config(tie_word_embeddings=tie))
    model.save_pretrained(tmp_path)
    unique = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert count_parameters(tmp_path) == unique


def test_training_record_and_eval_results_enter_the_card(tmp_path):
    model = LinearDecayForCausalLM(tiny_config())
    model.save_pretrained(tmp_path)
    (tmp_path / TRAINING_FILE).write_text(json.dumps({
        "base_model": "some-org/base-model", "datasets": ["HuggingFaceFW/fineweb-edu", "./local/file.txt"],
        "data_files": ["a.txt"], "steps": 20000, "train_tokens": 10_485_760_000, "learning_rate": 3e-3,
        "eval_loss": 2.5, "command": "python examples/run_clm.py --preset 160m"}))
    (tmp_path / LM_EVAL_FILE).write_text(json.dumps({  # lm-eval's `results`: metrics beside other task fields
        "shakespeare_cloze": {"name": "shakespeare_cloze", "alias": "shakespeare_cloze", "sample_len": 40,
                              "acc,none": 0.25, "acc_stderr,none": 0.04, "perplexity,none": 812.5,
                              "perplexity_stderr,none": "N/A"},
        "shakespeare_mc": {"sample_len": 12, "acc,none": 0.4, "acc_norm,none": float("nan")},
        "shakespeare_gen": {"alias": " - gen", "exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": 0.1,
                            "exact_match,flexible-extract": 0.75}}))
    write_model_card(tmp_path, repo_id="someone/tiny-mamba2")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "some-org/base-model"
    assert card.data.datasets == ["HuggingFaceFW/fineweb-edu"]  # local paths are not Hub datasets
    results = {(r.dataset_type, r.metric_name): r.metric_value for r in card.data.eval_results}
    assert results == {("shakespeare_cloze", "acc"): 0.25, ("shakespeare_cloze", "perplexity"): 812.5,
                       ("shakespeare_mc", "acc"): 0.4, ("shakespeare_gen", "exact_match (strict-match)"): 0.5,
                       ("shakespeare_gen", "exact_match (flexible-extract)"): 0.75}
    assert {r.metric_type for r in card.data.eval_results} == {"acc", "perplexity", "exact_match"}
    assert "sample_len" not in card.text and "alias" not in card.text and "_stderr" not in card.text
    assert "- optimizer steps: 20,000" in card.text and "- training tokens: 10,485,760,000" in card.text
    assert "| shakespeare_cloze | acc | 0.2500 | 0.0400 | 40 |" in card.text  # value, standard error, documents
    assert "| shakespeare_cloze | perplexity | 812.5000 | — | 40 |" in card.text
    assert "| shakespeare_gen | exact_match (strict-match) | 0.5000 | 0.1000 | — |" in card.text
    assert 'from_pretrained("someone/tiny-mamba2"' in card.text and card.data.model_name == "tiny-mamba2"


def test_base_model_comes_from_a_hub_name_not_from_a_local_path(tmp_path):
    model = LinearDecayForCausalLM(tiny_config())
    model.name_or_path = "org/pretrained-base"  # what from_pretrained("org/pretrained-base") sets
    model.save_pretrained(tmp_path / "a")
    assert ModelCard.load(tmp_path / "a" / "README.md").data.base_model == "org/pretrained-base"
    model.name_or_path = str(tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    assert ModelCard.load(tmp_path / "b" / "README.md").data.base_model is None


def test_a_hand_written_readme_is_never_overwritten(tmp_path):
    model = LinearDecayForCausalLM(tiny_config())
    (tmp_path / "README.md").write_text("# my own card\n")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "# my own card\n"
    assert write_model_card(tmp_path) is None
    assert write_model_card(tmp_path, overwrite=True) is not None
    assert GENERATED_MARKER in (tmp_path / "README.md").read_text()


def test_a_generated_card_is_refreshed_on_the_next_save(tmp_path):
    LinearDecayForCausalLM(tiny_config(decay_type="gla")).save_pretrained(tmp_path)
    LinearDecayForCausalLM(tiny_config(decay_type="hgrn2")).save_pretrained(tmp_path)
    assert "decay-hgrn2" in ModelCard.load(tmp_path / "README.md").data.tags


def trainer_run(tmp_path, logging_steps, steps=3):
    """A real Trainer run on a tiny model, saved as examples/run_clm.py saves one: model, metrics, state, and a
    training record whose final_train_loss comes from the log lines (None when none was logged)."""
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = LinearDecayForCausalLM(tiny_config())
    ids = torch.randint(0, 64, (2 * steps, 16), generator=torch.Generator().manual_seed(1))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2,
                             logging_steps=logging_steps, learning_rate=1e-2, save_strategy="no", report_to=[],
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids])
    result = trainer.train()
    trainer.save_model()
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    (tmp_path / TRAINING_FILE).write_text(json.dumps({"steps": steps, "final_train_loss": logged[-1] if logged
                                                      else None}))
    write_model_card(tmp_path)
    return result, logged, ModelCard.load(tmp_path / "README.md").text


def test_final_training_loss_when_logging_steps_exceed_the_steps(tmp_path):
    """No loss line was logged: the card gives the Trainer's loss of the run (its mean over all steps), saying so."""
    result, logged, text = trainer_run(tmp_path, logging_steps=50)
    assert not logged
    assert f"- final training loss: {result.training_loss:.4g} (mean over the training run" in text


def test_final_training_loss_is_the_last_logged_one(tmp_path):
    result, logged, text = trainer_run(tmp_path, logging_steps=1)
    assert len(logged) == 3 and abs(logged[-1] - result.training_loss) > 1e-3
    assert f"- final training loss: {logged[-1]:.4g}\n" in text


def test_final_training_loss_is_read_from_the_trainer_state_when_the_record_lacks_it(tmp_path):
    """A record written without the loss (or none at all) beside the Trainer's own files."""
    result, logged, _ = trainer_run(tmp_path, logging_steps=2)
    (tmp_path / TRAINING_FILE).write_text(json.dumps({"steps": 3}))
    write_model_card(tmp_path)
    assert f"- final training loss: {logged[-1]:.4g}\n" in ModelCard.load(tmp_path / "README.md").text
    (tmp_path / TRAINING_FILE).unlink()
    (tmp_path / "trainer_state.json").unlink()  # only train_results.json / all_results.json left
    write_model_card(tmp_path)
    text = ModelCard.load(tmp_path / "README.md").text
    assert f"- final training loss: {result.training_loss:.4g} (mean over the training run" in text
    assert "No training record" not in text
