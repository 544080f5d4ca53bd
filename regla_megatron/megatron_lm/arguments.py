"""ReGLA command-line options: the `--regla-*` argparse group and its env-var twin.

One table (`REGLA_OPTIONS`) drives three front ends that must agree:
- `add_regla_arguments(parser)`: the `--regla-*` group that the Megatron-LM patch adds;
- `regla_config_kwargs(args)`: parsed args -> `ReGLAConfig` keyword arguments;
- `regla_env_kwargs(environ)`: `REGLA_*` environment variables -> the same keywords, for the
  zero-patch form (`--spec regla_megatron.specs regla_spec`), where Megatron-LM rejects
  unknown flags and the environment is the only channel left.

Every argparse `dest` equals its `ReGLAConfig` field name, so Megatron-LM's
`core_transformer_config_from_args(args, config_class=ReGLAConfig)` (which copies every
attribute of `args` named like a config field) fills the ReGLA fields by itself. Unset
flags leave no attribute (`default=argparse.SUPPRESS`), so the config's defaults apply.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
from typing import Any, Callable, Mapping, Optional

from regla_megatron.pattern import REGLA_SYMBOL, SOFTMAX_SYMBOL, validate_regla_pattern

ENV_PREFIX = "REGLA_"


def _bool(text: str) -> bool:
    """Parses an env-var boolean (`1/0`, `true/false`, `yes/no`, `on/off`)."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (1/0, true/false), got {text!r}")


@dataclasses.dataclass(frozen=True)
class Option:
    """One ReGLA option: `--regla-<flag>`, env var `REGLA_<FLAG>`, config field `regla_<flag>`."""

    flag: str
    type: Callable[[str], Any]
    help: str
    choices: Optional[tuple] = None

    @property
    def field(self) -> str:
        return "regla_" + self.flag.replace("-", "_")

    @property
    def cli(self) -> str:
        return "--regla-" + self.flag

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.flag.replace("-", "_").upper()


REGLA_OPTIONS = (
    Option("pattern", str, f"Layer pattern, one symbol per layer: '{REGLA_SYMBOL}' = ReGLA, '{SOFTMAX_SYMBOL}' = "
           "softmax attention, e.g. 'R*R*' for 4 layers. Its length must equal --num-layers."),
    Option("num-heads", int, "ReGLA heads per layer (default: --num-attention-heads)."),
    Option("head-dim-k", int, "Key/query feature dim per ReGLA head (default: --kv-channels)."),
    Option("head-dim-v", int, "Value dim per ReGLA head (default: --kv-channels)."),
    Option("norm", str, "Per-head output norm.", ("rmsnorm", "layernorm")),
    Option("norm-eps", float, "Epsilon of the per-head output norm."),
    Option("gate-rank", int, "Rank of the gate projections; 0 = full rank (paper default)."),
    Option("gate-bias-init", float, "Initial value of the forget/refine gate biases."),
    Option("output-gate", _bool, "Swish output gate (off by default)."),
    Option("backend", str, "Kernel backend: auto = Triton on GPU, PyTorch otherwise.",
           ("auto", "triton", "torch")),
    Option("cp-layout", str, "Sequence layout under context parallelism: zigzag is what "
           "Megatron's get_batch_on_this_cp_rank produces.", ("zigzag", "contiguous")),
    Option("cp-overlap-forward", _bool, "Under CP (Triton, zigzag): the forward state all-gather per "
           "segment, overlapped with the other segment's compute (off by default; for slow links)."),
    Option("low-memory", _bool, "Triton path without CP: backward over time windows, neither the fp32 "
           "gate tensor nor the chunk-start states kept from the forward (less activation and peak memory, some speed)."),
    Option("low-memory-keep-gates", _bool, "With --regla-low-memory: the gate tensor and the states kept "
           "from the forward as without it (faster; the backward's peak stays low, saved activations do not)."),
)


