"""The demo's training data: prepared once per input, found and checked by every rank.

`prepare_corpus(cfg)` (launching process, or rank 0 under torchrun) gives the dataset to
train on:
- `--data DIR` naming a dataset written by `prepare-data` (a folder with one `<name>.idx`
  and its `<name>.json`, or the prefix itself) is used where it is, after `open_dataset`;
- text inputs (or the default stdlib sources) are prepared into `WORKDIR/data`, a folder
  the demo owns. Its `prepared.json` records what went in (each file's path, size and
  mtime, the tokenizer, `--max-bytes`, `--max-document-bytes`); a later run with other
  inputs prepares again into a temporary folder and swaps it in. A `WORKDIR/data` that the
  demo did not make is never written to or deleted: that is an error naming the way out.

`share_corpus` (every rank, right after the process group starts) hands rank 0's answer
to all ranks and checks that each sees the same dataset and the same workdir; a node that
does not (a workdir per node, no shared filesystem) stops every rank with one message
instead of waiting forever.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from regla_megatron.app.data import check_split, expand_sources, find_dataset, open_dataset, prepare_data
from regla_megatron.app.files import check_claimable, new_temp_dir, publish_dir, remove_owned

DATA_DIR = "data"
NAME = "corpus"
MANIFEST = "prepared.json"
SHARED_FS_WAIT_S = 20.0  # how long a rank waits for rank 0's files to appear (network filesystems lag)
NOT_SHARED = ("the workdir must be on a filesystem shared by all nodes, or prepare the data on every "
              "node with prepare-data first (and pass that folder with --data)")
WORKDIR_NOT_SHARED = ("the workdir must be on a filesystem shared by all nodes (every rank writes its part "
                      "of each checkpoint there)")


class SharedFilesystemError(RuntimeError):
    """Some ranks do not see the files rank 0 wrote (nodes without a shared filesystem)."""


@dataclass
class Corpus:
    """Where the training data is: `prefix` absolute, or relative to the workdir when inside it."""

    prefix: str
    fingerprint: str  # `DatasetInfo.fingerprint`: the same files on every rank
    in_workdir: bool
    documents: int
    tokens: int

    def path(self, workdir: str | Path) -> Path:
        """The dataset prefix as seen from `workdir` (each rank's own `--workdir`)."""
        return Path(workdir) / self.prefix if self.in_workdir else Path(self.prefix)


def prepared_dataset(cfg) -> Optional[Path]:
    """The prefix of a `prepare-data` dataset that `cfg.data` names, or None for text inputs."""
    if not cfg.data or len(cfg.data) != 1:
        if cfg.data and any(find_dataset(d) for d in cfg.data):
            raise ValueError("--data: name one prepared dataset, or text files/folders, not both")
        return None
    return find_dataset(cfg.data[0])


def corpus_request(cfg) -> dict:
    """What `prepare_corpus` would prepare from text inputs (the `prepared.json` content)."""
    sources = expand_sources(cfg.data, cfg.max_bytes)
    stats = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in sources]
    return {"sources": stats, "tokenizer": cfg.tokenizer,
            "bpe_vocab_size": cfg.bpe_vocab_size if cfg.tokenizer == "bpe" else None,
            "max_bytes": cfg.max_bytes, "max_document_bytes": cfg.max_document_bytes}


def check_corpus_target(cfg) -> None:
    """Raises before any work when the corpus cannot be placed (a `WORKDIR/data` not the demo's)."""
    if prepared_dataset(cfg) is None:
        check_claimable(Path(cfg.workdir) / DATA_DIR)


def _difference(old: dict, new: dict) -> str:
    changed = [k for k in new if old.get(k) != new[k]]
    if "sources" in changed:
        old_paths = {s[0] for s in old.get("sources", [])}
        new_paths = {s[0] for s in new["sources"]}
        what = "other input files" if old_paths != new_paths else "input files changed on disk"
        changed = [what] + [k for k in changed if k != "sources"]
    return ", ".join(changed)


def _checked(prefix: Path, in_workdir: bool, rel: str) -> Corpus:
    info = open_dataset(prefix)
    check_split(info.num_documents, None)
    return Corpus(rel, info.fingerprint, in_workdir, info.num_documents, info.num_tokens)


