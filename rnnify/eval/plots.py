"""PNG plots written next to eval.json (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    # optional at import time: matplotlib loads only when a plot is drawn, after choosing its headless backend
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path, dpi: int = 110) -> Path:
    """Lay out, write the PNG, free the figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


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
    return _save(plt, fig, path)


def loss_by_position_plot(results: dict, path: Path) -> Path:
    """Next-token loss by position (32-token bins), one line per model; the window + sinks as a dashed line."""
    plt = _pyplot()
    curves = {k: v for k, v in results["loss_by_position"].items() if k != "bin"}
    width = results["loss_by_position"]["bin"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in curves.items():
        label = results.get("baseline", "window baseline") if name == "window_baseline" else name
        ax.plot([width * (i + 0.5) for i in range(len(values))], values, label=label)
    window = _window(results)
    if window:
        ax.axvline(window, color="grey", ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("token position")
    ax.set_ylabel(f"next-token loss (mean over {width}-token bins)")
    ax.set_title(str(results["perplexity"].get("text", "")).replace("builtin:", ""))
    ax.legend()
    return _save(plt, fig, path)


def _window(results) -> int | None:
    label = results.get("baseline") or ""
    parts = label.split()
    try:
        return int(parts[1]) + int(parts[3]) if len(parts) >= 4 else None
    except ValueError:
        return None


def passkey_heatmap(results: dict, path: Path) -> Path:
    """Passkey accuracy by prompt length (rows) and depth of the key in the prompt (columns), one panel per model."""
    plt = _pyplot()
    grid = results["passkey_by_depth"]
    lengths = sorted(grid, key=int)
    names = list(next(iter(grid.values())))
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 0.6 * len(lengths) + 1.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        depths = [d for d, _ in grid[lengths[0]][name]]
        values = [[hit for _, hit in grid[L][name]] for L in lengths]
        ax.imshow(values, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_yticks(range(len(lengths)), lengths)
        ax.set_xlabel("depth of the key")
        ax.set_title(name)
    axes[0][0].set_ylabel("prompt tokens")
    return _save(plt, fig, path)


def tasks_plot(results: dict, path: Path) -> Path:
    """Each student's score as a share of the teacher's, per task (first metric of each task)."""
    plt = _pyplot()
    tasks = results["tasks"]
    students = [n for n in results.get("students", []) if n != "teacher"]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(tasks) * max(1, len(students))), 3.5))
    width = 0.8 / max(1, len(students))
    for j, name in enumerate(students):
        shares = []
        for metrics in tasks.values():
            values = next(iter(metrics.values()))
            t, s = values.get("teacher"), values.get(name)
            shares.append(s / t if t else 0.0)
        ax.bar([i + j * width for i in range(len(tasks))], shares, width, label=name)
    ax.axhline(1.0, color="grey", ls="--", lw=1)
    ax.set_xticks([i + width * (len(students) - 1) / 2 for i in range(len(tasks))], list(tasks))
    ax.set_ylabel("score / teacher's score")
    ax.legend()
    return _save(plt, fig, path)


def write_plots(results: dict, folder: Path) -> list[tuple[str, str]]:
    """The plots the results allow, written into ``folder``: (file name, title) each."""
    out = []
    if len(results.get("loss_by_position", {})) > 1:
        out.append((loss_by_position_plot(results, folder / "loss_by_position.png").name, "loss by position"))
    if results.get("passkey_by_depth"):
        out.append((passkey_heatmap(results, folder / "passkey.png").name, "passkey accuracy by length and depth"))
    if results.get("tasks") and "teacher" in results.get("columns", []):
        out.append((tasks_plot(results, folder / "tasks.png").name, "score per task, as a share of the teacher's"))
    if results.get("recurrence"):
        out.append((recurrence_plot(results, folder / "recurrence.png").name, "perplexity against loops"))
    return out


__all__ = ["loss_by_position_plot", "passkey_heatmap", "recurrence_plot", "tasks_plot", "write_plots"]


def bar_chart(path: Path, labels: list[str], values: list[float], highlight=(), title: str = "", xlabel: str = "",
              ylabel: str = "") -> Path:
    """One bar per label; the ``highlight`` indices in another colour (e.g. the layers a selection keeps)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(values)), 3.5))
    colors = ["tab:orange" if i in set(highlight) else "tab:blue" for i in range(len(values))]
    ax.bar(range(len(values)), values, color=colors)
    ax.set_xticks(range(len(values)), labels, fontsize=7)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    return _save(plt, fig, path, dpi=120)
