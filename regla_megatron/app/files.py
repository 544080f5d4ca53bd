"""Folders the tools own, and writes that never leave a half-written result behind.

The demo and the data tools delete only what they created. Every folder they make gets a
marker file (`MARKER`, JSON naming what the folder holds); `remove_owned` will not delete a folder
without it. Results appear whole or not at all: a folder is filled under a temporary
sibling name and renamed into place (`publish_dir`), a file is written beside its final
name and moved over it (`atomic_write_text`).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

MARKER = ".regla-megatron"


class OwnershipError(ValueError):
    """A path the tools would write or delete holds something they did not create."""


def atomic_write_text(path: str | Path, text: str) -> None:
    """Writes `text` to `path` so that readers see the old content or the new, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def is_owned(path: str | Path) -> bool:
    """True when `path` is a folder that carries the tools' marker file."""
    return (Path(path) / MARKER).is_file()


def owner_record(path: str | Path) -> dict:
    """The marker's JSON of an owned folder ({} when the folder is not owned)."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return {}
    try:
        return json.loads(marker.read_text())
    except ValueError:
        return {}


def mark_owned(path: str | Path, what: str) -> Path:
    """Writes the marker into the existing folder `path` (`what`: a short description)."""
    path = Path(path)
    (path / MARKER).write_text(json.dumps({"created_by": "regla-megatron", "what": what}) + "\n")
    return path


def claim_dir(path: str | Path, what: str, flag: str = "--workdir") -> Path:
    """Returns the owned folder `path`, creating and marking it when absent.

    A new folder appears with its marker already inside (made under a temporary name, then
    renamed). Raises OwnershipError when `path` exists but the tools did not make it (its
    files are someone else's: nothing is written there), naming `flag` as the way out.
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = new_temp_dir(path.parent, path.name, what)
        try:
            os.rename(tmp, path)
        except OSError:  # made meanwhile by another process: judged below
            shutil.rmtree(tmp)
    check_claimable(path, flag)
    return path


def check_claimable(path: str | Path, flag: str = "--workdir") -> None:
    """Raises OwnershipError when `claim_dir(path)` would reject `path`; creates nothing."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or not is_owned(path)):
        what = "a file, not a folder" if not path.is_dir() else \
            f"a folder not made by regla-megatron (no {MARKER} marker)"
        raise OwnershipError(f"{path} is {what}: it is left alone; pass another {flag}")


def new_temp_dir(parent: str | Path, stem: str, what: str) -> Path:
    """A fresh owned folder `<parent>/.<stem>.tmp-<random>` (hidden, never a final name)."""
    path = Path(parent) / f".{stem}.tmp-{uuid.uuid4().hex[:12]}"
    path.mkdir(parents=True)
    return mark_owned(path, what)


def remove_owned(path: str | Path) -> None:
    """Deletes the folder `path` if the tools made it; raises OwnershipError otherwise."""
    path = Path(path)
    if not path.exists():
        return
    if not is_owned(path):
        raise OwnershipError(f"not deleting {path}: it was not made by regla-megatron")
    shutil.rmtree(path)


def publish_dir(tmp: str | Path, final: str | Path) -> None:
    """Moves the complete folder `tmp` to `final`; a folder already at `final` must be owned.

    The previous `final` stays whole until `tmp` is in place: it is renamed aside, `tmp` is
    renamed to `final`, then the old one is deleted. Both renames stay inside one parent
    folder, so each is atomic.
    """
    tmp, final = Path(tmp), Path(final)
    if not final.exists():
        os.rename(tmp, final)
        return
    if not is_owned(final):
        raise OwnershipError(f"{final} exists and was not made by regla-megatron: not replacing it")
    aside = final.with_name(f".{final.name}.replaced-{uuid.uuid4().hex[:12]}")
    os.rename(final, aside)
    os.rename(tmp, final)
    shutil.rmtree(aside)
