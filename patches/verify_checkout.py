"""The Python half of `patches/verify.sh`: checks a patched Megatron-LM checkout on this machine.

    python patches/verify_checkout.py CHECKOUT

Run with CHECKOUT and the plugin importable (verify.sh sets PYTHONPATH). In order:
1. Megatron-LM's own Python dependencies (`MEGATRON_LM_REQUIREMENTS`, then whatever importing
   `megatron.training` still misses): missing ones are listed with the pip command (exit 1).
2. `parse_args` with `--spec regla --regla-*` builds a `ReGLAConfig`; a wrong pattern, `--regla-*`
   without `--spec regla`, a `--vocab-size` below a prepared dataset's vocabulary and a split
   leaving the validation set without documents are clear `ValueError`s.
3. Every flag of `examples/pretrain_regla_hybrid.sh` (its DRY_RUN command, patched and zero-patch)
   parses with this checkout.
4. The model: GPTModel built from the parsed args and the spec the args name, as Megatron-LM's
   gpt_builder does (patched `--spec regla` and the zero-patch `--spec regla_megatron.specs ...`
   with `REGLA_PATTERN`), one forward pass on CPU.
5. `pretrain_gpt.py` imports (its sibling modules, e.g. gpt_builders.py, must be in the checkout).
Exit codes: 0 all checked, 1 a check failed, 3 this Python is too old for the checkout's training
package (Megatron-LM 0.18+ needs Python >= 3.12).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

# import name -> pip name: what Megatron-LM's training package imports beyond megatron-core's needs
# (core_v0.16.x/0.17.x import all of them at start-up; 0.18+ guard most but still use them).
MEGATRON_LM_REQUIREMENTS = {"six": "six", "regex": "regex", "yaml": "pyyaml", "pydantic": "pydantic",
                            "einops": "einops"}
PIP_NAMES = {**MEGATRON_LM_REQUIREMENTS, "sentencepiece": "sentencepiece", "tiktoken": "tiktoken"}
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "pretrain_regla_hybrid.sh"
BASE = ["x", "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "128", "--max-position-embeddings", "128", "--micro-batch-size", "1",
        "--transformer-impl", "local", "--no-rope-fusion", "--no-persist-layer-norm",
        "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-dropout-fusion",
        "--no-bias-swiglu-fusion", "--position-embedding-type", "rope", "--normalization", "RMSNorm",
        "--swiglu", "--untie-embeddings-and-output-weights", "--disable-bias-linear"]


class CheckFailed(Exception):
    """A check that did not pass, with the exit code verify.sh passes on."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def missing_requirements() -> list[str]:
    """Import names of Megatron-LM's requirements, then of anything `megatron.training` misses."""
    missing = []
    for name in MEGATRON_LM_REQUIREMENTS:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    try:
        import megatron.training.arguments  # noqa: F401
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] not in missing:
            missing.append(error.name.split(".")[0])
    except ImportError as error:
        if sys.version_info < (3, 12):
            raise CheckFailed(f"megatron.training does not import on Python {sys.version.split()[0]} "
                              f"({error}): this Megatron-LM needs Python >= 3.12", code=3) from error
        raise
    return missing


def check_requirements() -> None:
    missing = missing_requirements()
    if missing:
        pip = " ".join(PIP_NAMES.get(m, m) for m in missing)
        raise CheckFailed(f"Megatron-LM's Python dependencies are missing: {', '.join(missing)}\n"
                          f"  install them: {sys.executable} -m pip install {pip}\n"
                          f"  (the list: patches/README.md, 'Megatron-LM's own dependencies')")
    print("dependencies: " + ", ".join(MEGATRON_LM_REQUIREMENTS) + " importable")


def parse(argv: list[str]):
    """Megatron-LM's parse_args on `argv` (patched: finalize_args runs inside)."""
    from megatron.training.arguments import parse_args

    sys.argv = argv
    return parse_args()


def transformer_config(args):
    import torch

    try:
        from megatron.training.arguments import core_transformer_config_from_args
    except ImportError:
        from megatron.training.argument_utils import core_transformer_config_from_args
    args.params_dtype = torch.float32
    return core_transformer_config_from_args(args)


def expect_error(argv: list[str], expected: str) -> None:
    try:
        parse(argv)
    except ValueError as error:
        if expected not in str(error):
            raise CheckFailed(f"{argv[len(BASE):]}: error without {expected!r}: {error}") from error
        print(f"clear error: {error}")
        return
    raise CheckFailed(f"{argv[len(BASE):]} was accepted")


