"""Compile the Triton kernels ahead of time for a GPU that is not here, and report what ptxas says.

The host-side code runs on CPU tensors with kernel launches recorded instead of executed; every recorded
launch is then compiled for ``sm_<arch>`` with the argument types and constexprs the host code chose, and
ptxas (shipped with triton) reports registers and spills. This catches GPU-only compile errors (the
interpreter accepts things the compiler does not, e.g. mixed-dtype dots) and register spills without a GPU.

    python -m rnnify.kernels.fused.aot                 # table for D=128, H=16, bf16, sm_90a
    python -m rnnify.kernels.fused.aot --dtype fp32 --D 64

Must run without TRITON_INTERPRET=1 (the interpreter replaces the kernels it compiles).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler import compile as triton_compile
from triton.runtime.jit import JITFunction

from ..ops import OPS

TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64"}


@contextlib.contextmanager
def recorded_launches():
    """Inside, ``kernel[grid](...)`` records (kernel, args, kwargs) instead of launching."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset (the interpreter replaces kernels)")
    launches, original = [], JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, dict(kwargs)))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = original


def run_every_op(D: int = 128, H: int = 16, T: int = 256, dtype=torch.bfloat16):
    """Every op of ``ops.OPS`` on its Triton backend, on each of the op's example arguments (forward, and backward
    for the ops that are not decode steps), on CPU tensors: the launches are recorded, not run."""
    gen = torch.Generator().manual_seed(0)
    for op in OPS.values():
        fused = op.function("triton")
        for args, kwargs in op.examples(1, T, H, D, dtype, gen):
            if op.step:
                with torch.no_grad():
                    fused(*args, **kwargs)
                continue
            args = [a.requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
            kwargs = {k: v.requires_grad_() if torch.is_tensor(v) else v for k, v in kwargs.items()}
            out = fused(*args, **kwargs)
            torch.autograd.backward([o for o in out if torch.is_tensor(o) and o.requires_grad],
                                    [torch.ones_like(o) for o in out if torch.is_tensor(o) and o.requires_grad])


def fused_kernels() -> set[str]:
    """``module.kernel`` for every launchable ``@triton.jit`` function (named ``*_kernel``; device helpers are not)
    in the modules that ``ops.OPS`` routes to Triton."""
    modules = {importlib.import_module(f"rnnify.kernels.{op.modules['triton']}") for op in OPS.values()}
    return {f"{m.__name__.rsplit('.', 1)[-1]}.{name}" for m in modules for name, obj in vars(m).items()
            if isinstance(obj, JITFunction) and obj.fn.__module__ == m.__name__ and name.endswith("_kernel")}


def compile_launch(fn, args, kwargs, arch: int = 90, num_warps: int | None = None):
    names = fn.arg_names
    signature, constexprs = {}, {}
    for name, a in zip(names, args):
        if a is None:
            signature[name], constexprs[(names.index(name),)] = "constexpr", None
        elif torch.is_tensor(a):
            signature[name] = "*" + TYPES[a.dtype]
        elif isinstance(a, bool):
            signature[name] = "i1"
        elif isinstance(a, int):
            signature[name] = "i64" if abs(a) >= 2**31 else "i32"
        else:
            signature[name] = "fp32"
    kwargs = dict(kwargs)
    warps = kwargs.pop("num_warps", 4)
    warps = warps if num_warps is None else num_warps
    kwargs.pop("num_stages", None)
    for name, value in kwargs.items():
        signature[name], constexprs[(names.index(name),)] = "constexpr", value
    return triton_compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps))


def ptxas_stats(compiled, arch: int = 90) -> dict:
    """Registers per thread and spill bytes of a compiled kernel, from ``ptxas -v``."""
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptxas = next((os.path.join(bindir, n) for n in ("ptxas-blackwell", "ptxas") if os.path.exists(os.path.join(bindir, n))), None)
    if ptxas is None:
        return {}
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        out = subprocess.run([ptxas, f"-arch=sm_{arch}a", "-v", f.name, "-o", os.devnull], capture_output=True,
                             text=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return {"registers": int(regs.group(1)) if regs else None, "spill_bytes": int(spill.group(1)) if spill else None}


def report(D=128, H=16, dtype=torch.bfloat16, arch=90, warps=None, ptxas=True):
    """One row per distinct (kernel, constexprs) launch: shared memory and (``ptxas``) registers, spills."""
    with recorded_launches() as launches:
        run_every_op(D=D, H=H, dtype=dtype)
    rows, seen = [], set()
    for fn, args, kwargs in launches:
        key = (fn.fn.__module__, fn.fn.__name__, tuple(sorted((k, str(v)) for k, v in kwargs.items())),
               tuple(str(a.dtype) if torch.is_tensor(a) else type(a).__name__ for a in args))
        if key in seen:
            continue
        seen.add(key)
        compiled = compile_launch(fn, args, kwargs, arch=arch, num_warps=warps)
        consts = {k: v for k, v in kwargs.items() if k in ("BT", "BK", "BV", "BC", "USE_G", "DELTA", "USE_DH")}
        rows.append(dict(kernel=f"{fn.fn.__module__.rsplit('.', 1)[-1]}.{fn.fn.__name__}", config=consts,
                         num_warps=compiled.metadata.num_warps, shared=compiled.metadata.shared,
                         **(ptxas_stats(compiled, arch) if ptxas else {})))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--warps", type=int, help="override every kernel's num_warps (to compare)")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    print(f"sm_{args.arch}a, D={args.D}, H={args.H}, {args.dtype}")
    print("| kernel | config | warps | shared KiB | registers | spill bytes |")
    print("|---|---|---|---|---|---|")
    for r in report(args.D, args.H, dtype, args.arch, args.warps):
        print(f"| {r['kernel']} | {r['config']} | {r['num_warps']} | {r['shared'] / 1024:.1f} | {r.get('registers')} | "
              f"{r.get('spill_bytes')} |")


if __name__ == "__main__":
    main()
