"""The layer pattern of a hybrid model: one symbol per layer, and the one check of it.

`ReGLAConfig` (`regla_pattern`), the `--regla-pattern` flag, the `REGLA_PATTERN` variable and
the demo's `--pattern` all use these symbols and `validate_regla_pattern`. Plain Python (no
torch, Megatron or Triton import), so the command line can check a pattern before it
imports Megatron.
"""

from typing import Optional

REGLA_SYMBOL = "R"
SOFTMAX_SYMBOL = "*"
PATTERN_SYMBOLS = {REGLA_SYMBOL: "ReGLA layer", SOFTMAX_SYMBOL: "softmax attention layer"}
"""Every pattern symbol and the layer it stands for."""


def validate_regla_pattern(
    pattern: str,
    num_layers: Optional[int],
    *,
    subject: str = "ReGLA pattern",
    num_layers_name: str = "--num-layers",
) -> str:
    """Check a layer pattern and return it; raise ValueError naming the problem.

    Args:
        pattern: str, one symbol per layer: 'R' (ReGLA) or '*' (softmax attention).
        num_layers: int, the model's layer count; None skips the length check.
        subject: how the message names the pattern ("ReGLAConfig: regla_pattern").
        num_layers_name: how the message names the layer count ("num_layers").
    Returns:
        `pattern`, unchanged.
    """
    if not isinstance(pattern, str):
        raise ValueError(f"{subject} must be a string such as 'R*R*', got {pattern!r}")
    bad = sorted(set(pattern) - set(PATTERN_SYMBOLS))
    if bad:
        uses = " and ".join(f"'{symbol}' for a {layer}" for symbol, layer in PATTERN_SYMBOLS.items())
        raise ValueError(f"{subject} {pattern!r} has unknown symbol(s) {bad}; use {uses}")
    if num_layers is not None and len(pattern) != num_layers:
        symbols = " or ".join(f"'{symbol}'" for symbol in PATTERN_SYMBOLS)
        raise ValueError(
            f"{subject} {pattern!r} describes {len(pattern)} layer(s) but {num_layers_name} is "
            f"{num_layers}: give exactly one symbol ({symbols}) per layer"
        )
    return pattern


__all__ = ["PATTERN_SYMBOLS", "REGLA_SYMBOL", "SOFTMAX_SYMBOL", "validate_regla_pattern"]
