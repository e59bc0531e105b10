"""Weighted mixtures of data sources (``data: {a: 0.75, b: 0.25}``): the proportions they draw in, and resuming."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from rnnify.distill import trainer
from rnnify.distill.mixture import MixedBlocks, interleave
from rnnify.errors import RnnifyError
from rnnify.pipeline.runner import run_recipe
from rnnify.recipe import recipe_from_dict


@pytest.mark.parametrize("weights", [[0.8, 0.2], [0.5, 0.3, 0.2], [0.999, 0.001]])
def test_every_prefix_of_the_interleave_holds_each_source_at_its_weight(weights):
    source, occurrence = interleave(weights, 2000)
    for n in (1, 7, 100, 999, 2000):
        counts = torch.bincount(source[:n], minlength=len(weights)).double()
        assert ((counts - torch.tensor(weights) * n).abs() <= 1).all(), (n, counts)
    for s in range(len(weights)):  # each source's blocks come in order, none skipped
        mine = occurrence[source == s]
        assert torch.equal(mine, torch.arange(len(mine)))


def _write(path, words, lines=120):
    path.write_text("\n".join(" ".join(words[(i + j) % len(words)] for j in range(30)) for i in range(lines)) + "\n")


def _recipe(workdir, data, stages):
    return recipe_from_dict({
        "name": "mixture", "seed": 0,
        "model": {"source": str(workdir / "src")},
        "conversion": {"method": "supra", "options": {"chunk_size": 16}},
        "datasets": {"a": {"path": str(workdir / "a.txt")}, "b": {"path": str(workdir / "b.txt")}},
        "train": {"seq_len": 32, "batch_size": 4, "checkpoint_every": 2, "data": data},
        "stages": stages,
        "output": {"dir": str(workdir / "out")},
    })


def test_a_mixture_trains_on_its_sources_in_their_proportions_and_resumes_to_the_same_weights(workdir, monkeypatch):
    """Source a holds words w0-w9 only and b words w50-w59: the token ids of every block the trainer reads say which
    source it came from. Over the run's 24 blocks, 3/4 come from a; an interrupted run resumes to the same weights."""
    _write(workdir / "a.txt", [f"w{i}" for i in range(10)])
    _write(workdir / "b.txt", [f"w{i}" for i in range(50, 60)])
    stages = [{"type": "finetune", "max_steps": 6, "lr": 0.003}]
    seen = []
    real = MixedBlocks.__getitem__
    monkeypatch.setattr(MixedBlocks, "__getitem__", lambda self, idx: seen.append(real(self, idx)) or seen[-1])
    run_recipe(_recipe(workdir, {"a": 3, "b": 1}, stages), progress=False)
    blocks = torch.cat(seen)
    a_words = (blocks >= 4) & (blocks < 14)  # ids: 4 special tokens (and EOS between rows), then w0, w1, ...
    b_words = (blocks >= 54) & (blocks < 64)
    from_a, from_b = a_words.any(1) & ~b_words.any(1), b_words.any(1) & ~a_words.any(1)
    assert blocks.shape[0] == 6 * 4 and bool((from_a | from_b).all())
    assert int(from_a.sum()) == 18 and int(from_b.sum()) == 6
    reference = load_file(str(workdir / "out" / "model.safetensors"))
    rows = [json.loads(x) for x in (workdir / "out.run" / "metrics.jsonl").read_text().splitlines()]

    shutil.rmtree(workdir / "out")
    shutil.rmtree(workdir / "out.run")
    monkeypatch.setattr(trainer, "_BEFORE_STEP", lambda stage, step: (_ for _ in ()).throw(KeyboardInterrupt)
                        if step == 3 else None)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(_recipe(workdir, {"a": 3, "b": 1}, stages), progress=False)
    monkeypatch.setattr(trainer, "_BEFORE_STEP", None)
    run_recipe(_recipe(workdir, {"a": 3, "b": 1}, stages), resume=True, progress=False)
    resumed = load_file(str(workdir / "out" / "model.safetensors"))
    again = [json.loads(x) for x in (workdir / "out.run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in rows], abs=1e-6)
    for k in reference:
        torch.testing.assert_close(resumed[k], reference[k], atol=1e-6, rtol=1e-6, msg=k)


@pytest.mark.parametrize("data,message", [
    ({"a": 1, "c": 1}, "uses data 'c', not in datasets"),
    ({"a": 1, "b": 0}, "a weight above zero"),
])
def test_a_mixture_names_what_it_accepts(workdir, data, message):
    _write(workdir / "a.txt", ["w1"])
    _write(workdir / "b.txt", ["w2"])
    with pytest.raises(RnnifyError, match=message):
        _recipe(workdir, data, [{"type": "finetune", "max_steps": 1}])


def test_a_longer_schedule_starts_with_every_shorter_one():
    """MixedBlocks grows its schedule by doubling and slices it: that is only right if prefixes agree."""
    weights = [0.5, 0.3, 0.2]
    long_source, long_occurrence = interleave(weights, 4096)
    for n in (1, 3, 10, 333, 2048):
        source, occurrence = interleave(weights, n)
        assert torch.equal(source, long_source[:n]) and torch.equal(occurrence, long_occurrence[:n])
