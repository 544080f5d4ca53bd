"""Multi-process CPU (gloo) harness for comparing parallel Megatron runs to one process.

Not a test file. The pieces:

- `run_distributed(fn, world_size, *args)`: run a picklable, module-level
  `fn(rank, world_size, *args)` in `world_size` spawned gloo processes; returns the
  per-rank results, or raises with the failing rank's traceback.
- `init_parallel(tp, pp, cp, vpp)`: Megatron's parallel_state and RNG tracker.
- `tiny_config(...)`, `build_gpt(config, spec)`: a tiny fp32 GPTModel whose parameters
  are a function of their *global* name only (`init_params_by_name`), so TP/PP runs
  start from exactly the weights of the one-process run.
- `train_step(model, config, batches)`: one forward/backward through Megatron's
  pipeline schedule (`get_forward_backward_func`) and `finalize_model_grads`.
- `collect_full(model)`: every parameter and its gradient as full (TP-gathered)
  tensors keyed by global name; `compare_runs(ref, got)` lists the mismatches.
"""

import datetime
import faulthandler
import os
import pickle
import queue as queue_module
import re
import signal
import socket
import time
import traceback
import zlib

import torch
import torch.multiprocessing as mp

VOCAB = 128
SEQ = 32
MICRO_BATCH = 2
RTOL = 1e-5


# --------------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    # Ranks share two cores; more threads per rank only thrash.
    torch.set_num_threads(1)
    # On timeout the parent sends SIGUSR1: a stuck rank prints its stack to stderr.
    faulthandler.register(signal.SIGUSR1)
    try:
        from regla_megatron.cpu_shim import apply_cpu_shim

        apply_cpu_shim()
        torch.distributed.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=900)
        )
        # Plain pickle: torch's queue pickler would pass tensors through shared memory
        # that dies with this process before the parent reads it.
        result = pickle.dumps(fn(rank, world_size, *args))
        queue.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        except Exception:  # noqa: BLE001
            pass
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_distributed(fn, world_size, *args, timeout=1800):
    """Run `fn(rank, world_size, *args)` in `world_size` gloo processes; list of results.

    `fn` and `args` must be picklable (a module-level function). The first rank that
    raises makes this raise `RuntimeError` with that rank's traceback; a run past
    `timeout` seconds is killed and raises `TimeoutError`. The limit only catches hangs: it is
    far above what any test needs on a loaded 2-core machine.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    # Not daemonic: Megatron's checkpoint writer starts child processes of its own.
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue))
        for r in range(world_size)
    ]
    for proc in procs:
        proc.start()
    results, errors = {}, {}
    silent_polls = 0
    try:
        deadline = time.monotonic() + timeout
        while len(results) < world_size and not errors:
            if time.monotonic() > deadline:
                for proc in procs:  # stuck ranks print their stacks (SIGUSR1, faulthandler)
                    if proc.is_alive():
                        os.kill(proc.pid, signal.SIGUSR1)
                time.sleep(1.0)
                raise TimeoutError(
                    f"run_distributed: {fn.__name__} on {world_size} ranks exceeded {timeout}s; "
                    f"results from ranks {sorted(results)}; stacks on stderr"
                )
            try:
                rank, ok, payload = queue.get(timeout=1.0)
            except queue_module.Empty:
                # A rank that exited without reporting (killed, crashed in C) would hang us.
                gone = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in results]
                silent_polls = silent_polls + 1 if gone else 0
                if silent_polls > 3:
                    codes = [procs[r].exitcode for r in gone]
                    raise RuntimeError(f"run_distributed: ranks {gone} exited (codes {codes}) without a result") from None
                continue
            (results if ok else errors)[rank] = payload
    finally:
        for proc in procs:  # after an error the others may wait in a collective forever
            proc.join(timeout=0.5 if errors else 10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    if errors:
        rank, trace = next(iter(errors.items()))  # the first to report; the rest were killed
        raise RuntimeError(f"rank {rank} of {world_size} failed:\n{trace}")
    return [pickle.loads(results[r]) for r in range(world_size)]


# --------------------------------------------------------------------------- Megatron setup


def init_parallel(tp=1, pp=1, cp=1, vpp=None, seed=1234):
    """Initialize Megatron's model-parallel groups and RNG tracker (after init_process_group)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def tiny_config(config_cls=None, **overrides):
    """A tiny deterministic fp32 config sized for the current parallel_state."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_config import TransformerConfig

    config_cls = config_cls or TransformerConfig
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    fields = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=128,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        deterministic_mode=True,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
    )
    fields.update(overrides)
    return config_cls(**fields)


def tiny_hybrid_config(pattern: str = "R*R*", **overrides):
    """A tiny ReGLAConfig for the hybrid `pattern` on the CPU torch path (local layers)."""
    from regla_megatron.config import ReGLAConfig

    return tiny_config(ReGLAConfig, num_layers=len(pattern), regla_pattern=pattern, regla_backend="torch",
                       normalization="RMSNorm", transformer_impl="local", **overrides)


def build_gpt(config, layer_spec, vp_stage=None, seed=0, vocab=VOCAB, seq=SEQ):
    """A GPTModel for this pipeline stage (untied embeddings, RoPE), weights by name."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    kwargs = {} if vp_stage is None else {"vp_stage": vp_stage}
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=vocab,
        max_sequence_length=seq,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, **kwargs),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, **kwargs),
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        **kwargs,
    )
    init_params_by_name(model, seed)
    return model


