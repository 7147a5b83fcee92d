"""The experiment-grid sweep (linear_decay/sweep.py, DESIGN §6): outputs with sane numbers checked against
independent computations, resuming skips finished runs, bad grid entries are reported, the named grids."""

import csv
import json
import math

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer

from linear_decay.quickstart import CORPUS, TOKENIZER
from linear_decay.sweep import GRIDS, build_config, load_grid, main

SMALL_RUN = ["--size", "tiny", "--steps", "3", "--batch_size", "2", "--seq_len", "32", "--eval_examples", "2",
             "--seeds", "0"]
GRID = [
    {"name": "gla-scalar", "overrides": {"decay_type": "gla", "decay_granularity": "scalar"}},
    {"name": "typo", "overrides": {"decay_tpye": "gla"}},
    {"name": "simple-p0.9", "overrides": {"decay_type": "simple", "simple_decay_init": 0.9}},
    {"name": "tnl-shared", "overrides": {"decay_type": "tnl", "share_decay": True}},
]


def held_out_blocks(seq_len, count):
    """The documented held-out split, recomputed: the last 2 % of the corpus's characters, from a line start."""
    text = CORPUS.read_text(encoding="utf-8")
    cut = text.rindex("\n", 0, int(len(text) * 0.98)) + 1
    ids = AutoTokenizer.from_pretrained(TOKENIZER)(text[cut:], add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[: seq_len * count]).view(count, seq_len)


def test_sweep_writes_results_and_a_second_run_skips_everything(tmp_path, capsys):
    grid_file = tmp_path / "grid.json"
    grid_file.write_text(json.dumps(GRID))
    out = tmp_path / "sweep"
    assert main(["--grid", str(grid_file), "--output_dir", str(out), *SMALL_RUN]) == 0
    printed = capsys.readouterr().out
    assert "invalid: typo: LinearDecayConfig has no field 'decay_tpye'; did you mean decay_type" in printed
    assert "invalid: tnl-shared:" in printed and "share_decay" in printed
    assert printed.count(": start (") == 2 and printed.count(": done in ") == 2 and "ETA" in printed

    expected_median = {"gla-scalar": 0.5, "simple-p0.9": 0.9}  # λ at init: sigmoid(0) and p (DESIGN §2)
    results = {}
    for name, median in expected_median.items():
        run = out / f"{name}-seed0"
        assert (run / "model.safetensors").is_file() and (run / "config.json").is_file()
        result = json.loads((run / "result.json").read_text())
        results[name] = result
        assert result["steps"] == 3 and result["train_tokens"] == 3 * 2 * 32
        assert abs(result["final_train_loss"] - math.log(8192)) < 1.0  # three steps barely move a uniform model
        assert result["eval_perplexity"] == pytest.approx(math.exp(result["eval_loss"]))
        assert result["eval_accuracy"] is None and result["tokens_per_second"] > 0
        assert len(result["median_decay_per_layer"]) == 4  # tiny preset: 4 layers
        assert all(abs(m - median) < 0.02 for m in result["median_decay_per_layer"]), result["median_decay_per_layer"]

        card = ModelCard.load(run / "README.md").text  # the checkpoint's card tells how it was trained
        assert "No training record" not in card
        assert f"- final training loss: {result['final_train_loss']:.4g}\n" in card
        assert f"- eval perplexity: {result['eval_perplexity']:.4g}\n" in card
        assert "- optimizer steps: 3\n" in card and "- training tokens: 192\n" in card
        assert "bundled Shakespeare corpus" in card and "linear_decay.sweep" in card

        model = AutoModelForCausalLM.from_pretrained(run).eval()  # the saved model gives the recorded eval loss
        assert model.config.decay_type == result["overrides"]["decay_type"]
        blocks = held_out_blocks(32, 2)
        with torch.no_grad():
            eval_loss = model(input_ids=blocks, labels=blocks, use_cache=False).loss.item()
        assert eval_loss == pytest.approx(result["eval_loss"], rel=1e-4)

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["config"] for row in rows] == ["gla-scalar", "simple-p0.9"]
    for row in rows:
        result = results[row["config"]]
        assert float(row["eval_loss"]) == pytest.approx(result["eval_loss"])
        assert float(row["final_train_loss"]) == pytest.approx(result["final_train_loss"])
        assert [float(m) for m in row["median_decay_per_layer"].split(";")] == pytest.approx(
            result["median_decay_per_layer"], abs=1e-4)
    assert rows[0]["decay_granularity"] == "scalar" and rows[1]["decay_type"] == "simple"
    table = (out / "results.md").read_text()
    assert "| gla-scalar |" in table and "| simple-p0.9 |" in table
    assert "- typo: " in table and "- tnl-shared: " in table
    assert (out / "decay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    watched = [out / f"{name}-seed0" / file
               for name in expected_median for file in ("result.json", "model.safetensors")]
    mtimes = [path.stat().st_mtime_ns for path in watched]
    assert main(["--grid", str(grid_file), "--output_dir", str(out), *SMALL_RUN]) == 0
    printed = capsys.readouterr().out
    assert printed.count(": skip") == 2 and ": start (" not in printed and "warning" not in printed
    assert [path.stat().st_mtime_ns for path in watched] == mtimes
    with open(out / "results.csv", newline="") as f:
        assert [row["config"] for row in csv.DictReader(f)] == ["gla-scalar", "simple-p0.9"]

    # A finished run is kept even under another budget, but the sweep says that it differs.
    assert main(["--grid", str(grid_file), "--output_dir", str(out), *SMALL_RUN, "--steps", "5"]) == 0
    printed = capsys.readouterr().out
    assert printed.count(": skip") == 2 and printed.count("warning: its result.json was trained with steps=3") == 2


