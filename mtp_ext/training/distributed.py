"""Data-parallel training of the reference model with torch.distributed: the torchrun
environment, DDP or FSDP (fully_shard) wrapping, the rank's share of a global batch, and a
clean end of a rank.
The fused loss needs nothing special here: it is an ordinary autograd op inside the model's
forward, so DDP's gradient all-reduce and FSDP's all-gather / reduce-scatter work around it.

Ending a rank (docs/distributed.md, "Ending a rank"): a gloo process group runs worker threads,
and a worker drops a finished collective's tensors after the caller has seen it complete. If
the group is still alive when the interpreter finalizes, a worker that must release a tensor
whose Python object it keeps alive waits for the GIL, is made to exit by the finalizing
interpreter, and the process aborts ("terminate called without an active exception") after the
work is done. So the group must be freed before the interpreter ends: `init_process_group`
imports torch.distributed.nn first (imported later, as DDP does, it binds the live default group
into its functions' default arguments for good), `shutdown` frees the wrapped model before it
destroys the group, and `end_rank` covers what torch itself still holds (FSDP)."""
from __future__ import annotations

import gc
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

PARALLEL_MODES = ("ddp", "fsdp")


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


DEVICES = ("auto", "cpu", "cuda")


def pick_device(name: str = "auto") -> torch.device:
    """The device a process trains or decodes on: "cuda" (this rank's GPU, LOCAL_RANK under
    torchrun), "cpu", or "auto" (CUDA where torch sees a GPU, else the CPU). "cuda" without a
    GPU: ValueError."""
    if name not in DEVICES:
        raise ValueError(f"--device must be one of {DEVICES}, got {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = (f"CUDA {torch.version.cuda} build, no GPU visible" if torch.version.cuda
                 else "a CPU-only build")
        raise ValueError(f"--device cuda: torch.cuda.is_available() is False (torch "
                         f"{torch.__version__}, {build}); use --device cpu or auto")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= torch.cuda.device_count():
        raise ValueError(f"--device cuda: LOCAL_RANK {local} but {torch.cuda.device_count()} "
                         f"GPU(s) visible")
    return torch.device("cuda", local)


def init_from_env(device: str = "auto") -> DistContext:
    """The process's device (pick_device) and, under torchrun (WORLD_SIZE, RANK, MASTER_ADDR,
    ...), its process group: nccl on CUDA, gloo on the CPU. One process: no group."""
    dev = pick_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        return DistContext(device=dev)
    if not dist.is_initialized():
        init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), dev)


def init_process_group(backend: str, **kwargs):
    """dist.init_process_group, with torch.distributed.nn imported before it: that module's
    functions take `group=group.WORLD` as a default argument, evaluated when it is first
    imported; imported after the group exists (DDP imports it), they hold the group forever and
    destroy_process_group cannot free it (see the module docstring)."""
    import torch.distributed.nn  # noqa: F401
    dist.init_process_group(backend, **kwargs)


# Set by wrap(mode="fsdp"): torch keeps the group alive past destroy_process_group (DTensor's
# sharding and redistribution caches hold FSDP's device mesh, which holds its process groups).
_group_outlives_shutdown = False


def shutdown(ctx: DistContext):
    """Frees what holds the process group, then destroys it on every rank at once. Call it
    after the last collective, with the wrapped model and optimizer out of scope."""
    if ctx.enabled and dist.is_initialized():
        gc.collect()  # a wrapped model lives in reference cycles (module hooks): it holds the group
        dist.barrier()  # nobody closes its connections while another rank still reads
        dist.destroy_process_group()


def end_rank(code: int = 0) -> int:
    """The exit of a rank after `shutdown`: returns `code` when the process group is freed (the
    interpreter can end as usual), else flushes stdout and stderr and leaves with os._exit(code)
    without finalizing the interpreter: the group's worker threads would meet the finalizing
    interpreter and abort a finished run. Everything the rank writes (checkpoint, logs) must be
    written and closed before this call."""
    if not _group_outlives_shutdown:
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def wrap(model: nn.Module, mode: str) -> nn.Module:
    """DDP around the model, or FSDP2: fully_shard on each transformer block, then on the
    model (embedding, norm and unembedding are sharded with the root)."""
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel mode must be one of {PARALLEL_MODES}, got {mode!r}")
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard
    global _group_outlives_shutdown
    _group_outlives_shutdown = True
    for blk in list(model.trunk) + list(model.heads):
        fully_shard(blk)
    fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The MTPTransformer inside a DDP wrapper (FSDP2 keeps the module itself)."""
    return getattr(model, "module", model)


def local_batch(batch: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """This rank's rows of a global batch (every rank draws the same global batch)."""
    if batch.shape[0] % ctx.world:
        raise ValueError(f"batch size {batch.shape[0]} is not divisible by the {ctx.world} ranks")
    return batch.chunk(ctx.world)[ctx.rank]


def full_state_dict(model: nn.Module) -> dict:
    """The whole model's state on the CPU (gathered from the shards under FSDP); a collective
    under FSDP, so every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))


def mean_over_ranks(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if not ctx.enabled:
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / ctx.world
