"""Losses over the vocabulary a chunk of positions at a time (distill/logits.py) and block-wise attention transfer:
the same losses and gradients as the whole computation (losses.py), without its memory."""

import copy
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from rnnify.convert import convert
from rnnify.distill.stages import AttentionTransferObjective, DistillObjective, FinetuneObjective
from rnnify.pipeline.runner import run_recipe

from .conftest import tiny_config, tiny_model
from .test_training import losses, recipe


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(objective, ids, labels=None):
    objective.student.zero_grad(set_to_none=True)
    loss, metrics = objective(ids, labels) if labels is not None else objective(ids)
    loss.backward()
    return loss.detach(), metrics, _grads(objective.student)


def _assert_same(a, b):
    (la, ma, ga), (lb, mb, gb) = a, b
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    assert ma.keys() == mb.keys() and ga.keys() == gb.keys() and ga
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-4, atol=1e-6, msg=k)


class LargestLogits(TorchDispatchMode):
    """The most rows of any tensor an op makes whose last dimension is the vocabulary (not the head's weight)."""

    def __init__(self, vocab, hidden):
        super().__init__()
        self.vocab, self.hidden, self.rows = vocab, hidden, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab and \
                    tuple(t.shape) != (self.hidden, self.vocab):
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


@pytest.mark.parametrize("kl,temperature,ce_weight", [("forward", 1.0, 0.0), ("reverse", 2.0, 0.3)])
def test_chunked_distillation_equals_whole_logits(kl, temperature, ce_weight):
    teacher = tiny_model("llama")
    student = convert(tiny_model("llama"), "supra", options={"chunk_size": 8})
    student.requires_grad_(True)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :5] = -100  # masked positions count in neither loss
    runs = []
    for chunk in (None, 7, 1000):  # whole; 7 does not divide the 48 - 5 positions; one chunk of all of them
        obj = DistillObjective(copy.deepcopy(student), teacher, temperature, kl, ce_weight, logits_chunk=chunk)
        runs.append(_step(obj, ids, labels))
    _assert_same(runs[0], runs[1])
    _assert_same(runs[0], runs[2])


def test_chunked_finetune_equals_whole_logits_for_every_parameter_and_holds_one_chunk():
    config = tiny_config("llama")
    config.vocab_size = 97  # no other dimension of the model is 97: a tensor ending in 97 is logits
    torch.manual_seed(0)
    source = AutoModelForCausalLM.from_config(config)
    student = convert(source, "lolcats", options={"window": 4, "sinks": 1, "chunk_size": 8})
    student.requires_grad_(True)  # the head and the embeddings train too
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    whole = _step(FinetuneObjective(copy.deepcopy(student), logits_chunk=None), ids)
    vocab = student.config.vocab_size
    obj = FinetuneObjective(copy.deepcopy(student), logits_chunk=5)
    _step(obj, ids)  # the first step checks, once, that the head's logits are the model's (on 8 positions)
    with LargestLogits(vocab, config.hidden_size) as seen:
        chunked = _step(obj, ids)
    _assert_same(whole, chunked)
    assert "lm_head.weight" in chunked[2]
    assert seen.rows == 5  # no [positions x vocabulary] tensor beyond one chunk's, forward or backward
    with LargestLogits(vocab, config.hidden_size) as seen_whole:
        _step(FinetuneObjective(copy.deepcopy(student), logits_chunk=None), ids)
    assert seen_whole.rows == 2 * 40


def test_soft_capped_logits_are_chunked_with_their_cap():
    """Gemma's final soft-cap is applied to each chunk (read from the config, checked against the model's logits)."""
    teacher = tiny_model("gemma3_text")
    teacher.config.final_logit_softcapping = 3.0  # small, so the cap bends these tiny logits
    student = convert(copy.deepcopy(teacher), "supra", options={"chunk_size": 8})
    student.requires_grad_(True)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(2))
    runs = [_step(DistillObjective(copy.deepcopy(student), teacher, ce_weight=0.5, logits_chunk=c), ids, ids)
            for c in (None, 6)]
    _assert_same(runs[0], runs[1])
    obj = DistillObjective(copy.deepcopy(student), teacher, logits_chunk=6)
    out = obj.vocab.teacher_outputs(teacher, ids)
    assert out.head is not None and out.rows.shape[-1] == 64 and obj.vocab.checked == {id(teacher): True}


def test_a_model_with_an_unknown_logit_transform_falls_back_to_whole_logits():
    teacher = tiny_model("llama")
    teacher.config.logits_scaling = 4.0  # the config says Granite-style scaling; this model's forward does not scale
    student = convert(tiny_model("llama"), "supra", options={"chunk_size": 8})
    student.requires_grad_(True)
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(3))
    whole = _step(DistillObjective(copy.deepcopy(student), teacher, logits_chunk=None), ids, ids)
    obj = DistillObjective(copy.deepcopy(student), teacher, logits_chunk=4)
    with pytest.warns(UserWarning, match="computing whole logits for it"):
        chunked = _step(obj, ids, ids)
    _assert_same(whole, chunked)
    assert obj.vocab.checked[id(teacher)] is False


@pytest.mark.parametrize("k", [1, 3])
def test_block_wise_attention_transfer_equals_all_layers_at_once(k):
    teacher = tiny_model("llama")
    student = convert(tiny_model("llama"), "lolcats", options={"window": 4, "sinks": 1, "chunk_size": 8,
                                                                "init_linear_mix_logit": 0.0})
    student.requires_grad_(True)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(4))
    whole = AttentionTransferObjective(copy.deepcopy(student), teacher)
    blocks = AttentionTransferObjective(copy.deepcopy(student), teacher, layers_per_block=k)
    assert [len(b) for b in blocks.blocks] == ([1, 1, 1, 1] if k == 1 else [3, 1])
    _assert_same(_step(whole, ids), _step(blocks, ids))


def test_block_wise_transfer_and_chunked_distillation_train_to_the_same_weights(workdir):
    """Three steps of each stage through the trainer: the same losses and the same saved weights either way."""
    runs = []
    for at, dist in (({}, {"logits_chunk": None}), ({"layers_per_block": 1}, {"logits_chunk": 16})):
        shutil.rmtree(workdir / "out", ignore_errors=True), shutil.rmtree(workdir / "out.run", ignore_errors=True)
        stages = [{"type": "attention_transfer", "max_steps": 3, "lr": 0.05, **at},
                  {"type": "distill", "max_steps": 3, "lr": 0.01, "ce_weight": 0.2, **dist}]
        run_recipe(recipe(workdir, stages), progress=False)
        runs.append((losses(workdir, "attention_transfer")[0] + losses(workdir, "distill")[0],
                     load_file(str(workdir / "out" / "model.safetensors"))))
    (l0, w0), (l1, w1) = runs
    assert len(l0) == 6 and l1 == pytest.approx(l0, rel=1e-5)
    for name in w0:
        torch.testing.assert_close(w1[name], w0[name], rtol=1e-5, atol=1e-6)
