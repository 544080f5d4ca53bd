"""`regla-megatron train`: train a small hybrid ReGLA GPT with Megatron-Core, end to end.

Read top to bottom: `DemoConfig` (every knob), `run_demo` (prepare data, launch ranks),
`worker` (per rank: train, save, resume, evaluate, generate), then the pieces it uses.

Everything is Megatron-Core's own: GPTModel with the plugin's hybrid block spec, DDP,
`get_megatron_optimizer`, the pipeline schedule from `get_forward_backward_func`,
GPTDataset via BlendedMegatronDatasetBuilder, `dist_checkpointing`. On CPU the ranks talk
gloo (with `apply_cpu_shim`); on GPUs, NCCL, bf16 and the Triton kernels.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Optional

import torch

from regla_megatron.launch import init_model_parallel, launch, under_torchrun

PRESETS = {
    # ~0.9M parameters: the loss falls from 5.6 to about 2 in a few CPU minutes.
    "small": dict(num_layers=4, hidden_size=128, num_attention_heads=4, ffn_hidden_size=512,
                  pattern="R*R*", seq_length=256, micro_batch_size=8, steps=250, save_at=150,
                  lr=3e-3, warmup=20, eval_batches=4, gen_tokens=48, max_bytes=4_000_000),
    # CI-sized: seconds per step, enough to see the loss move and to test resuming.
    "tiny": dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                 pattern="R*", seq_length=64, micro_batch_size=2, steps=6, save_at=3,
                 lr=1e-2, warmup=0, eval_batches=1, gen_tokens=8, max_bytes=300_000),
}


@dataclasses.dataclass
class DemoConfig:
    """All settings of the demo run (CLI flags of `regla-megatron train` map 1:1)."""

    workdir: str = "runs/demo"
    data: Optional[list] = None  # text files/folders; None = this Python's stdlib sources
    tokenizer: str = "byte"  # 'byte' | 'bpe' (needs the optional `tokenizers` package)
    bpe_vocab_size: int = 2048
    max_bytes: Optional[int] = None
    tp: int = 2
    cp: int = 2
    pp: int = 1
    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    ffn_hidden_size: int = 512
    pattern: str = "R*R*"
    seq_length: int = 256
    micro_batch_size: int = 8
    num_microbatches: int = 1
    steps: int = 250
    save_at: Optional[int] = 150  # save here, then restart from the checkpoint; None: no restart
    load: Optional[str] = None  # start from this checkpoint (any TP/CP/PP layout)
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 20
    log_every: int = 10
    eval_batches: int = 4
    gen_tokens: int = 48
    prompt: str = "def __init__(self"
    seed: int = 1234

    @classmethod
    def preset(cls, name: str, **overrides) -> "DemoConfig":
        return cls(**{**PRESETS[name], **overrides})

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.pp


def run_demo(cfg: DemoConfig) -> Optional[dict]:
    """Prepares the corpus, trains on `cfg.world_size` ranks; returns the metrics of rank 0.

    The metrics (also in `<workdir>/metrics.json`): `losses` {step: loss}, `val_loss`,
    `val_ppl`, `generated`, `tokens_per_s`, `seconds`. Under an outer torchrun every rank
    calls this; rank 0 prepares the data, the others wait for it and return None.
    """
    work = Path(cfg.workdir)
    data_dir = work / "data"
    if under_torchrun() and int(os.environ["RANK"]) != 0:
        while not (data_dir / "prepared").exists():
            time.sleep(1)
        launch(worker, cfg.world_size, cfg)
        return None
    work.mkdir(parents=True, exist_ok=True)
    if not (data_dir / "prepared").exists():
        _prepare(cfg, data_dir)
    else:
        print(f"using the corpus prepared earlier in {data_dir} (delete it to re-prepare)", flush=True)
    (work / "metrics.json").unlink(missing_ok=True)
    launch(worker, cfg.world_size, cfg)
    return json.loads((work / "metrics.json").read_text())


def _prepare(cfg: DemoConfig, data_dir: Path) -> None:
    from regla_megatron.data import prepare_data

    t0 = time.time()
    shutil.rmtree(data_dir, ignore_errors=True)  # a half-written earlier attempt
    prepared = prepare_data(data_dir, cfg.data, cfg.tokenizer, cfg.bpe_vocab_size, cfg.max_bytes)
    (data_dir / "prepared").write_text(json.dumps({"files": cfg.data, "max_bytes": cfg.max_bytes}))
    print(f"prepared {prepared.num_documents} documents, {prepared.num_tokens:,} tokens "
          f"({prepared.tokenizer.kind} tokenizer) in {time.time() - t0:.1f}s -> {prepared.prefix}",
          flush=True)


def worker(cfg: DemoConfig) -> None:
    """One rank: train (with a save/restart in the middle), evaluate, generate."""
    from megatron.core import parallel_state as ps

    from regla_megatron.data import load_tokenizer

    init_model_parallel(cfg.tp, cfg.cp, cfg.pp, cfg.seed)
    say = _printer(cfg)
    tokenizer = load_tokenizer(Path(cfg.workdir) / "data")
    train_ds, valid_ds = build_datasets(cfg, tokenizer)
    say(f"world {cfg.world_size} = TP {cfg.tp} x CP {cfg.cp} x PP {cfg.pp} x DP "
        f"{ps.get_data_parallel_world_size()} on {_device().type} "
        f"({torch.distributed.get_backend()}); {len(train_ds):,} train / {len(valid_ds):,} valid "
        f"sequences of {cfg.seq_length} tokens")

    ckpt = Path(cfg.workdir) / "checkpoint"
    losses, start, seconds, tokens = {}, 0, 0.0, 0
    model, optimizer = build_model_and_optimizer(cfg, tokenizer)
    say(f"model: pattern {cfg.pattern}, {_count_params(model):,} parameters on this rank")
    if cfg.load:
        start = load_checkpoint(cfg.load, model, optimizer)
        say(f"loaded {cfg.load} at step {start}")
    stops = [s for s in (cfg.save_at, cfg.steps) if s is not None and start < s <= cfg.steps]
    for stop in sorted(set(stops)):
        t0 = time.time()
        losses.update(train(cfg, model, optimizer, train_ds, start, stop, say))
        seconds += time.time() - t0
        tokens += (stop - start) * _tokens_per_step(cfg)
        save_checkpoint(ckpt / f"step{stop}", model, optimizer, stop)
        say(f"saved checkpoint {ckpt / f'step{stop}'}")
        if stop < cfg.steps:  # restart from the checkpoint, as a new job would
            del model, optimizer
            model, optimizer = build_model_and_optimizer(cfg, tokenizer)
            start = load_checkpoint(ckpt / f"step{stop}", model, optimizer)
            say(f"resumed from {ckpt / f'step{stop}'} with a freshly built model and optimizer")
        start = stop

    val_loss = evaluate(cfg, model, valid_ds)
    say(f"validation: loss {val_loss:.4f}, perplexity {math.exp(val_loss):.2f} (per "
        f"{tokenizer.kind} token)")
    prompt_ids = tokenizer.tokenize(cfg.prompt)
    new_ids = generate(cfg, model, prompt_ids, cfg.gen_tokens, tokenizer.eod)
    text = tokenizer.detokenize(new_ids)
    say(f"greedy: {cfg.prompt!r} -> {text!r}")
    metrics = dict(workdir=cfg.workdir, losses={str(k): v for k, v in losses.items()}, val_loss=val_loss,
                   val_ppl=math.exp(val_loss), generated=text, generated_ids=new_ids,
                   tokens_per_s=tokens / max(seconds, 1e-9), seconds=seconds)
    if torch.distributed.get_rank() == 0:
        (Path(cfg.workdir) / "metrics.json").write_text(json.dumps(metrics, indent=1))


# --------------------------------------------------------------------------- model


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def model_config(cfg: DemoConfig):
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


def build_model_and_optimizer(cfg: DemoConfig, tokenizer):
    """GPTModel (this pipeline stage) in Megatron DDP, and Megatron's Adam."""
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
    ).to(_device())
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=False)
    model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    model.broadcast_params()
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=0.1,
                        adam_beta1=0.9, adam_beta2=0.95, clip_grad=_clip_grad(), bf16=config.bf16,
                        params_dtype=config.params_dtype, use_distributed_optimizer=False),
        [model])
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = model.no_sync
    return model, optimizer