def prepare_corpus(cfg, say: Callable[[str], None] = print) -> Corpus:
    """The dataset to train on (see module doc); prepares it when needed. Raises ValueError."""
    given = prepared_dataset(cfg)
    if given is not None:
        corpus = _checked(given.resolve(), False, str(given.resolve()))
        say(f"using the dataset {given} ({corpus.documents} documents, {corpus.tokens:,} tokens)")
        return corpus
    work = Path(cfg.workdir)
    data_dir = work / DATA_DIR
    check_claimable(data_dir)
    request = corpus_request(cfg)
    rel = f"{DATA_DIR}/{NAME}"
    reason = "no corpus prepared yet"
    if data_dir.is_dir():
        try:
            earlier = json.loads((data_dir / MANIFEST).read_text())
        except (OSError, ValueError):
            earlier = {}
        if earlier == request:
            try:
                corpus = _checked(data_dir / NAME, True, rel)
                say(f"using the corpus prepared earlier in {data_dir} (same inputs and settings)")
                return corpus
            except ValueError as err:
                reason = f"the corpus prepared earlier is damaged ({err})"
        else:
            reason = f"the inputs differ from those of the corpus prepared earlier ({_difference(earlier, request)})"
    say(f"preparing the corpus in {data_dir}: {reason}")
    t0 = time.time()
    made_workdir = not work.exists()
    work.mkdir(parents=True, exist_ok=True)
    tmp = new_temp_dir(work, DATA_DIR, "the demo's corpus")
    try:
        sources = [Path(s[0]) for s in request["sources"]]
        prepared = prepare_data(tmp, sources, cfg.tokenizer, cfg.bpe_vocab_size, None, NAME,
                                max_document_bytes=cfg.max_document_bytes, split=None)
        (tmp / MANIFEST).write_text(json.dumps(request) + "\n")
        publish_dir(tmp, data_dir)
    finally:
        if tmp.exists():
            remove_owned(tmp)
            if made_workdir and not any(work.iterdir()):
                work.rmdir()  # made above, and nothing came of it
    say(f"prepared {prepared.num_documents} documents, {prepared.num_tokens:,} tokens "
        f"({prepared.tokenizer.kind} tokenizer) in {time.time() - t0:.1f}s -> {data_dir / NAME}")
    return _checked(data_dir / NAME, True, rel)


def visibility_problem(workdir: str | Path, corpus: Corpus, probe: Optional[str] = None,
                       rank0_workdir: str = "", wait_s: float = SHARED_FS_WAIT_S) -> Optional[str]:
    """What this rank misses of rank 0's files, with the way out; None when it misses nothing.

    Checks the dataset (`corpus`, with the same fingerprint), then, when `probe` is given,
    the file of that name that rank 0 wrote into its workdir (`rank0_workdir`), looked for
    in this rank's `workdir`. Waits up to `wait_s` seconds for files to appear (network
    filesystems lag); does not communicate.
    """
    prefix = corpus.path(workdir)
    wanted = [prefix.with_name(prefix.name + ".json")] + ([Path(workdir) / probe] if probe else [])
    deadline = time.monotonic() + wait_s
    while not all(p.exists() for p in wanted) and time.monotonic() < deadline:
        time.sleep(0.5)
    try:
        info = open_dataset(prefix)
    except ValueError as err:
        return f"do not see the dataset rank 0 uses ({err}): {NOT_SHARED}"
    if info.fingerprint != corpus.fingerprint:
        return f"see another dataset at {prefix} than rank 0 (its .idx or .bin differs): {NOT_SHARED}"
    if probe and not (Path(workdir) / probe).exists():
        return (f"do not see in --workdir {workdir} the file rank 0 wrote into {rank0_workdir or workdir}: "
                f"{WORKDIR_NOT_SHARED}")
    return None


def combine_reports(reports: list) -> Optional[str]:
    """One message for every rank's `(rank, host, problem or None)`, or None when none has a problem."""
    groups: dict = {}
    for rank, host, problem in reports:
        if problem:
            groups.setdefault(problem, []).append(f"{rank} ({host})")
    if not groups:
        return None
    return "; ".join(f"rank(s) {', '.join(ranks)} {problem}" for problem, ranks in groups.items())


def share_corpus(workdir: str | Path, corpus: Optional[Corpus], probe_workdir: bool = True) -> Corpus:
    """Collective over all ranks: rank 0's `corpus` for everyone, checked on every rank.

    With `probe_workdir`, rank 0 also writes a small file into its workdir that every rank
    must see in its own (checkpoints are written there by all ranks). Raises
    SharedFilesystemError on every rank when any rank misses something.
    """
    import torch

    rank = torch.distributed.get_rank()
    probe = None
    if rank == 0:
        probe = f".probe-{uuid.uuid4().hex[:12]}" if probe_workdir else None
        if probe:
            Path(workdir).mkdir(parents=True, exist_ok=True)
            (Path(workdir) / probe).write_text("rank 0\n")
    box = [None if corpus is None else asdict(corpus), probe, str(Path(workdir).resolve())]
    torch.distributed.broadcast_object_list(box, src=0)
    corpus, probe, rank0_workdir = Corpus(**box[0]), box[1], box[2]
    try:
        problem = visibility_problem(workdir, corpus, probe, rank0_workdir)
        reports = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(reports, (rank, socket.gethostname(), problem))
    finally:
        if rank == 0 and probe:
            (Path(workdir) / probe).unlink(missing_ok=True)
    message = combine_reports(reports)
    if message:
        raise SharedFilesystemError(message)
    return corpus


__all__ = ["Corpus", "SharedFilesystemError", "check_corpus_target", "combine_reports", "corpus_request",
           "prepare_corpus", "prepared_dataset", "share_corpus", "visibility_problem"]
