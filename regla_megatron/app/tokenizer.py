"""The two tokenizers of the data tools, and how a prepared dataset names its tokenizer.

Both satisfy what GPTDataset reads from `config.tokenizer` (`eod`, `vocab_size`, `pad`,
`unique_identifiers`) plus `tokenize`/`detokenize`:
- `ByteTokenizer` (default): ids 0..255 are the UTF-8 bytes, 256 is EOD, so an embedding
  needs at least 257 rows (`--vocab-size 257` with Megatron-LM's NullTokenizer).
- `BPETokenizer`: byte-level BPE trained locally on the corpus with the optional
  `tokenizers` package (`pip install regla-megatron[bpe]`); saved as `tokenizer.json`,
  which Megatron-LM reads with `--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Sequence

BPE_FILE = "tokenizer.json"


class TokenizerUnavailable(ValueError):
    """`--tokenizer bpe` without the optional `tokenizers` package."""


class ByteTokenizer:
    """UTF-8 bytes as tokens. ids: int 0..255 bytes, 256 = EOD (also used as pad)."""

    kind = "byte"

    def __init__(self):
        self.eod = 256
        self.vocab_size = 257

    @property
    def pad(self) -> int:
        """The padding id (EOD)."""
        return self.eod

    @property
    def unique_identifiers(self) -> dict:
        """What GPTDataset hashes into its index names."""
        return {"class": type(self).__name__, "vocab_size": self.vocab_size}

    def tokenize(self, text: str) -> list[int]:
        """str -> list of int ids in 0..255 (the UTF-8 bytes; no EOD appended)."""
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Iterable[int]) -> str:
        """int ids -> str (EOD and other ids >= 256 dropped, bad UTF-8 replaced)."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def identity(self) -> str:
        """A short string that two equal tokenizers share ('byte')."""
        return self.kind


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
        """The padding id (EOD)."""
        return self.eod

    @property
    def unique_identifiers(self) -> dict:
        """What GPTDataset hashes into its index names (the vocabulary's hash included)."""
        return {"class": type(self).__name__, "vocab_size": self.vocab_size, "vocab_sha1": self.identity()[4:]}

    @classmethod
    def train(cls, files: Sequence[Path], vocab_size: int) -> "BPETokenizer":
        """Trains a `vocab_size`-entry byte-level BPE on the text files `files`."""
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
        """Reads a `tokenizer.json` written by `save`."""
        return cls(_import_tokenizers().Tokenizer.from_file(str(path)))

    def save(self, path: Path) -> None:
        """Writes `tokenizer.json` plus the `tokenizer_config.json` that lets transformers'
        AutoTokenizer (Megatron-LM's HuggingFaceTokenizer) load the folder offline."""
        self._tok.save(str(path))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.EOD_TOKEN,
                  "bos_token": self.EOD_TOKEN, "unk_token": self.EOD_TOKEN}
        (Path(path).parent / "tokenizer_config.json").write_text(json.dumps(config, indent=1))

    def tokenize(self, text: str) -> list[int]:
        """str -> list of int ids (no EOD appended)."""
        return self._tok.encode(text).ids

    def detokenize(self, ids: Iterable[int]) -> str:
        """int ids -> str."""
        return self._tok.decode([int(i) for i in ids])

    def identity(self) -> str:
        """'bpe:<sha1 of the vocabulary and merges>': equal for the same trained tokenizer."""
        return "bpe:" + hashlib.sha1(self._tok.to_str().encode()).hexdigest()


def bpe_available() -> bool:
    """Whether the optional `tokenizers` package (needed by `--tokenizer bpe`) is installed."""
    import importlib.util

    return importlib.util.find_spec("tokenizers") is not None


def _import_tokenizers():
    try:
        import tokenizers
        import tokenizers.decoders  # noqa: E401,F401
        import tokenizers.models
        import tokenizers.pre_tokenizers
        import tokenizers.trainers
    except ImportError as err:
        raise TokenizerUnavailable("the BPE tokenizer needs the optional 'tokenizers' package: "
                           "pip install 'regla-megatron[bpe]' (or use --tokenizer byte)") from err
    return tokenizers


def make_tokenizer(kind: str, files: Sequence[Path], vocab_size: int):
    """A new tokenizer: 'byte', or 'bpe' trained on `files` with `vocab_size` entries."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.train(files, vocab_size)
    raise ValueError(f"unknown tokenizer {kind!r}: use 'byte' or 'bpe'")


def load_tokenizer(prefix: str | Path):
    """The tokenizer of the dataset `<prefix>.bin/.idx`, as its `<prefix>.json` names it."""
    prefix = Path(prefix)
    meta = json.loads(prefix.with_name(prefix.name + ".json").read_text())
    if meta["tokenizer"] == "byte":
        return ByteTokenizer()
    return BPETokenizer.load(prefix.parent / BPE_FILE)
