"""Saving specifics (save/load of every method with and without rnnify is in the matrix, test_methods.py)."""

import torch
import transformers

from rnnify.convert import convert

from .conftest import tiny_model


def test_bf16_save_keeps_dtype(tmp_path):
    student = convert(tiny_model("llama"), "lolcats").to(torch.bfloat16)
    student.save_pretrained(tmp_path / "m")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert next(loaded.parameters()).dtype == torch.bfloat16
    for (n, a), (_, b) in zip(student.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
