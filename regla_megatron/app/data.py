"""Text files -> Megatron indexed datasets (`<prefix>.bin` / `<prefix>.idx`), no downloads.

`prepare_data` writes three files, each whole or not at all (written under temporary names,
then renamed): `<name>.bin` and `<name>.idx` with megatron-core's own `IndexedDatasetBuilder`
(token dtype uint16 when the vocab fits, as Megatron's preprocess_data.py does), and
`<name>.json`, which says how to read them:
`{"tokenizer": "byte"|"bpe", "vocab_size": V, "eod": id, "documents": N, "tokens": T,
"sources": [paths]}`. Tokenizers: see `regla_megatron.app.tokenizer`.

Documents: a file of at most `max_document_bytes` (default `MAX_DOCUMENT_BYTES`) UTF-8 bytes
is one document (its tokens, then EOD). A larger file, such as one big text, is cut at blank
lines into documents of consecutive paragraphs up to that size (a longer paragraph is cut at
line ends, a longer line at the size), so the train/valid/test split has documents to share.
A split that would leave one of its parts without documents is rejected here
(`check_split`): Megatron would otherwise loop forever building that part's index.
"""

from __future__ import annotations

import json
import os
import re
import sysconfig
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from regla_megatron.app.tokenizer import BPE_FILE, BPETokenizer, ByteTokenizer, load_tokenizer, make_tokenizer
from regla_megatron.indexed_data import (
    JSON_KEYS,
    MEGATRON_DEFAULT_SPLIT,
    dataset_fingerprint,
    dataset_meta,
    parse_index_header,
    sequence_lengths,
    split_sizes,
    token_bytes,
)

__all__ = ["BPETokenizer", "ByteTokenizer", "DatasetError", "PreparedData", "check_split", "demo_split",
           "expand_sources", "load_tokenizer", "open_dataset", "prepare_data", "split_documents", "stdlib_sources"]

EXCLUDED_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
TEXT_SUFFIXES = (".py", ".txt", ".md")
MAX_DOCUMENT_BYTES = 65536
MEGATRON_LM_SPLIT = MEGATRON_DEFAULT_SPLIT.replace(" ", "")  # "969,30,1", as the CLI default
PART_NAMES = ("train", "valid", "test")  # the demo's words, in messages, for the parts of a --split


class DatasetError(ValueError):
    """A dataset that cannot be used: missing, truncated, or too small for its split."""


def stdlib_sources() -> list[Path]:
    """The running interpreter's standard-library `.py` files (tests and site-packages left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in root.rglob("*.py")
             if not EXCLUDED_STDLIB_DIRS.intersection(f.relative_to(root).parts[:-1])]
    if not files:
        raise RuntimeError(f"no Python sources under {root}: name text files to use instead")
    return sorted(files)


def expand_sources(files: Optional[Sequence[str | Path]], max_bytes: Optional[int] = None) -> list[Path]:
    """The text files to read: files as given, folders as their `*.py/*.txt/*.md` (recursive, sorted).

    None means `stdlib_sources()`. With `max_bytes`, whole files are kept until their sizes
    reach it. Raises FileNotFoundError for a missing path, DatasetError when nothing is left.
    """
    if not files:
        paths = stdlib_sources()
    else:
        paths = []
        for f in map(Path, files):
            if f.is_dir():
                paths += sorted(p for p in f.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
            elif f.is_file():
                paths.append(f)
            else:
                raise FileNotFoundError(f"{f}: no such file or directory")
        if not paths:
            raise DatasetError(f"no text files ({', '.join(TEXT_SUFFIXES)}) in {', '.join(map(str, files))}")
    if max_bytes is not None:
        kept, total = [], 0
        for p in paths:
            if total >= max_bytes:
                break
            kept.append(p)
            total += p.stat().st_size
        paths = kept
    return [p.resolve() for p in paths]


def split_documents(text: str, max_document_bytes: int = MAX_DOCUMENT_BYTES) -> list[str]:
    """Cuts `text` into documents of at most `max_document_bytes` UTF-8 bytes.

    A text that fits is one document. Otherwise paragraphs (separated by blank lines) are
    grouped in order up to the size; a paragraph longer than the size is cut at line ends,
    a line longer than it at the size (on a character boundary). Joining the documents
    gives `text` back; documents of whitespace only are dropped.
    """
    if max_document_bytes <= 0:
        raise ValueError(f"max_document_bytes must be positive, got {max_document_bytes}")
    if len(text.encode("utf-8")) <= max_document_bytes:
        return [text] if text.strip() else []
    docs, current, size = [], [], 0
    for piece in _pieces(text, max_document_bytes):
        n = len(piece.encode("utf-8"))
        if current and size + n > max_document_bytes:
            docs.append("".join(current))
            current, size = [], 0
        current.append(piece)
        size += n
    if current:
        docs.append("".join(current))
    return [d for d in docs if d.strip()]


def _pieces(text: str, limit: int) -> Iterator[str]:
    """Paragraphs (each with the blank lines after it), cut further where longer than `limit`."""
    parts = re.split(r"(\n[ \t]*\n\s*)", text)
    for para, sep in zip(parts[::2], parts[1::2] + [""]):
        para += sep
        if len(para.encode("utf-8")) <= limit:
            yield para
            continue
        for line in para.splitlines(keepends=True):
            data = line.encode("utf-8")
            while len(data) > limit:
                cut = limit
                while cut > 0 and data[cut] & 0xC0 == 0x80:  # not inside a multi-byte character
                    cut -= 1
                if cut == 0:  # a limit smaller than one character: take the character whole
                    cut = 1
                    while cut < len(data) and data[cut] & 0xC0 == 0x80:
                        cut += 1
                yield data[:cut].decode("utf-8")
                data = data[cut:]
            yield data.decode("utf-8")


def demo_split(num_documents: int) -> str:
    """The demo's train/valid/test split: 98/2/0 by document, at least one valid document."""
    valid_pct = max(2.0, 100.0 / max(num_documents, 1))
    return f"{100 - valid_pct},{valid_pct},0"


