"""``python -m deformops bench``: arguments and entry point.

Examples
--------
All workloads, dtypes and default implementations on the GPU, peers included::

    python -m deformops bench --peer-path /opt/peer --out bench-results

A quick look on the CPU at an eighth of the map sizes::

    python -m deformops bench --device cpu --scale 0.125 --runs 5 --warmup 1

Table and charts again from saved records::

    python -m deformops bench --from-json bench-results/msda.json --out charts
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from . import impls, peers, report
from .runner import Config, Runner
from .workloads import DTYPES, WORKLOADS

OPS = ("msda", "conv", "roi")


METHOD = (
    "Method: inputs random from a fixed seed, the same for every implementation; median "
    "of --runs calls after --warmup, forward alone (no_grad) and forward+backward "
    "(gradients of every floating input); CUDA events with the L2 cache flushed before "
    "each call (time.perf_counter on the CPU); peak MiB of one forward+backward including "
    "its inputs (CUDA only); rel_err = max over the output and every gradient of "
    "||x - x64|| / ||x64||, x64 computed in float64 from the same rounded inputs. One JSON "
    "record per (op, workload, dtype, impl) in OUT/NAME.json, one bar chart per operator "
    "in OUT/<op>.png, a markdown table on stdout."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to ``parser`` (and the method to its epilog)."""
    parser.epilog = METHOD
    names = sorted({*(n for op in OPS for n in impls.IMPLS[op]), *peers.PEER_IMPLS["msda"]})
    parser.add_argument("--op", nargs="+", choices=OPS, help="operators (default: all)")
    parser.add_argument(
        "--workload",
        nargs="+",
        choices=list(WORKLOADS),
        help="workloads of DESIGN.md (default: all of the chosen operators)",
    )
    parser.add_argument(
        "--dtype", nargs="+", choices=list(DTYPES), default=["fp32", "bf16", "fp16"]
    )
    parser.add_argument(
        "--impl",
        nargs="+",
        choices=names,
        help="implementations (default: every one available here; the peers with "
        "--peer-path on CUDA, except the Triton convolution, which must be named)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench-results"), help="folder of the JSON and PNGs"
    )
    parser.add_argument(
        "--name", help="JSON file name without .json (default: the operators joined by '-')"
    )
    parser.add_argument("--runs", type=int, default=100, help="timed calls (median reported)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls before timing")
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every map side (H, W) by this; MSDA encoders keep Q = S, the decoder's "
        "Q scales by scale**2; batch, channels, heads and points are unchanged",
    )
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--allow-tf32",
        action="store_true",
        help="float32 matrix products on TF32 tensor cores in this process "
        "(torch.backends.cuda.matmul.allow_tf32 = True; each CUDA record's tf32 field says "
        "which); default: PyTorch's own setting, off",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument(
        "--peer-path",
        default=os.environ.get("DEFORMOPS_PEER_PATH"),
        help="folder with the published deformops 3.0.1 (pip install --no-deps --target "
        "DIR); default $DEFORMOPS_PEER_PATH",
    )
    parser.add_argument(
        "--peer-timeout",
        type=float,
        default=900.0,
        help="seconds to wait for one peer measurement (its build or autotuning included)",
    )
    parser.add_argument(
        "--from-json",
        nargs="+",
        type=Path,
        metavar="FILE",
        help="measure nothing: print the table and draw the charts of saved records",
    )


def _config(args: argparse.Namespace) -> Config | str:
    """The run configuration, or why the arguments are inconsistent."""
    chosen = args.op or {WORKLOADS[w].op for w in args.workload or WORKLOADS}
    ops = [op for op in OPS if op in chosen]
    names = [w for w in args.workload or WORKLOADS if WORKLOADS[w].op in ops]
    if not names:
        return f"no workload of {', '.join(ops)} among {', '.join(args.workload)}"
    if args.runs < 1 or args.warmup < 0 or args.scale <= 0:
        return "--runs must be >= 1, --warmup >= 0 and --scale > 0"
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return Config(
        ops=ops,
        workloads=names,
        dtypes=list(args.dtype),
        impls=args.impl,
        device=device,
        runs=args.runs,
        warmup=args.warmup,
        scale=args.scale,
        seed=args.seed,
        peer_path=args.peer_path,
        peer_timeout=args.peer_timeout,
    )


def _publish(records: list[dict], out: Path) -> None:
    """Print the markdown table and draw one chart per operator into ``out``."""
    print(report.markdown_table(records))
    for op in dict.fromkeys(r["op"] for r in records):
        path = report.plot(records, op, out / f"{op}.png")
        if path is not None:
            print(f"chart: {path}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` (from :func:`add_arguments`).

    Returns
    -------
    int
        0 when every deformops record was measured (a peer that cannot run a case, such
        as torchvision in bfloat16, is recorded with its ``error`` and listed on stderr),
        1 when one of ours failed, 2 on inconsistent arguments.
    """
    if args.from_json:
        records = [r for path in args.from_json for r in json.loads(path.read_text())]
        _publish(records, args.out)
        return 0
    config = _config(args)
    if isinstance(config, str):
        print(f"bench: {config}", file=sys.stderr)
        return 2
    if torch.device(config.device).type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    json_path = args.out / f"{args.name or '-'.join(config.ops)}.json"
    records = Runner(config, json_path).run()
    if not records:
        print("bench: no implementation of the chosen operators was selected", file=sys.stderr)
        return 2
    _publish(records, args.out)
    print(f"records: {json_path}", file=sys.stderr)
    failed = [r for r in records if r.get("error")]
    for r in failed:
        print(f"bench: {r['impl']} {r['workload']} {r['dtype']}: {r['error']}", file=sys.stderr)
    return 1 if any(r["impl"] == "deformops" for r in failed) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m deformops.bench.cli``: the same as ``python -m deformops bench``."""
    parser = argparse.ArgumentParser(prog="python -m deformops bench", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