def add_regla_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the `--regla-*` group to `parser` and returns it (Megatron's extra_args_provider form)."""
    group = parser.add_argument_group("ReGLA", "ReGLA gated linear attention (regla-megatron plugin)")
    for opt in REGLA_OPTIONS:
        if opt.type is _bool:
            group.add_argument(opt.cli, dest=opt.field, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=opt.help)
        else:
            group.add_argument(opt.cli, dest=opt.field, type=opt.type, choices=opt.choices,
                               default=argparse.SUPPRESS, help=opt.help)
    return parser


def _checked(kwargs: dict, num_layers: Optional[int], name: Callable[[Option], str]) -> dict:
    """Validates option values shared by every front end (choices, pattern, positivity).

    `name(option)` is how the front end spells the option in messages (flag or env var).
    """
    for opt in REGLA_OPTIONS:
        value = kwargs.get(opt.field)
        if value is None:
            continue
        if opt.choices is not None and value not in opt.choices:
            raise ValueError(f"{name(opt)}: invalid choice {value!r} "
                             f"(choose from {', '.join(opt.choices)})")
        if opt.type is int and opt.flag != "gate-rank" and value <= 0:
            raise ValueError(f"{name(opt)} must be positive, got {value}")
    if kwargs.get("regla_pattern") is not None:
        validate_regla_pattern(kwargs["regla_pattern"], num_layers)
    return kwargs


def regla_config_kwargs(args: argparse.Namespace) -> dict:
    """Returns the `ReGLAConfig` keyword arguments set on Megatron-LM's parsed `args`.

    Only options that were given appear. The pattern is checked against `args.num_layers`.
    Raises ValueError on a bad value.
    """
    kwargs = {o.field: getattr(args, o.field) for o in REGLA_OPTIONS
              if getattr(args, o.field, None) is not None}
    return _checked(kwargs, getattr(args, "num_layers", None), lambda o: o.cli)


def regla_env_kwargs(environ: Optional[Mapping[str, str]] = None,
                     num_layers: Optional[int] = None) -> dict:
    """Returns `ReGLAConfig` keyword arguments from `REGLA_*` environment variables.

    `REGLA_PATTERN=R*R*`, `REGLA_NORM=layernorm`, `REGLA_OUTPUT_GATE=1`, ... (one variable per
    `--regla-*` flag, same values). A `REGLA_*` name close to an option's (`REGLA_PATERN`)
    is an error, so a typo cannot quietly train the wrong model; other `REGLA_*` variables
    (the test suite's, the demo's) are not ours to judge and are left alone.
    """
    environ = os.environ if environ is None else environ
    by_env = {o.env: o for o in REGLA_OPTIONS}
    kwargs = {}
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        opt = by_env.get(name)
        if opt is None:
            close = difflib.get_close_matches(name, by_env, n=1, cutoff=0.85)
            if close:
                raise ValueError(f"unknown environment variable {name}; did you mean {close[0]}? "
                                 f"ReGLA reads {', '.join(sorted(by_env))}")
            continue
        try:
            kwargs[opt.field] = opt.type(text)
        except ValueError as exc:
            raise ValueError(f"{name}={text!r}: {exc}") from None
    return _checked(kwargs, num_layers, lambda o: o.env)


def regla_config_from(config, environ: Optional[Mapping[str, str]] = None, **overrides):
    """Returns a `ReGLAConfig` for `config`, whatever Megatron handed over.

    A `ReGLAConfig` is returned as is (the patched Megatron-LM built it from `--regla-*`).
    A plain `TransformerConfig` (zero-patch `--spec`, Megatron-Bridge providers) is copied
    field by field into a `ReGLAConfig` whose ReGLA fields come from `REGLA_*` variables,
    then `overrides`, then the config's defaults. Objects that wrap a TransformerConfig
    (Megatron-LM main's GPTModelConfig keeps it in `.transformer`) are unwrapped first.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    from regla_megatron.config import ReGLAConfig

    inner = getattr(config, "transformer", None)
    if not isinstance(config, TransformerConfig) and isinstance(inner, TransformerConfig):
        config = inner
    if isinstance(config, ReGLAConfig) and not overrides:
        return config
    if not isinstance(config, TransformerConfig):
        raise TypeError(f"expected a TransformerConfig, got {type(config).__name__}")
    base = {f.name: getattr(config, f.name) for f in dataclasses.fields(TransformerConfig)
            if f.init and hasattr(config, f.name)}
    if isinstance(config, ReGLAConfig):
        base.update({o.field: getattr(config, o.field) for o in REGLA_OPTIONS
                     if hasattr(config, o.field)})
    base.update(regla_env_kwargs(environ, num_layers=config.num_layers))
    base.update(overrides)
    return ReGLAConfig(**base)
