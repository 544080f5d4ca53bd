"""Megatron layer/block specs for ReGLA and ReGLA/softmax hybrids.

- `get_regla_layer_spec(backend)`: a TransformerLayer with `ReGLAMixer` as self_attention.
- `get_softmax_layer_spec(backend)`: a softmax attention TransformerLayer (the local one
  runs on CPU and GPU: torch SDPA's flash attention (`SDPADotProductAttention`) plus our
  SP-correct norms).
- `get_hybrid_block_spec(config, vp_stage)`: this pipeline stage's layers from the pattern
  (under context parallelism the local softmax layers use `cp_attention`'s core attention).

backend: 'local' (Megatron's ColumnParallelLinear/RowParallelLinear, `SequenceParallelNorm`),
'te' (TransformerEngine layers; an error if it is not installed), 'auto' (te if importable).

`--spec` entry points (which one Megatron uses):
- `regla_hybrid_spec`: a static ModuleSpec. Megatron-LM core_v0.16.x imports the name and
  does not call it; Megatron fans the spec out to every layer of the stage and the layer
  picks ReGLA or softmax from its global number when built. The final norm is then
  Megatron's default (TENorm, apex, or torch's, which refuses sequence parallelism).
- `regla_spec(config, vp_stage=None)`: a callable returning the block spec. Megatron-LM
  main (0.19 era) and Megatron-Bridge call it; prefer it where available (our final norm).
Both accept a plain TransformerConfig (zero-patch form): its ReGLA options then come from
the `REGLA_*` environment variables (`regla_megatron.megatron_lm.arguments.regla_config_from`).
"""

import importlib.util
from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_with_transformer_engine_spec,
    get_mlp_module_spec_for_backend,
)
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType, LayerType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import (
    BaseTransformerLayer,
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from regla_megatron.attention import SDPADotProductAttention
from regla_megatron.config import ReGLAConfig, layer_is_regla
from regla_megatron.mixer import ReGLAMixer, ReGLAMixerSubmodules
from regla_megatron.norms import PerHeadNorm, SequenceParallelNorm

BACKENDS = ("local", "te", "auto")

# Local norms stored under TE's fused names, so local and TE checkpoints interchange.
_LOCAL_MLP_NORM_KEYS = {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
_LOCAL_ATTENTION_NORM_KEYS = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_", **_LOCAL_MLP_NORM_KEYS}


def te_available() -> bool:
    """Whether TransformerEngine can be imported."""
    return importlib.util.find_spec("transformer_engine") is not None


def _resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown spec backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "te" if te_available() else "local"
    if backend == "te" and not te_available():
        raise ImportError(
            "spec backend 'te' needs TransformerEngine, which is not installed; "
            "install transformer_engine or use backend='local'"
        )
    return backend


def _backend_for(config) -> str:
    """'local' when the config asks for Megatron's local implementation, else 'auto'."""
    return "local" if getattr(config, "transformer_impl", None) == "local" else "auto"


def _as_regla_config(config):
    if isinstance(config, ReGLAConfig):
        return config
    from regla_megatron.megatron_lm.arguments import regla_config_from

    return regla_config_from(config)


def get_regla_layer_spec(backend: str = "local") -> ModuleSpec:
    """TransformerLayer spec: norm -> ReGLAMixer -> residual -> norm -> MLP -> residual."""
    backend = _resolve_backend(backend)
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TENorm, TERowParallelLinear
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        # TENorm stays separate from in_proj: the low-rank gate reads the normed input too.
        input_norm, in_proj, out_proj = TENorm, TEColumnParallelLinear, TERowParallelLinear
        mlp = get_mlp_module_spec_for_backend(TESpecProvider())  # fc1 carries the pre-MLP norm
        pre_mlp_norm, keys = IdentityOp, {}
    else:
        input_norm, in_proj, out_proj = SequenceParallelNorm, ColumnParallelLinear, RowParallelLinear
        mlp = get_mlp_module_spec_for_backend(LocalSpecProvider())
        pre_mlp_norm, keys = SequenceParallelNorm, _LOCAL_MLP_NORM_KEYS
    mixer = ModuleSpec(
        module=ReGLAMixer,
        submodules=ReGLAMixerSubmodules(in_proj=in_proj, out_norm=PerHeadNorm, out_proj=out_proj),
    )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=input_norm,
            self_attention=mixer,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=pre_mlp_norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=dict(keys),
        ),
    )


def get_softmax_layer_spec(backend: str = "local", qk_layernorm: bool = False, core_attention=None) -> ModuleSpec:
    """A causal softmax attention TransformerLayer.

    'te' is Megatron's own TE GPT layer. 'local' uses `SDPADotProductAttention` (torch SDPA:
    FlashAttention or cuDNN on the GPU, no materialized scores; Megatron's DotProductAttention
    would store `[b, heads, s, s]` scores); it runs on CPU too but refuses context parallelism: pass
    `core_attention` (a class or spec with DotProductAttention's interface) to use another
    core attention, e.g. a CP-capable one, with the local layers.
    """
    backend = _resolve_backend(backend)
    if backend == "te":
        if core_attention is not None:
            raise ValueError("get_softmax_layer_spec: core_attention is only for backend='local'")
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    qk_norm = SequenceParallelNorm if qk_layernorm else IdentityOp
    attention = ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=core_attention or SDPADotProductAttention,
            linear_proj=RowParallelLinear,
            q_layernorm=qk_norm,
            k_layernorm=qk_norm,
        ),
    )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=SequenceParallelNorm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=SequenceParallelNorm,
            mlp=get_mlp_module_spec_for_backend(LocalSpecProvider()),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=dict(_LOCAL_ATTENTION_NORM_KEYS),
        ),
    )