def _clip_grad() -> float:
    # Megatron's clip_grad_by_total_norm_fp32 asserts CUDA tensors; on CPU the demo
    # trains without clipping (its small model and warmup do not need it).
    return 1.0 if torch.cuda.is_available() else 0.0


def _count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- data


def build_datasets(cfg: DemoConfig, tokenizer):
    """GPTDataset train/valid splits (98/2 by document, at least one valid document)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = str(Path(cfg.workdir) / "data" / "corpus")
    num_docs = IndexedDataset(prefix).sequence_lengths.shape[0]
    if num_docs < 2:
        raise ValueError(f"{prefix}: {num_docs} document(s); train and validation need at least 2 files")
    # An empty validation split would make GPTDataset loop forever looking for tokens.
    valid_pct = max(2.0, 100.0 / num_docs)

    dp = _dp_size()
    gbs = cfg.micro_batch_size * cfg.num_microbatches * dp
    config = GPTDatasetConfig(
        random_seed=cfg.seed, sequence_length=cfg.seq_length,
        blend=([prefix], None), split=f"{100 - valid_pct},{valid_pct},0",
        tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=False, mmap_bin_files=True,
    )
    sizes = [cfg.steps * gbs, cfg.eval_batches * gbs, 0]
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    return train, valid


def _dp_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_world_size()


def _tokens_per_step(cfg: DemoConfig) -> int:
    return cfg.seq_length * cfg.micro_batch_size * cfg.num_microbatches * _dp_size()


def get_microbatches(cfg: DemoConfig, dataset, step: int) -> list:
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
        batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]).to(_device())
                 for k in ("tokens", "labels", "loss_mask", "position_ids")}
        batches.append(megatron_cp_batch(batch, ps.get_context_parallel_group()))
    return batches


# --------------------------------------------------------------------------- training


def lr_at(cfg: DemoConfig, step: int) -> float:
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


def _run_schedule(cfg: DemoConfig, model, batches, forward_only: bool) -> tuple[float, float]:
    """One pass over `batches` through the pipeline schedule; returns (loss sum, tokens) of the job."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    reports = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
        num_microbatches=len(batches), seq_length=cfg.seq_length,
        micro_batch_size=cfg.micro_batch_size, forward_only=forward_only)
    local = torch.zeros(2, dtype=torch.float64, device=_device())
    for report in reports:  # empty except on the last pipeline stage
        local += report["lm loss"].to(local)
    # Sum over every rank: each TP rank of the last stage reports the same numbers, which
    # cancels in sum / tokens; DP and CP ranks report disjoint tokens.
    torch.distributed.all_reduce(local)
    return local[0].item(), local[1].item()