def test_mqar_sweep_reports_recall_accuracy(tmp_path, capsys):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text("- name: gla\n  overrides: {decay_type: gla}\n")
    out = tmp_path / "mqar"
    main(["--grid", str(grid_file), "--output_dir", str(out), "--data", "mqar", "--mqar_vocab_size", "64",
          "--mqar_num_pairs", "4", *SMALL_RUN])
    assert "accuracy" in capsys.readouterr().out
    result = json.loads((out / "gla-seed0" / "result.json").read_text())
    assert 0.0 <= result["eval_accuracy"] <= 1.0 and result["eval_perplexity"] is None
    card = ModelCard.load(out / "gla-seed0" / "README.md").text
    assert f"- eval accuracy: {result['eval_accuracy']:.4g}\n" in card and "eval perplexity" not in card
    assert "- training data: multi-query associative recall" in card
    assert result["model_config"]["vocab_size"] == 64
    assert abs(result["final_train_loss"] - math.log(64)) < 1.0
    with open(out / "results.csv", newline="") as f:
        assert float(next(csv.DictReader(f))["eval_accuracy"]) == pytest.approx(result["eval_accuracy"])
    assert "mqar data (vocabulary 64, 4 key-value pairs, 4 queries, power gaps)," in (out / "results.md").read_text()

    # Resumed with another task, the finished run is named as trained with the old one (pair counts mixed now).
    main(["--grid", str(grid_file), "--output_dir", str(out), "--data", "mqar", "--mqar_vocab_size", "64",
          "--mqar_num_pairs", "4", "--mqar_min_pairs", "2", *SMALL_RUN])
    assert "warning: its result.json was trained with mqar_min_pairs=None" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--grid", str(grid_file), "--output_dir", str(out), "--data", "mqar", "--mqar_num_pairs", "4",
              "--mqar_min_pairs", "5", *SMALL_RUN])


def test_mqar_queries_spread_over_the_sequence(tmp_path):
    """--mqar_query_gaps uniform: queries anywhere after the context, not mostly next to it (the held-out set the
    sweep scores on, read back from the run's record and regenerated here from the module's documented knobs)."""
    from linear_decay.mqar import IGNORE_INDEX, mqar_examples

    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text("- name: gla\n  overrides: {decay_type: gla}\n")
    out = tmp_path / "mqar"
    main(["--grid", str(grid_file), "--output_dir", str(out), "--data", "mqar", "--mqar_vocab_size", "64",
          "--mqar_num_pairs", "4", "--mqar_query_gaps", "uniform", *SMALL_RUN])
    record = json.loads((out / "gla-seed0" / "linear_decay_training.json").read_text())
    assert "(uniform gaps)" in record["data"]
    knobs = dict(vocab_size=64, num_pairs=4, num_queries=4, seq_len=128, seed=7)
    positions = {gap: (mqar_examples(400, **knobs, query_gap_power=power)[1] != IGNORE_INDEX).nonzero()[1]
                 for gap, power in (("uniform", None), ("power", 0.01))}
    assert positions["uniform"].mean() > positions["power"].mean() + 20  # later on average: spread, not clustered


