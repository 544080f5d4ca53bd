"""Apply and verify the Megatron-LM patch (`regla-megatron patch PATH`).

The patch files live beside this module, in `regla_megatron/megatron_lm/patches/` (package
data, so an installed wheel carries them). Each one adds three hook
calls into `regla_megatron.megatron_lm`; which file fits is decided by `git apply --check`,
so a new Megatron-LM release that moved a hunk is reported, not half-patched.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

MARKER = "# regla-megatron patch"
PATCH_FAMILIES = (  # (patch file, Megatron-LM tags it applies to)
    ("megatron-lm-main.patch", "core_v0.18.x, core_v0.19.x, main"),
    ("megatron-lm-core_v0.16.patch", "core_v0.16.x, core_v0.17.x"),
)
# Files that mark a Megatron-LM checkout (megatron-core alone has no training package).
CHECKOUT_FILES = ("pretrain_gpt.py", "megatron/training/arguments.py", "megatron/core/__init__.py")


class PatchError(RuntimeError):
    """A patch target that is not a Megatron-LM checkout, or a patch that does not fit."""


def patches_dir() -> Path:
    """The folder holding the `.patch` files."""
    return Path(__file__).resolve().parent / "patches"


def check_checkout(path: str | os.PathLike) -> Path:
    """Returns `path` resolved, or raises PatchError saying why it is no Megatron-LM checkout."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise PatchError(f"{root}: no such directory (expected a Megatron-LM checkout)")
    missing = [f for f in CHECKOUT_FILES if not (root / f).is_file()]
    if missing:
        hint = (" (this looks like an installed megatron-core package; the patch needs the "
                "Megatron-LM repository, e.g. git clone of NVIDIA/Megatron-LM)"
                if (root / "core").is_dir() or (root / "megatron" / "core").is_dir() else "")
        raise PatchError(f"{root} is not a Megatron-LM checkout: missing "
                         f"{', '.join(missing)}{hint}")
    return root


def patched_files(root: Path) -> list[Path]:
    """The checkout's files that carry the patch marker."""
    training = root / "megatron" / "training"
    return [p for p in sorted(training.glob("*.py")) if MARKER in p.read_text()]


def _git_apply(root: Path, patch: Path, *flags: str) -> subprocess.CompletedProcess:
    # `git apply` works in plain (non-git) directories as well, as a strict `patch -p1`.
    return subprocess.run(["git", "apply", *flags, str(patch)], cwd=root,
                           capture_output=True, text=True)


def select_patch(root: Path) -> Path:
    """The patch file that applies cleanly to `root`; PatchError listing the attempts if none."""
    errors = []
    for name, tags in PATCH_FAMILIES:
        patch = patches_dir() / name
        result = _git_apply(root, patch, "--check")
        if result.returncode == 0:
            return patch
        errors.append(f"  {name} ({tags}): {result.stderr.strip().splitlines()[0:1]}")
    raise PatchError(f"no regla-megatron patch applies to {root}; tried:\n" + "\n".join(errors)
                     + "\nSupported: Megatron-LM core_v0.16.x to core_v0.19.x and main.")


def verify(root: Path) -> list[str]:
    """Checks an applied patch; returns human-readable findings, raises PatchError if broken.

    Checks: the three hook calls are present, the patched files compile, and the hooks
    they call exist in this installation of regla_megatron.
    """
    from regla_megatron.megatron_lm import hooks as megatron_lm

    text = "".join(p.read_text() for p in patched_files(root))
    findings = []
    for hook in ("add_arguments", "finalize_args", "config_class"):
        if f"regla.{hook}(" not in text:
            raise PatchError(f"{root}: patch incomplete, no call to regla_megatron.megatron_lm.{hook}")
        if not callable(getattr(megatron_lm, hook, None)):
            raise PatchError(f"installed regla_megatron lacks megatron_lm.{hook}")
        findings.append(f"hook {hook}: present")
    for path in patched_files(root):
        try:
            compile(path.read_text(), str(path), "exec")
        except SyntaxError as err:
            raise PatchError(f"{path}: does not compile after patching: {err}") from err
        findings.append(f"{path.relative_to(root)}: compiles")
    return findings


def apply_patch(path: str | os.PathLike) -> list[str]:
    """Patches the Megatron-LM checkout at `path` (idempotent); returns what was done."""
    root = check_checkout(path)
    if patched_files(root):
        return [f"{root}: patch already applied"] + verify(root)
    patch = select_patch(root)
    result = _git_apply(root, patch)
    if result.returncode != 0:
        raise PatchError(f"git apply {patch.name} failed in {root}: {result.stderr.strip()}")
    return [f"{root}: applied {patch.name}"] + verify(root)