def train(cfg: DemoConfig, model, optimizer, dataset, start: int, stop: int, say) -> dict:
    """Steps [start, stop); returns {step (1-based): loss}."""
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
        ok, norm, _ = optimizer.step()
        grad_norm = norm if torch.cuda.is_available() else grad_norm
        losses[step + 1] = total / count
        if (step + 1) % cfg.log_every == 0 or step + 1 in (start + 1, stop):
            dt = (time.time() - t_log) / (step + 1 - logged)
            say(f"step {step + 1:5d} | loss {losses[step + 1]:.4f} | lr {lr_at(cfg, step):.2e} | "
                f"grad norm {grad_norm:.3f} | {_tokens_per_step(cfg) / dt:,.0f} tokens/s")
            t_log, logged = time.time(), step + 1
    return losses


@torch.no_grad()
def evaluate(cfg: DemoConfig, model, dataset) -> float:
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
def generate(cfg: DemoConfig, model, prompt: list, n: int, eod: int) -> list:
    """Greedy decoding by full recomputation: each new token re-runs the whole window.

    The window is `cfg.seq_length` tokens padded with EOD after the text (causal, so the
    padding never influences earlier positions); it slides once the text fills it.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model.eval()
    seq, ids, out = cfg.seq_length, list(prompt), []
    positions = _local_positions(seq).to(_device())

    def argmax_step(data_iterator, model):
        tokens = next(data_iterator)
        logits = model(tokens, positions[None], None)  # [1, seq/cp, vocab/tp]
        full = gather_from_tensor_model_parallel_region(logits.float())
        return logits, lambda _: (torch.zeros((), device=_device()), {"ids": full.argmax(-1)[0]})

    for _ in range(n):
        window = ids[-seq:]
        tokens = torch.full((seq,), eod, dtype=torch.long)
        tokens[: len(window)] = torch.tensor(window)
        local = tokens.to(_device())[positions][None]
        reports = get_forward_backward_func()(
            forward_step_func=argmax_step, data_iterator=iter([local] * 1), model=[model],
            num_microbatches=1, seq_length=seq, micro_batch_size=1, forward_only=True)
        # The rank holding position len(window)-1 of the last stage proposes the token;
        # a MAX all-reduce hands it to every rank.
        proposal = torch.full((1,), -1, dtype=torch.long, device=_device())
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


def _sharded_state(model, optimizer, step: int, is_loading: bool) -> dict:
    model_sd = model.module.sharded_state_dict()
    return {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=is_loading),
            "step": step}


def save_checkpoint(path: Path, model, optimizer, step: int) -> None:
    """Saves model + optimizer with `dist_checkpointing` (loadable at other TP/CP/PP)."""
    from megatron.core import dist_checkpointing

    if torch.distributed.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)  # dist_checkpointing refuses a non-empty folder
        path.mkdir(parents=True)
    torch.distributed.barrier()
    dist_checkpointing.save(_sharded_state(model, optimizer, step, False), str(path))
    torch.distributed.barrier()


def load_checkpoint(path, model, optimizer) -> int:
    """Loads a `save_checkpoint` folder into `model`/`optimizer`; returns its step."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(_sharded_state(model, optimizer, 0, True), str(path))
    model.module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def _printer(cfg: DemoConfig):
    rank = torch.distributed.get_rank()

    def say(msg: str) -> None:
        if rank == 0:
            print(msg, flush=True)

    return say
