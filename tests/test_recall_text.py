"""benchmarks/recall_text.py: synthetic recall documents whose every answer is the value its pair listed, with none
of the eval's MQAR keys or wording, read by the data loader as any JSON-lines source."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

from rnnify.distill.data import pack_tokens
from rnnify.distill.settings import DataSpec
from rnnify.errors import RnnifyError
from rnnify.eval.recall import KEYS
from rnnify.paths import resolve_path

from .conftest import make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "recall_text.py"
# the pair and the answer of each wording, as patterns over a name and a number
PAIRS = (r"(?P<k>[A-Z]\w+ [A-Z]\w+) - locker (?P<v>\d+)", r"(?P<k>[A-Z]\w+ [A-Z]\w+): ext\. (?P<v>\d+)",
         r"(?P<k>[A-Z]\w+ [A-Z]\w+) is staying in room (?P<v>\d+)\.", r"(?P<v>\d+) belongs to (?P<k>[A-Z]\w+ [A-Z]\w+)")
ANSWERS = (r"Which locker does (?P<k>.+?) use\? Locker (?P<v>\d+)\.", r"Q: What is the extension of (?P<k>.+?)\? A: "
           r"(?P<v>\d+)\.", r"(?P<k>.+?) is staying in room (?P<v>\d+)\.", r"The membership number of (?P<k>.+?) is "
           r"(?P<v>\d+)\.")


_spec = importlib.util.spec_from_file_location("recall_text", SCRIPT)
recall_text = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recall_text)


def _write(tmp_path, *args):
    out = tmp_path / "recall.jsonl"
    recall_text.main([str(out), *args])
    return out


def test_every_answer_is_the_value_its_pair_listed_and_no_eval_key_appears(tmp_path):
    out = _write(tmp_path, "--docs", "60", "--pairs", "8", "32", "--queries", "6", "--seed", "3")
    docs = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert len(docs) == 60 and not (tmp_path / "recall.jsonl.partial").exists()
    wordings = set()
    for doc in docs:
        listing, questions = doc.split("\n\n")
        w = next(i for i, p in enumerate(PAIRS) if re.search(p, listing))
        wordings.add(w)
        table = {m["k"]: m["v"] for m in re.finditer(PAIRS[w], listing)}
        assert len(table) in (8, 32)
        asked = questions.split("\n")
        assert len(asked) == 6
        for line in asked:
            m = re.fullmatch(ANSWERS[w], line)
            assert m and table[m["k"]] == m["v"], line
        words = set(re.findall(r"[a-z]+", doc.lower()))
        assert not words & set(KEYS), doc[:200]
        assert "remember these codes" not in doc.lower() and "the code of" not in doc.lower()
    assert wordings == {0, 1, 2, 3}


def test_the_same_seed_writes_the_same_file_and_another_seed_another(tmp_path):
    a = _write(tmp_path / "a", "--docs", "5").read_text()
    b = _write(tmp_path / "b", "--docs", "5").read_text()
    c = _write(tmp_path / "c", "--docs", "5", "--seed", "1").read_text()
    assert a == b and a != c


def test_the_file_is_a_data_source_the_trainer_packs(tmp_path):
    out = _write(tmp_path, "--docs", "20")
    blocks = pack_tokens(DataSpec(path=str(out)), make_tokenizer(), seq_len=64)
    assert blocks.shape[1] == 64 and blocks.shape[0] > 10


def test_bad_counts_are_refused_with_the_flag_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _write(tmp_path, "--docs", "0")
    assert e.value.code == 2 and "--docs, --pairs and --queries must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "recall.jsonl").exists()


def test_the_shipped_file_is_what_its_readme_command_writes(tmp_path):
    """rnnify/data/recall/train.jsonl (read by statex_cpu as builtin:recall/train.jsonl) is byte for byte the script's
    output for the command in its README, so the two cannot drift apart."""
    shipped = Path(resolve_path("builtin:recall/train.jsonl"))
    command = re.search(r"python benchmarks/recall_text\.py (\S+) (.+)", (shipped.parent / "README.md").read_text())
    assert Path(command[1]) == shipped.relative_to(ROOT)
    out = _write(tmp_path, *command[2].split())
    assert out.read_bytes() == shipped.read_bytes()


def test_a_missing_builtin_names_every_shipped_file_the_recall_documents_too():
    with pytest.raises(RnnifyError) as e:
        resolve_path("builtin:recall/valid.jsonl")
    assert "recall/train.jsonl" in str(e.value) and "wikitext-2/test.txt" in str(e.value)
    assert "README.md" not in str(e.value)
