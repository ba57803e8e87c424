"""Multi-process training helpers: process group, model wrapping (DDP or FSDP2), full state dicts.

Launch with ``torchrun --nproc_per_node N -m omnidit train CONFIG``; a plain ``omnidit train`` is a
world of one and none of this does anything. Checkpoints always hold full (unsharded) state dicts
keyed by parameter name, so they load the same whatever the world size.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from omnidit.errors import OmniditError

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_world(device: torch.device) -> World:
    """Join the process group that torchrun describes in the environment (nccl on CUDA, else gloo)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def local_device(device: torch.device, world: World) -> torch.device:
    """Each rank uses its own GPU (cuda:LOCAL_RANK); CPU ranks share the CPU."""
    if device.type == "cuda" and world.distributed:
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return device


def wrap_model(model: nn.Module, world: World, parallel: str) -> nn.Module:
    """DDP, or FSDP2 with ``fully_shard`` on every transformer block and then on the root."""
    if not world.distributed:
        return model
    if parallel == "ddp":
        device_ids = [model.img_in.weight.device.index] if model.img_in.weight.is_cuda else None
        # A batch of sound alone leaves the picture stream's weights without a gradient (and the reverse).
        unused = bool(model.config.extra_streams)
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=unused)
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in [*model.double_blocks, *model.single_blocks]:
            fully_shard(block)
        fully_shard(model)
        return model
    raise OmniditError(f"unknown train.parallel '{parallel}'", hint="use ddp or fsdp")


def clip_gradients(model: nn.Module, max_norm: float) -> Tensor:
    """Clip the gradients' global norm to ``max_norm`` (inf: only measure it) and return the norm before clipping
    as a plain tensor (under FSDP the norm of sharded gradients comes as a DTensor)."""
    norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def frozen_copy(model: nn.Module, world: World, parallel: str, build: Callable[[], nn.Module]) -> nn.Module:
    """A frozen copy of ``model`` in eval mode, sharded like it under FSDP (``build()`` makes an unwrapped model
    of the same architecture, whose shards then take ``model``'s; FSDP2 modules cannot be deep-copied)."""
    if parallel != "fsdp" or not world.distributed:
        return copy.deepcopy(unwrap(model)).requires_grad_(False).eval()
    with torch.random.fork_rng(devices=[]):  # building draws initial weights: leave the run's random stream
        copied = wrap_model(build(), world, parallel)
    with torch.no_grad():
        for mine, theirs in zip(copied.parameters(), model.parameters(), strict=True):
            mine.copy_(theirs)
    return copied.requires_grad_(False).eval()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """The whole model's state dict on the CPU (a collective under FSDP: call it on every rank)."""
    return get_model_state_dict(model, options=_FULL)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer state keyed by parameter name, unsharded, on the CPU (collective under FSDP)."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_full_state(model: nn.Module, state: dict[str, Tensor], optimizer: torch.optim.Optimizer | None = None,
                    optimizer_state: dict | None = None, strict: bool = True) -> None:
    """Load full state dicts into a (possibly wrapped or sharded) model and its optimizer; ``strict=False`` lets
    ``state`` cover part of the model (a LoRA run's adapter)."""
    # A copy: set_model_state_dict rewrites the dict it gets (DDP "module." prefixes, its own entries).
    set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True, strict=strict))
    if optimizer is not None and optimizer_state is not None:
        # A parameter that has had no gradient yet has no state (a picture stream before the first mixed-in batch
        # with pictures). Torch's loader refuses that when strict; not strict, it keeps the state it makes for
        # every parameter first (a step of zero gradients), which shifts AdamW's bias correction. So: load not
        # strict, drop that made-up state for the parameters the checkpoint lists without state (AdamW makes it at
        # their first gradient, as in the run that was not stopped), and refuse a parameter it does not list.
        set_optimizer_state_dict(model, optimizer, optimizer_state,
                                 options=StateDictOptions(full_state_dict=True, strict=False))
        listed = {n for g in optimizer_state.get("param_groups", []) for n in g.get("params", ())}
        with_state = optimizer_state.get("state", {})
        names = {id(p): n.removeprefix("module.") for n, p in model.named_parameters()}
        for p in (p for group in optimizer.param_groups for p in group["params"]):
            name = names.get(id(p), "?")
            if name not in listed:
                raise OmniditError(f"the checkpoint's optimizer state does not cover the parameter {name}: the run "
                                   "trains parameters it did not (a changed config?)",
                                   hint="resume with the config the run was started with, or use a new out_dir")
            if name not in with_state:
                optimizer.state.pop(p, None)


def all_reduce_mean(value: Tensor, world: World) -> Tensor:
    """Mean of a tensor over ranks (identity in a world of one)."""
    if world.distributed:
        value = value.clone()
        dist.all_reduce(value)
        value /= world.world_size
    return value


def all_gather_rows(value: Tensor, world: World) -> Tensor:
    """Every rank's ``value`` (b, ...) stacked in rank order along the first dimension, on every rank."""
    if not world.distributed:
        return value
    parts = [torch.empty_like(value) for _ in range(world.world_size)]
    dist.all_gather(parts, value.contiguous())
    return torch.cat(parts)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