def check_split(num_documents: int, split: Optional[str]) -> None:
    """Raises DatasetError when `split` leaves a part of non-zero weight without documents.

    `split` None is the demo's rule (`demo_split`), which needs 2 documents.
    """
    rule = (lambda n: split) if split else demo_split
    if split and split_sizes(1, split)[0] is None:
        raise DatasetError(f"the split {split} gives the train part no weight: use one such as 969,30,1")
    def empty_parts(n: int) -> list[str]:  # a train part of weight 0 counts as empty
        sizes = split_sizes(n, rule(n))
        return [name for i, (name, k) in enumerate(zip(PART_NAMES, sizes)) if k == 0 or (i == 0 and k is None)]

    empty = empty_parts(num_documents)
    if not empty:
        return
    need = next((n for n in range(1, 1_000_000) if not empty_parts(n)), None)
    alternative = f", or --split {num_documents - 1},1,0" if split and num_documents >= 2 else ""
    which = f"the split {split}" if split else "the demo's train/validation split"
    raise DatasetError(
        f"{num_documents} document(s) leave the {' and '.join(empty)} part{'s' * (len(empty) > 1)} of {which} empty "
        f"(it needs {need or 'more'} documents): give more text or a smaller --max-document-bytes{alternative}")


@dataclass
class PreparedData:
    """Where `prepare_data` wrote a dataset, and its size."""

    prefix: Path  # Megatron's data path: <prefix>.bin / <prefix>.idx / <prefix>.json
    tokenizer: object
    num_documents: int
    num_tokens: int


def dataset_files(out_dir: str | Path, name: str) -> list[Path]:
    """The files `prepare_data(out_dir, ..., name=name)` writes (with `tokenizer.json` for BPE)."""
    out = Path(out_dir)
    return [out / f"{name}{suffix}" for suffix in (".bin", ".idx", ".json")]


def check_name(name: str) -> str:
    """Returns `name` if it is a plain file name; raises ValueError for '../x', 'a/b', absolute paths."""
    if not name or name in (".", "..") or Path(name).name != name or "/" in name or "\\" in name:
        raise ValueError(f"--name {name!r} must be a plain file name that stays inside the output "
                         f"folder (such as 'corpus'), not a path")
    return name


