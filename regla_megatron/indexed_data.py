"""The facts about a Megatron indexed dataset that the data checks read, each stated once.

A dataset is three files beside one prefix:
- `PREFIX.idx`, megatron-core's `MMIDIDX` index (`megatron.core.datasets.indexed_dataset`),
  little endian, no padding: the magic `INDEX_MAGIC` (9 bytes), version `<Q`, token dtype
  code `<B`, sequence count S `<Q`, document-boundary count D `<Q` (34 bytes in all,
  `INDEX_HEADER_BYTES`), then the sequence lengths int32[S], the sequence byte offsets
  int64[S] and the document boundaries int64[D] (D = documents + 1: a leading 0, then each
  document's end, in sequences);
- `PREFIX.bin`, the tokens of all sequences back to back in that dtype;
- `PREFIX.json`, written by `regla-megatron prepare-data` (keys `JSON_KEYS`): how to read
  the tokens (`dataset_meta`).

`--split` (`split_weights`, `split_sizes`) is Megatron's rule for cutting the sequences into
train/validation/test (`megatron.core.datasets.blended_megatron_dataset_config`).

Light on purpose: numpy and the standard library only at import; megatron-core is imported
inside `token_bytes` alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import struct
from typing import Optional

import numpy as np

INDEX_MAGIC = b"MMIDIDX\x00\x00"  # megatron.core.datasets.indexed_dataset's index header
INDEX_HEADER_FORMAT = "<QBQQ"  # version, dtype code, sequence count, document-boundary count
INDEX_HEADER_BYTES = len(INDEX_MAGIC) + struct.calcsize(INDEX_HEADER_FORMAT)
MEGATRON_DEFAULT_SPLIT = "969, 30, 1"  # what Megatron-LM's validate_args sets for --data-path without --split
SPLIT_NAMES = ("train", "validation", "test")  # the order of --split's weights
JSON_KEYS = ("tokenizer", "vocab_size", "eod", "documents", "tokens", "sources")  # PREFIX.json


@dataclasses.dataclass(frozen=True)
class IndexHeader:
    """The header of a `PREFIX.idx` (see the module docstring for the layout).

    `sequences` is what GPTDataset splits into train/validation/test; `boundaries` is the
    stored document-boundary count (documents + 1). `regla-megatron prepare-data` writes one
    sequence per document, so `sequences` and `documents` agree there.
    """

    version: int
    dtype_code: int
    sequences: int
    boundaries: int

    @property
    def documents(self) -> int:
        """The number of documents (one less than the stored boundaries, never below 0)."""
        return max(self.boundaries - 1, 0)

    @property
    def index_bytes(self) -> int:
        """The size a complete `.idx` with this header has at least: header, lengths, offsets, boundaries."""
        return INDEX_HEADER_BYTES + (4 + 8) * self.sequences + 8 * self.boundaries


def parse_index_header(data: bytes, path: str | os.PathLike = "<index>") -> IndexHeader:
    """The `IndexHeader` at the start of `data` (the bytes of a `.idx`, or at least its first 34).

    `path` only names the file in errors. Raises ValueError if `data` does not start with the
    `MMIDIDX` magic or is shorter than the header.
    """
    if data[: len(INDEX_MAGIC)] != INDEX_MAGIC:
        raise ValueError(f"{path}: not a Megatron indexed dataset index (no {INDEX_MAGIC!r} header)")
    if len(data) < INDEX_HEADER_BYTES:
        raise ValueError(f"{path}: truncated index header")
    version, dtype_code, sequences, boundaries = struct.unpack_from(INDEX_HEADER_FORMAT, data, len(INDEX_MAGIC))
    return IndexHeader(version, dtype_code, sequences, boundaries)


def read_index_header(path: str | os.PathLike) -> IndexHeader:
    """Reads the header of the `.idx` file at `path` (its first 34 bytes; `parse_index_header`).

    Raises ValueError if the file does not start with the `MMIDIDX` magic or is truncated.
    """
    with open(path, "rb") as stream:
        return parse_index_header(stream.read(INDEX_HEADER_BYTES), path)


def sequence_lengths(data: bytes, header: IndexHeader) -> np.ndarray:
    """The tokens per sequence, int32 [header.sequences], from the bytes of a whole `.idx`.

    `data` must hold at least the header and the lengths (check `header.index_bytes` first).
    """
    return np.frombuffer(data, dtype=np.int32, count=header.sequences, offset=INDEX_HEADER_BYTES)


def token_bytes(dtype_code: int) -> int:
    """Bytes per token in `PREFIX.bin` for the header's dtype code (megatron-core's `DType`)."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.size(dtype_code)


def dataset_fingerprint(index: bytes, bin_bytes: int) -> str:
    """A text that changes when the `.idx` (its bytes, `index`) or the `.bin` size (`bin_bytes`) changes."""
    return hashlib.sha1(index).hexdigest() + f":{bin_bytes}"


def dataset_meta(prefix: str | os.PathLike) -> Optional[dict]:
    """The `PREFIX.json` that `regla-megatron prepare-data` writes (tokenizer, vocab_size, eod,
    documents, tokens, sources), or None where there is none.

    Raises ValueError (json's, or a decoding error) when the file is not valid JSON.
    """
    path = os.fspath(prefix) + ".json"
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as stream:
        return json.loads(stream.read())


def split_weights(split: str) -> list[float]:
    """`--split` text ('98,2,0', '969, 30, 1', '8,2') -> the three normalized weights, float64,
    as Megatron parses it (missing weights are 0).

    Raises ValueError for more than three weights or weights that are all zero.
    """
    weights = [float(w) for w in re.findall(r"[.0-9]+", split)]
    if len(weights) > len(SPLIT_NAMES):
        raise ValueError(f"--split {split}: give up to 3 non-negative weights such as 969,30,1")
    weights += [0.0] * (len(SPLIT_NAMES) - len(weights))
    vector = np.array(weights, dtype=np.float64)
    total = np.sum(vector)
    if total <= 0:
        raise ValueError(f"--split {split!r}: the weights must not all be zero")
    return (vector / total).tolist()


def split_sizes(num_sequences: int, split: str) -> list[Optional[int]]:
    """How many sequences Megatron gives each of train/validation/test, as a list of 3
    (None: weight 0, the set is not built).

    Megatron turns the weights into cumulative bookends and rounds `bookend * count` to
    whole sequences (`BlendedMegatronDatasetBuilder`), so a small weight of a small dataset
    can round to nothing. Raises ValueError as `split_weights` does.
    """
    bounds = [0.0]
    for weight in split_weights(split):
        bounds.append(bounds[-1] + weight)
    count = float(num_sequences)
    return [None if hi <= lo else int(round(hi * count)) - int(round(lo * count))
            for lo, hi in zip(bounds[:-1], bounds[1:])]
