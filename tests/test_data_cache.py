"""The on-disk token cache: packing in bounded memory, lazy streaming, resumable packing, cache keys."""

import json
import tracemalloc

import numpy as np
import pytest
import torch

from rnnify.distill import data as data_mod
from rnnify.distill import token_cache
from rnnify.distill.data import pack_tokens
from rnnify.distill.token_cache import PackedBlocks
from rnnify.errors import RnnifyError
from rnnify.recipe import DataSpec

from .conftest import make_tokenizer


def _lines(n, seed=0, vocab=120):
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{w}" for w in rng.integers(0, vocab, rng.integers(5, 40))) for _ in range(n)]


def _reference(lines, tok, seq_len):
    """Independent packing: every line's ids + EOS, concatenated, cut into whole blocks."""
    stream = []
    for line in lines:
        stream += tok(line, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len)


def test_blocks_match_an_independent_packing_and_are_reused(tmp_path, monkeypatch):
    lines = _lines(700)
    (tmp_path / "d.txt").write_text("\n".join(lines) + "\n")
    tok = make_tokenizer(128)
    blocks = PackedBlocks(DataSpec(path=str(tmp_path / "d.txt")), tok, 32, root=tmp_path / "c").ensure(10**9)
    ref = _reference(lines, tok, 32)
    assert blocks.complete and len(blocks) == len(ref)
    assert torch.equal(blocks[torch.arange(len(ref))], ref)
    assert blocks.dtype == np.uint16 and blocks.data_file.stat().st_size == ref.numel() * 2

    calls = []
    real = token_cache.pack_stream
    monkeypatch.setattr(token_cache, "pack_stream", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = PackedBlocks(DataSpec(path=str(tmp_path / "d.txt")), tok, 32, root=tmp_path / "c").ensure(len(ref))
    assert not calls and again.dir == blocks.dir  # a second run reads the cache, packs nothing
    assert torch.equal(again[torch.tensor([3, 1])], ref[[3, 1]])


def test_packing_memory_does_not_grow_with_the_data(tmp_path):
    tok = make_tokenizer(128)
    spec = DataSpec(path=str(tmp_path / "big.txt"))

    def peak(n_lines):
        (tmp_path / "big.txt").write_text("\n".join(_lines(n_lines, seed=n_lines)) + "\n")
        data_mod.load_rows(spec)  # datasets converts the file to its own on-disk Arrow cache first: not ours
        tracemalloc.start()
        b = PackedBlocks(spec, tok, 64, root=tmp_path / f"c{n_lines}").ensure(10**9)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top, len(b) * 64

    small_peak, _ = peak(2_000)
    big_peak, big_tokens = peak(40_000)
    # the old packer held every token as a Python int in lists (~36 bytes each): ~30 MB here
    assert big_peak < big_tokens * 8 / 4, (big_peak, big_tokens)
    assert big_peak < 3 * small_peak + 2_000_000, (small_peak, big_peak)  # 20x the data, not 20x the memory


def test_ensure_reads_only_the_rows_it_needs(tmp_path):
    (tmp_path / "d.txt").write_text("\n".join(_lines(5_000)) + "\n")
    b = PackedBlocks(DataSpec(path=str(tmp_path / "d.txt")), make_tokenizer(128), 16, root=tmp_path / "c").ensure(4)
    progress = json.loads((b.dir / "progress.json").read_text())
    assert len(b) >= 4 and not b.complete
    assert progress["rows"] <= 256  # one batch of rows, not the file
    b.ensure(len(b) + 500)  # extending continues where it stopped
    assert len(b) >= 504 and json.loads((b.dir / "progress.json").read_text())["rows"] > progress["rows"]


def test_interrupted_packing_continues_to_the_same_blocks(tmp_path, monkeypatch):
    lines = _lines(1500)
    (tmp_path / "d.txt").write_text("\n".join(lines) + "\n")
    tok = make_tokenizer(128)
    spec = DataSpec(path=str(tmp_path / "d.txt"))
    real = data_mod.pack_stream

    def dying(*a, **k):
        for i, item in enumerate(real(*a, **k)):
            if i == 3:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(token_cache, "pack_stream", dying)
    b = PackedBlocks(spec, tok, 24, root=tmp_path / "c")
    with pytest.raises(KeyboardInterrupt):
        b.ensure(10**9)
    with open(b.data_file, "ab") as f:  # a half-written block after the last record
        f.write(b"\x07" * 10)
    monkeypatch.setattr(token_cache, "pack_stream", real)
    resumed = PackedBlocks(spec, tok, 24, root=tmp_path / "c")
    assert 0 < len(resumed) and not resumed.complete
    resumed.ensure(10**9)
    ref = _reference(lines, tok, 24)
    assert resumed.complete and torch.equal(resumed[torch.arange(len(ref))], ref)


def test_another_tokenizer_seq_len_or_edited_file_never_reuses_a_cache(tmp_path):
    (tmp_path / "d.txt").write_text("\n".join(_lines(300)) + "\n")
    spec = DataSpec(path=str(tmp_path / "d.txt"))
    a = PackedBlocks(spec, make_tokenizer(128), 16, root=tmp_path / "c").ensure(10**9)
    other_tok = make_tokenizer(100)  # w100..w123 become <unk>: other ids for the same text
    b = PackedBlocks(spec, other_tok, 16, root=tmp_path / "c").ensure(10**9)
    assert a.dir != b.dir
    assert torch.equal(b[torch.arange(len(b))], _reference(_lines(300), other_tok, 16))
    assert PackedBlocks(spec, make_tokenizer(128), 32, root=tmp_path / "c").dir != a.dir
    (tmp_path / "d.txt").write_text("\n".join(_lines(301)) + "\n")
    assert PackedBlocks(spec, make_tokenizer(128), 16, root=tmp_path / "c").dir != a.dir


def test_streaming_rows_are_tokenised_as_training_reaches_them(tmp_path):
    lines = _lines(3000)
    folder = tmp_path / "hub-like"  # a dataset repository's layout, loaded by name as from the Hub
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    tok = make_tokenizer(128)
    spec = DataSpec(path=str(folder), format="hub", streaming=True)
    b = PackedBlocks(spec, tok, 16, root=tmp_path / "c")
    assert b.lazy and len(b) == 0
    b.ensure(3)
    first = json.loads((b.dir / "progress.json").read_text())["rows"]
    assert first <= 256 and not b.complete
    b.ensure(400)
    ref = _reference(lines, tok, 16)
    assert torch.equal(b[torch.arange(400)], ref[:400])


def test_too_little_data_is_a_clear_error(tmp_path):
    (tmp_path / "d.txt").write_text("w1 w2 w3\n")
    with pytest.raises(RnnifyError, match="fewer than 4096 tokens"):
        PackedBlocks(DataSpec(path=str(tmp_path / "d.txt")), make_tokenizer(128), 4096, root=tmp_path / "c").ensure(1)
    with pytest.raises(RnnifyError, match="fewer than 4096 tokens"):
        pack_tokens(DataSpec(path=str(tmp_path / "d.txt")), make_tokenizer(128), 4096)


def _with_eos(eos: str):
    """The test tokenizer with another EOS token: the same vocabulary and serialisation, other packed ids."""
    tok = make_tokenizer(128)
    tok.eos_token = eos
    return tok


def test_tokenizers_that_differ_only_in_their_eos_id_never_share_a_cache(tmp_path):
    lines = _lines(200)
    (tmp_path / "d.txt").write_text("\n".join(lines) + "\n")
    spec = DataSpec(path=str(tmp_path / "d.txt"))
    first, second = make_tokenizer(128), _with_eos("<pad>")
    assert first.eos_token_id == 2 and second.eos_token_id == 3
    a = PackedBlocks(spec, first, 16, root=tmp_path / "c").ensure(10**9)
    b = PackedBlocks(spec, second, 16, root=tmp_path / "c").ensure(10**9)
    assert a.dir != b.dir
    got = b[torch.arange(len(b))]
    assert torch.equal(got, _reference(lines, second, 16))  # each document ends in the second tokenizer's EOS
    assert (got == 3).sum() > 100 and not (got == 2).any()


@pytest.mark.parametrize("how", ["zeroed", "truncated", "one byte changed"])
def test_a_damaged_cache_is_packed_again_and_never_trained_on(tmp_path, how):
    lines = _lines(400)
    (tmp_path / "d.txt").write_text("\n".join(lines) + "\n")
    spec, tok = DataSpec(path=str(tmp_path / "d.txt")), make_tokenizer(128)
    ref = _reference(lines, tok, 16)
    a = PackedBlocks(spec, tok, 16, root=tmp_path / "c").ensure(10**9)
    raw = a.data_file.read_bytes()
    if how == "zeroed":  # same size, every byte zero
        a.data_file.write_bytes(bytes(len(raw)))
    elif how == "truncated":
        a.data_file.write_bytes(raw[: len(raw) // 3])
    else:
        a.data_file.write_bytes(raw[:100] + bytes([raw[100] ^ 1]) + raw[101:])
    said = []
    b = PackedBlocks(spec, tok, 16, root=tmp_path / "c", log=said.append)
    assert b.dir == a.dir and len(said) == 1 and f"token cache {a.dir}: blocks.bin" in said[0], said
    assert ("holds" in said[0]) == (how == "truncated") and said[0].endswith("packing " + spec.path + " again")
    b.ensure(10**9)
    assert b.complete and torch.equal(b[torch.arange(len(b))], ref)
    assert PackedBlocks(spec, tok, 16, root=tmp_path / "c", log=said.append).ensure(10**9) and len(said) == 2
    assert "packed" in said[1]  # the rebuild's own message; opening the rebuilt cache said nothing more
