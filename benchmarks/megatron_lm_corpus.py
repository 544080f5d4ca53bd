"""Assemble a plain English corpus from the documentation a Debian machine ships.

    python benchmarks/megatron_lm_corpus.py OUT [--big-mb 5] [--docs-mb 5]

Writes `OUT/big.txt` (one large file: the GNU info manuals and Perl's pod documentation,
decompressed, markup control characters removed) and `OUT/docs/*.txt` (one file per source
document: the package READMEs, NEWS and FAQs under /usr/share/doc, the licence texts and the
Vim manual), for `benchmarks/gpu_megatron_lm.sh`, which prepares both with
`regla-megatron prepare-data`. Nothing is downloaded; which files exist depends on the
machine, so the sizes are caps, and the files are taken in sorted order.
"""

from __future__ import annotations

import argparse
import gzip
import re
from pathlib import Path

BIG_SOURCES = ("/usr/share/info/*.info*.gz", "/usr/share/perl*/**/pod/*.pod")
DOC_SOURCES = ("/usr/share/doc/*/README*", "/usr/share/doc/*/NEWS*", "/usr/share/doc/*/FAQ*",
               "/usr/share/common-licenses/*", "/usr/share/vim/vim*/doc/*.txt")
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # info node marks, backspace overstrikes


def read_text(path: Path) -> str:
    """A documentation file as text (gzip decompressed); '' when it is not readable UTF-8 text."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError, gzip.BadGzipFile, EOFError):
        return ""
    return CONTROL.sub("", text).strip()


def files(patterns: tuple[str, ...]) -> list[Path]:
    """The files matching the absolute glob `patterns`, sorted, without duplicates."""
    found = set()
    for pattern in patterns:
        root, _, rest = pattern[1:].partition("/")
        found.update(p for p in Path("/" + root).glob(rest) if p.is_file())
    return sorted(found)


def take(paths: list[Path], limit: int, min_chars: int = 2000) -> list[tuple[Path, str]]:
    """(path, text) of the files in order until `limit` bytes, skipping those under `min_chars`."""
    kept, total = [], 0
    for path in paths:
        text = read_text(path)
        if len(text) < min_chars:
            continue
        kept.append((path, text))
        total += len(text.encode())
        if total >= limit:
            break
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--big-mb", type=float, default=5.0)
    parser.add_argument("--docs-mb", type=float, default=5.0)
    args = parser.parse_args()
    docs = args.out / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    big = take(files(BIG_SOURCES), int(args.big_mb * 2**20))
    (args.out / "big.txt").write_text("\n\n".join(text for _, text in big) + "\n")
    parts = take(files(DOC_SOURCES), int(args.docs_mb * 2**20))
    for index, (path, text) in enumerate(parts):
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(path.parts[-2:]))
        (docs / f"{index:04d}-{name}.txt").write_text(text + "\n")
    size = sum(p.stat().st_size for p in docs.iterdir())
    print(f"{args.out / 'big.txt'}: {len(big)} sources, {(args.out / 'big.txt').stat().st_size / 2**20:.1f} MiB; "
          f"{docs}: {len(parts)} files, {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
