"""Few-shot results as a picture: each task's primary metric against the number of shots."""

from __future__ import annotations

from typing import Any


def plot_shots(results: dict[str, dict[str, dict[str, Any]]], metric_of: dict[str, str], png_path) -> None:
    """One panel per task (metrics differ in range: CIDEr reaches 1000, accuracies 100); no file
    for no results."""
    if not results:
        return
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = list(results)
    figure, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.0), squeeze=False)
    for axis, name in zip(axes[0], names):
        shots = sorted(int(s) for s in results[name])
        scores = [results[name][str(s)][metric_of[name]] for s in shots]
        axis.plot(shots, scores, marker="o")
        axis.set_xticks(shots)
        axis.set(title=name.removeprefix("synthetic_"), xlabel="shots", ylabel=metric_of[name])
        axis.set_ylim(bottom=0)
    figure.tight_layout()
    with open(png_path, "wb") if isinstance(png_path, str) else png_path.open("wb") as f:
        figure.savefig(f, format="png", dpi=100)
    plt.close(figure)
