"""A recipe's memory per device, before any weights load: ``rnnify validate RECIPE --plan --gpus 8 --gpu-memory 80GiB``.

The teacher is built from its config on PyTorch's ``meta`` device (shapes, no data) and converted the way the run
converts it, so parameter counts are exact for any architecture and method. Per stage:

- weights: teacher (when the stage needs one) and student, at the recipe's dtype; under FSDP each process holds 1/N
  of the student and of the teacher's layers (the teacher's embeddings, norm and head stay whole, see ``sharding.py``)
  plus the largest layer gathered twice (the one running and the one prefetched);
- gradients and AdamW's two moments for what trains (all of it, the new parameters, or LoRA adapters), at the
  parameters' dtype, 1/N of them under FSDP;
- activations: the stage's objective is run once on ``meta`` tensors of the stage's micro-batch (``batch_size / N``
  sequences of ``seq_len``), and the peak of the bytes its tensors hold is tracked (a ``TorchDispatchMode`` over
  every op, once per storage); the tensors autograd saves for the backward pass are counted too
  (``saved_tensors_hooks``), per decoder layer. With gradient checkpointing a decoder layer keeps only its input,
  and one layer's saved tensors are rebuilt at a time in the backward pass;
  the backward's start adds twice the largest saved tensor (its gradient and a temporary; the logits' usually).
On GPUs ``CUDA_OVERHEAD`` is added for the CUDA context, cuBLAS/NCCL workspaces and the caching allocator's slack.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from dataclasses import dataclass, field

import torch
import torch.fx.experimental._config as fx_config
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoModelForCausalLM

from .. import sources
from ..distill import recompute
from ..distill.sharding import decoder_layers, fsdp_requested
from ..distill.stages import STAGES, build_objective
from ..distill.trainer import total_steps
from ..errors import RnnifyError
from ..units import human_bytes, parse_bytes
from .student import recipe_student, stage_model

GiB = 2**30
CUDA_OVERHEAD = 2 * GiB


def fmt(n: float) -> str:
    return human_bytes(n, digits=2)


@dataclass
class StageMemory:
    stage: str
    strategy: str
    micro_batch: int
    seq_len: int
    trainable_params: int
    parts: dict = field(default_factory=dict)  # name -> bytes per process
    activations: int = 0
    activations_checkpointed: int = 0
    gradient_checkpointing: bool = False
    overhead: int = 0
    param_bytes: int = 4
    # settings that would lower the activations, traced when the stage does not fit: (setting, activations, with
    # gradient checkpointing)
    alternatives: list = field(default_factory=list)

    @property
    def activation_bytes(self) -> int:
        return self.activations_checkpointed if self.gradient_checkpointing else self.activations

    @property
    def total(self) -> int:
        return sum(self.parts.values()) + self.activation_bytes + self.overhead


@dataclass
class MemoryPlan:
    source: str
    devices: int
    device_memory: int | None
    teacher_params: int
    student_params: int
    stages: list[StageMemory]
    advice: dict = field(default_factory=dict)  # stage -> list of lines

    def fits(self) -> bool:
        return self.device_memory is None or all(s.total <= self.device_memory for s in self.stages)

    def report(self) -> str:
        per = f" of {fmt(self.device_memory)}" if self.device_memory else ""
        lines = [f"memory plan for {self.source} on {self.devices} device(s){per} each "
                 f"(teacher {self.teacher_params / 1e9:.2f}B parameters, student {self.student_params / 1e9:.2f}B)"]
        for s in self.stages:
            lines.append(f"  stage {s.stage} ({s.strategy}, {s.micro_batch} x {s.seq_len} tokens per process, "
                         f"training {s.trainable_params:,} parameters):")
            for k, v in s.parts.items():
                lines.append(f"    {k:<34} {fmt(v):>12}")
            gc_on, gc_off = fmt(s.activations_checkpointed), fmt(s.activations)
            lines.append(f"    {'activations':<34} {fmt(s.activation_bytes):>12}   (without gradient checkpointing "
                         f"{gc_off}, with {gc_on})")
            if s.overhead:
                lines.append(f"    {'CUDA context, workspaces, slack':<34} {fmt(s.overhead):>12}")
            verdict = "" if self.device_memory is None else (
                "  fits" if s.total <= self.device_memory else f"  DOES NOT FIT ({fmt(self.device_memory)} per device)")
            lines.append(f"    {'total per device':<34} {fmt(s.total):>12}{verdict}")
            for a in self.advice.get(s.stage, []):
                lines.append(f"    -> {a}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ measuring
class SavedTensors:
    """Bytes autograd saves for the backward pass and still holds, once per storage, and per decoder layer. A graph
    freed during the traced code (e.g. a logits chunk's loss taken inside the forward) releases its saved tensors:
    they are forgotten when the last one on their storage dies, before its address can serve another storage (a key
    is an address: kept past its storage's life, a later storage there would be taken for it, or not, by chance)."""

    def __init__(self):
        self.seen: dict[int, int] = {}
        self.layer_of: dict[int, int | None] = {}
        self.current: list[int] = []
        self._holders: dict[int, int] = {}  # storage key -> saved tensors on it still alive

    def pack(self, t):
        if isinstance(t, torch.nn.Parameter):  # a weight the backward reads: counted with the weights already
            return t
        try:
            key, nbytes = t.untyped_storage()._cdata, t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            key, nbytes = id(t), t.numel() * t.element_size()
        if key not in self.seen:
            self.seen[key] = nbytes
            self.layer_of[key] = self.current[-1] if self.current else None
        self._holders[key] = self._holders.get(key, 0) + 1
        weakref.finalize(t, self._release, key)
        return t

    def _release(self, key):
        self._holders[key] -= 1
        if self._holders[key] == 0:
            del self._holders[key], self.seen[key], self.layer_of[key]

    def total(self) -> int:
        return sum(self.seen.values())

    def by_layer(self) -> dict[int | None, int]:
        out: dict[int | None, int] = {}
        for k, n in self.seen.items():
            out[self.layer_of[k]] = out.get(self.layer_of[k], 0) + n
        return out


class LiveTensors:
    """Peak bytes of the tensors the traced code creates and still holds (op outputs, once per storage, released
    when the last tensor on a storage is freed): what a forward pass has in memory at its fullest, including what it
    keeps outside autograd (e.g. the teacher's hidden states an attention-transfer stage captures)."""

    def __init__(self):
        self.live = self.peak = 0
        self.refs: dict[int, list] = {}  # storage key -> [tensors alive, bytes]

    def mode(self):
        tracker = self

        def release(key):
            entry = tracker.refs.get(key)
            if entry is not None:
                entry[0] -= 1
                if entry[0] == 0:
                    tracker.live -= entry[1]
                    del tracker.refs[key]

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        try:
                            st = t.untyped_storage()
                            key, nbytes = st._cdata, st.nbytes()
                        except (RuntimeError, NotImplementedError):
                            continue
                        entry = tracker.refs.setdefault(key, [0, nbytes])
                        if entry[0] == 0:
                            tracker.live += nbytes
                            tracker.peak = max(tracker.peak, tracker.live)
                        entry[0] += 1
                        weakref.finalize(t, release, key)
                return out

        return Mode()


@contextlib.contextmanager
def _meta_values():
    """Values read from meta tensors while tracing: ``.item()`` / ``.tolist()`` (an objective's metrics) give zeros
    ``int()`` 0, a truth test True (transformers asks ``(mask == 0).all()`` of unpacked sequences), instead of
    failing. Only the shapes matter to the plan."""
    item, tolist, as_bool, as_int = torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__
    nonzero = fx_config.meta_nonzero_assume_all_nonzero

    def fake_item(self):
        return 0.0 if self.is_meta else item(self)

    def fake_tolist(self):
        return torch.zeros(self.shape).tolist() if self.is_meta else tolist(self)

    def fake_bool(self):
        return True if self.is_meta else as_bool(self)

    def fake_int(self):
        return 0 if self.is_meta else as_int(self)

    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__ = fake_item, fake_tolist, fake_bool
    torch.Tensor.__int__ = fake_int
    fx_config.meta_nonzero_assume_all_nonzero = True  # nonzero() on meta: every element (an upper bound)
    try:
        yield
    finally:
        torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__ = item, tolist, as_bool
        torch.Tensor.__int__ = as_int
        fx_config.meta_nonzero_assume_all_nonzero = nonzero


def trace_activations(objective, batch: int, seq_len: int, device="meta") -> tuple[int, int]:
    """Peak activation bytes of one training step of ``objective`` on a ``batch x seq_len`` block: without and with
    per-layer gradient checkpointing. The larger of the forward's peak and the backward's start (what the forward
    holds, plus the largest saved tensor's gradient and a temporary of its size). On ``meta`` nothing is computed
    or allocated."""
    rec = SavedTensors()
    layers = decoder_layers(objective.student)
    inputs: dict[int, int] = {}
    hooks = []
    for i, layer in enumerate(layers):
        def pre(module, args, kwargs, i=i):
            rec.current.append(i)
            h = args[0] if args else kwargs.get("hidden_states")
            if torch.is_tensor(h):
                inputs[i] = h.numel() * h.element_size()

        hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        def post(*_):
            rec.current.pop()

        hooks.append(layer.register_forward_hook(post))
    ids = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    objective.set_step(0, 0)
    live = LiveTensors()
    regions: list[int] = []  # what each recomputed region holds while its backward runs

    def probe(fn, args):
        """A recomputed region run whole once more: the bytes its graph saves, plus the gradient of its largest
        saved tensor and a temporary of that size (as the backward's start below). It runs under the live
        tracker, so the forward's peak also sees the region's graph alive, as its backward will."""
        gc.collect()  # what earlier code left in reference cycles (a real run's collector would have freed it)
        inner = SavedTensors()
        with torch.autograd.graph.saved_tensors_hooks(inner.pack, lambda t: t):
            out = fn(*args)
        regions.append(inner.total() + 2 * max(inner.seen.values(), default=0))
        del out
        gc.collect()  # its graph, which reference cycles may hold, is gone before the real forward of the region

    gc.collect()
    gc.disable()  # tensors in reference cycles are then freed at the same point in every trace: deterministic
    recompute.PROBE = probe
    try:
        with _meta_values(), torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda t: t), live.mode():
            loss, _ = objective(ids)
    finally:
        recompute.PROBE = None
        gc.enable()
        for h in hooks:
            h.remove()
    if not loss.requires_grad:
        raise RnnifyError("memory plan: the stage's loss does not depend on what it trains")
    per_layer = rec.by_layer()
    outside = per_layer.pop(None, 0)
    saved, largest = rec.total(), max(rec.seen.values(), default=0)
    held = max(live.live, saved)  # what the forward leaves for the backward: saved tensors and anything kept
    # the backward: what is held, plus the gradient of the largest saved tensor and a temporary of its size, or one
    # recomputed region's graph (a block of attention-transfer layers), whichever is more
    backward = held + max(2 * largest, max(regions, default=0))
    peak = max(live.peak, backward)
    if not per_layer:  # the stage calls no decoder layer whole (attention transfer): nothing to checkpoint
        return peak, peak
    # checkpointed: each layer keeps only its input; the backward rebuilds one layer's saved tensors at a time
    kept = outside + sum(inputs.get(i, 0) for i in per_layer)
    dropped = saved - kept
    ckpt = max(live.peak - dropped, held - dropped + max(per_layer.values()) + max(2 * largest, max(regions, default=0)))
    return peak, min(ckpt, peak)


# ------------------------------------------------------------------------------------------------ planning
def meta_models(recipe, source: str | None = None):
    """(teacher, student) of the recipe on the meta device, from the source's config alone."""
    name = source or recipe.model.source
    config = sources.load_config(name, progress=lambda *_: None)
    dtype = sources.parse_dtype(recipe.model.dtype) or torch.float32
    with torch.device("meta"):
        teacher = AutoModelForCausalLM.from_config(config, dtype=dtype)
    teacher.eval()
    student = recipe_student(recipe, teacher)
    return teacher, student


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def _largest_layer(model) -> int:
    return max(_numel(layer.parameters()) for layer in decoder_layers(model))


def plan_recipe(recipe, *, devices: int = 1, device_memory: int | None = None, source: str | None = None,
                strategy: str | None = None, cuda: bool = True) -> MemoryPlan:
    """The memory per device of each stage of ``recipe`` on ``devices`` processes (see the module docstring)."""
    strategy = strategy or ("fsdp" if fsdp_requested(recipe.distributed.strategy) else "ddp")
    teacher, student = meta_models(recipe, source)
    dtype = next(teacher.parameters()).dtype
    new_names = student.new_parameter_names()
    n_teacher, n_student = _numel(teacher.parameters()), _numel(student.parameters())
    teacher_layers = sum(_numel(layer.parameters()) for layer in decoder_layers(teacher))
    plans = []
    for i, stage in enumerate(recipe.stages):
        settings = recipe.stage_settings(i)
        spec = STAGES[stage.type]
        model, trainable, active = stage_model(student, settings, spec, new_names)
        named = dict(model.named_parameters())
        param_bytes = next(iter(named.values())).element_size()
        n_train = sum(named[n].numel() for n in trainable)
        shard = devices if strategy == "fsdp" and devices > 1 else 1
        micro = max(1, settings.batch_size // devices)
        p = StageMemory(stage.name, strategy if devices > 1 else "one process", micro, settings.seq_len, n_train,
                      gradient_checkpointing=settings.gradient_checkpointing,
                      overhead=CUDA_OVERHEAD if cuda else 0, param_bytes=param_bytes)
        if spec.needs_teacher:
            whole = n_teacher - teacher_layers
            t_shard = shard if recipe.distributed.shard_teacher else 1
            p.parts["teacher weights"] = (whole + teacher_layers / t_shard) * param_bytes
        p.parts["student weights"] = _numel(model.parameters()) * param_bytes / shard
        p.parts["gradients"] = n_train * param_bytes / shard
        moments = 2 if settings.optimizer == "adamw" else 1
        p.parts[f"optimizer ({settings.optimizer})"] = moments * n_train * param_bytes / shard
        if shard > 1:
            gathered = 2 if settings.dtype == "bfloat16" else param_bytes
            p.parts["FSDP gathered layers (2)"] = 2 * _largest_layer(model) * gathered

        def activations(settings, stage=stage, model=model, spec=spec, active=active, micro=micro):
            objective = build_objective(stage.type, model, teacher if spec.needs_teacher else None, settings, active,
                                        total_steps=total_steps(settings))
            # bfloat16 stages run under autocast: traced with bf16 weights, so the matmuls' outputs are bf16 as
            # there (autocast itself does not act on meta tensors)
            if settings.dtype == "bfloat16":
                objective.to(torch.bfloat16)
            try:
                return trace_activations(objective, micro, settings.seq_len)
            finally:
                objective.to(dtype)

        p.activations, p.activations_checkpointed = activations(settings)
        if device_memory is not None and p.total > device_memory:
            for name, value in _lighter_settings(settings, len(student.mixers())):
                traced = activations(settings.model_copy(update={name: value}))
                p.alternatives.append((f"{name}: {value}", *traced))
                if p.total - p.activation_bytes + traced[1 if p.gradient_checkpointing else 0] <= device_memory:
                    break
        if model is not student:  # a LoRA wrapper: the next stage plans on the plain student
            student = model.merge_and_unload()
        student.requires_grad_(False)
        plans.append(p)
    out = MemoryPlan(str(source or recipe.model.source), devices, device_memory, n_teacher, n_student, plans)
    if device_memory is not None:
        for p in plans:
            if p.total > device_memory:
                out.advice[p.stage] = advise(p, device_memory, devices)
    return out


def plan_here(recipe, *, gpus: int | None = None, gpu_memory: str | None = None, source: str | None = None,
              strategy: str | None = None) -> MemoryPlan:
    """``plan_recipe`` for ``gpus`` GPUs of ``gpu_memory`` each (e.g. "80GiB"), or else this machine's GPUs (one
    process and no memory verdict on a machine without them)."""
    memory = parse_bytes(gpu_memory, "--gpu-memory") if gpu_memory else None
    if gpus is not None and gpus < 1:
        raise RnnifyError(f"--gpus {gpus}: accepted: a number of GPUs (processes) >= 1")
    if torch.cuda.is_available():
        gpus = gpus or torch.cuda.device_count()
        memory = memory or torch.cuda.get_device_properties(0).total_memory
    return plan_recipe(recipe, devices=gpus or 1, device_memory=memory, source=source, strategy=strategy)


def _lighter_settings(settings, converted: int) -> list[tuple[str, int]]:
    """Settings of the stage that lower its activations without changing its result, lightest last: the vocabulary
    losses in chunks; attention transfer in blocks of fewer layers."""
    if "logits_chunk" in type(settings).model_fields and settings.logits_chunk is None:
        return [("logits_chunk", type(settings).model_fields["logits_chunk"].default)]
    if "layers_per_block" in type(settings).model_fields:
        now = settings.layers_per_block or converted
        return [("layers_per_block", k) for k in (16, 8, 4, 2, 1) if k < now]
    return []


def advise(p: StageMemory, limit: int, devices: int) -> list[str]:
    """What to change so a stage that does not fit does: each line a setting and the total it gives."""
    out = []
    fixed = p.total - p.activation_bytes
    for setting, act_off, act_on in p.alternatives:
        t = fixed + (act_on if p.gradient_checkpointing else act_off)
        if t < p.total:
            out.append(f"{setting} in stage {p.stage} (the same losses, less memory): {fmt(t)} per device"
                       + (" (fits)" if t <= limit else ""))
    act = p.activation_bytes
    if not p.gradient_checkpointing and p.activations_checkpointed < p.activations:
        t = p.total - act + p.activations_checkpointed
        out.append(f"gradient_checkpointing: true in stage {p.stage}: {fmt(t)} per device"
                   + (" (fits)" if t <= limit else ""))
        act = p.activations_checkpointed
    fixed = p.total - p.activation_bytes
    micro = p.micro_batch
    while micro > 1:
        micro //= 2
        t = fixed + act * micro / p.micro_batch
        if t <= limit:
            out.append(f"micro-batch {micro} per device (batch_size {micro * devices} with grad_accum x"
                       f"{p.micro_batch // micro}, the same tokens per step): {fmt(t)} per device (fits)")
            break
    if p.strategy == "ddp":
        out.append("distributed.strategy: fsdp shards weights, gradients and optimizer state over the devices "
                   "(rnnify validate --plan --strategy fsdp shows the figures)")
    if p.strategy == "one process" or devices == 1:
        out.append("more devices under FSDP (--gpus N --strategy fsdp) divide weights, gradients and optimizer state")
    if p.param_bytes == 4:
        weights = sum(v for k, v in p.parts.items() if "weights" in k)
        out.append(f"model.dtype: bfloat16 halves the weights, gradients and optimizer state (now float32; weights "
                   f"{fmt(weights)} per device)")
    out.append("a shorter seq_len or LoRA (fewer parameters training) also lowers it")
    return out