def _layer_spec(config, global_layer_number: int, backend: str) -> ModuleSpec:
    if layer_is_regla(config, global_layer_number):
        return get_regla_layer_spec(backend)
    core_attention = None
    if backend == "local" and config.context_parallel_size > 1:
        # Megatron's local DotProductAttention refuses CP; TE's handles it itself.
        from regla_megatron.context_parallel.attention import ContextParallelDotProductAttention as core_attention
    return get_softmax_layer_spec(backend, qk_layernorm=config.qk_layernorm, core_attention=core_attention)


def _mark_heterogeneous(model_config, regla_config) -> None:
    # The block reads this flag from the config the model was built with, which in the
    # zero-patch form is the plain TransformerConfig, not our converted copy.
    if getattr(regla_config, "hetereogenous_dist_checkpoint", False):
        getattr(model_config, "transformer", model_config).hetereogenous_dist_checkpoint = True


def get_hybrid_block_spec(
    config, vp_stage: Optional[int] = None, pp_rank: Optional[int] = None, backend: Optional[str] = None
) -> TransformerBlockSubmodules:
    """The block spec of this pipeline stage (and virtual stage) for `config.regla_pattern`.

    Args:
        config: a ReGLAConfig (a plain TransformerConfig is converted, see module doc).
        vp_stage: virtual pipeline stage, None without virtual pipelining.
        pp_rank: pipeline rank; None means this process's.
        backend: 'local' | 'te' | 'auto'; None means 'local' if config.transformer_impl is
            'local', else 'auto'.
    Returns:
        TransformerBlockSubmodules(layer_specs=this stage's layers, layer_norm=final norm).
    """
    regla_config = _as_regla_config(config)
    _mark_heterogeneous(config, regla_config)
    backend = _resolve_backend(backend or _backend_for(config))
    layer_specs = [_layer_spec(regla_config, n, backend) for n in range(1, regla_config.num_layers + 1)]
    if regla_config.pipeline_model_parallel_layout is not None:
        layer_ids = regla_config.pipeline_model_parallel_layout.get_layer_id_list(
            layer_type=LayerType.decoder, vp_stage=vp_stage, pp_rank=pp_rank
        )
        local_specs = [layer_specs[i] for i in layer_ids]
    else:
        count = get_num_layers_to_build(regla_config, vp_stage=vp_stage, pp_rank=pp_rank)
        offset = get_transformer_layer_offset(regla_config, vp_stage=vp_stage, pp_rank=pp_rank)
        local_specs = layer_specs[offset : offset + count]
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm as final_norm
    else:
        final_norm = SequenceParallelNorm
    return TransformerBlockSubmodules(layer_specs=local_specs, layer_norm=final_norm)


def regla_spec(config, vp_stage: Optional[int] = None) -> TransformerBlockSubmodules:
    """`--spec regla_megatron.specs regla_spec`: the callable form (Megatron-LM main, Bridge).

    Inside a Megatron-LM run it first checks the data flags against the dataset
    (`check_megatron_lm_data`; raises ValueError naming the flag), since the zero-patch form
    has no argument hook; elsewhere that check does nothing.
    """
    from regla_megatron.megatron_lm.hooks import check_megatron_lm_data

    check_megatron_lm_data()
    return get_hybrid_block_spec(config, vp_stage=vp_stage)


class HybridLayerDispatch(BaseTransformerLayer):
    """Builds a ReGLA or softmax TransformerLayer, chosen by the global layer number.

    Megatron calls it like a layer class (`config=, layer_number=` local to the stage,
    `pg_collection=`, `vp_stage=`); `__new__` returns the built TransformerLayer, so
    this class never has instances. Subclassing BaseTransformerLayer makes Megatron's
    TransformerBlock repeat the spec for every layer of the stage.
    """

    def __new__(cls, config, layer_number: int = 1, pg_collection=None, vp_stage=None, **kwargs):
        from megatron.core import parallel_state
        from megatron.core.utils import get_pg_rank

        from regla_megatron.megatron_lm.hooks import check_megatron_lm_data

        check_megatron_lm_data()  # the zero-patch form's data check (once per run; see regla_spec)
        if pg_collection is not None:
            pp_rank = get_pg_rank(pg_collection.pp)
        else:
            pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        regla_config = _as_regla_config(config)
        _mark_heterogeneous(config, regla_config)
        global_number = layer_number
        # Megatron >= 0.20 may hand over an already-global number (add_layer_offset=False).
        if kwargs.get("add_layer_offset", True) and not kwargs.get("is_mtp_layer", False):
            global_number += get_transformer_layer_offset(regla_config, vp_stage, pp_rank)
        spec = _layer_spec(regla_config, global_number, _resolve_backend(_backend_for(config)))
        return build_module(
            spec, config=config, layer_number=layer_number, pg_collection=pg_collection, vp_stage=vp_stage, **kwargs
        )


regla_hybrid_spec = ModuleSpec(module=HybridLayerDispatch)
"""`--spec regla_megatron.specs regla_hybrid_spec`: the static form (Megatron-LM core_v0.16.x)."""
