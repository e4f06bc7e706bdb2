"""Markdown tables of a benchmark run against the targets of the issues, for the README.

    python benchmarks/summarize.py benchmarks/results/<run>/

Reads ``msda.json`` and ``conv.json`` (records of ``python -m deformops bench``) and prints:

- MSDA: ours, the fastest peer, and the fastest peer whose error is within the target
  (1e-5 in float32, 5e-3 in half precision), forward and forward+backward ratios;
- convolution: ours, torchvision, the published deformops 3.0.1 Triton convolution (when
  the run measured it) and dense cuDNN, with the speed-ups over the first two and the
  ratio to the dense convolution.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

ERROR_BAR = {"fp32": 1e-5, "bf16": 5e-3, "fp16": 5e-3}


def _by_case(records: list[dict]) -> dict[tuple[str, str], dict[str, dict]]:
    cases: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    for r in records:
        if r.get("fwd_ms") is not None:
            cases[(r["workload"], r["dtype"])][r["impl"]] = r
    return cases


def _short(impl: str) -> str:
    return impl.removeprefix("peer-deformops-").replace("-", " ")


def msda_table(records: list[dict]) -> str:
    """The MSDA table: ours against the fastest peer and the fastest accurate peer."""
    rows = [
        "| workload | dtype | deformops fwd / fwd+bwd ms, peak MiB, err | fastest peer fwd / "
        "fwd+bwd (err) | fastest peer within the error bar fwd / fwd+bwd | ratios fwd, "
        "fwd+bwd (vs within the bar) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for (workload, dtype), impls in _by_case(records).items():
        ours = impls.get("deformops")
        peers = [r for name, r in impls.items() if name.startswith("peer")]
        if ours is None or not peers:
            continue
        fwd = min(peers, key=lambda r: r["fwd_ms"])
        both = min(peers, key=lambda r: r["fwdbwd_ms"])
        good = [r for r in peers if r["rel_err"] <= ERROR_BAR[dtype]]
        if good:
            gfwd = min(good, key=lambda r: r["fwd_ms"])
            gboth = min(good, key=lambda r: r["fwdbwd_ms"])
            accurate = (
                f"{gfwd['fwd_ms']:.3f} ({_short(gfwd['impl'])}) / "
                f"{gboth['fwdbwd_ms']:.3f} ({_short(gboth['impl'])})"
            )
            ratios = (
                f"{ours['fwd_ms'] / gfwd['fwd_ms']:.2f}, "
                f"{ours['fwdbwd_ms'] / gboth['fwdbwd_ms']:.2f}"
            )
        else:
            accurate, ratios = "none", "-"
        rows.append(
            f"| {workload} | {dtype} | {ours['fwd_ms']:.3f} / {ours['fwdbwd_ms']:.3f}, "
            f"{ours['peak_mib']:.0f}, {ours['rel_err']:.1e} | {fwd['fwd_ms']:.3f} "
            f"({_short(fwd['impl'])}, {fwd['rel_err']:.0e}) / {both['fwdbwd_ms']:.3f} "
            f"({_short(both['impl'])}, {both['rel_err']:.0e}) | {accurate} | {ratios} |"
        )
    return "\n".join(rows)


def _versus(ours: dict, other: dict | None, missing: str) -> tuple[str, str]:
    """Another implementation's ``fwd / fwd+bwd`` cell and our speed-up over it."""
    if other is None:
        return missing, "-"
    cell = f"{other['fwd_ms']:.3f} / {other['fwdbwd_ms']:.3f}"
    speedup = (
        f"{other['fwd_ms'] / ours['fwd_ms']:.1f}x, {other['fwdbwd_ms'] / ours['fwdbwd_ms']:.1f}x"
    )
    return cell, speedup


def conv_table(records: list[dict]) -> str:
    """The convolution table: ours, torchvision, the published Triton convolution (when
    measured) and dense cuDNN."""
    rows = [
        "| workload | dtype | deformops fwd / fwd+bwd ms, peak MiB, err | torchvision | "
        "speed-up over torchvision fwd, fwd+bwd | 3.0.1 triton | speed-up over 3.0.1 triton | "
        "dense cuDNN | fwd+bwd / dense |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (workload, dtype), impls in _by_case(records).items():
        ours, dense = impls.get("deformops"), impls.get("cudnn-dense")
        if ours is None:
            continue
        tv_cell, over_tv = _versus(ours, impls.get("torchvision"), "not supported")
        peer_cell, over_peer = _versus(
            ours, impls.get("peer-deformops-3.0.1-triton"), "not measured"
        )
        dense_cell = f"{dense['fwd_ms']:.3f} / {dense['fwdbwd_ms']:.3f}" if dense else "-"
        over_dense = f"{ours['fwdbwd_ms'] / dense['fwdbwd_ms']:.1f}x" if dense else "-"
        rows.append(
            f"| {workload} | {dtype} | {ours['fwd_ms']:.3f} / {ours['fwdbwd_ms']:.3f}, "
            f"{ours['peak_mib']:.0f}, {ours['rel_err']:.1e} | {tv_cell} | {over_tv} | "
            f"{peer_cell} | {over_peer} | {dense_cell} | {over_dense} |"
        )
    return "\n".join(rows)


def main() -> None:
    folder = Path(sys.argv[1])
    for name, table in (("msda.json", msda_table), ("conv.json", conv_table)):
        path = folder / name
        if path.is_file():
            print(table(json.loads(path.read_text())), end="\n\n")


if __name__ == "__main__":
    main()
