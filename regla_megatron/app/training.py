"""The demo model and its training, evaluation and generation, on every rank.

Everything is Megatron-Core's own: GPTModel with the plugin's hybrid block spec, DDP,
`get_megatron_optimizer`, the pipeline schedule from `get_forward_backward_func`, GPTDataset
via BlendedMegatronDatasetBuilder. Functions take the run's `DemoConfig` (`cfg`); the data
order and the learning rate are functions of the step, so a resumed run repeats an
uninterrupted one. On CPU the ranks talk gloo (with `apply_cpu_shim`, fp32); on GPUs,
NCCL, bf16 and the Triton kernels.
"""

from __future__ import annotations

import logging
import math
import time
from functools import partial

import torch


class NonFiniteError(RuntimeError):
    """A loss or a parameter became NaN/inf: the run stops, and nothing of it is saved."""


def device() -> torch.device:
    """This rank's device: its GPU (set by the launcher), or the CPU."""
    return torch.device("cuda", torch.cuda.currentdevice()) if torch.cuda.is_available() else torch.device("cpu")


def model_config(cfg):
    """The ReGLAConfig of the demo model (fp32 on CPU, bf16 on GPU)."""
    from regla_megatron.config import ReGLAConfig

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return ReGLAConfig(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads, ffn_hidden_size=cfg.ffn_hidden_size,
        regla_pattern=cfg.pattern, normalization="RMSNorm",
        tensor_model_parallel_size=cfg.tp, context_parallel_size=cfg.cp,
        pipeline_model_parallel_size=cfg.pp, sequence_parallel=cfg.tp > 1,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
        use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
        add_bias_linear=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        masked_softmax_fusion=False, gradient_accumulation_fusion=False,
        init_method_std=0.02, transformer_impl="local",
    )


