"""Whole-model decoding: a converted SmolLM2-135M-shaped model against the same-shaped Llama, in one run.

For every model, batch and prompt length, prints decode tokens/s (one prefill, 2 untimed warm-up steps, then each
greedy step with the cache timed on its own: the median step), the prefill time and the peak memory. A figure that
cannot be measured is said to be so, never printed. Weights are random: speed and memory depend on the shape only,
so the real checkpoint is not needed (`--shape tiny` gives a CPU smoke run).

With --cuda-graph, the fully recurrent students (every layer converted: their per-sequence state has a fixed
shape) also decode through one captured CUDA graph per batch size; tokens are checked against the eager loop
before the graph's speed is reported. flash-linear-attention's GLA model of the same shape is added when fla is
installed.

    python benchmarks/decode.py                                     # batch 1/16/64 x prompt 4k/32k on CUDA
    python benchmarks/decode.py --cuda-graph
    python benchmarks/decode.py --shape tiny --batch 1 2 --prompt 64 --new-tokens 8 --device cpu
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import rnnify  # noqa: F401
from rnnify.convert import convert
from rnnify.eval.speed import timed_decode, tokens_per_s

SHAPES = {  # SmolLM2-135M (HuggingFaceTB/SmolLM2-135M config.json)
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, rope_theta=100000.0,
                         tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=256, tie_word_embeddings=True),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")


def build_models(args, device, dtype):
    cfg = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=max(args.prompt) + args.new_tokens + 8)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    models = {"llama (softmax attention, KV cache)": teacher}
    for method in args.methods:
        models[f"rnnify {method}"] = convert(teacher, method=method).to(device=device, dtype=dtype).eval()
    if importlib.util.find_spec("fla") is not None and device.type == "cuda":
        try:
            from fla.models import GLAConfig, GLAForCausalLM

            s = SHAPES[args.shape]
            gla = GLAConfig(hidden_size=s["hidden_size"], num_hidden_layers=s["num_hidden_layers"],
                            num_heads=s["num_attention_heads"], intermediate_size=s["intermediate_size"],
                            vocab_size=s["vocab_size"], tie_word_embeddings=True)
            models["fla GLA"] = GLAForCausalLM(gla).to(device=device, dtype=dtype).eval()
        except Exception as e:  # noqa: BLE001 - optional comparison; say why it is missing
            print(f"fla GLA model not built: {type(e).__name__}: {e}")
    return models


@torch.no_grad()
def time_decode(model, ids, new_tokens, device):
    """(prefill seconds, decode tokens/s or None, peak bytes): one prefill, 2 untimed warm-up steps, then each decode
    step timed on its own; tokens/s from the median step (``rnnify.eval.speed``)."""
    model.generate(ids[:, :8], max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)  # compile/warm
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    r = timed_decode(model, ids, new_tokens, warmup=2)
    return r["prefill_s"], tokens_per_s(ids.shape[0], r["step_s"]), peak_bytes(device)


def _states(cache):
    return [t for layer in cache.layers for name in ("recurrent_states", "conv_states")
            for t in getattr(layer, name, []) if torch.is_tensor(t)]


@torch.no_grad()
def manual_decode(model, ids, new_tokens, device, graph: bool):
    """Greedy decode after one prefill, eagerly or by replaying one captured CUDA graph per token.
    Returns (tokens [B, new_tokens], decode tokens/s from the median step, or None)."""
    out = model(input_ids=ids, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    nxt = out.logits[:, -1:].argmax(-1)
    pos = torch.full((1, 1), ids.shape[1], dtype=torch.long, device=device)
    static_ids = nxt.clone()

    def step():
        return model(input_ids=static_ids, position_ids=pos, cache=cache, use_cache=True).logits

    if graph:
        saved = [t.clone() for t in _states(cache)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_logits = step()
        for t, s in zip(_states(cache), saved):  # undo the warm-up steps
            t.copy_(s)
        run = lambda: (g.replay(), static_logits)[1]  # noqa: E731
    else:
        run = step
    tokens, times = [nxt], []  # the prefill's token, then one per step
    for i in range(new_tokens - 1):
        static_ids.copy_(nxt)
        pos.fill_(ids.shape[1] + i)
        sync(device)
        t = time.perf_counter()
        nxt = run()[:, -1:].argmax(-1)
        sync(device)
        times.append(time.perf_counter() - t)
        tokens.append(nxt)
    return torch.cat(tokens, 1), tokens_per_s(ids.shape[0], times[2:] or times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="smollm2-135m")
    ap.add_argument("--methods", nargs="+", default=["supra", "mamba_in_llama"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--prompt", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", choices=DTYPES, default="bf16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cuda-graph", action="store_true")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    from rnnify.kernels import backend_for

    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; kernels: "
          f"{backend_for(device)}; shape {args.shape}, {args.dtype}, {args.new_tokens} new tokens, greedy")
    models = build_models(args, device, dtype)
    print("| model | batch | prompt | prefill s | decode tok/s | vs llama | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for P in args.prompt:
        for B in args.batch:
            ids = torch.randint(1, SHAPES[args.shape]["vocab_size"], (B, P), device=device)
            base = None
            for name, model in models.items():
                try:
                    prefill, tps, peak = time_decode(model, ids, args.new_tokens, device)
                except torch.OutOfMemoryError:
                    print(f"| {name} | {B} | {P} | out of memory | | | |")
                    gc.collect()
                    torch.cuda.empty_cache()
                    continue
                if tps is None:
                    print(f"| {name} | {B} | {P} | {prefill:.2f} | could not be measured | | {peak / 2**30:.2f} |")
                    continue
                base = tps if base is None else base
                print(f"| {name} | {B} | {P} | {prefill:.2f} | {tps:,.0f} | {tps / base:.2f}x | {peak / 2**30:.2f} |")
                if args.cuda_graph and name.startswith("rnnify"):
                    report_graph(name, model, ids, args.new_tokens, device, base)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


def report_graph(name, model, ids, new_tokens, device, base):
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0)[:, ids.shape[1]:]
    try:
        eager_tokens, eager_tps = manual_decode(model, ids, new_tokens, device, graph=False)
        graph = manual_decode(model, ids, new_tokens, device, graph=True) if device.type == "cuda" else None
    except Exception as e:  # noqa: BLE001 - capture can fail on ops that sync; report it, keep benchmarking
        print(f"| {name} + CUDA graph | {ids.shape[0]} | {ids.shape[1]} | failed: {type(e).__name__}: {e} | | | |")
        return
    agree = "tokens match generate()" if torch.equal(eager_tokens, want) else "tokens DIFFER from generate()"
    print(f"| {name} eager step loop | {ids.shape[0]} | {ids.shape[1]} | {agree} | {_rate(eager_tps, base)} |")
    if graph is None:
        print(f"| {name} + CUDA graph | {ids.shape[0]} | {ids.shape[1]} | needs CUDA | | | |")
        return
    agree = "tokens match generate()" if torch.equal(graph[0], want) else "tokens DIFFER from generate()"
    print(f"| {name} + CUDA graph | {ids.shape[0]} | {ids.shape[1]} | {agree} | {_rate(graph[1], base)} |")


def _rate(tps, base) -> str:
    """'tok/s | ratio |' cells, or a plain statement when the figure could not be measured."""
    if tps is None:
        return "could not be measured | | "
    return f"{tps:,.0f} | {tps / base:.2f}x | " if base else f"{tps:,.0f} | | "


if __name__ == "__main__":
    main()
