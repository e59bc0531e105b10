"""The layer program: the ordered steps a converted model's forward executes.

A step runs one source decoder layer with a token mixer (``attention`` = the source layer's own attention,
untouched, or a registered mixer name); a block is a contiguous run of steps executed ``loops`` times, with the
parameters the method adds between loops (an adapter that mixes the loop state with the block's input). Source
layers that no step names are dropped (their weights are not part of the model).

JSON form, as stored in ``config.json``::

    [{"layer": 0, "mixer": "attention"},
     {"layer": 1, "mixer": "lolcats", "settings": {"window": 32}},          # per-step mixer settings
     {"block": [{"layer": 2, "mixer": "attention"}, {"layer": 3, "mixer": "attention"}],
      "loops": 4, "adapter": "concat_linear", "adapter_init": "passthrough", "state_init": "prelude"}]

Cache slots: a step's first execution uses the slot of its source layer (so ``layer_types`` has one entry per
source layer, and a model without blocks caches exactly like its source); the further executions of a block
(loop 2, 3, ...) get slots after the source layers, allocated when first run (``CacheSlots``).

Only the standard library is imported: this file ships with converted models (``trust_remote_code``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

ATTENTION = "attention"  # the mixer name of a layer that keeps the source's attention
DROPPED = "dropped"  # layer_mixers entry of a source layer that no step runs

BLOCK_ADAPTERS = ("concat_linear", "none")
ADAPTER_INITS = ("random", "passthrough", "damped")
STATE_INITS = ("normal", "zeros", "prelude")


@dataclass
class Step:
    layer: int
    mixer: str = ATTENTION
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out = {"layer": self.layer, "mixer": self.mixer}
        if self.settings:
            out["settings"] = dict(self.settings)
        return out


@dataclass
class Block:
    """A contiguous run of steps executed ``loops`` times (the default; a forward may ask for another count)."""

    steps: list[Step]
    loops: int = 1
    adapter: str = "concat_linear"  # how the loop state and the block's input are combined at each loop
    adapter_init: str = "random"
    state_init: str = "normal"  # the loop state before the first loop
    state_std: float = 1.0  # std of the truncated normal initial state (state_init: normal)

    def to_json(self) -> dict:
        return {"block": [s.to_json() for s in self.steps], "loops": self.loops, "adapter": self.adapter,
                "adapter_init": self.adapter_init, "state_init": self.state_init, "state_std": self.state_std}


def parse(program: list, num_layers: int) -> list[Step | Block]:
    """Program JSON -> steps and blocks, checked: layers in range, each source layer named at most once."""
    if not isinstance(program, list) or not program:
        raise ValueError(f"program must be a non-empty list of steps, got {program!r}")
    out: list[Step | Block] = []
    seen: set[int] = set()

    def step(entry, where) -> Step:
        if not isinstance(entry, dict) or "layer" not in entry:
            raise ValueError(f"program {where}: a step is {{'layer': i, 'mixer': name}}, got {entry!r}")
        unknown = set(entry) - {"layer", "mixer", "settings"}
        if unknown:
            raise ValueError(f"program {where}: unknown step keys {sorted(unknown)}; accepted: layer, mixer, settings")
        i = entry["layer"]
        if not isinstance(i, int) or not 0 <= i < num_layers:
            raise ValueError(f"program {where}: layer {i!r} is not a source layer (0..{num_layers - 1})")
        if i in seen:
            raise ValueError(f"program {where}: layer {i} appears twice; a layer runs again only inside a block")
        seen.add(i)
        return Step(i, str(entry.get("mixer", ATTENTION)), dict(entry.get("settings") or {}))

    for n, entry in enumerate(program):
        if isinstance(entry, dict) and "block" in entry:
            unknown = set(entry) - {"block", "loops", "adapter", "adapter_init", "state_init", "state_std"}
            if unknown:
                raise ValueError(f"program step {n}: unknown block keys {sorted(unknown)}")
            steps = [step(e, f"step {n}.{j}") for j, e in enumerate(entry["block"] or [])]
            if not steps:
                raise ValueError(f"program step {n}: a block needs at least one step")
            layers = [s.layer for s in steps]
            if layers != list(range(layers[0], layers[0] + len(layers))):
                raise ValueError(f"program step {n}: a block runs contiguous source layers in order, got {layers}")
            block = Block(steps, int(entry.get("loops", 1)), entry.get("adapter", "concat_linear"),
                          entry.get("adapter_init", "random"), entry.get("state_init", "normal"),
                          float(entry.get("state_std", 1.0)))
            if block.loops < 1:
                raise ValueError(f"program step {n}: loops must be >= 1, got {block.loops}")
            for name, value, accepted in (("adapter", block.adapter, BLOCK_ADAPTERS),
                                          ("adapter_init", block.adapter_init, ADAPTER_INITS),
                                          ("state_init", block.state_init, STATE_INITS)):
                if value not in accepted:
                    raise ValueError(f"program step {n}: {name} {value!r}; accepted: {', '.join(accepted)}")
            out.append(block)
        else:
            out.append(step(entry, f"step {n}"))
    return out


def to_json(program: list[Step | Block]) -> list[dict]:
    return [p.to_json() for p in program]


def from_layer_mixers(layer_mixers: list[str], mixer_config: dict | None) -> list[dict]:
    """The program of a model saved by rnnify 0.1 (``layer_mixers`` + ``mixer_config['per_layer']``)."""
    per_layer = (mixer_config or {}).get("per_layer", {})
    program = []
    for i, mixer in enumerate(layer_mixers):
        settings = dict(per_layer.get(str(i), {}))
        if mixer == "lolcats" and {**(mixer_config or {}), **settings}.get("linear_branch") is False:
            mixer = "window"  # 0.1 spelled the window-only baseline as lolcats without its linear branch
        program.append(Step(i, mixer, settings).to_json())
    return program


def every_step(program: list[Step | Block]):
    """Each step once, in program order (blocks expanded once)."""
    for p in program:
        if isinstance(p, Block):
            yield from p.steps
        else:
            yield p


def layer_mixers(program: list[Step | Block], num_layers: int) -> list[str]:
    """Mixer name per source layer (``dropped`` for layers the program does not run)."""
    out = [DROPPED] * num_layers
    for s in every_step(program):
        out[s.layer] = s.mixer
    return out


def blocks(program: list[Step | Block]) -> list[Block]:
    return [p for p in program if isinstance(p, Block)]


class CacheSlots:
    """Slot of the cache each execution of a step uses: its source layer's slot the first time, then slots after
    the source layers for the further loops of a block, allocated in order of first use and remembered by the cache
    (so a call with another loop count finds the same slots)."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.extra: dict[tuple[int, int], int] = {}
        self.seen: dict[int, int] = {}  # slot -> tokens it has processed

    def slot(self, layer: int, loop: int) -> int:
        if loop == 0:
            return layer
        key = (layer, loop)
        if key not in self.extra:
            self.extra[key] = self.num_layers + len(self.extra)
        return self.extra[key]




