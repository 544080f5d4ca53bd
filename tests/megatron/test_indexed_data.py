"""`regla_megatron.indexed_data`: the `.idx` header and layout as megatron-core writes them,
Megatron's `--split` rounding, the `PREFIX.json` reader, and a module light to import."""

import json
import subprocess
import sys

import numpy as np
import pytest

from regla_megatron import indexed_data
from regla_megatron.indexed_data import (
    dataset_meta,
    parse_index_header,
    read_index_header,
    sequence_lengths,
    split_sizes,
    token_bytes,
)


def write_dataset(folder, documents, name="corpus"):
    """A byte-token dataset of `documents` documents (document i: 10 (i + 1) + 1 tokens) written
    by megatron-core's builder, uint16; returns its prefix (str)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(folder / name)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for i in range(documents):
        ids = np.array(list(b"some text ") * (i + 1) + [256], dtype=np.uint16)
        builder.add_document(ids, [len(ids)])
    builder.finalize(prefix + ".idx")
    return prefix


def test_index_header_matches_megatron(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = write_dataset(tmp_path, 7)
    header = read_index_header(prefix + ".idx")
    dataset = IndexedDataset(prefix)
    assert header.sequences == len(dataset) == 7
    assert header.documents == len(dataset.document_indices) - 1 == 7
    raw = open(prefix + ".idx", "rb").read()
    assert parse_index_header(raw) == header
    assert header.index_bytes == len(raw)
    lengths = sequence_lengths(raw, header)
    assert lengths.dtype == np.int32 and lengths.tolist() == dataset.sequence_lengths.tolist()
    assert token_bytes(header.dtype_code) == 2  # uint16
    assert int(lengths.sum()) * token_bytes(header.dtype_code) == (tmp_path / "corpus.bin").stat().st_size


def test_index_header_rejects_other_files(tmp_path):
    path = tmp_path / "x.idx"
    path.write_bytes(b"not an index file at all, no")
    with pytest.raises(ValueError, match="MMIDIDX"):
        read_index_header(path)
    path.write_bytes(indexed_data.INDEX_MAGIC + b"\x01\x00")
    with pytest.raises(ValueError, match="x.idx: truncated index header"):
        read_index_header(path)


@pytest.mark.parametrize("split", ["98,2,0", "969, 30, 1", "969,30,1", "1,1,1", "100,0,0", "0.9,0.1", "2,98", "8,2"])
def test_split_sizes_match_megatron(split):
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for n in (1, 2, 3, 5, 10, 24, 25, 26, 49, 50, 51, 199, 1000, 12345):
        expected = [None if m is None else int(round(m[1] * float(n))) - int(round(m[0] * float(n)))
                    for m in matrix]
        assert split_sizes(n, split) == expected, (n, split)


def test_split_sizes_of_small_datasets():
    assert split_sizes(5, "969,30,1") == [5, 0, 0]
    assert split_sizes(1000, "969,30,1") == [969, 30, 1]
    assert split_sizes(10, "8,2") == [8, 2, None]
    assert split_sizes(200, indexed_data.MEGATRON_DEFAULT_SPLIT) == [194, 6, 0]


def test_bad_splits_are_rejected():
    with pytest.raises(ValueError, match="give up to 3 non-negative weights"):
        split_sizes(10, "1,1,1,1")
    with pytest.raises(ValueError, match="the weights must not all be zero"):
        split_sizes(10, "0,0,0")


def test_dataset_meta_reads_the_prefix_json(tmp_path):
    prefix = str(tmp_path / "corpus")
    assert dataset_meta(prefix) is None
    meta = {"tokenizer": "byte", "vocab_size": 257, "eod": 256, "documents": 1, "tokens": 2, "sources": []}
    (tmp_path / "corpus.json").write_text(json.dumps(meta))
    assert dataset_meta(prefix) == dataset_meta(tmp_path / "corpus") == meta
    assert sorted(meta) == sorted(indexed_data.JSON_KEYS)
    (tmp_path / "corpus.json").write_text("{not json")
    with pytest.raises(ValueError):
        dataset_meta(prefix)


def test_import_loads_neither_torch_nor_megatron():
    code = ("import sys, regla_megatron.indexed_data; "
            "loaded = [m for m in ('torch', 'megatron', 'triton') if m in sys.modules]; "
            "assert not loaded, loaded")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
