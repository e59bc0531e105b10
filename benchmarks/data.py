"""Training-data packing: peak memory, throughput and time to the first step, on-disk token cache against the
in-memory packer of rnnify 0.2 (every token a Python int in lists, then one tensor), in one run.

Each measurement runs in its own process. "packer RSS" is the largest anonymous resident set (RssAnon: not the
mapped Arrow file) while packing, less the one just before (libraries, tokenizer and the dataset's Arrow table
already loaded): the packer's own memory, which must not grow with the data; "process peak" is the whole process's
``ru_maxrss``. Text: WikiText-2 and Pride and Prejudice repeated to the token counts asked for.

    python benchmarks/data.py                        # 1M and 20M tokens, SmolLM2's tokenizer
    python benchmarks/data.py --tokens 200000 --tokenizer path/to/model
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [ROOT.parent / "shared/data/wikitext-2/valid.txt", ROOT.parent / "shared/data/wikitext-2/test.txt",
         ROOT.parent / "shared/data/pride-and-prejudice/pg1342.txt"]


def _tokenizer(name):
    from transformers import AutoTokenizer

    from rnnify import sources

    return AutoTokenizer.from_pretrained(sources.local_path(name, progress=lambda *_: None).path)


def _lists_packer(spec, tok, seq_len):
    """rnnify 0.2's pack_tokens, for the comparison: Python lists of every block, then one tensor."""
    import torch

    from rnnify.distill.data import _row_text, load_rows

    buf, blocks = [], []
    for row in load_rows(spec):
        text = _row_text(row, spec, tok)
        if text:
            buf.extend(tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
            while len(buf) >= seq_len:
                blocks.append(buf[:seq_len])
                del buf[:seq_len]
    return torch.tensor(blocks, dtype=torch.int32)


def _rss_mb(fields=("RssAnon",)) -> float:
    """The anonymous resident set (the process's own allocations; not the file pages it maps, such as datasets'
    Arrow files or safetensors, which the kernel can drop); ``fields=("RssAnon", "RssFile")`` adds the mapped pages."""
    found = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in fields:
                found[key] = int(line.split()[1]) / 1024
    if set(found) != set(fields):
        raise RuntimeError(f"no {set(fields) - set(found)} in /proc/self/status")
    return sum(found.values())


class PeakRSS:
    """The largest resident set seen while the block runs (sampled every 5 ms), less the resident set at its
    start: the memory the packer itself takes, apart from the libraries and the dataset loaded before it."""

    def __init__(self, fields=("RssAnon",)):
        self.fields = fields

    def __enter__(self):
        import threading

        self.start = self.peak = _rss_mb(self.fields)
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, _rss_mb(self.fields))

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb(self.fields))
        self.above = self.peak - self.start


def child(mode, path, tokenizer, seq_len, cache, batch):
    """One measurement in this process; prints a JSON line."""
    from rnnify.distill.data import load_rows
    from rnnify.distill.token_cache import PackedBlocks
    from rnnify.recipe import DataSpec

    tok = _tokenizer(tokenizer)
    spec = DataSpec(path=path, streaming=mode == "stream-first")
    load_rows(spec)  # opens datasets' Arrow cache (written by the parent): in every mode, so the differences are the
    # packers'
    t0 = time.perf_counter()
    out = {"mode": mode}
    with PeakRSS() as rss:
        if mode == "lists":
            out["tokens"] = _lists_packer(spec, tok, seq_len).numel()
        elif mode in ("cache", "cache-rerun", "stream-first"):
            b = PackedBlocks(spec, tok, seq_len, root=Path(cache), log=lambda *_: None)
            b.ensure(batch if mode == "stream-first" else 10**12)
            b[list(range(min(batch, len(b))))]  # the first step's batch
            out["tokens"] = len(b) * seq_len
    out["seconds"] = time.perf_counter() - t0
    out["above_mb"] = rss.above
    out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def make_text(folder: Path, tokens: int, tok) -> Path:
    """The sample texts repeated (and cut) until they hold about ``tokens`` tokens."""
    parts = [p.read_text() for p in TEXTS if p.exists()]
    if not parts:
        raise SystemExit(f"no sample text found ({TEXTS[0]} ...)")
    base = "\n".join(parts)
    chars = int(len(base) * tokens / len(tok(base, add_special_tokens=False)["input_ids"]) * 1.01)
    path = folder / f"text-{tokens}.txt"
    with path.open("w") as f:
        i = 0
        while chars > 0:
            piece = base[:chars]
            f.write(piece + f"\n{i}\n")
            chars -= len(piece)
            i += 1
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1_000_000, 20_000_000])
    ap.add_argument("--tokenizer", default="smollm2-135m", help="a model alias, folder or Hub id whose tokenizer packs")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8, help="blocks in the first step's batch")
    ap.add_argument("--skip-lists", action="store_true", help="leave out the 0.2 packer (slow and large at 20M)")
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, path, tokenizer, seq_len, cache, batch = args.child
        child(mode, path, tokenizer, int(seq_len), cache, int(batch))
        return

    tok = _tokenizer(args.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"tokenizer {args.tokenizer}, seq_len {args.seq_len}, first batch {args.batch} blocks\n")
        print(f"{'tokens':>12} {'packer':<28} {'seconds':>9} {'tokens/s':>11} {'packer RSS':>11} {'process peak':>13}")
        for n in args.tokens:
            text = make_text(tmp, n, tok)
            from rnnify.distill.data import load_rows
            from rnnify.recipe import DataSpec

            load_rows(DataSpec(path=str(text)))  # datasets' Arrow conversion, once, before any measurement
            modes = ["base", "cache", "cache-rerun", "stream-first"] + ([] if args.skip_lists else ["lists"])
            for mode in modes:
                cache = tmp / f"cache-{n}"
                r = subprocess.run([sys.executable, __file__, "--child", mode, str(text), args.tokenizer,
                                    str(args.seq_len), str(cache if mode != "stream-first" else tmp / f"s-{n}"),
                                    str(args.batch)], capture_output=True, text=True)
                if r.returncode:
                    print(f"{n:>12,} {mode:<28} failed: {r.stderr.strip().splitlines()[-1]}")
                    continue
                res = json.loads(r.stdout.strip().splitlines()[-1])
                label = {"base": "(libraries + dataset only)", "cache": "token cache, first run",
                         "cache-rerun": "token cache, rerun (reuse)", "stream-first": "streaming: first batch",
                         "lists": "0.2 lists (in memory)"}[mode]
                tokens = res.get("tokens", 0)
                rate = f"{tokens / res['seconds']:>11,.0f}" if tokens and res["seconds"] > 0 else f"{'':>11}"
                print(f"{tokens or n:>12,} {label:<28} {res['seconds']:>9.2f} {rate} {res['above_mb']:>9.0f}MB "
                      f"{res['maxrss_mb']:>11.0f}MB")
            print()


if __name__ == "__main__":
    main()