def write_dataset(folder: Path, documents: int) -> str:
    """A byte dataset of `documents` documents with the PREFIX.json of prepare-data."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = folder / f"docs{documents}"
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for _ in range(documents):
        builder.add_document(np.array(list(b"text") + [256], dtype=np.uint16), [5])
    builder.finalize(f"{prefix}.idx")
    meta = {"tokenizer": "byte", "vocab_size": 257, "eod": 256, "documents": documents}
    Path(f"{prefix}.json").write_text(json.dumps(meta))
    return str(prefix)


def check_arguments(folder: Path) -> None:
    args = parse(BASE + ["--spec", "regla", "--regla-pattern", "R*R*", "--regla-norm", "layernorm"])
    config = transformer_config(args)
    if type(config).__name__ != "ReGLAConfig" or (config.regla_pattern, config.regla_norm) != ("R*R*", "layernorm"):
        raise CheckFailed(f"--spec regla built {type(config).__name__}, not the ReGLAConfig asked for")
    print(f"--spec regla -> {args.spec}, {type(config).__name__}(regla_pattern={config.regla_pattern!r})")
    expect_error(BASE + ["--spec", "regla", "--regla-pattern", "R*"], "--num-layers is 4")
    expect_error(BASE + ["--regla-pattern", "R*R*"], "without --spec regla")
    data = ["--tokenizer-type", "NullTokenizer", "--split", "98,2,0", "--data-path"]
    expect_error(BASE + ["--vocab-size", "256"] + data + [write_dataset(folder, 60)], "use --vocab-size 257")
    expect_error(BASE + ["--vocab-size", "257"] + data + [write_dataset(folder, 1)], "validation set")


def example_argv(checkout: Path, **env) -> list[str]:
    """pretrain_gpt.py's arguments from the example's DRY_RUN command."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "REGLA_"))}
    environ.update(DRY_RUN="1", MEGATRON_LM=str(checkout), DIST_OPT="1", PYTHON=sys.executable, **env)
    out = subprocess.run(["bash", str(EXAMPLE)], env=environ, capture_output=True, text=True, check=True).stdout
    words = shlex.split([line for line in out.splitlines() if line.startswith("env ")][0])
    script = next(i for i, w in enumerate(words) if w.endswith("pretrain_gpt.py"))
    return ["pretrain_gpt.py"] + words[script + 1:]


def check_example(checkout: Path) -> None:
    for form, env in (("patched", {}), ("zero-patch", {"ZERO_PATCH": "1"})):
        argv = example_argv(checkout, **env)
        parse(argv)
        print(f"examples/pretrain_regla_hybrid.sh ({form}): its {len(argv) - 1} arguments parse")


def build_model(args, config):
    """GPTModel from args and the spec they name, as Megatron-LM's gpt_builder builds it."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.spec_utils import ModuleSpec, import_module

    spec = import_module(args.spec)
    if callable(spec) and not isinstance(spec, ModuleSpec):
        spec = spec(config, vp_stage=None)
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=384,
                    max_sequence_length=args.max_position_embeddings, pre_process=True, post_process=True,
                    parallel_output=True, share_embeddings_and_output_weights=False,
                    position_embedding_type=args.position_embedding_type)


def check_model() -> None:
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from regla_megatron.cpu_shim import apply_cpu_shim

    apply_cpu_shim()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("VERIFY_PORT", "29531"))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(1)
    tokens = torch.randint(0, 256, (1, 128))
    positions = torch.arange(128).unsqueeze(0)
    forms = (("patched", ["--spec", "regla", "--regla-pattern", "R*R*", "--regla-backend", "torch"], {}),
             ("zero-patch", ["--spec", "regla_megatron.specs", "regla_hybrid_spec"],
              {"REGLA_PATTERN": "R*R*", "REGLA_BACKEND": "torch"}))
    try:
        for form, flags, env in forms:
            os.environ.update(env)
            args = parse(BASE + ["--use-cpu-initialization"] + flags)
            model = build_model(args, transformer_config(args))
            kinds = sorted({type(layer.self_attention).__name__ for layer in model.decoder.layers})
            with torch.no_grad():
                logits = model(tokens, positions, attention_mask=None)
            for name in env:
                del os.environ[name]
            if tuple(logits.shape) != (1, 128, 384) or not bool(torch.isfinite(logits).all()):
                raise CheckFailed(f"{form} model: logits {tuple(logits.shape)}, finite {bool(torch.isfinite(logits).all())}")
            print(f"model ({form}, {args.spec[-1]}): GPTModel with {kinds}, "
                  f"{sum(p.numel() for p in model.parameters()):,} parameters, forward -> {tuple(logits.shape)}")
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def check_entry_point(checkout: Path) -> None:
    try:
        importlib.import_module("pretrain_gpt")
    except ModuleNotFoundError as error:
        top = (error.name or "").split(".")[0]
        if top and not (checkout / f"{top}.py").exists() and importlib.util.find_spec(top) is None \
                and top not in PIP_NAMES:
            raise CheckFailed(f"pretrain_gpt.py imports {top!r}, which is not in the checkout: copy "
                              f"{top}.py (and the other top-level .py files) from the same Megatron-LM tag") from error
        raise CheckFailed(f"pretrain_gpt.py: {error}; install it: {sys.executable} -m pip install "
                          f"{PIP_NAMES.get(top, top)}") from error
    print("pretrain_gpt.py: imports")


def main(argv: list[str]) -> int:
    checkout = Path(argv[1]).resolve()
    os.chdir(checkout)
    sys.path[:0] = [str(checkout)]
    try:
        check_requirements()
        with tempfile.TemporaryDirectory() as folder:
            check_arguments(Path(folder))
        check_example(checkout)
        check_model()
        check_entry_point(checkout)
    except CheckFailed as failure:
        print(f"FAILED: {failure}")
        return failure.code
    except Exception:  # noqa: BLE001 - any other failure is a finding, with its traceback
        traceback.print_exc()
        print("FAILED: see the traceback above")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
