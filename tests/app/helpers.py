"""Helpers of the app tests: a one-rank tiny configuration and its corpus."""

from regla_megatron.app.corpus import prepare_corpus
from regla_megatron.app.demo import DemoConfig


def one_rank_config(workdir, **overrides) -> DemoConfig:
    """The tiny preset on one rank, with a small corpus (fast in the test process)."""
    settings = dict(tp=1, cp=1, pp=1, workdir=str(workdir), max_bytes=60_000, steps=2, save_at=1,
                    gen_tokens=2, log_every=1)
    return DemoConfig.preset("tiny", **{**settings, **overrides})


def prepared(cfg):
    """The corpus of `cfg`, prepared in the test process."""
    return prepare_corpus(cfg, say=lambda msg: None)