def wrap_ddp(model, config):
    """Megatron DDP (fp32 grad buffers, no overlap), the path `finalize_model_grads` needs."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False)
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)


# --------------------------------------------------------------------------- naming and sharding

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def global_named_parameters(model):
    """(global name, param): local layer indices replaced by global ones (PP/VPP)."""
    gpt = _unwrap(model)
    for name, param in gpt.named_parameters():
        match = _LAYER.match(name)
        if match:
            layer = gpt.decoder.layers[int(match.group(1))]
            name = f"decoder.layers.{layer.layer_number - 1}." + name[match.end() :]
        yield name, param


def _tp():
    from megatron.core import parallel_state

    return (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_group(),
    )


def is_tp_split(param) -> bool:
    """Whether `param` is split over the TP group (Megatron's `tensor_model_parallel` tag)."""
    return bool(getattr(param, "tensor_model_parallel", False))


def full_shape(param, tp_size):
    """The global shape (list of ints) of `param`: its local shape, the split dim times `tp_size`."""
    shape = list(param.shape)
    if is_tp_split(param):
        shape[param.partition_dim] *= tp_size
    return shape


def shard_tensor(full, tp_rank, tp_size, dim, stride=1):
    """Rank `tp_rank`'s piece of `full`, cut as Megatron's CPU initialization cuts it:
    `tp_size * stride` equal chunks along `dim`, this rank taking every `tp_size`-th."""
    pieces = torch.chunk(full, tp_size * stride, dim=dim)
    return torch.cat(pieces[tp_rank::tp_size], dim=dim)


def unshard_tensor(parts, dim, stride=1):
    """Inverse of `shard_tensor`: the full tensor from all ranks' pieces, in rank order."""
    per_rank = [torch.chunk(p, stride, dim=dim) for p in parts]
    return torch.cat([per_rank[r][k] for k in range(stride) for r in range(len(parts))], dim=dim)


def shard(full, param, tp_rank, tp_size):
    """This rank's piece of a full tensor for `param` (unchanged if replicated)."""
    if not is_tp_split(param):
        return full
    return shard_tensor(full, tp_rank, tp_size, param.partition_dim, param.partition_stride)


def gather_full(local, param):
    """Full tensor from the TP shards of `local` (a param or its grad), stride-aware."""
    _, tp_size, group = _tp()
    if not is_tp_split(param) or tp_size == 1:
        return local.detach().clone()
    local = local.detach().contiguous()
    parts = [torch.empty_like(local) for _ in range(tp_size)]
    torch.distributed.all_gather(parts, local, group=group)
    return unshard_tensor(parts, param.partition_dim, param.partition_stride)


def init_params_by_name(model, seed=0):
    """Overwrite every parameter with values that depend only on its global name.

    Norm-like parameters that start at one stay near one and zero-initialized ones get
    small values, so every parameter (biases included) carries a gradient signal.
    """
    tp_rank, tp_size, _ = _tp()
    with torch.no_grad():
        for name, param in global_named_parameters(model):
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) + seed)
            noise = torch.randn(full_shape(param, tp_size), generator=gen)
            if param.dim() >= 2:
                full = 0.05 * noise
            elif bool((param == 1).all()):
                full = 1.0 + 0.1 * noise
            else:
                full = 0.1 * noise
            param.copy_(shard(full, param, tp_rank, tp_size))


# --------------------------------------------------------------------------- data and steps


def make_batches(num, micro_batch=MICRO_BATCH, seq=SEQ, vocab=VOCAB, seed=0):
    """`num` micro-batches of random tokens with next-token labels."""
    gen = torch.Generator().manual_seed(1000 + seed)
    batches = []
    for _ in range(num):
        tokens = torch.randint(0, vocab, (micro_batch, seq + 1), generator=gen)
        batches.append(
            dict(
                tokens=tokens[:, :-1].contiguous(),
                labels=tokens[:, 1:].contiguous(),
                position_ids=torch.arange(seq).unsqueeze(0).expand(micro_batch, seq).contiguous(),
            )
        )
    return batches