def prepare_data(out_dir: str | Path, files: Optional[Sequence[str | Path]] = None,
                 tokenizer="byte", vocab_size: int = 4096, max_bytes: Optional[int] = None,
                 name: str = "corpus", *, max_document_bytes: int = MAX_DOCUMENT_BYTES,
                 split: Optional[str] = MEGATRON_LM_SPLIT, force: bool = False) -> PreparedData:
    """Tokenizes text files into `<out_dir>/<name>.bin/.idx/.json` with megatron-core's builder.

    Args:
        out_dir: output folder (created).
        files: text files or folders (see `expand_sources`); None: this Python's stdlib sources.
        tokenizer: 'byte' (vocab 257), 'bpe' (trained here, `vocab_size` entries, saved as
            `tokenizer.json`), or a tokenizer object to reuse.
        max_bytes: stop after this many input bytes (whole files), None for all.
        name: file name prefix (a plain name, see `check_name`).
        max_document_bytes: larger files are cut into documents (see `split_documents`).
        split: the train/valid/test split the data must support (`check_split`); None: the
            demo's (`demo_split`, at least 2 documents).
        force: replace existing output files; without it they are an error.
    Returns:
        PreparedData with the dataset prefix, the tokenizer, document and token counts.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    check_name(name)
    if split and split_sizes(1, split)[0] is None:  # a bad --split fails before any work
        check_split(1, split)
    if max_document_bytes <= 0:
        raise ValueError(f"--max-document-bytes must be positive, got {max_document_bytes}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file: name a folder for the dataset")
    targets = dataset_files(out, name)
    if tokenizer == "bpe":
        targets += [out / BPE_FILE, out / "tokenizer_config.json"]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not force:
        raise ValueError(f"{', '.join(existing)} already exist(s): pass --force to replace, or "
                         f"another output folder or --name")
    paths = expand_sources(files, max_bytes)
    tok = make_tokenizer(tokenizer, paths, vocab_size) if isinstance(tokenizer, str) else tokenizer

    texts = (split_documents(p.read_text(encoding="utf-8", errors="replace"), max_document_bytes)
             for p in paths)
    made_out = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tok.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    tag = uuid.uuid4().hex[:8]
    tmp = {p.suffix: p.with_name(f".{p.name}.tmp-{tag}") for p in dataset_files(out, name)}
    try:
        builder = IndexedDatasetBuilder(str(tmp[".bin"]), dtype=dtype)
        num_docs = num_tokens = 0
        for docs in texts:
            for doc in docs:
                ids = tok.tokenize(doc) + [tok.eod]
                builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
                num_docs += 1
                num_tokens += len(ids)
        builder.finalize(str(tmp[".idx"]))
        check_split(num_docs, split)
        meta = {"tokenizer": tok.kind, "vocab_size": tok.vocab_size, "eod": tok.eod,
                "documents": num_docs, "tokens": num_tokens, "sources": [str(p) for p in paths]}
        tmp[".json"].write_text(json.dumps(meta, indent=1) + "\n")
        if isinstance(tok, BPETokenizer):
            tok.save(out / BPE_FILE)
        for suffix in (".bin", ".idx", ".json"):  # the .json last: it marks the set complete
            os.replace(tmp[suffix], out / f"{name}{suffix}")
    finally:
        for p in tmp.values():
            p.unlink(missing_ok=True)
        if made_out and not any(out.iterdir()):
            out.rmdir()  # made above, and nothing came of it
    return PreparedData(out / name, tok, num_docs, num_tokens)


@dataclass
class DatasetInfo:
    """A checked dataset on disk: its prefix, `<prefix>.json` content, and the sizes its .idx gives."""

    prefix: Path
    meta: dict
    num_documents: int
    num_tokens: int
    fingerprint: str  # changes when the .idx or the .bin size changes


def open_dataset(prefix: str | Path) -> DatasetInfo:
    """Checks the dataset `<prefix>.bin/.idx/.json` before anything reads it.

    Raises DatasetError naming the file when one is missing, the .idx is not an indexed
    dataset index (or is cut short), the .bin holds fewer or more bytes than the .idx
    describes (a truncated or foreign .bin), or the .json disagrees with the .idx.
    """
    prefix = Path(prefix)
    idx, binf, js = (prefix.with_name(prefix.name + s) for s in (".idx", ".bin", ".json"))
    for f in (idx, binf, js):
        if not f.is_file():
            why = " (datasets need the .json that prepare-data writes)" if f == js else ""
            raise DatasetError(f"{f}: no such file{why}")
    raw = idx.read_bytes()
    try:
        header = parse_index_header(raw, idx)
    except ValueError:
        raise DatasetError(f"{idx} is not a Megatron indexed-dataset index: prepare the data again") from None
    sequences = header.sequences
    if len(raw) < header.index_bytes:
        raise DatasetError(f"{idx} is cut short ({len(raw)} bytes for {sequences} sequences): "
                           f"prepare the data again")
    tokens = int(sequence_lengths(raw, header).sum(dtype=np.int64))
    expected = tokens * token_bytes(header.dtype_code)
    actual = binf.stat().st_size
    if actual != expected:
        raise DatasetError(f"{binf} holds {actual:,} bytes but {idx.name} describes {tokens:,} tokens "
                           f"({expected:,} bytes): the .bin is truncated or belongs to another dataset; "
                           f"prepare the data again")
    try:
        meta = dataset_meta(prefix)
    except ValueError as err:
        raise DatasetError(f"{js} is not valid JSON ({err}): prepare the data again") from None
    missing = [k for k in JSON_KEYS if k not in meta]
    if missing:
        raise DatasetError(f"{js} lacks {', '.join(missing)}: prepare the data again")
    if (meta["documents"], meta["tokens"]) != (sequences, tokens):
        raise DatasetError(f"{js} says {meta['documents']} documents / {meta['tokens']:,} tokens but "
                           f"{idx.name} holds {sequences} / {tokens:,}: the files are from different "
                           f"preparations; prepare the data again")
    return DatasetInfo(prefix, meta, sequences, tokens, dataset_fingerprint(raw, actual))


def find_dataset(path: str | Path) -> Optional[Path]:
    """The dataset prefix that `path` names, or None when `path` holds text instead.

    `path` may be a prefix (`OUT/corpus`, with `OUT/corpus.idx` beside it) or a folder
    holding exactly one `<name>.idx` with its `<name>.json`. Raises DatasetError for a
    folder with several.
    """
    path = Path(path)
    if path.with_name(path.name + ".idx").is_file():
        return path
    if not path.is_dir():
        return None
    found = sorted(p.with_suffix("") for p in path.glob("*.idx") if p.with_suffix(".json").is_file())
    if len(found) > 1:
        raise DatasetError(f"{path} holds several datasets ({', '.join(p.name for p in found)}): "
                           f"name one as {found[0]}")
    return found[0] if found else None
