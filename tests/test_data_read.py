"""A post-training (``conversion.start_from``) reads on from where its start model's training stopped in the same
text (``data_start: continue``), through a chain of start models; ``data_start: beginning`` reads from the first
block; the offset view rotates a finite source."""

import pytest
import torch

from rnnify.distill.offset_blocks import OffsetBlocks
from rnnify.distill.settings import DataSpec
from rnnify.distill.token_cache import PackedBlocks
from rnnify.pipeline import runner
from rnnify.pipeline.data_read import positions, source_key, stage_reads
from rnnify.pipeline.plan import RunPlan
from rnnify.recipe import recipe_from_dict
from tests.conftest import make_tokenizer


def _packed(workdir, seq_len=8, name="data.txt"):
    part = PackedBlocks(DataSpec(path=str(workdir / name)), make_tokenizer(128), seq_len, root=workdir / "tokens",
                        log=lambda *_: None)
    part.ensure(10**6)  # all of it
    assert part.complete
    return part


def test_the_offset_view_reads_from_its_block_and_rotates_a_finite_source(workdir):
    part = _packed(workdir)
    n = len(part)
    full = part[torch.arange(n)]
    view = OffsetBlocks(_packed(workdir), 3).ensure(4).limit(4)
    assert len(view) == 4 and torch.equal(view[torch.arange(4)], full[3:7])
    near_end = OffsetBlocks(_packed(workdir), n - 2).ensure(5)  # past the end: wraps to the first block
    assert len(near_end) == n and near_end.start == n - 2
    assert torch.equal(near_end[torch.arange(5)], full[[n - 2, n - 1, 0, 1, 2]])
    beyond = OffsetBlocks(_packed(workdir), 2 * n + 1).ensure(1)  # read whole twice over: modulo its length
    assert beyond.start == 1 and torch.equal(beyond[torch.tensor([0])], full[1:2])
    with pytest.raises(IndexError, match="out of range"):
        view[torch.tensor([4])]


def _write(path, words, lines=60):
    path.write_text("\n".join(" ".join(words[(i + j) % len(words)] for j in range(12)) for i in range(lines)) + "\n")


def test_what_a_recipe_read_counts_each_source_of_a_mixture_and_continues_after_its_start(workdir):
    _write(workdir / "a.txt", [f"w{i}" for i in range(10)])
    _write(workdir / "b.txt", [f"w{i}" for i in range(50, 60)])
    data = {"a": {"path": str(workdir / "a.txt")}, "b": {"path": str(workdir / "b.txt")}}
    stages = [{"type": "finetune", "max_steps": 6, "batch_size": 4, "seq_len": 16, "data": {"a": 3, "b": 1}},
              {"type": "finetune", "max_steps": 5, "batch_size": 2, "seq_len": 32, "data": "a"}]
    base = {"name": "r", "model": {"source": str(workdir / "src")}, "conversion": {"method": "supra"},
            "datasets": data, "stages": stages, "output": {"dir": str(workdir / "out")}}
    recipe = recipe_from_dict(base)
    a, b = (source_key(DataSpec(path=str(workdir / f))) for f in ("a.txt", "b.txt"))
    first, second = RunPlan.of(recipe).stages
    # 24 blocks of 16 tokens at 3:1 (the interleave puts 18 of a and 6 of b among them), then 10 blocks of 32 of a
    assert stage_reads(first) == {a: 18 * 16, b: 6 * 16} and stage_reads(second) == {a: 10 * 32}
    assert positions(recipe, {}) == {a: 320, b: 96}  # each stage of a fresh run reads from the first block
    after = recipe_from_dict({**base, "conversion": {"method": "supra", "start_from": "x"}})
    assert positions(after, {a: 100}) == {a: 100 + 320, b: 96}  # both stages read on past the start's 100 tokens
    again = recipe_from_dict({**base, "conversion": {"method": "supra", "start_from": "x"},
                              "stages": [dict(s, data_start="beginning") for s in stages]})
    assert positions(again, {a: 100}) == {a: 320, b: 96}

def _run(workdir, out, start_from=None, data_start="continue"):
    conversion = {"method": "ahn", "options": {} if start_from else {"window": 4, "sinks": 1, "chunk_size": 8}}
    if start_from:
        conversion["start_from"] = str(workdir / start_from)
    recipe = recipe_from_dict({
        "name": out, "seed": 1, "model": {"source": str(workdir / "src")}, "conversion": conversion,
        "datasets": {"d": {"path": str(workdir / "data.txt")}},
        "train": {"seq_len": 32, "batch_size": 2, "data_start": data_start},
        "stages": [{"type": "self_distill", "max_steps": 3, "lr": 0.01}],
        "output": {"dir": str(workdir / out)},
    })
    return runner.run_recipe(recipe, progress=False)


def test_a_post_training_reads_the_blocks_its_start_did_not_and_the_chain_adds_up(workdir, monkeypatch, capsys):
    """Each run reads 3 steps x 2 blocks of 32 tokens: the source blocks 0-5, a post-training from it 6-11, one
    from that 12-17; with data_start: beginning, blocks 0-5 again."""
    full = _packed(workdir, seq_len=32)[torch.arange(18)]
    stage_blocks = []
    real = runner.train_stage
    monkeypatch.setattr(runner, "train_stage", lambda **kw: stage_blocks.append(
        kw["blocks"][torch.arange(len(kw["blocks"]))]) or real(**kw))
    _run(workdir, "ahn")
    _run(workdir, "post", start_from="ahn")
    _run(workdir, "post2", start_from="post")
    _run(workdir, "again", start_from="ahn", data_start="beginning")
    assert [len(b) for b in stage_blocks] == [6, 6, 6, 6]
    for blocks, first in zip(stage_blocks, (0, 6, 12, 0)):
        assert torch.equal(blocks, full[first:first + 6])
    log = capsys.readouterr().err
    assert f"data d read from block 6 on ({workdir / 'ahn'}'s training read its first 192 tokens" in log
    assert f"data d read from block 12 on ({workdir / 'post'}'s training read its first 384 tokens" in log
    card = (workdir / "post2" / "README.md").read_text()
    assert "`self_distill`: 3 steps, 192 tokens, final loss" in card and "; data d read from block 12 on" in card
    assert "read from block" not in (workdir / "again" / "README.md").read_text()


def test_a_start_without_a_recipe_has_read_nothing_and_says_so(workdir):
    from rnnify.cli import main
    from rnnify.pipeline.data_read import tokens_read

    assert main(["convert", str(workdir / "src"), "--method", "ahn", "--out", str(workdir / "conv"), "--window", "4"]) == 0
    said = []
    assert tokens_read(str(workdir / "conv"), log=said.append) == {}
    assert len(said) == 1 and "holds no recipe.yaml" in said[0] and "from the first block" in said[0]


def test_a_start_whose_own_start_is_gone_counts_what_it_read_itself(workdir, capsys):
    import shutil

    from rnnify.pipeline.data_read import tokens_read

    _run(workdir, "ahn")
    _run(workdir, "post", start_from="ahn")
    shutil.rmtree(workdir / "ahn")
    said = []
    read = tokens_read(str(workdir / "post"), log=said.append)
    assert list(read.values()) == [192]  # its own 3 steps x 2 x 32 tokens, read from the first block it knows of
    assert len(said) == 1 and f"{workdir / 'ahn'} (which {workdir / 'post'} started from) is not here" in said[0]
