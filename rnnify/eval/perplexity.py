"""Perplexity on a text file at a fixed context length, on the same windows for every model compared."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import RnnifyError
from ..paths import resolve_path


def tokenize_text_file(path: str, tokenizer) -> torch.Tensor:
    """All tokens of a text file (or ``builtin:...``) as one 1-D stream."""
    p = Path(resolve_path(path))
    if not p.is_file():
        raise RnnifyError(f"text file {path} does not exist")
    return torch.tensor(tokenizer(p.read_text(), add_special_tokens=False)["input_ids"], dtype=torch.long)


def windows(tokens: torch.Tensor, context_length: int, num_windows: int) -> torch.Tensor:
    """The first ``num_windows`` non-overlapping windows of ``context_length`` tokens: ``[N, L]``."""
    n = min(num_windows, tokens.numel() // context_length)
    if n == 0:
        raise RnnifyError(f"the text has {tokens.numel()} tokens, fewer than one context of {context_length}")
    return tokens[: n * context_length].view(n, context_length)


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 1, progress=None, details: bool = False,
               **forward_kwargs) -> dict:
    """exp(mean next-token NLL) over every position of every block (each block is one independent context).
    ``forward_kwargs`` go to the model (e.g. ``recurrence=8`` for a looped model). With ``details``: also the mean
    NLL at each position (``position_nll``, over the blocks) and the greedy next token at every position
    (``argmax``), for loss-by-position plots and agreement with a teacher."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    by_position, argmax = [], []
    for i in range(0, blocks.shape[0], batch_size):
        x = blocks[i : i + batch_size].to(device)
        logits = model(input_ids=x, use_cache=False, **forward_kwargs).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
        nll += loss.sum().item()
        count += x[:, 1:].numel()
        if details:
            by_position.append(loss.view(x.shape[0], -1).cpu())
            argmax.append(logits.argmax(-1).cpu())
        if progress:
            progress(i + x.shape[0])
    out = {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count}
    if details:
        out["position_nll"] = torch.cat(by_position).mean(0)
        out["argmax"] = torch.cat(argmax)
    return out
