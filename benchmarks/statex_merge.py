"""What StateX's head merge does to a trained memory's forgetting, measured before any post-training.

StateX (Shen et al. 2025, sec. 3.1) merges a layer's linear-attention heads into one head of H x D keys and values.
The paper merges GLA heads, whose decay is per key channel and so survives the merge; AHN's Gated DeltaNet memory and
the gated_deltanet mixer decay per head, so the merged head takes one decay per token: the heads' mean log-decay
(``mixer_ahn.py``, ``mixer_gated_deltanet.py``). This script measures, on a trained model (e.g. ``out/ahn_cpu``):

* per expanded layer, each head's half-life in tokens (ln 2 over its mean -log decay on the text), and that of the
  merged head: how long the merged memory holds a token;
* MQAR recall (several pairs, trials with a spread) and perplexity of: the model unmerged (what ``--control``
  post-trains), merged as ``statex`` with ``init: keep`` does, and merged after every head takes the decay of its
  layer's slowest head (so the merged memory forgets as slowly as the slowest head did).

    python benchmarks/statex_merge.py out/ahn_cpu
    python benchmarks/statex_merge.py out/ahn_cpu --layers 5,11 --pairs 8 16 --trials 16

Nothing is trained: the figures say where post-training starts from. ``--save-slowest DIR`` also writes the model with
every head given its layer's slowest decay (unmerged, with the source's ``recipe.yaml``, so a post-training from it reads
on where the source's training stopped): a recipe with ``conversion.start_from: DIR`` then post-trains from that start,
against ``--control`` from the source itself. statex_cpu's header gives what that measured (2026-12-07):

    python benchmarks/statex_merge.py out/ahn_cpu --decay-text builtin:mix/train.txt --save-slowest out/ahn_cpu_slow \
        --skip-table
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rnnify.convert import convert
from rnnify.convert.statex import pick_layers
from rnnify.eval.perplexity import perplexity, tokenize_text_file, windows
from rnnify.eval.recall import mqar_accuracy
from rnnify.io import write_model_folder


def decay_rows(mixer):
    """(A_log, dt_bias, the linear layer whose output rows set each head's decay, the first such row) of a mixer with
    a per-head data-dependent decay, or None."""
    if getattr(mixer, "memory_kind", None) == "gated_deltanet":  # AHN: write_gates = [beta (H), decay (H)]
        return mixer.A_log, mixer.dt_bias, mixer.write_gates, mixer.num_heads
    if getattr(mixer, "a_proj", None) is not None:  # the gated_deltanet mixer
        return mixer.A_log, mixer.dt_bias, mixer.a_proj, 0
    return None


def head_forgetting(model, layers, tokens) -> dict[int, torch.Tensor]:
    """Each head's mean -log decay per token over ``tokens`` (one forward), per layer."""
    mixers, inputs, hooks = dict(model.mixers()), {}, []
    for i in layers:
        _, _, lin, _ = decay_rows(mixers[i])
        hooks.append(lin.register_forward_hook(lambda mod, inp, out, i=i: inputs.__setitem__(i, out.detach())))
    with torch.no_grad():
        model(tokens[None], use_cache=False)
    for h in hooks:
        h.remove()
    out = {}
    for i in layers:
        A_log, _, _, first = decay_rows(mixers[i])
        H = A_log.numel()
        logits = inputs[i][..., first : first + H]
        out[i] = -mixers[i].log_decay(logits).reshape(-1, H).mean(0)
    return out


def adopt_slowest(model, slowest: dict[int, int]):
    """Every head of layer i takes the decay parameters of head ``slowest[i]``: the heads' mean log-decay (the merged
    head's) is then that head's."""
    mixers = dict(model.mixers())
    with torch.no_grad():
        for i, h in slowest.items():
            A_log, dt_bias, lin, first = decay_rows(mixers[i])
            H = A_log.numel()
            A_log.copy_(A_log[h].expand(H).clone())
            dt_bias.copy_(dt_bias[h].expand(H).clone())
            lin.weight[first : first + H] = lin.weight[first + h].clone()
            if lin.bias is not None:
                lin.bias[first : first + H] = lin.bias[first + h].clone()
    return model


def half_life(forgetting: float) -> float:
    return math.log(2) / max(forgetting, 1e-12)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a trained rnnify folder whose memories decay per head (ahn, gated_deltanet)")
    ap.add_argument("--layers", default="every:6", help="the layers StateX merges (as its --layers; default every:6)")
    ap.add_argument("--text", default="../shared/data/pride-and-prejudice/pg1342.txt",
                    help="text for the decays and the perplexity (builtin:... or a path)")
    ap.add_argument("--decay-text", default=None, help="text for the decays alone (default: --text)")
    ap.add_argument("--save-slowest", metavar="DIR", default=None,
                    help="write the model with every head of the chosen layers given its layer's slowest decay here")
    ap.add_argument("--skip-table", action="store_true", help="measure the decays (and save), not the table")
    ap.add_argument("--context-length", type=int, default=2048)
    ap.add_argument("--num-windows", type=int, default=2)
    ap.add_argument("--pairs", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--trials", type=int, default=8)
    args = ap.parse_args(argv)

    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    mixers = dict(model.mixers())
    candidates = [i for i, m in mixers.items() if m.state_expansion == "merge_heads" and decay_rows(m) is not None]
    if not candidates:
        raise SystemExit(f"{args.model}: no layer with a per-head decayed memory (ahn with a gated_deltanet memory, "
                         "gated_deltanet)")
    layers = pick_layers(candidates, args.layers, len(model.config.layer_mixers))
    tokens = tokenize_text_file(args.text, tok)
    decay_tokens = tokenize_text_file(args.decay_text, tok) if args.decay_text else tokens
    forgetting = head_forgetting(model, layers, decay_tokens[: args.context_length])
    slowest = {i: int(f.argmin()) for i, f in forgetting.items()}
    print("half-life in tokens (ln 2 / mean -log decay on the text): each head, and the merged head (the heads' mean)")
    for i, f in forgetting.items():
        heads = " ".join(f"{half_life(x):.3g}" for x in f.tolist())
        print(f"  layer {i}: heads {heads} | merged {half_life(f.mean().item()):.2g} | slowest head {slowest[i]}")

    if args.save_slowest:
        recipe = Path(args.model) / "recipe.yaml"
        files = {"recipe.yaml": recipe.read_text()} if recipe.is_file() else {}
        write_model_folder(args.save_slowest, adopt_slowest(copy.deepcopy(model), slowest), tok, files=files)
        print(f"saved {args.save_slowest}: every head of layers {layers} with its layer's slowest decay"
              + ("" if files else f" ({args.model} has no recipe.yaml: a post-training from it reads from block 0)"))
    if args.skip_table:
        return

    options = {"layers": ",".join(map(str, layers)), "init": "keep"}
    variants = {
        "unmerged (the control's start)": model,
        "merged, init keep (statex_cpu's start)": convert(model, "statex", options=options),
        "merged after every head takes the slowest head's decay":
            convert(adopt_slowest(copy.deepcopy(model), slowest), "statex", options=options),
    }
    blocks = windows(tokens, args.context_length, args.num_windows)
    print(f"\n| start | perplexity @ {args.context_length} ({args.num_windows} windows) | "
          + " | ".join(f"MQAR {p} pairs" for p in args.pairs) + " | seconds |")
    print("|---|---|" + "---|" * len(args.pairs) + "---|")
    for name, m in variants.items():
        t0 = time.time()
        ppl = perplexity(m.eval(), blocks)["ppl"]
        recall = [mqar_accuracy(m, tok, p, trials=args.trials) for p in args.pairs]
        cells = " | ".join(f"{r['accuracy']:.0%} ±{r['stderr']:.0%}" for r in recall)
        print(f"| {name} | {ppl:.2f} | {cells} | {time.time() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
