"""Conversions that fit each layer's output scale to its attention's at conversion (Gated DeltaNet, and
Mamba-in-the-Llama with ``init: attention``): convert() does it on the selection text when given a tokenizer."""

import pytest
import torch

from rnnify.convert import convert

from .conftest import tiny_model


@pytest.mark.parametrize("method,extra", [("gated_deltanet", {}), ("mamba_in_llama", {"init": "attention"})])
def test_calibration_fits_each_layers_output_scale_to_its_attention(tmp_path, method, extra):
    """With a tokenizer, convert() fits each layer's output scale by least squares on the source's own activations
    for the selection text: on those tokens the best further scale is then 1, and every layer is at least as close to
    its attention as before."""
    from rnnify.convert.layer_select import text_ids

    from .conftest import make_tokenizer

    text = tmp_path / "t.txt"
    text.write_text("\n".join(" ".join(f"w{(i * 7 + j) % 97}" for j in range(40)) for i in range(40)))
    teacher, tok = tiny_model("llama"), make_tokenizer(128)
    plain = convert(teacher, method, keep_attention="0", options={"chunk_size": 8, **extra})
    fitted = convert(teacher, method, keep_attention="0", options={"chunk_size": 8, "calibrate_tokens": 256, **extra},
                     tokenizer=tok, select_text=str(text))
    ids = text_ids(tok, str(text), 256, seq_len=256)[:1]  # the tokens the conversion fitted on
    captured = {}
    hooks = [teacher.model.layers[i].self_attn.register_forward_hook(
        lambda m, a, k, o, i=i: captured.__setitem__(i, (k["hidden_states"], k["position_embeddings"], o[0])),
        with_kwargs=True) for i in (1, 2, 3)]
    with torch.no_grad():
        teacher(ids)
        for h in hooks:
            h.remove()
        for i in (1, 2, 3):
            h, pe, target = captured[i]
            before, _ = plain.model.layers[i].self_attn(h, position_embeddings=pe)
            after, _ = fitted.model.layers[i].self_attn(h, position_embeddings=pe)
            assert ((after - target) ** 2).mean() <= ((before - target) ** 2).mean()
            best = float((after.double() * target).sum() / (after.double() ** 2).sum())
            assert best == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(Exception, match="at least 64 tokens"):
        convert(teacher, method, options={"calibrate_tokens": 10, **extra})
