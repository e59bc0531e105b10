"""Tokens/s and the final loss of each stage of a run, from its metrics.jsonl (the GPU scripts print it):

    python benchmarks/stage_summary.py out/gpu_smoke.run/metrics.jsonl
"""

import json
import sys
from pathlib import Path


def main(path: str) -> None:
    file = Path(path)
    last = {}
    for line in file.read_text().splitlines() if file.exists() else []:
        row = json.loads(line)
        last[row["stage"]] = row
    for name, r in last.items():
        print(f"stage {name}: {r['step']} steps, {r['tokens']:,} tokens, {r['tokens_per_s']:,.0f} tokens/s, "
              f"final loss {r['loss']:.4g}")
    if not last:
        print("no metrics: the run did not train")


if __name__ == "__main__":
    main(sys.argv[1])
