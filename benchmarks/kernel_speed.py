"""Speed of the recurrence kernels against softmax attention and flash-linear-attention, in one run.

Prints, for B x H x D (default 4 x 16 x 128, bf16) and each T:
  - forward and forward+backward milliseconds of rnnify's chunked kernels (scalar-decay linear attention with a
    data-dependent decay, and the gated delta rule), PyTorch SDPA causal softmax attention (flash backend on
    CUDA) and, when installed, flash-linear-attention's chunk_simple_gla / chunk_gated_delta_rule; ratios
    against SDPA and against fla;
  - for the fused decode steps at each batch: milliseconds per step and the effective bandwidth of state
    traffic (fp32 state read + written once: 2 * B * H * K * V * 4 bytes / time), ours against fla's
    fused_recurrent kernels and the PyTorch reference step.

    python benchmarks/kernel_speed.py                                   # the issue's sizes, on CUDA
    python benchmarks/kernel_speed.py --T 256 512 --H 2 --D 32 --device cpu   # a smoke run (reference + SDPA only)
    TRITON_INTERPRET=1 python benchmarks/kernel_speed.py --T 64 --B 1 --H 1 --D 16 --device cpu  # + our kernels, interpreted

Before timing, every backend's output is checked against the reference at a small shape (max abs error).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import os
import time

import torch
import torch.nn.functional as F

from rnnify.kernels.ops import OPS, functions

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NAN = float("nan")


def attempt(label, where, measure, failed):
    """measure(), or ``failed`` after printing why: one backend that cannot run at a shape (fla refuses its gated
    backward on Hopper with Triton < 3.7.1) must not cost the rest of the table."""
    try:
        return measure()
    except Exception as e:
        print(f"{label} {where} could not run: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
        return failed


def timer(device):
    """Median milliseconds of fn()."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu(fn, reps=3):
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return sorted(times)[len(times) // 2]
    return cpu


def backends(device):
    """label -> {op name: function} for every backend that runs here, all derived from ``rnnify.kernels.ops.OPS``."""
    out = {}
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        out["rnnify"] = functions("triton")
        if importlib.util.find_spec("fla") is not None and device.type == "cuda":
            out["fla"] = functions("fla")
        else:
            print("flash-linear-attention is not installed: no fla columns (pip install 'rnnify[fla]')")
    else:
        print(f"{device.type}: the fused kernels need CUDA; timing the PyTorch reference instead")
    out["reference"] = functions("reference")
    return out


def example(name, B, T, H, D, dtype, device, seed=0):
    """The op's fullest example (the last of ``Op.examples``: decay, state ...) at this shape, on ``device``."""
    return OPS[name].examples(B, T, H, D, dtype, torch.Generator(device).manual_seed(seed))[-1]


def first_tensor(out):
    return out[0] if isinstance(out, tuple) else out


def cloned(args):
    return [a.clone() if torch.is_tensor(a) else a for a in args]  # the fused steps write their state in place


def check(impls, device):
    """Every op of every backend against the reference on the op's own examples (fp32, T=200): max abs error."""
    for name, op in OPS.items():
        worst = {}
        for args, kwargs in op.examples(1, 200, 2, 64, torch.float32, torch.Generator(device).manual_seed(0)):
            ref = first_tensor(impls["reference"][name](*cloned(args), **kwargs)).float()
            for label, fns in impls.items():
                if label != "reference":
                    err = attempt(label, name, lambda fn=fns[name], a=args, k=kwargs, ref=ref: (
                        first_tensor(fn(*cloned(a), **k)).float() - ref).abs().max().item(), NAN)
                    worst[label] = max(worst.get(label, 0.0), err)
        for label, err in worst.items():
            print(f"check {label:7s} {name:24s} max|err| vs reference over its examples (fp32, T=200): {err:.1e}")


def chunked_table(impls, args, device, dtype, bench):
    sdpa_label = "SDPA softmax (flash)" if device.type == "cuda" else "SDPA softmax"
    print(f"\n## chunked kernels: B={args.B}, H={args.H}, D={args.D}, {args.dtype}  (ms; ratio = other / ours)")
    print("| T | kernel | fwd ms | fwd+bwd ms | vs SDPA fwd+bwd | vs fla fwd+bwd |")
    print("|---|---|---|---|---|---|")
    chunked = [name for name, op in OPS.items() if not op.step]
    for T in args.T:
        rows = {}

        def both(fn):
            fwd = bench(fn)
            do = torch.randn_like(first_tensor(fn()))

            def fwd_bwd(fn=fn, do=do):
                first_tensor(fn()).backward(do)
            return fwd, bench(fwd_bwd)

        q, k, v = (torch.randn(args.B, args.H, T, args.D, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))  # SDPA takes [B, H, T, D]
        try:
            with (torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.FLASH_ATTENTION])
                  if device.type == "cuda" else contextlib.nullcontext()):
                rows[(sdpa_label, "")] = both(
                    lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        except RuntimeError as e:
            rows[(sdpa_label, "")] = (NAN, NAN)
            print(f"SDPA at T={T}: {e}")
        del q, k, v
        for name in chunked:
            ex_args, ex_kwargs = example(name, args.B, T, args.H, args.D, dtype, device)
            ex_args = [a.requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a for a in ex_args]
            for label, fns in impls.items():
                if label == "reference" and device.type == "cuda" and T > args.reference_max_T:
                    continue
                rows[(label, name)] = attempt(label, f"{name} at T={T}", lambda fn=fns[name], a=ex_args, k=ex_kwargs: both(
                    lambda: fn(*a, **k)), (NAN, NAN))
            del ex_args, ex_kwargs
        sdpa = rows[(sdpa_label, "")][1]
        for (label, name), (f, fb) in rows.items():
            fla = rows.get(("fla", name), (NAN, NAN))[1]
            vs_fla = f"{fla / fb:.2f}x" if label == "rnnify" and not math.isnan(fla) else ""
            vs_sdpa = f"{sdpa / fb:.2f}x" if name else ""
            print(f"| {T} | {label} {name} | {f:.2f} | {fb:.2f} | {vs_sdpa} | {vs_fla} |")


def step_table(impls, args, device, bench):
    print(f"\n## decode steps: H={args.H}, K=V={args.D}, fp32 state  (TB/s = 2 * bytes of the state / time)")
    print("| batch | kernel | ms | TB/s | vs fla |")
    print("|---|---|---|---|---|")
    steps = [name for name, op in OPS.items() if op.step]
    for B in args.decode_batch:
        rows = {}
        with torch.no_grad():
            for name in steps:
                ex_args, ex_kwargs = example(name, B, 1, args.H, args.D, torch.bfloat16, device)
                nbytes = 2 * ex_args[-1].numel() * ex_args[-1].element_size()  # the state, read and written once
                for label, fns in impls.items():
                    ms = attempt(label, f"{name} at batch {B}", lambda fn=fns[name], a=ex_args, k=ex_kwargs: bench(
                        lambda: fn(*a, **k)), NAN)
                    rows[(label, name)] = (ms, nbytes)
        for (label, name), (ms, nbytes) in rows.items():
            fla = rows.get(("fla", name), (NAN, 0))[0]
            vs = f"{fla / ms:.2f}x" if label == "rnnify" and not math.isnan(fla) else ""
            print(f"| {B} | {label} {name} | {ms:.4f} | {nbytes / ms / 1e9:.3f} | {vs} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--dtype", choices=DTYPES, default="bf16")
    ap.add_argument("--decode-batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reference-max-T", type=int, default=4096, help="skip the slow reference above this T on CUDA")
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else device.type}; torch {torch.__version__}")
    impls = backends(device)
    bench = timer(device)
    check(impls, device)
    chunked_table(impls, args, device, DTYPES[args.dtype], bench)
    step_table(impls, args, device, bench)


if __name__ == "__main__":
    main()
