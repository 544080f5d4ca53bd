"""Text files -> Megatron indexed datasets (`<prefix>.bin` / `<prefix>.idx`), no downloads.

Tokenizers (both satisfy what GPTDataset reads from `config.tokenizer`: `eod`,
`vocab_size`, `pad`, `unique_identifiers`, plus `tokenize`/`detokenize`):
- `ByteTokenizer` (default): ids 0..255 are the UTF-8 bytes, 256 is EOD; vocab 257. It
  matches Megatron-LM's `--tokenizer-type NullTokenizer --vocab-size 256` (whose EOD is
  the id after the vocab), so data prepared here trains under pretrain_gpt.py as is.
- `BPETokenizer`: byte-level BPE trained locally on the corpus with the optional
  `tokenizers` package (`pip install regla-megatron[bpe]`); saved as `tokenizer.json`,
  which Megatron-LM reads with `--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR`.

Each input file becomes one document: its tokens followed by EOD. The dataset is written
with megatron-core's own `IndexedDatasetBuilder`; its token dtype is uint16 when the vocab
fits (as Megatron's preprocess_data.py does).
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

EXCLUDED_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}


class ByteTokenizer:
    """UTF-8 bytes as tokens. ids: int 0..255 bytes, 256 = EOD (also used as pad)."""

    kind = "byte"

    def __init__(self):
        self.eod = 256
        self.vocab_size = 257

    @property
    def pad(self) -> int:
        return self.eod

    @property
    def unique_identifiers(self) -> dict:
        # GPTDataset hashes this into its index-cache names.
        return {"class": type(self).__name__, "vocab_size": self.vocab_size}

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def to_json(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eod": self.eod}


class BPETokenizer:
    """A byte-level BPE from the `tokenizers` package; EOD is the special token `<|endoftext|>`."""

    kind = "bpe"
    EOD_TOKEN = "<|endoftext|>"

    def __init__(self, hf_tokenizer):
        self._tok = hf_tokenizer
        self.eod = hf_tokenizer.token_to_id(self.EOD_TOKEN)
        self.vocab_size = hf_tokenizer.get_vocab_size()

    @property
    def pad(self) -> int:
        return self.eod

    @property
    def unique_identifiers(self) -> dict:
        return {"class": type(self).__name__, "vocab_size": self.vocab_size,
                "vocab_sha1": hashlib.sha1(self._tok.to_str().encode()).hexdigest()}

    @classmethod
    def train(cls, files: Sequence[Path], vocab_size: int) -> "BPETokenizer":
        tokenizers = _import_tokenizers()
        tok = tokenizers.Tokenizer(tokenizers.models.BPE())
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[cls.EOD_TOKEN], show_progress=False,
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
        tok.train([str(f) for f in files], trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: Path) -> "BPETokenizer":
        return cls(_import_tokenizers().Tokenizer.from_file(str(path)))

    def save(self, path: Path) -> None:
        """Writes `tokenizer.json` plus the `tokenizer_config.json` that lets transformers'
        AutoTokenizer (Megatron-LM's HuggingFaceTokenizer) load the folder offline."""
        self._tok.save(str(path))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.EOD_TOKEN,
                  "bos_token": self.EOD_TOKEN, "unk_token": self.EOD_TOKEN}
        (Path(path).parent / "tokenizer_config.json").write_text(json.dumps(config, indent=1))

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def to_json(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eod": self.eod,
                "file": "tokenizer.json"}


def _import_tokenizers():
    try:
        import tokenizers
        import tokenizers.decoders, tokenizers.models, tokenizers.pre_tokenizers, tokenizers.trainers  # noqa: E401,F401
    except ImportError as err:
        raise RuntimeError("the BPE tokenizer needs the optional 'tokenizers' package: "
                           "pip install 'regla-megatron[bpe]' (or use --tokenizer byte)") from err
    return tokenizers


def stdlib_sources() -> list[Path]:
    """The running interpreter's standard-library `.py` files (tests and site-packages left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in root.rglob("*.py")
             if not EXCLUDED_STDLIB_DIRS.intersection(f.relative_to(root).parts[:-1])]
    if not files:
        raise RuntimeError(f"no Python sources under {root}: name text files to use instead")
    return sorted(files)


@dataclass
class PreparedData:
    """Where `prepare_data` wrote a dataset, and its size."""

    prefix: Path  # Megatron's data path: <prefix>.bin / <prefix>.idx
    tokenizer: object
    num_documents: int
    num_tokens: int


def load_tokenizer(out_dir: Path):
    """The tokenizer saved next to a prepared dataset (`tokenizer_meta.json`)."""
    meta = json.loads((Path(out_dir) / "tokenizer_meta.json").read_text())
    if meta["kind"] == "byte":
        return ByteTokenizer()
    return BPETokenizer.load(Path(out_dir) / meta["file"])


def prepare_data(out_dir: str | Path, files: Optional[Sequence[str | Path]] = None,
                 tokenizer: str = "byte", vocab_size: int = 4096,
                 max_bytes: Optional[int] = None, name: str = "corpus") -> PreparedData:
    """Tokenizes text files into `<out_dir>/<name>.bin/.idx` with megatron-core's builder.

    Args:
        out_dir: output folder (created).
        files: text files or folders (folders: their `*.py`, `*.txt`, `*.md` files, recursively);
            None means the running Python's standard library sources.
        tokenizer: 'byte' (vocab 257) or 'bpe' (trained here, `vocab_size` entries).
        max_bytes: stop after this many input bytes (whole files), None for all.
    Returns:
        PreparedData with the dataset prefix, the tokenizer, document and token counts.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    paths = _expand(files) if files else stdlib_sources()
    paths = _cap(paths, max_bytes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer == "byte":
        tok = ByteTokenizer()
    elif tokenizer == "bpe":
        tok = BPETokenizer.train(paths, vocab_size)
        tok.save(out / "tokenizer.json")
    else:
        raise ValueError(f"unknown tokenizer {tokenizer!r}: use 'byte' or 'bpe'")
    (out / "tokenizer_meta.json").write_text(json.dumps(tok.to_json()))

    prefix = out / name
    dtype = np.uint16 if tok.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    num_docs = num_tokens = 0
    for path in paths:
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        ids = tok.tokenize(text) + [tok.eod]
        builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
        num_docs += 1
        num_tokens += len(ids)
    builder.finalize(f"{prefix}.idx")
    return PreparedData(prefix, tok, num_docs, num_tokens)


def _expand(files: Sequence[str | Path]) -> list[Path]:
    paths = []
    for f in map(Path, files):
        if f.is_dir():
            paths += sorted(p for p in f.rglob("*") if p.suffix in (".py", ".txt", ".md") and p.is_file())
        elif f.is_file():
            paths.append(f)
        else:
            raise FileNotFoundError(f"{f}: no such file or directory")
    if not paths:
        raise ValueError(f"no text files found in {', '.join(map(str, files))}")
    return paths


def _cap(paths: list[Path], max_bytes: Optional[int]) -> list[Path]:
    if max_bytes is None:
        return paths
    kept, total = [], 0
    for p in paths:
        if total >= max_bytes:
            break
        kept.append(p)
        total += p.stat().st_size
    return kept
