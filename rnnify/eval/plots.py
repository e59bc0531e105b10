"""PNG plots written next to eval.json (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def recurrence_plot(results: dict, path: Path) -> Path:
    """Perplexity against loop count (test-time depth), FLOPs per token on a second axis; the source model as a
    horizontal line when it was measured."""
    plt = _pyplot()
    loops = sorted(int(r) for r in results["recurrence"])
    ppl = [results["recurrence"][str(r)]["ppl"] for r in loops]
    flops = [results["recurrence"][str(r)]["flops_per_token"] / 1e6 for r in loops]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(loops, ppl, "o-", label="looped model")
    teacher = results.get("recurrence_teacher")
    if teacher:
        ax.axhline(teacher["ppl"], color="grey", ls="--", label="source model")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("loops of the recurrent block")
    ax.set_ylabel(f"perplexity @ {results['context_length']} tokens")
    ax2 = ax.twinx()
    ax2.plot(loops, flops, "s:", color="tab:orange", label="MFLOPs / token")
    ax2.set_ylabel("MFLOPs per token")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["recurrence_plot"]