def describe(program: list[Step | Block], layer_types: list[str]) -> list[str]:
    """Readable lines of a program: runs of consecutive layers with the same mixer grouped, blocks shown with their
    loops and adapter, dropped layers named."""
    lines: list[str] = []

    def runs(steps: list[Step], indent: str):
        start = prev = None
        for s in steps + [None]:
            if s is not None and prev is not None and s.layer == prev.layer + 1 and s.mixer == prev.mixer \
                    and s.settings == prev.settings and layer_types[s.layer] == layer_types[prev.layer]:
                prev = s
                continue
            if prev is not None:
                span = str(start.layer) if start is prev else f"{start.layer}-{prev.layer}"
                extra = f"  {prev.settings}" if prev.settings else ""
                lines.append(f"{indent}{span:<8} {prev.mixer:<10} ({layer_types[prev.layer]}){extra}")
            start = prev = s

    pending: list[Step] = []
    named: set[int] = set()
    for p in program:
        if isinstance(p, Block):
            runs(pending, "")
            pending = []
            first, last = p.steps[0].layer, p.steps[-1].layer
            lines.append(f"block    layers {first}-{last} x {p.loops} loops (adapter {p.adapter}, "
                         f"{p.adapter_init} init; initial state {p.state_init})")
            runs(p.steps, "  ")
            named.update(s.layer for s in p.steps)
        else:
            pending.append(p)
            named.add(p.layer)
    runs(pending, "")
    dropped = [i for i in range(len(layer_types)) if i not in named]
    if dropped:
        spans, start = [], None
        for j, i in enumerate(dropped):
            start = i if start is None else start
            if j + 1 == len(dropped) or dropped[j + 1] != i + 1:
                spans.append(str(start) if start == i else f"{start}-{i}")
                start = None
        lines.append(f"dropped  {','.join(spans)}")
    return lines


__all__ = ["ATTENTION", "DROPPED", "Block", "CacheSlots", "Step", "blocks", "describe", "every_step", "from_layer_mixers",
           "layer_mixers", "parse", "to_json"]