def padded_vocab(vocab_size: int, tp: int) -> int:
    """Vocab rounded up to a multiple of 64, whatever the TP size.

    The padding must not depend on TP: padded logits still enter the softmax, so a
    checkpoint reloaded at another TP with another padding would give other losses.
    """
    padded = -(-vocab_size // 64) * 64
    if padded % tp:
        raise ValueError(f"padded vocab {padded} does not split over TP={tp}")
    return padded


def build_model_and_optimizer(cfg, tokenizer, with_optimizer: bool = True):
    """GPTModel (this pipeline stage) in Megatron DDP, and Megatron's Adam (None without it)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from regla_megatron.specs import get_hybrid_block_spec

    torch.manual_seed(cfg.seed)  # same initial weights on every build (use_cpu_initialization)
    config = model_config(cfg)
    model = GPTModel(
        config=config, transformer_layer_spec=get_hybrid_block_spec(config),
        vocab_size=padded_vocab(tokenizer.vocab_size, cfg.tp), max_sequence_length=cfg.seq_length,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False, position_embedding_type="rope",
    ).to(device())
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=False)
    model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    model.broadcast_params()
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model.no_sync
    if not with_optimizer:
        return model, None
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=0.1,
                        adam_beta1=0.9, adam_beta2=0.95, clip_grad=_clip_grad(), bf16=config.bf16,
                        params_dtype=config.params_dtype, use_distributed_optimizer=False),
        [model])
    config.grad_scale_func = optimizer.scale_loss
    return model, optimizer


def _clip_grad() -> float:
    # Megatron's clip_grad_by_total_norm_fp32 asserts CUDA tensors; on CPU the demo
    # trains without clipping (its small model and warmup do not need it).
    return 1.0 if torch.cuda.is_available() else 0.0


def count_params(model) -> int:
    """Parameters of this rank's part of the model."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- data


def build_datasets(cfg, prefix, tokenizer):
    """GPTDataset train/valid splits of the dataset `prefix` (`demo_split`: 98/2 by document,
    at least one valid document); `cfg.steps` and `cfg.eval_batches` global batches each."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from regla_megatron.app.data import check_split, demo_split, open_dataset

    info = open_dataset(prefix)
    check_split(info.num_documents, None)
    gbs = cfg.micro_batch_size * cfg.num_microbatches * _dp_size()
    config = GPTDatasetConfig(
        random_seed=cfg.seed, sequence_length=cfg.seq_length,
        blend=([str(prefix)], None), split=demo_split(info.num_documents),
        tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=False, mmap_bin_files=True,
        # "" (not None): every rank builds the sample index in memory, so nothing is written
        # next to the data (which may be read-only, or a separate copy on each node).
        path_to_cache="",
    )
    sizes = [max(cfg.steps, 1) * gbs, cfg.eval_batches * gbs, 0]
    quiet = logging.getLogger("megatron.core.datasets")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its "unable to save indexes" warning: meant so
    try:
        train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    finally:
        quiet.setLevel(level)
    return train, valid


def _dp_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_world_size()


def tokens_per_step(cfg) -> int:
    """Tokens one training step reads over the whole job."""
    return cfg.seq_length * cfg.micro_batch_size * cfg.num_microbatches * _dp_size()


def get_microbatches(cfg, dataset, step: int) -> list:
    """The step's micro-batches for this rank, a pure function of `step` (exact resume).

    Each is a dict of `tokens`, `labels`, `loss_mask`, `position_ids` of shape
    [micro_batch, seq/cp] (int64, loss_mask fp32), sliced for this CP rank.
    """
    from megatron.core import parallel_state as ps

    from regla_megatron.context_parallel import megatron_cp_batch

    dp, dp_rank = _dp_size(), ps.get_data_parallel_rank()
    batches = []
    for micro in range(cfg.num_microbatches):
        first = ((step * cfg.num_microbatches + micro) * dp + dp_rank) * cfg.micro_batch_size
        samples = [dataset[(first + j) % len(dataset)] for j in range(cfg.micro_batch_size)]
        batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]).to(device())
                 for k in ("tokens", "labels", "loss_mask", "position_ids")}
        batches.append(megatron_cp_batch(batch, ps.get_context_parallel_group()))
    return batches


# --------------------------------------------------------------------------- training


def lr_at(cfg, step: int) -> float:
    """Linear warmup then cosine decay to `min_lr` (a function of the step only)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def forward_step(data_iterator, model):
    """Megatron's forward_step_func: per-token losses and the loss function to reduce them."""
    batch = next(data_iterator)
    losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return losses, partial(_loss_func, batch["loss_mask"])


def _loss_func(loss_mask, losses):
    # (sum, tokens, report): the schedule divides by the token count, as pretrain_gpt does.
    total = torch.sum(losses.float().view(-1) * loss_mask.view(-1))
    count = loss_mask.sum().to(torch.int)
    return total, count, {"lm loss": torch.stack([total.detach(), count.float()])}


def _run_schedule(cfg, model, batches, forward_only: bool) -> tuple[float, float]:
    """One pass over `batches` through the pipeline schedule; returns (loss sum, tokens) of the job."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    reports = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
        num_microbatches=len(batches), seq_length=cfg.seq_length,
        micro_batch_size=cfg.micro_batch_size, forward_only=forward_only)
    local = torch.zeros(2, dtype=torch.float64, device=device())
    for report in reports:  # empty except on the last pipeline stage
        local += report["lm loss"].to(local)
    # Sum over every rank: each TP rank of the last stage reports the same numbers, which
    # cancels in sum / tokens; DP and CP ranks report disjoint tokens.
    torch.distributed.all_reduce(local)
    return local[0].item(), local[1].item()


def check_finite_loss(step: int, loss: float, grad_norm: float) -> None:
    """Raises NonFiniteError naming `step` (1-based) when its loss or gradient norm is NaN/inf."""
    for what, value in (("loss", loss), ("gradient norm", grad_norm)):
        if not math.isfinite(value):
            raise NonFiniteError(f"step {step}: the {what} is {value}; stopping here, nothing from this "
                                 f"step on is saved (try a lower --lr, or more --warmup steps)")


def train(cfg, model, optimizer, dataset, start: int, stop: int, say) -> dict:
    """Steps [start, stop); returns {step (1-based): loss}.

    Raises NonFiniteError at the first step whose loss or gradient norm is not finite
    (every rank sees the same job-wide numbers, so every rank stops there).
    """
    model.train()
    losses, t_log, logged = {}, time.time(), start
    for step in range(start, stop):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step)
        model.zero_grad_buffer()
        optimizer.zero_grad()
        total, count = _run_schedule(cfg, model, get_microbatches(cfg, dataset, step), False)
        if not torch.cuda.is_available():
            optimizer.prepare_grads()  # copies DDP's main_grad into .grad (step() repeats it)
            grad_norm = optimizer.get_grad_norm()  # step() computes it only when clipping
            check_finite_loss(step + 1, total / count, grad_norm)
        ok, norm, _ = optimizer.step()
        grad_norm = norm if torch.cuda.is_available() else grad_norm
        losses[step + 1] = total / count
        check_finite_loss(step + 1, losses[step + 1], grad_norm if grad_norm is not None else 0.0)
        if (step + 1) % cfg.log_every == 0 or step + 1 in (start + 1, stop):
            dt = (time.time() - t_log) / (step + 1 - logged)
            say(f"step {step + 1:5d} | loss {losses[step + 1]:.4f} | lr {lr_at(cfg, step):.2e} | "
                f"grad norm {grad_norm:.3f} | {tokens_per_step(cfg) / dt:,.0f} tokens/s")
            t_log, logged = time.time(), step + 1
    return losses


@torch.no_grad()
def evaluate(cfg, model, dataset) -> float:
    """Mean validation loss per token over `cfg.eval_batches` steps' worth of data."""
    model.eval()
    total = count = 0.0
    for step in range(cfg.eval_batches):
        t, c = _run_schedule(cfg, model, get_microbatches(cfg, dataset, step), True)
        total, count = total + t, count + c
    model.train()
    return total / count


# --------------------------------------------------------------------------- generation


def _local_positions(seq: int) -> torch.Tensor:
    """Global positions held by this CP rank, in local order (Megatron's 2*CP zigzag chunks)."""
    from megatron.core import parallel_state as ps

    cp, rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    chunk = seq // (2 * cp)
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in (rank, 2 * cp - 1 - rank)])


