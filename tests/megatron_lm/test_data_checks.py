"""The data checks that `finalize_args` (patched Megatron-LM) and the zero-patch spec entry
points run: the NullTokenizer vocabulary against `PREFIX.json`, and `--split` against the
document count in the `.idx` header (a set with weight > 0 and no documents hangs Megatron)."""

import argparse
import json
import sys
import types

import numpy as np
import pytest

from regla_megatron.megatron_lm import hooks


def _dataset(tmp_path, documents, name="corpus", vocab=257, eod=256):
    """A byte-token dataset of `documents` documents written by megatron-core, with its PREFIX.json."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / name)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for i in range(documents):
        ids = np.array(list(b"some text ") * (i + 1) + [eod], dtype=np.uint16)
        builder.add_document(ids, [len(ids)])
    builder.finalize(prefix + ".idx")
    meta = {"tokenizer": "byte", "vocab_size": vocab, "eod": eod, "documents": documents,
            "tokens": 0, "sources": []}
    (tmp_path / f"{name}.json").write_text(json.dumps(meta))
    return prefix


def _args(prefix, split="98,2,0", vocab_size=257, **extra):
    fields = dict(data_path=[prefix], split=split, tokenizer_type="NullTokenizer", vocab_size=vocab_size,
                  mock_data=False, spec=None)
    fields.update(extra)
    return argparse.Namespace(**fields)


def test_vocab_too_small_names_the_flag_and_value(tmp_path):
    prefix = _dataset(tmp_path, 60)
    with pytest.raises(ValueError, match=r"--vocab-size 256 is too small.*use --vocab-size 257"):
        hooks.finalize_args(_args(prefix, vocab_size=256))
    hooks.finalize_args(_args(prefix, vocab_size=257))
    hooks.finalize_args(_args(prefix, vocab_size=256, tokenizer_type="HuggingFaceTokenizer"))


def test_split_without_validation_documents_is_rejected(tmp_path):
    one = _dataset(tmp_path, 1, name="one")
    with pytest.raises(ValueError, match=r"validation set .* no documents.*has 1 document"):
        hooks.finalize_args(_args(one))
    few = _dataset(tmp_path, 20, name="few")
    with pytest.raises(ValueError, match=r"validation set .*20 document.*--split 19,1,0"):
        hooks.finalize_args(_args(few))
    hooks.finalize_args(_args(few, split="19,1,0"))
    hooks.finalize_args(_args(one, split="100,0,0"))  # weight 0: Megatron builds no such set


def test_default_split_checks_the_test_set(tmp_path):
    prefix = _dataset(tmp_path, 200)
    with pytest.raises(ValueError, match="test set"):  # 969,30,1 of 200 documents: test gets 0
        hooks.finalize_args(_args(prefix, split=None))


def test_blends_mock_data_and_missing_files(tmp_path):
    good, bad = _dataset(tmp_path, 60, "good"), _dataset(tmp_path, 60, "bad", vocab=300, eod=299)
    assert hooks.data_prefixes(["0.3", good, "0.7", bad]) == [good, bad]
    assert hooks.data_prefixes([good, bad]) == [good, bad]
    with pytest.raises(ValueError, match="use --vocab-size 300"):
        hooks.finalize_args(_args(good, data_path=["0.3", good, "0.7", bad]))
    hooks.finalize_args(_args(bad, vocab_size=256, mock_data=True))
    hooks.finalize_args(_args(str(tmp_path / "absent")))  # Megatron reports missing files itself


@pytest.fixture
def megatron_lm_args(monkeypatch):
    """A stand-in for Megatron-LM's `megatron.training.global_vars` (not installed here), put in
    `sys.modules`; returns the dict whose "args" its `get_args()` hands out (None: not parsed yet)."""
    global_vars = types.ModuleType("megatron.training.global_vars")
    state = {"args": None}

    def get_args():
        assert state["args"] is not None, "args is not initialized."
        return state["args"]

    global_vars.get_args = get_args
    monkeypatch.setitem(sys.modules, "megatron.training.global_vars", global_vars)
    return state


def test_zero_patch_check_reads_megatron_lm_args(tmp_path, megatron_lm_args, monkeypatch):
    prefix = _dataset(tmp_path, 1)
    assert hooks.check_megatron_lm_data() is False  # args not parsed yet
    megatron_lm_args["args"] = _args(prefix, spec=["regla_megatron.specs", "regla_spec"])
    with pytest.raises(ValueError, match="validation set"):
        hooks.check_megatron_lm_data()
    megatron_lm_args["args"] = _args(prefix, split="100,0,0")
    assert hooks.check_megatron_lm_data() is True
    monkeypatch.delitem(sys.modules, "megatron.training.global_vars")
    assert hooks.check_megatron_lm_data() is False  # not a Megatron-LM run


def test_zero_patch_spec_entry_points_check_the_data(tmp_path, megatron_lm_args, megatron_single_process, monkeypatch):
    """Inside pretrain_gpt.py (here: its global args faked) both `--spec` entry points refuse
    `--vocab-size 256` for a byte dataset before building anything."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from regla_megatron.mixer import ReGLAMixer
    from regla_megatron.specs import HybridLayerDispatch, regla_spec

    monkeypatch.setenv("REGLA_PATTERN", "R*")
    prefix = _dataset(tmp_path, 60)
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=2, transformer_impl="local",
                               use_cpu_initialization=True)
    megatron_lm_args["args"] = _args(prefix, vocab_size=256, spec=["regla_megatron.specs", "regla_spec"])
    with pytest.raises(ValueError, match=r"--vocab-size 256 is too small for .*corpus.*use --vocab-size 257"):
        regla_spec(config)
    with pytest.raises(ValueError, match=r"--vocab-size 256 is too small"):
        HybridLayerDispatch(config, layer_number=1)
    megatron_lm_args["args"] = _args(prefix, vocab_size=257, spec=["regla_megatron.specs", "regla_spec"])
    block = regla_spec(config)
    assert [spec.submodules.self_attention.module is ReGLAMixer for spec in block.layer_specs] == [True, False]
