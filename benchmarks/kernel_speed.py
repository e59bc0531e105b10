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

from rnnify.kernels import reference as R

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
    """name -> module with chunk_linear_attention / chunk_delta_rule / *_step (only those that run here)."""
    out = {}
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        from rnnify.kernels.fused import delta_rule, linear_attention

        out["rnnify"] = {"la": linear_attention.chunk_linear_attention, "delta": delta_rule.chunk_delta_rule,
                         "la_step": linear_attention.linear_attention_step, "delta_step": delta_rule.delta_rule_step}
        if importlib.util.find_spec("fla") is not None and device.type == "cuda":
            from rnnify.kernels import fla_backend as fb

            out["fla"] = {"la": fb.chunk_linear_attention, "delta": fb.chunk_delta_rule,
                          "la_step": fb.linear_attention_step, "delta_step": fb.delta_rule_step}
        else:
            print("flash-linear-attention is not installed: no fla columns (pip install 'rnnify[fla]')")
    else:
        print(f"{device.type}: the fused kernels need CUDA; timing the PyTorch reference instead")
    out["reference"] = {"la": R.chunk_linear_attention, "delta": R.chunk_delta_rule,
                        "la_step": R.linear_attention_step, "delta_step": R.delta_rule_step}
    return out


def inputs(B, T, H, D, dtype, device, grad):
    q = torch.randn(B, T, H, D, device=device, dtype=dtype)
    k = F.normalize(torch.randn(B, T, H, D, device=device), dim=-1).to(dtype)
    v = torch.randn(B, T, H, D, device=device, dtype=dtype)
    g = F.logsigmoid(torch.randn(B, T, H, device=device) + 4)  # decays near 1, as trained models have
    beta = torch.rand(B, T, H, device=device, dtype=dtype)
    xs = (q, k, v, g, beta)
    return [x.requires_grad_(grad) for x in xs]


def check(impls, device):
    q, k, v, g, beta = inputs(1, 200, 2, 64, torch.float32, device, False)
    ref_la, _ = R.recurrent_linear_attention(q, k, v, g)
    ref_d, _ = R.recurrent_delta_rule(q, k, v, beta, g)
    for name, ops in impls.items():
        e1 = (ops["la"](q, k, v, g)[0].float() - ref_la).abs().max().item()
        e2 = (ops["delta"](q, k, v, beta, g)[0].float() - ref_d).abs().max().item()
        print(f"check {name:9s} max|err| vs token loop (fp32, T=200): linear attention {e1:.1e}, delta rule {e2:.1e}")


def chunked_table(impls, args, device, dtype, bench):
    sdpa_label = "SDPA softmax (flash)" if device.type == "cuda" else "SDPA softmax"
    print(f"\n## chunked kernels: B={args.B}, H={args.H}, D={args.D}, {args.dtype}  (ms; ratio = other / ours)")
    print("| T | kernel | fwd ms | fwd+bwd ms | vs SDPA fwd+bwd | vs fla fwd+bwd |")
    print("|---|---|---|---|---|---|")
    for T in args.T:
        q, k, v, g, beta = inputs(args.B, T, args.H, args.D, dtype, device, True)
        rows = {}

        def both(fn):
            fwd = bench(fn)
            out = fn()
            o = out[0] if isinstance(out, tuple) else out
            do = torch.randn_like(o)

            def fwd_bwd(fn=fn, do=do):
                out = fn()
                (out[0] if isinstance(out, tuple) else out).backward(do)
            return fwd, bench(fwd_bwd)

        qs, ks, vs = (x.transpose(1, 2) for x in (q, k, v))  # SDPA takes [B, H, T, D]
        try:
            with (torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.FLASH_ATTENTION])
                  if device.type == "cuda" else contextlib.nullcontext()):
                rows[sdpa_label] = both(lambda qs=qs, ks=ks, vs=vs: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True))
        except RuntimeError as e:
            rows[sdpa_label] = (float("nan"), float("nan"))
            print(f"SDPA at T={T}: {e}")
        for name, ops in impls.items():
            if name == "reference" and device.type == "cuda" and T > args.reference_max_T:
                continue
            args_ = (q, k, v, g, beta)
            for label, fn in ((f"{name} linear attention (chunk, scalar decay)", lambda ops=ops, a=args_: ops["la"](*a[:4])),
                              (f"{name} gated delta rule (chunk)", lambda ops=ops, a=args_: ops["delta"](*a[:3], a[4], a[3]))):
                rows[label] = attempt(label, f"at T={T}", lambda fn=fn: both(fn), (NAN, NAN))
        sdpa = rows[sdpa_label][1]
        for label, (f, fb) in rows.items():
            kind = "la" if "linear attention" in label else ("delta" if "delta" in label else None)
            fla_label = {"la": "fla linear attention (chunk, scalar decay)", "delta": "fla gated delta rule (chunk)"}.get(kind)
            vs_fla = (f"{rows[fla_label][1] / fb:.2f}x" if fla_label in rows and label.startswith("rnnify")
                      and not math.isnan(rows[fla_label][1]) else "")
            vs_sdpa = f"{sdpa / fb:.2f}x" if kind else ""
            print(f"| {T} | {label} | {f:.2f} | {fb:.2f} | {vs_sdpa} | {vs_fla} |")
        del q, k, v, g, beta, args_


def step_table(impls, args, device, bench):
    K = V = args.D
    print(f"\n## decode step: H={args.H}, K=V={K}, fp32 state  (TB/s = 2 * B*H*K*V*4 bytes / time)")
    print("| batch | kernel | ms | TB/s | vs fla |")
    print("|---|---|---|---|---|")
    for B in args.decode_batch:
        q, k, v = (torch.randn(B, args.H, K, device=device, dtype=torch.bfloat16) for _ in range(3))
        g = F.logsigmoid(torch.randn(B, args.H, device=device) + 4)
        beta = torch.rand(B, args.H, device=device)
        state = torch.zeros(B, args.H, K, V, device=device)
        nbytes = 2 * state.numel() * 4
        rows = {}
        with torch.no_grad():
            for name, ops in impls.items():
                a = (q, k, v, g, beta, state)
                for label, fn in ((f"{name} linear attention step", lambda ops=ops, a=a: ops["la_step"](*a[:4], a[5])),
                                  (f"{name} delta rule step", lambda ops=ops, a=a: ops["delta_step"](*a[:3], a[4], a[3], a[5]))):
                    rows[label] = attempt(label, f"at batch {B}", lambda fn=fn: bench(fn), NAN)
        for label, ms in rows.items():
            kind = "linear attention step" if "linear" in label else "delta rule step"
            other = rows.get(f"fla {kind}")
            vs = f"{other / ms:.2f}x" if other and not math.isnan(other) and label.startswith("rnnify") else ""
            print(f"| {B} | {label} | {ms:.4f} | {nbytes / ms / 1e9:.3f} | {vs} |")


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
