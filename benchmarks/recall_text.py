"""Synthetic recall documents for post-training a recurrent memory on what MQAR measures (a JSON-lines file).

Each document lists key-value pairs in one of several wordings (a register, a phone book, sentences), then asks for
some of them in another order, so an answer sits tens to hundreds of tokens after its pair: beyond a 64-token window,
where only the memory can hold it. The keys are first names and surnames, never ``rnnify.eval.recall.KEYS`` (the
eval's own words), and the wordings are not the eval's ("Remember these codes. apple: 4821 ... The code of apple
is"), so MQAR measured after training on these documents is recall that carries over, not a memorised format.

    python benchmarks/recall_text.py out/recall.jsonl --docs 2000 --seed 0

A recipe reads it as a data source (``datasets: {recall: {path: out/recall.jsonl}}``), mixed with text
(``train.data: {mix: 0.7, recall: 0.2, wikitext: 0.1}``). The package ships this script's first 400 documents (``--docs
400 --seed 0``) as ``builtin:recall/train.jsonl``, which statex_cpu reads; write more for longer post-trainings.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

from rnnify.eval.recall import KEYS

FIRST = ("Ada", "Bruno", "Carmen", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kasia", "Lars",
         "Mina", "Nils", "Olga", "Pavel", "Rosa", "Sami", "Tara", "Ugo", "Vera", "Wen", "Yara", "Zoltan", "Amir",
         "Beatriz", "Chen", "Dalia", "Emil", "Fatima", "Goran", "Hana", "Ivo", "Jana", "Kofi", "Lena", "Marco",
         "Noor", "Oskar", "Priya", "Quentin", "Rania", "Sven", "Tomas", "Uma", "Viktor", "Wanda", "Xavier", "Yusuf",
         "Zara", "Anton", "Bianca", "Cyrus", "Dora", "Erik", "Flora", "Gideon", "Helga", "Igor", "Julia")
LAST = ("Novak", "Silva", "Berg", "Okafor", "Larsen", "Moreau", "Kowalski", "Tanaka", "Haddad", "Fischer", "Rossi",
        "Petrov", "Nguyen", "Costa", "Jensen", "Weber", "Dubois", "Sato", "Ibrahim", "Lindqvist", "Mendez", "Horvat",
        "Quinn", "Varga", "Adler", "Brandt", "Castillo", "Duarte", "Eriksen", "Falk")

# (heading, one pair, the separator between pairs, a question, its answer); {k} a key, {v} its value
WORDINGS = (
    ("Locker register for the spring term:\n", "{k} - locker {v}", "\n", "Which locker does {k} use?", " Locker {v}."),
    ("Staff phone extensions.\n", "{k}: ext. {v}", "; ", "Q: What is the extension of {k}?", " A: {v}."),
    ("Hotel guest list.\n", "{k} is staying in room {v}.", " ", "{k} is staying in room", " {v}."),
    ("Membership numbers, as issued:\n", "{v} belongs to {k}", ", ", "The membership number of {k} is", " {v}."),
)


NAMES = [f"{a} {b}" for a in FIRST for b in LAST]


def names(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct "First Last" names."""
    return rng.sample(NAMES, n)


def document(rng: random.Random, pairs: int, queries: int) -> str:
    """One recall document: ``pairs`` key-value pairs in one wording, then ``queries`` of them asked and answered."""
    head, pair, sep, question, answer = rng.choice(WORDINGS)
    keys = names(rng, pairs)
    values = [str(rng.randint(100, 99999)) for _ in keys]
    listing = head + sep.join(pair.format(k=k, v=v) for k, v in zip(keys, values)) + "\n\n"
    asked = rng.sample(range(pairs), min(queries, pairs))
    return listing + "\n".join(question.format(k=keys[i]) + answer.format(v=values[i]) for i in asked)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="the JSON-lines file to write (one {\"text\": ...} per document)")
    ap.add_argument("--docs", type=int, default=2000, help="documents (default 2000, about 0.6M SmolLM2 tokens)")
    ap.add_argument("--pairs", type=int, nargs="+", default=[8, 16, 24, 32, 48],
                    help="pairs per document, drawn from these (default 8 16 24 32 48)")
    ap.add_argument("--queries", type=int, default=8, help="questions per document (default 8)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.docs < 1 or min(args.pairs) < 1 or args.queries < 1:
        ap.error("--docs, --pairs and --queries must be at least 1")
    if max(args.pairs) > len(NAMES):
        ap.error(f"--pairs: at most {len(NAMES)} (distinct names)")
    assert not {w.lower() for w in FIRST + LAST} & set(KEYS), "a key the eval's MQAR uses"
    rng = random.Random(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".partial")
    with tmp.open("w") as f:
        for _ in range(args.docs):
            f.write(json.dumps({"text": document(rng, rng.choice(args.pairs), args.queries)}) + "\n")
    os.replace(tmp, args.out)  # a file that exists is whole
    print(f"{args.out}: {args.docs} recall documents ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
