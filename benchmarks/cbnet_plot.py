"""The CBNet benchmark's Pareto plot: test accuracy against batch-1 latency."""

from __future__ import annotations

from pathlib import Path

from splitexit.report import pyplot

__all__ = ["pareto_front", "plot_pareto"]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both latency (lower) and accuracy
    (higher), ordered by latency."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -1.0
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _short(method: str) -> str:
    return (method.replace("CBNet with fallback exit", "fallback").replace(
        "fine-tuned classifier", "ft").replace("jointly fine-tuned", "joint")
        .replace("BranchyNet (B-LeNet, entropy exits)", "BranchyNet")
        .replace("B-LeNet truncated after exit 0", "truncated B-LeNet"))


def plot_pareto(path: Path, rows: list[dict]) -> None:
    """One panel per data set and runtime (ONNX Runtime, PyTorch eager): every method as a
    point (mean batch-1 latency, test accuracy), the Pareto front as a line."""
    plt = pyplot()

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    runtimes = [("onnx_latency_ms", "ONNX Runtime"), ("latency_ms", "PyTorch eager")]
    fig, axes = plt.subplots(len(runtimes), len(datasets), dpi=110, squeeze=False,
                             figsize=(7.5 * len(datasets), 5.5 * len(runtimes)))
    for col, name in enumerate(datasets):
        sub = [r for r in rows if r["dataset"] == name]
        for row_i, (key, label) in enumerate(runtimes):
            ax = axes[row_i][col]
            pts = [(r[key], r["accuracy"]) for r in sub]
            front = pareto_front(pts)
            for i, r in enumerate(sub):
                colour = ("tab:red" if r["method"].startswith(("LeNet", "BranchyNet"))
                          else "tab:green" if "fallback" in r["method"]
                          else "tab:blue" if r["method"].startswith("CBNet") else "tab:gray")
                ax.scatter(*pts[i], color=colour, s=40 if r.get("selected") else 18,
                           edgecolors="black" if r.get("selected") else "none")
                ax.annotate(_short(r["method"]), pts[i], fontsize=5, xytext=(3, 2),
                            textcoords="offset points")
            ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k--", lw=0.8,
                    label="Pareto front")
            ax.set_xlabel(f"batch-1 latency per image, mean (ms), {label}, 1 thread")
            ax.set_ylabel("test accuracy")
            ax.set_title(f"{name}: {label}")
            ax.legend(fontsize=7)
    fig.suptitle("accuracy vs latency (red: baselines, blue: CBNet, green: fallback, "
                 "outlined: selected)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
