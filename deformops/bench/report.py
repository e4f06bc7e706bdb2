"""Presentation of benchmark records: markdown table, bar charts, progress bar."""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

_COLUMNS = (
    "op",
    "workload",
    "dtype",
    "impl",
    "fwd ms",
    "fwd+bwd ms",
    "peak MiB",
    "rel err",
    "GB/s fwd / fwd+bwd",
    "note",
)


def _number(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _note(record: dict[str, Any]) -> str:
    if record.get("error"):
        return "error: " + record["error"].splitlines()[0][:100].replace("|", "/")
    backend = record.get("backend")
    return f"backend {backend}" if backend not in (None, "native") else ""


def markdown_table(records: Sequence[dict[str, Any]]) -> str:
    """One row per record: times (median ms), peak MiB, error vs float64, bandwidth.

    Parameters
    ----------
    records : sequence of dict
        Benchmark records (see :mod:`deformops.bench.runner`).

    Returns
    -------
    str
        A GitHub markdown table.
    """
    rows = [_COLUMNS, ("---",) * len(_COLUMNS)]
    for r in records:
        gbps = "-"
        if r.get("fwd_gbps") is not None:
            gbps = f"{r['fwd_gbps']:.3g} / {r['fwdbwd_gbps']:.3g}"
        rows.append(
            (
                r["op"],
                r["workload"],
                r["dtype"],
                r["impl"],
                _number(r.get("fwd_ms"), ".4g"),
                _number(r.get("fwdbwd_ms"), ".4g"),
                _number(r.get("peak_mib"), ".0f"),
                _number(r.get("rel_err"), ".1e"),
                gbps,
                _note(r),
            )
        )
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def plot(records: Sequence[dict[str, Any]], op: str, path: Path) -> Path | None:
    """Bar chart of one operator: median ms of forward and of forward+backward (log scale)
    per workload and dtype, one bar per implementation. Records with an error are left out.

    Returns
    -------
    pathlib.Path or None
        ``path``, or None when matplotlib is missing or there is nothing to plot.
    """
    mine = [r for r in records if r["op"] == op and r.get("fwdbwd_ms") is not None]
    if not mine:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn(f"matplotlib is not installed: no chart {path}", stacklevel=2)
        return None
    groups = list(dict.fromkeys((r["workload"], r["dtype"]) for r in mine))
    impls = list(dict.fromkeys(r["impl"] for r in mine))
    width = 0.8 / len(impls)
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.3 * len(groups) + 3), 7), sharex=True)
    for ax, key, title in zip(
        axes, ("fwd_ms", "fwdbwd_ms"), ("forward", "forward + backward"), strict=True
    ):
        for i, impl in enumerate(impls):
            by_group = {(r["workload"], r["dtype"]): r[key] for r in mine if r["impl"] == impl}
            xs = [g + (i - (len(impls) - 1) / 2) * width for g in range(len(groups))]
            heights = [by_group.get(group, float("nan")) for group in groups]
            ax.bar(xs, heights, width, label=impl)
        ax.set_yscale("log")
        ax.set_ylabel("median ms")
        ax.set_title(f"{op}: {title}")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[-1].set_xticks(range(len(groups)), [f"{w}\n{d}" for w, d in groups])
    axes[0].legend(fontsize="small")
    device = mine[0].get("device", "")
    fig.suptitle(f"{device}, torch {mine[0].get('torch', '')}", fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, one line per step
    otherwise (logs)."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.count = 0
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()

    def step(self, label: str) -> None:
        """Announce the next item."""
        self.count += 1
        filled = round(20 * (self.count - 1) / max(1, self.total))
        elapsed = time.perf_counter() - self.start
        text = f"[{'#' * filled}{'.' * (20 - filled)}] {self.count}/{self.total} {elapsed:5.0f}s {label}"
        if self.stream.isatty():
            self.stream.write(f"\r\033[K{text}")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the bar."""
        elapsed = time.perf_counter() - self.start
        end = "\r\033[K" if self.stream.isatty() else ""
        self.stream.write(f"{end}[{'#' * 20}] {self.count}/{self.total} done in {elapsed:.0f} s\n")
        self.stream.flush()
