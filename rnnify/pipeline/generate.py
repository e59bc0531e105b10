"""``rnnify generate``: continue a prompt with a model (greedy or sampled), streaming the text as it comes."""

from __future__ import annotations

import time

import torch
from transformers import TextStreamer

from .. import sources
from ..errors import RnnifyError


def generate_text(model_name: str, prompt: str, *, max_new_tokens: int = 40, temperature: float = 0.0,
                  chat: bool = False, dtype: str = "auto", seed: int = 0, recurrence: int | None = None,
                  log=None) -> str:
    """Stream the continuation of ``prompt`` to stdout and return it; ``log`` gets the speed."""
    if not prompt.strip():
        raise RnnifyError("the prompt is empty; give some text to continue, e.g. \"The capital of France is\"")
    if max_new_tokens < 1:
        raise RnnifyError(f"--max-new-tokens {max_new_tokens}: accepted: an integer >= 1")
    if temperature < 0:
        raise RnnifyError(f"--temperature {temperature}: accepted: 0 (greedy) or a positive number")
    if recurrence is not None and recurrence < 1:
        raise RnnifyError(f"--recurrence {recurrence}: accepted: an integer >= 1 (loops of the recurrent block)")
    torch.manual_seed(seed)
    model, tok = sources.load_source(model_name, dtype=dtype)
    if tok is None:
        raise RnnifyError(f"{model_name} has no tokenizer files; save one next to the model")
    text = prompt
    if chat:
        if not getattr(tok, "chat_template", None):
            raise RnnifyError(f"--chat: the tokenizer of {model_name} has no chat template; accepted: a model whose "
                              "tokenizer_config.json or chat_template.jinja defines one, or the prompt without --chat")
        text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt")
    extra = {}
    if recurrence is not None:
        if not len(getattr(model, "blocks", [])):
            raise RnnifyError(f"--recurrence: {model_name} has no recurrent block (convert with --method retrofit)")
        extra["recurrence"] = recurrence
    streamer = TextStreamer(tok, skip_prompt=False, skip_special_tokens=True)
    t0 = time.time()
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
            streamer=streamer, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            **extra,
        )
    new = out[0, enc["input_ids"].shape[1]:]
    seconds = max(time.time() - t0, 1e-9)
    if log:
        log(f"{len(new)} tokens in {seconds:.2f}s ({len(new) / seconds:.1f} tokens/s)")
    return tok.decode(new, skip_special_tokens=True)


__all__ = ["generate_text"]