def test_paired_comparisons_subtract_seed_by_seed(tmp_path):
    """Configurations one design field apart are compared seed by seed (B − A over the seeds both ran); pairs that
    differ in the decay or in two fields are not."""
    from linear_decay.sweep import paired_comparisons, write_summaries

    def run(name, seed, perplexity, decay="gla", granularity="vector", share=False, position="none"):
        config = dict(decay_type=decay, decay_granularity=granularity, share_decay=share, position_encoding=position,
                      simple_decay_init=0.99, hidden_size=64, num_hidden_layers=2, num_heads=2, vocab_size=64)
        return {"run": f"{name}-seed{seed}", "config": name, "seed": seed, "overrides": {}, "size": "tiny",
                "model_overrides": "", "data": "corpus", "steps": 1, "batch_size": 1, "seq_len": 8, "train_tokens": 8,
                "final_train_loss": 1.0, "eval_loss": math.log(perplexity), "eval_perplexity": perplexity,
                "eval_accuracy": None, "tokens_per_second": 1.0, "median_decay_per_layer": [0.5, 0.5],
                "model_config": config}

    results = [run("gla-vector", s, p) for s, p in ((0, 10.0), (1, 12.0), (2, 11.0))]
    results += [run("gla-scalar", s, p, granularity="scalar") for s, p in ((0, 13.0), (1, 12.5))]  # seed 2 missing
    results += [run("gla-shared", s, p, share=True) for s, p in ((0, 9.0), (1, 11.0), (2, 12.0))]
    results += [run("gla-scalar-rope", 0, 14.0, granularity="scalar", position="rope")]
    results += [run("hgrn2-vector", 0, 8.0, decay="hgrn2")]
    grouped = {}
    for result in results:
        grouped.setdefault(result["config"], []).append(result)
    rows = {(a, b): (field, d) for field, a, b, d in paired_comparisons(grouped, "eval_perplexity")}
    assert rows == {("gla-vector", "gla-scalar"): ("decay_granularity", [3.0, 0.5]),
                    ("gla-vector", "gla-shared"): ("share_decay", [-1.0, -1.0, 1.0]),
                    ("gla-scalar", "gla-scalar-rope"): ("position_encoding", [1.0])}
    write_summaries(results, [], tmp_path, "t")
    text = (tmp_path / "results.md").read_text()
    assert "| share_decay | gla-vector | gla-shared | 3 | -0.3333 ± 1.1547 | 2/3 |" in text
    assert "| decay_granularity | gla-vector | gla-scalar | 2 | 1.7500 ± 1.7678 | 0/2 |" in text


def test_median_decay_against_the_metric():
    """Configurations ordered by their mean median λ beside the metric, and Spearman's ρ of the two (hand-computed:
    ranks of λ 1, 2, 3, 4 against ranks of perplexity 2, 1, 3.5, 3.5 → ρ = 0.7379)."""
    from linear_decay.sweep import decay_relation, spearman

    def run(name, seed, perplexity, medians):
        return {"config": name, "seed": seed, "eval_perplexity": perplexity, "median_decay_per_layer": medians}

    grouped = {"c": [run("c", 0, 30.0, [0.9, 0.7]), run("c", 1, 30.0, [0.7, 0.9])],  # λ 0.8
               "a": [run("a", 0, 12.0, [0.1, 0.3])],  # λ 0.2
               "d": [run("d", 0, 30.0, [0.95, 0.95])],
               "b": [run("b", 0, 10.0, [0.5, 0.5]), run("b", 1, 10.0, [0.4, 0.6])]}
    rows, rho = decay_relation(grouped, "eval_perplexity")
    assert [name for name, _, _ in rows] == ["a", "b", "c", "d"]
    assert [round(decay, 6) for _, decay, _ in rows] == [0.2, 0.5, 0.8, 0.95]
    assert rho == pytest.approx(0.7378647873726218)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0) and spearman([1, 2], [2, 1]) is None


