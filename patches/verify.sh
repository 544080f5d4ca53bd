#!/usr/bin/env bash
# Check that `regla-megatron patch` applies cleanly, idempotently and correctly to
# Megatron-LM checkouts. Not part of CI: it needs the Megatron-LM checkouts.
#
#   patches/verify.sh CHECKOUT [CHECKOUT ...]
#
# Each CHECKOUT is a Megatron-LM work tree (e.g. `git worktree add DIR core_v0.16.1`);
# it is modified (patched) and restored with `git checkout` at the end if it is a git tree.
# For each one: apply, re-apply (must say "already applied"), and where the checkout's
# Python requirements are met (core_v0.16.x-era on Python 3.11; main needs Python >= 3.12),
# parse Megatron-LM arguments with --spec regla / --regla-* and build the ReGLAConfig.
set -euo pipefail

PY=${PYTHON:-python}
status=0
for checkout in "$@"; do
  checkout=$(cd "$checkout" && pwd)
  echo "== $checkout ($(git -C "$checkout" describe --tags --always 2>/dev/null || echo 'not git'))"
  git -C "$checkout" checkout -q -- megatron 2>/dev/null || true
  $PY -m regla_megatron.cli patch "$checkout"
  $PY -m regla_megatron.cli patch "$checkout" | grep "already applied" >/dev/null
  echo "idempotent: ok"
  if git -C "$checkout" diff --stat >/dev/null 2>&1; then
    git -C "$checkout" diff --stat | tail -1
  fi
  # Parse real Megatron-LM arguments through the patched parse_args.
  ( cd "$checkout" && PYTHONWARNINGS=ignore $PY - <<'EOF'
import sys
try:
    from megatron.training.arguments import parse_args
except ImportError as err:  # main's training package needs a newer Python than this one
    print(f"argument check skipped: cannot import megatron.training here ({err})")
    sys.exit(0)
try:
    from megatron.training.arguments import core_transformer_config_from_args
except ImportError:
    from megatron.training.argument_utils import core_transformer_config_from_args

base = ["x", "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "128", "--max-position-embeddings", "128", "--micro-batch-size", "1",
        "--no-rope-fusion", "--no-persist-layer-norm"]  # no TransformerEngine here
sys.argv = base + ["--spec", "regla", "--regla-pattern", "R*R*", "--regla-norm", "layernorm"]
args = parse_args()
args.params_dtype = __import__("torch").float32
config = core_transformer_config_from_args(args)
assert type(config).__name__ == "ReGLAConfig", type(config)
assert (config.regla_pattern, config.regla_norm) == ("R*R*", "layernorm")
print(f"--spec regla -> {args.spec}, {type(config).__name__}(regla_pattern={config.regla_pattern!r})")
for bad, expect in ((["--spec", "regla", "--regla-pattern", "R*"], "--num-layers is 4"),
                    (["--regla-pattern", "R*R*"], "without --spec regla")):
    sys.argv = base + bad
    try:
        parse_args()
    except ValueError as err:
        assert expect in str(err), err
        print(f"clear error: {err}")
    else:
        raise AssertionError(f"{bad} was accepted")
EOF
  ) || status=1
  if git -C "$checkout" rev-parse >/dev/null 2>&1; then
    git -C "$checkout" checkout -q -- megatron
  fi
done
exit $status