@torch.no_grad()
def generate(cfg, model, prompt: list, n: int, eod: int) -> list:
    """Greedy decoding by full recomputation: each new token re-runs the whole window.

    The window is `cfg.seq_length` tokens padded with EOD after the text (causal, so the
    padding never influences earlier positions); it slides once the text fills it.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model.eval()
    seq, ids, out = cfg.seq_length, list(prompt), []
    positions = _local_positions(seq).to(device())

    def argmax_step(data_iterator, model):
        tokens = next(data_iterator)
        logits = model(tokens, positions[None], None)  # [1, seq/cp, vocab/tp]
        full = gather_from_tensor_model_parallel_region(logits.float())
        return logits, lambda _: (torch.zeros((), device=device()), {"ids": full.argmax(-1)[0]})

    for _ in range(n):
        window = ids[-seq:]
        tokens = torch.full((seq,), eod, dtype=torch.long)
        tokens[: len(window)] = torch.tensor(window)
        local = tokens.to(device())[positions][None]
        reports = get_forward_backward_func()(
            forward_step_func=argmax_step, data_iterator=iter([local] * 1), model=[model],
            num_microbatches=1, seq_length=seq, micro_batch_size=1, forward_only=True)
        # The rank holding position len(window)-1 of the last stage proposes the token;
        # a MAX all-reduce hands it to every rank.
        proposal = torch.full((1,), -1, dtype=torch.long, device=device())
        if reports and ps.is_pipeline_last_stage():
            hit = (positions == len(window) - 1).nonzero()
            if hit.numel():
                proposal[0] = reports[0]["ids"][hit[0, 0]]
        torch.distributed.all_reduce(proposal, op=torch.distributed.ReduceOp.MAX)
        ids.append(int(proposal.item()))
        out.append(ids[-1])
    model.train()
    return out


# --------------------------------------------------------------------------- checkpoints