def test_grid_files_report_malformed_entries(tmp_path):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text("- name: ok\n  overrides: {decay_type: gla}\n"
                         "- overrides: {decay_type: gla}\n"
                         "- name: flat\n  overrides: [decay_type, gla]\n"
                         "- name: ok\n")
    entries = load_grid(str(grid_file))
    assert [entry.get("error") is None for entry in entries] == [True, False, False, False]
    assert "name" in entries[1]["error"] and "mapping" in entries[2]["error"] and "duplicate" in entries[3]["error"]
    not_a_list = tmp_path / "grid.json"
    not_a_list.write_text('{"name": "gla"}')
    with pytest.raises(SystemExit, match="expected a list"):
        main(["--grid", str(not_a_list), "--output_dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="neither a named grid"):
        main(["--grid", "T9", "--output_dir", str(tmp_path / "out")])


def test_named_grids_are_the_papers_and_all_valid():
    """DESIGN §6: T1 11 parameterizations, T2 4 × 2 sharing, T3 4 × 2 granularities + tnl, tnl_l, T4 6 × 4 positions
    (none, rope, lrpe, tpe)."""
    assert {name: len(entries) for name, entries in GRIDS.items()} == {"T1": 11, "T2": 8, "T3": 10, "T4": 24}
    for entries in GRIDS.values():
        assert len({entry["name"] for entry in entries}) == len(entries)
        for entry in entries:
            build_config("tiny", entry["overrides"], {"vocab_size": 8192})  # raises on an unsupported combination
    t1 = {e["overrides"]["decay_type"] for e in GRIDS["T1"]}
    assert t1 == {"mamba2", "mamba2_no_a", "mamba2_no_dt", "mamba2_no_a_no_dt", "gla", "hgrn2", "lightnet", "simple"}
    assert sorted(e["overrides"]["simple_decay_init"] for e in GRIDS["T1"] if "simple_decay_init" in e["overrides"]) \
        == [0.8, 0.9, 0.95, 0.99]
    assert sum(e["overrides"]["share_decay"] for e in GRIDS["T2"]) == 4
    assert all(e["overrides"]["decay_granularity"] == "scalar" for e in GRIDS["T4"])


def test_shards_split_the_plan_and_model_overrides_reach_every_run(tmp_path, capsys):
    grid_file = tmp_path / "grid.json"
    grid_file.write_text(json.dumps([GRID[0], GRID[2]]))
    out = tmp_path / "sharded"
    common = ["--grid", str(grid_file), "--output_dir", str(out), *SMALL_RUN, "--seeds", "0,1",
              "--model_overrides", "hidden_size=64, num_hidden_layers=2"]
    trained = []
    for shard in ("0/3", "1/3", "2/3"):
        assert main([*common, "--shard", shard]) == 0
        printed = capsys.readouterr().out
        trained.append(sorted(line.split("] ")[1].split(":")[0] for line in printed.splitlines() if ": start (" in line))
        assert not (out / "results.md").exists()  # shards leave the summaries to the last, unsharded run
        if shard == "0/3":  # a look at the sweep so far: summaries of the finished runs, nothing trained
            assert main([*common, "--summarize_only"]) == 0
            printed = capsys.readouterr().out
            assert "2 run(s) not finished: gla-scalar-seed1, simple-p0.9-seed0" in printed and "start" not in printed
            with open(out / "results.csv", newline="") as f:
                assert sorted(row["run"] for row in csv.DictReader(f)) == trained[0]
            (out / "results.md").unlink()
    # plan order: (gla-scalar, 0), (gla-scalar, 1), (simple-p0.9, 0), (simple-p0.9, 1) dealt round-robin
    assert trained == [["gla-scalar-seed0", "simple-p0.9-seed1"], ["gla-scalar-seed1"], ["simple-p0.9-seed0"]]
    assert main(common) == 0
    printed = capsys.readouterr().out
    assert printed.count(": skip") == 4 and ": start (" not in printed and "warning" not in printed
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((row["config"], row["seed"]) for row in rows) == [
        ("gla-scalar", "0"), ("gla-scalar", "1"), ("simple-p0.9", "0"), ("simple-p0.9", "1")]
    for run in trained[0]:
        config = json.loads((out / run / "config.json").read_text())
        assert (config["hidden_size"], config["num_hidden_layers"]) == (64, 2)
        assert len(json.loads((out / run / "result.json").read_text())["median_decay_per_layer"]) == 2
    assert "hidden_size=64" in (out / "results.md").read_text()
    with pytest.raises(SystemExit):
        main([*common, "--shard", "3/3"])
    with pytest.raises(SystemExit, match="FIELD=VALUE"):
        main([*common[:-1], "hidden_size"])


def test_processes_run_the_shards_and_summarise(tmp_path, capsys):
    grid_file = tmp_path / "grid.json"
    grid_file.write_text(json.dumps([GRID[0], GRID[2]]))
    out = tmp_path / "parallel"
    assert main(["--grid", str(grid_file), "--output_dir", str(out), *SMALL_RUN, "--processes", "2", "--cpu",
                 "--model_overrides", "hidden_size=32,num_heads=2,num_hidden_layers=1"]) == 0
    printed = capsys.readouterr().out
    for shard, run in ((0, "gla-scalar-seed0"), (1, "simple-p0.9-seed0")):
        assert f"[shard {shard}] [1/1] {run}: start (" in printed
        assert json.loads((out / run / "result.json").read_text())["steps"] == 3
    with open(out / "results.csv", newline="") as f:
        assert [row["run"] for row in csv.DictReader(f)] == ["gla-scalar-seed0", "simple-p0.9-seed0"]


def test_joined_grids_train_a_shared_configuration_once(tmp_path, capsys):
    """T1's gla (vector by default) is T3's gla-vector: `--grid T1,T3` plans it once."""
    out = tmp_path / "joined"
    assert main(["--grid", "T1,T3", "--output_dir", str(out), "--summarize_only", "--seeds", "0,1"]) == 0
    printed = capsys.readouterr().out
    for alias, name in (("mamba2-vector", "mamba2"), ("gla-vector", "gla"), ("hgrn2-vector", "hgrn2"),
                        ("lightnet-vector", "lightnet")):
        assert f"same configuration: {alias} = {name}" in printed
    assert "34 run(s) not finished" in printed  # (11 + 10 - 4) configurations x 2 seeds
    assert "lightnet-vector = lightnet" in (out / "results.md").read_text()


def test_time_budget_defers_runs_to_the_next_sweep(tmp_path, capsys):
    """With a budget shorter than one run, the first run trains and the others wait, reported by name; a later sweep
    into the same folder trains exactly those."""
    grid_file = tmp_path / "grid.json"
    grid_file.write_text(json.dumps([GRID[0], GRID[2]]))
    out = tmp_path / "budgeted"
    common = ["--grid", str(grid_file), "--output_dir", str(out), *SMALL_RUN, "--seeds", "0,1", "--cpu",
              "--model_overrides", "hidden_size=32,num_heads=2,num_hidden_layers=1"]
    assert main([*common, "--time_budget", "0.001"]) == 0
    printed = capsys.readouterr().out
    assert printed.count(": start (") == 1 and "[1/4] gla-scalar-seed0: start (" in printed
    assert ("--time_budget 0.001 s: 3 run(s) not started, left for a later sweep into "
            f"{out}: gla-scalar-seed1, simple-p0.9-seed0, simple-p0.9-seed1") in printed
    with open(out / "results.csv", newline="") as f:
        assert [row["run"] for row in csv.DictReader(f)] == ["gla-scalar-seed0"]
    assert main(common) == 0
    printed = capsys.readouterr().out
    assert printed.count(": skip") == 1 and printed.count(": start (") == 3 and "not started" not in printed
    with open(out / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 4
    with pytest.raises(SystemExit):
        main([*common, "--time_budget", "0"])
