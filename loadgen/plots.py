"""PNG plots of a concurrency sweep: latency percentiles and throughput against concurrency.

Owns: `plot_sweep()`, which takes one or more labelled series of run summaries (one
series for `gateway bench`; one per target for `bench/overhead.py`) and writes
`latency.png` and `throughput.png` (with an optional file-name prefix).

Does not own: the numbers (metrics.py). matplotlib is an optional dependency (the `bench`
and `dev` extras) and is imported here only, with the headless Agg backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

Series = dict[str, list[dict[str, Any]]]  # label → summaries, one per concurrency level


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("plots need matplotlib: pip install 'llm-gateway[bench]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plain_axes(ax: Any, xs: list[int]) -> None:
    """Log axes labelled 1, 16, 64 and 2.5, 30 instead of 2^4 and 3x10^1."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    ax.set_xticks(sorted(set(xs)))
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain if ax.get_yscale() == "log" else NullFormatter())
    ax.tick_params(axis="y", which="minor", labelsize=6)


def plot_sweep(
    series: Series, out_dir: str | Path, prefix: str = "", title: str = ""
) -> list[Path]:
    """Write the latency and throughput plots; return their paths."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    streamed = any(s["stream"] for runs in series.values() for s in runs)
    metrics = [("ttft_ms", "TTFT"), ("e2el_ms", "E2E latency")]
    if streamed:
        metrics.insert(1, ("itl_ms", "ITL"))
    paths: list[Path] = []

    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.2), squeeze=False)
    for ax, (key, name) in zip(axes[0], metrics, strict=True):
        for i, (label, runs) in enumerate(series.items()):
            runs = sorted(runs, key=lambda s: s["concurrency"])
            xs = [s["concurrency"] for s in runs]
            color = f"C{i}"
            tag = f"{label} " if label else ""
            ax.plot(xs, [s[key]["p50"] for s in runs], "o-", color=color, label=f"{tag}p50")
            ax.plot(xs, [s[key]["p99"] for s in runs], "s--", color=color, label=f"{tag}p99")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        plain_axes(ax, [s["concurrency"] for runs in series.values() for s in runs])
        ax.set_xlabel("concurrency")
        ax.set_ylabel("ms")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = out / f"{prefix}latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

    fig, axes = plt.subplots(1, 2, figsize=(10.4, 4.2), squeeze=False)
    for ax, (key, name) in zip(
        axes[0],
        [("request_throughput", "requests/s"), ("output_throughput", "output tokens/s")],
        strict=True,
    ):
        for i, (label, runs) in enumerate(series.items()):
            runs = sorted(runs, key=lambda s: s["concurrency"])
            ax.plot(
                [s["concurrency"] for s in runs],
                [s[key] for s in runs],
                "o-",
                color=f"C{i}",
                label=label or None,
            )
        ax.set_xscale("log", base=2)
        plain_axes(ax, [s["concurrency"] for runs in series.values() for s in runs])
        ax.set_xlabel("concurrency")
        ax.set_ylabel(name)
        ax.set_title(f"Throughput ({name})")
        ax.grid(True, which="both", alpha=0.3)
        if any(series):
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = out / f"{prefix}throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths
