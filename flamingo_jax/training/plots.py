"""A run's curves as one PNG at the end of training: the loss per dataset and, for Flamingo,
tanh(gate) of every GATED XATTN-DENSE layer (how much each layer has opened to the images)."""

from __future__ import annotations

import json
from collections import defaultdict

from etils import epath


def read_metrics(path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl -> {metric: [(step, value)]}, the last line of a step winning (a resumed run
    writes the steps after its checkpoint again)."""
    by_step: dict[int, dict[str, float]] = {}
    for line in epath.Path(path).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        by_step[int(record.pop("step"))] = {k: v for k, v in record.items() if isinstance(v, (int, float))}
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for step in sorted(by_step):
        for name, value in by_step[step].items():
            series[name].append((step, float(value)))
    return dict(series)


def plot_training(metrics_path, png_path, title: str = "") -> bool:
    """Writes the PNG; False when the run logged no loss yet."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    series = read_metrics(metrics_path)
    losses = sorted(name for name in series if name == "loss" or name.startswith("loss/"))
    gates = sorted((name for name in series if name.startswith("gates/")), key=_gate_order)
    if not losses:
        return False
    panels = 2 if gates else 1
    figure, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    for name in losses:
        steps, values = zip(*series[name])
        axes[0, 0].plot(steps, values, label=name, linewidth=1.8 if name == "loss" else 1.0)
    axes[0, 0].set(xlabel="step", ylabel="loss (nats per token or pair)", title="loss")
    axes[0, 0].legend(fontsize=7)
    if gates:
        for name in gates:
            steps, values = zip(*series[name])
            axes[0, 1].plot(steps, values, label=name.removeprefix("gates/"), linewidth=1.0)
        axes[0, 1].set(xlabel="step", ylabel="tanh(gate)", title="xattn gates per layer")
        axes[0, 1].axhline(0.0, color="grey", linewidth=0.5)
        axes[0, 1].legend(fontsize=7, ncol=2)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    with epath.Path(png_path).open("wb") as f:
        figure.savefig(f, format="png", dpi=100)
    plt.close(figure)
    return True


def _gate_order(name: str) -> tuple[str, int]:
    kind, _, layer = name.removeprefix("gates/").partition("/")
    return kind, int(layer) if layer.isdigit() else -1
