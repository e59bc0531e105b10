"""FSDP2 (PyTorch's ``fully_shard``) for a training stage, the same code on GPUs (NCCL) and on CPU (gloo).

accelerate 1.15 builds its FSDP state only for GPU launches: on CPU it falls back to DDP (``MULTI_CPU``) and the
plugin is ignored. So rnnify shards the model itself, with accelerate still launching the processes, placing them
on devices and reducing metrics; an accelerate config that asks for FSDP (``recipes/accelerate/fsdp.yaml``, which
sets ``ACCELERATE_USE_FSDP``) selects this path as the recipe's ``distributed.strategy: fsdp`` does.

Layout of the shards:
- the student (a copy made for the stage, so the model outside stays a plain module that later stages, the
  evaluation and ``save_pretrained`` use): one unit per attention/mixer module, one per decoder layer, and the root
  (embeddings, final norm, LM head); after the stage its trained parameters are gathered back into the original.
- the frozen teacher: one unit per attention module and per decoder layer, sharded in place once; its embeddings,
  final norm and LM head stay whole on every process (a stage may call ``teacher.model`` directly, bypassing a root
  unit's hooks, and they are small beside the layers).
Attention modules are units of their own because stages call them directly (attention transfer calls each
student mixer on the teacher's hidden states; stepwise distillation runs teacher attentions inside the student).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint

from ..errors import RnnifyError


def fsdp_requested(strategy: str) -> bool:
    """The recipe's ``distributed.strategy``, or for ``auto`` an ``accelerate launch`` whose config asks for FSDP."""
    if strategy == "auto":
        return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    return strategy == "fsdp"


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a causal LM (through a peft wrapper too): the longest ``ModuleList`` named ``layers``."""
    best: list[nn.Module] = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and name.split(".")[-1] == "layers" and len(m) > len(best):
            best = list(m)
    if not best:
        raise RnnifyError(f"{type(model).__name__}: no decoder layers found (a ModuleList named 'layers') to shard")
    return best


def _attention(layer: nn.Module):
    return getattr(layer, "self_attn", None)


def _is_sharded(module) -> bool:
    return isinstance(module, FSDPModule)


class ShardedStage:
    """Shards a stage's objective; ``gather_back()`` copies the trained parameters into the original student."""

    def __init__(self, objective, *, device, bf16: bool, reshard_after_forward: bool = True,
                 shard_teacher: bool = True, world: int):
        if not dist.is_initialized():
            raise RnnifyError("distributed.strategy fsdp needs several processes: launch with `accelerate launch "
                              "--config_file recipes/accelerate/fsdp.yaml -m rnnify run ...` or `torchrun "
                              "--nproc_per_node N -m rnnify run ...`")
        self.original = objective.student
        teacher = objective.teacher
        keep = {} if teacher is None or teacher is objective.student else {id(teacher): teacher}
        # a copy of the objective with its own student (the teacher, frozen and shared, is not copied)
        self.objective = copy.deepcopy(objective, memo=keep)
        mesh = init_device_mesh(device.type, (world,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
            else MixedPrecisionPolicy()
        shard = functools.partial(fully_shard, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        student = self.objective.student
        for layer in decoder_layers(student):
            if _attention(layer) is not None:
                shard(_attention(layer))
            shard(layer)
        shard(student)
        self.root = student
        self.teacher_sharded = False
        if teacher is not None and teacher is not objective.student and shard_teacher:
            for layer in decoder_layers(teacher):
                if _is_sharded(layer):
                    continue  # an earlier stage sharded it
                if _attention(layer) is not None:
                    shard(_attention(layer))
                shard(layer)
            teacher.to(device)  # the unsharded rest (embeddings, norm, head)
            self.teacher_sharded = True
        elif teacher is not None and teacher is not objective.student:
            teacher.to(device)

    def describe(self) -> str:
        local = sum(_local(p).numel() for p in self.root.parameters())
        total = sum(p.numel() for p in self.root.parameters())
        text = f"student {local:,} of {total:,} parameters on this process"
        if self.teacher_sharded:
            text += "; teacher layers sharded"
        return text

    def set_gradient_sync(self, sync: bool) -> None:
        """The FSDP counterpart of DDP's ``no_sync``: skip the reduce-scatter on accumulation micro-steps."""
        self.root.set_requires_gradient_sync(sync)

    def full_trainable(self) -> dict[str, torch.Tensor]:
        """Every trainable parameter gathered to a full CPU tensor, on every process (a collective: all call it)."""
        out = {}
        for n, p in self.root.named_parameters():
            if p.requires_grad:
                out[n] = _full(p).detach().cpu()
        return out

    def load_trainable(self, weights: dict[str, torch.Tensor]) -> None:
        """Full tensors (the same on every process) into this process's shards."""
        named = {n: p for n, p in self.root.named_parameters() if p.requires_grad}
        with torch.no_grad():
            for n, p in named.items():
                full = weights[n].to(p.dtype)
                if isinstance(p, DTensor):
                    local = distribute_tensor(full.to(p.to_local().device), p.device_mesh, p.placements).to_local()
                    p.to_local().copy_(local)
                else:
                    p.copy_(full)

    def optimizer_state(self, optimizer) -> dict:
        """The optimizer's state with full tensors keyed by parameter name (on the main process; a collective)."""
        return get_optimizer_state_dict(self.root, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        set_optimizer_state_dict(self.root, optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))

    def gather_back(self) -> None:
        """The trained parameters, gathered, into the original (unsharded) student; the copy is dropped."""
        full = self.full_trainable()
        named = dict(self.original.named_parameters())
        with torch.no_grad():
            for n, t in full.items():
                named[n].copy_(t.to(device=named[n].device, dtype=named[n].dtype))
        self.objective = self.root = None


def _local(p):
    return p.to_local() if isinstance(p, DTensor) else p


def _full(p):
    return p.full_tensor() if isinstance(p, DTensor) else p


@contextlib.contextmanager
def activation_checkpointing(model: nn.Module, enabled: bool):
    """Recompute each decoder layer's activations in the backward pass instead of keeping them (non-reentrant
    ``torch.utils.checkpoint``): activation memory falls from every layer's intermediates to one hidden state per
    layer, for about one more forward pass of compute. The layer's forward is wrapped (inside any FSDP unit's hooks,
    so the recomputation finds its parameters gathered) and restored afterwards."""
    if not enabled:
        yield
        return

    layers = decoder_layers(model)
    originals = [layer.forward for layer in layers]
    for layer, fwd in zip(layers, originals):
        layer.forward = functools.partial(checkpoint, fwd, use_reentrant=False)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # the instance attribute; the class's forward shows through again