def _loss_func(output_tensor):
    loss = output_tensor.float().mean()
    return loss, {"lm loss": loss.detach().clone()}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(
        batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"]
    )
    return output, _loss_func


def train_step(model, config, batches):
    """Forward+backward over `batches` (micro-batches) with Megatron's schedule.

    `model` is one DDP-wrapped chunk or a list of chunks (VPP). Grads end in
    `param.main_grad`, finalized (DP all-reduce, SP norm all-reduce). Returns the mean
    loss over micro-batches on the last pipeline stage, else None.
    """
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    chunks = model if isinstance(model, list) else [model]
    for chunk in chunks:
        chunk.zero_grad_buffer()
    config.finalize_model_grads_func = finalize_model_grads
    data = iter(batches) if len(chunks) == 1 else [iter(batches) for _ in chunks]
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=data,
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(batches),
        seq_length=batches[0]["tokens"].shape[1],
        micro_batch_size=batches[0]["tokens"].shape[0],
        forward_only=False,
    )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return torch.stack([out["lm loss"] for out in losses]).mean().item()


def collect_full(model):
    """{global name: (full param, full grad)} from this rank's chunk(s), TP-gathered.

    Every TP rank must call it (collective). Grads come from `main_grad` (DDP) or `grad`.
    """
    chunks = model if isinstance(model, list) else [model]
    out = {}
    for chunk in chunks:
        for name, param in global_named_parameters(chunk):
            grad = getattr(param, "main_grad", None)
            grad = param.grad if grad is None else grad
            if grad is None:
                grad = torch.zeros_like(param)
            out[name] = (gather_full(param, param), gather_full(grad, param))
    return out


def keep_on_tp0_dp0(data):
    """`data` on the rank that speaks for its pipeline stage (TP rank 0, DP rank 0), else None."""
    from megatron.core import parallel_state

    first = (
        parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0
    )
    return data if first else None


def merge_ranks(results):
    """Union of the per-stage dicts returned by the ranks (None entries skipped)."""
    merged = {}
    for res in results:
        if res:
            merged.update(res)
    return merged


# --------------------------------------------------------------------------- comparison


def rel_error(got, ref) -> float:
    """max |got - ref| / max |ref| (0 when both are zero)."""
    scale = ref.abs().max().item()
    err = (got - ref).abs().max().item()
    return err / scale if scale > 0 else err


def compare_runs(ref, got, rtol=RTOL):
    """Names whose param or grad differ from `ref` beyond `rtol` (or are missing/extra).

    `ref` and `got` map global names to (param, grad). Returns a list of
    "name: reason" strings, empty when the runs agree.
    """
    problems = [f"{n}: missing" for n in ref if n not in got]
    problems += [f"{n}: unexpected" for n in got if n not in ref]
    for name in ref.keys() & got.keys():
        (ref_p, ref_g), (got_p, got_g) = ref[name], got[name]
        if ref_p.shape != got_p.shape:
            problems.append(f"{name}: shape {tuple(got_p.shape)} != {tuple(ref_p.shape)}")
            continue
        if rel_error(got_p, ref_p) > rtol:
            problems.append(f"{name}: param rel err {rel_error(got_p, ref_p):.2e}")
        if rel_error(got_g, ref_g) > rtol:
            problems.append(f"{name}: grad rel err {rel_error(got_g, ref_g):.2e}")
    return sorted(problems)


def assert_same_run(ref_loss, ref, got_loss, got, rtol=RTOL):
    """Loss and every parameter/gradient of `got` match the one-process `ref`."""
    assert ref, "empty reference"
    assert abs(got_loss - ref_loss) <= rtol * abs(ref_loss), f"loss {got_loss} != {ref_loss}"
    problems = compare_runs(ref, got, rtol)
    assert not problems, "mismatches vs one process:\n  " + "\n  ".join(problems)


__all__ = [
    "RTOL",
    "assert_same_run",
    "build_gpt",
    "collect_full",
    "compare_runs",
    "full_shape",
    "gather_full",
    "global_named_parameters",
    "init_parallel",
    "init_params_by_name",
    "is_tp_split",
    "keep_on_tp0_dp0",
    "make_batches",
    "merge_ranks",
    "rel_error",
    "run_distributed",
    "shard",
    "shard_tensor",
    "tiny_config",
    "tiny_hybrid_config",
    "train_step",
    "unshard_tensor",
    "wrap_ddp",
]
