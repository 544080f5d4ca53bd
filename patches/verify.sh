#!/usr/bin/env bash
# Check that `regla-megatron patch` applies cleanly, idempotently and correctly to
# Megatron-LM checkouts, and that the patched checkout parses, checks and builds a ReGLA model
# on this machine (CPU is enough). Not part of CI: it needs the Megatron-LM checkouts.
#
#   patches/verify.sh CHECKOUT [CHECKOUT ...]
#
# Each CHECKOUT is a Megatron-LM work tree (e.g. `git worktree add DIR core_v0.16.1`) or a plain
# copy of one; it is patched in place, and restored with `git checkout` at the end if it is a
# git tree. For each one: apply, re-apply (must say "already applied"), then
# patches/verify_checkout.py: Megatron-LM's Python dependencies, argument parsing with
# --spec regla / --regla-* and the data checks, the example's flags, the model built from the
# parsed arguments (one forward pass), and the `pretrain_gpt.py` imports.
#
# Exit status: 0 only if every check ran and passed for every checkout. A checkout whose
# training package needs a newer Python (Megatron-LM 0.18+ needs >= 3.12) fails too, unless
# VERIFY_PARTIAL=1 accepts the patch checks alone for it.
set -euo pipefail

PY=${PYTHON:-python}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
status=0
own_git_tree() {  # a checkout that is the top of its own git work tree (not a copy inside another)
  [[ "$(git -C "$1" rev-parse --show-toplevel 2>/dev/null)" == "$1" ]]
}
for checkout in "$@"; do
  checkout=$(cd "$checkout" && pwd)
  echo "== $checkout ($(git -C "$checkout" describe --tags --always 2>/dev/null || echo 'not git'))"
  if own_git_tree "$checkout"; then git -C "$checkout" checkout -q -- megatron; fi
  PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" $PY -m regla_megatron patch "$checkout"
  PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" $PY -m regla_megatron patch "$checkout" | grep "already applied" >/dev/null
  echo "idempotent: ok"
  if own_git_tree "$checkout"; then git -C "$checkout" diff --stat | tail -1; fi
  rc=0
  PYTHONWARNINGS=ignore PYTHONPATH="$checkout:$ROOT${PYTHONPATH:+:$PYTHONPATH}" \
    $PY "$HERE/verify_checkout.py" "$checkout" || rc=$?
  if ((rc == 3)) && [[ "${VERIFY_PARTIAL:-0}" == 1 ]]; then
    echo "partial: the patch applies and compiles; the Python checks need a newer Python (VERIFY_PARTIAL=1)"
  elif ((rc != 0)); then
    echo "verify: $checkout FAILED (exit $rc)"
    status=1
  else
    echo "verify: $checkout ok"
  fi
  if own_git_tree "$checkout"; then git -C "$checkout" checkout -q -- megatron; fi
done
exit $status
