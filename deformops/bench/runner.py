"""The measurement loop: every (op, workload, dtype) with every implementation side by
side, one JSON record each.

A record holds ``op, workload, dtype, impl, fwd_ms, fwdbwd_ms, peak_mib, rel_err, device,
torch, cuda, version, date`` and: ``extra_mib`` (working memory: the peak less the inputs,
output and gradients, see :mod:`.timing`), ``harness`` (this package's version; ``version`` is
that of the implementation measured), ``shape`` (the workload, after ``scale``),
``scale``, ``runs``, ``warmup``, ``seed``, ``rel_err_parts`` (error of the output and of
each gradient), ``backend`` (for ``deformops``: ``native`` or ``reference``),
``options`` (peer call options), ``tf32`` and ``l2_flush`` (CUDA), for MSDA
``fwd_bytes``/``fwdbwd_bytes`` (least bytes moved, see
:func:`workloads.msda_min_bytes`), ``fwd_gbps``/``fwdbwd_gbps`` (those bytes over the
median time) and ``fwd_hbm_util``/``fwdbwd_hbm_util`` (that over the H100 SXM's 3.35
TB/s), and ``error`` when the implementation failed (then times are null).

``rel_err`` is the largest, over the output and every gradient, of ``||x - x64|| /
||x64||``, where ``x64`` is computed in float64 from the same rounded inputs
(:func:`impls.expected_results`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import deformops

from . import impls, peers
from .report import Progress
from .timing import Case, measure
from .workloads import (
    DTYPES,
    WORKLOADS,
    Workload,
    checksum,
    differentiable,
    make_inputs,
    msda_min_bytes,
    to_dict,
)

#: HBM bandwidth of one H100 SXM (bytes/s), the yardstick of ``*_hbm_util``.
H100_HBM_BYTES_PER_S = 3.35e12


@dataclasses.dataclass
class Config:
    """What to run (see ``python -m deformops bench --help``)."""

    ops: list[str]
    workloads: list[str]
    dtypes: list[str]
    impls: list[str] | None
    device: str
    runs: int = 100
    warmup: int = 10
    scale: float = 1.0
    seed: int = 0
    peer_path: str | None = None
    peer_timeout: float = 900.0


def default_impls(op: str, device: str, peer_path: str | None) -> list[str]:
    """The implementations run when ``--impl`` is not given: all of this process that
    can run here, and the peers (not the opt-in ones) when on CUDA with a peer folder."""
    names = [name for name, impl in impls.IMPLS[op].items() if impl.unavailable() is None]
    if torch.device(device).type == "cuda" and peers.peer_path_problem(peer_path) is None:
        names += [p for p in peers.PEER_IMPLS.get(op, ()) if (op, p) not in peers.OPT_IN]
    return names


def impls_for(op: str, config: Config) -> list[str]:
    """The implementations of ``op`` to run: those of ``config.impls`` that implement it,
    else :func:`default_impls`."""
    if config.impls is None:
        return default_impls(op, config.device, config.peer_path)
    known = [*impls.IMPLS[op], *peers.PEER_IMPLS.get(op, ())]
    return [name for name in config.impls if name in known]


def plan(config: Config) -> list[tuple[Workload, str, list[str]]]:
    """``(workload, dtype, impls)`` in run order."""
    items = []
    for name in config.workloads:
        workload = WORKLOADS[name]
        if workload.op not in config.ops:
            continue
        names = impls_for(workload.op, config)
        if not names:
            continue
        for dtype in config.dtypes:
            items.append((workload.scaled(config.scale), dtype, names))
    return items


def environment(device: str) -> dict[str, Any]:
    """Fields shared by every record of a run."""
    dev = torch.device(device)
    info: dict[str, Any] = {
        "device": f"{platform.machine() or 'cpu'}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "harness": deformops.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if dev.type == "cuda":
        info["device"] = torch.cuda.get_device_name(dev)
        info["tf32"] = {
            "matmul": torch.backends.cuda.matmul.allow_tf32,
            "cudnn": torch.backends.cudnn.allow_tf32,
        }
        info["l2_flush"] = True
    return info


def relative_errors(
    results: Sequence[Tensor], expected: dict[str, Tensor], names: Sequence[str]
) -> dict[str, float]:
    """``||x - x64|| / ||x64||`` of the output and of each gradient (``||x||`` where the
    float64 value is all zeros).

    Raises
    ------
    ValueError
        If the number or the shapes of the results do not match.
    """
    names = ("output", *names)
    if len(results) != len(names):
        raise ValueError(f"expected {len(names)} results ({', '.join(names)}), got {len(results)}")
    errors = {}
    for name, result in zip(names, results, strict=True):
        exact = expected[name]
        if result.shape != exact.shape:
            raise ValueError(f"{name}: shape {tuple(result.shape)}, expected {tuple(exact.shape)}")
        diff = (result.to(exact.device, torch.float64) - exact).norm()
        norm = exact.norm()
        errors[name] = (diff / norm if norm > 0 else diff).item()
    return errors


def _bandwidth(record: dict[str, Any], inputs: dict[str, Tensor], cuda: bool) -> None:
    fwd_bytes, fwdbwd_bytes = msda_min_bytes(inputs)
    record["fwd_bytes"], record["fwdbwd_bytes"] = fwd_bytes, fwdbwd_bytes
    for key, nbytes in (("fwd", fwd_bytes), ("fwdbwd", fwdbwd_bytes)):
        ms = record.get(f"{key}_ms")
        if ms:
            record[f"{key}_gbps"] = nbytes / ms / 1e6
            if cuda:
                record[f"{key}_hbm_util"] = nbytes / (ms * 1e-3) / H100_HBM_BYTES_PER_S


class Runner:
    """Runs a :class:`Config`, writing the records to ``json_path`` after each one."""

    def __init__(self, config: Config, json_path: Path) -> None:
        self.config = config
        self.json_path = json_path
        self.records: list[dict[str, Any]] = []
        self.env = environment(config.device)
        self.peer: peers.PeerWorker | None = None
        self.scratch = tempfile.TemporaryDirectory(prefix="deformops-bench-")

    def _save(self) -> None:
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.json_path.with_suffix(".json.partial")
        lines = ",\n".join(json.dumps(record) for record in self.records)
        partial.write_text(f"[\n{lines}\n]\n")
        os.replace(partial, self.json_path)

    def _measure_peer(
        self, workload: Workload, dtype: str, impl: str, inputs: dict[str, Tensor]
    ) -> tuple[Any, dict]:
        problem = peers.peer_path_problem(self.config.peer_path)
        if problem is not None:
            raise RuntimeError(problem)
        if self.peer is None:
            assert self.config.peer_path is not None
            self.peer = peers.PeerWorker(
                self.config.peer_path, self.config.device, self.config.peer_timeout
            )
        path = os.path.join(self.scratch.name, "results.pt")
        job = {
            "op": workload.op,
            "impl": impl,
            "workload": to_dict(workload),
            "dtype": dtype,
            "seed": self.config.seed,
            "runs": self.config.runs,
            "warmup": self.config.warmup,
            "results_path": path,
        }
        reply = self.peer.run(job)
        if reply.get("error"):
            raise RuntimeError(reply["error"])
        if not math.isclose(reply["checksum"], checksum(inputs), rel_tol=1e-9, abs_tol=1e-6):
            raise RuntimeError("the peer worker generated other inputs than the harness")
        results = torch.load(path, map_location=self.config.device, weights_only=True)
        os.remove(path)
        return results, reply

    def _measure_local(
        self, workload: Workload, inputs: dict[str, Tensor], impl: impls.Impl, record: dict
    ) -> list[Tensor]:
        record["version"] = impl.version()
        if impl.name == "deformops":
            record["backend"] = deformops.backend(self.config.device, impls.OP_NAMES[impl.op])
        case: Case = impl.build(workload, inputs)
        measured = measure(case, self.config.runs, self.config.warmup)
        record.update(
            fwd_ms=measured.fwd_ms,
            fwdbwd_ms=measured.fwdbwd_ms,
            peak_mib=measured.peak_mib,
            extra_mib=measured.extra_mib,
        )
        return measured.results

    def _one(
        self,
        workload: Workload,
        dtype: str,
        name: str,
        inputs: dict[str, Tensor],
        expected: dict[str, dict[str, Tensor]],
    ) -> dict[str, Any]:
        config = self.config
        record: dict[str, Any] = {
            "op": workload.op,
            "workload": workload.name,
            "dtype": dtype,
            "impl": name,
            "fwd_ms": None,
            "fwdbwd_ms": None,
            "peak_mib": None,
            "extra_mib": None,
            "rel_err": None,
            **self.env,
            "version": None,
            "shape": to_dict(workload),
            "scale": config.scale,
            "runs": config.runs,
            "warmup": config.warmup,
            "seed": config.seed,
        }
        try:
            local = impls.IMPLS[workload.op].get(name)
            if local is None:
                results, reply = self._measure_peer(workload, dtype, name, inputs)
                for key in ("fwd_ms", "fwdbwd_ms", "peak_mib", "extra_mib", "version", "options"):
                    record[key] = reply.get(key)
                kind, gradients = impls.DEFORMABLE, differentiable(workload)
            else:
                missing = local.unavailable()
                if missing is not None:
                    raise RuntimeError(missing)
                results = self._measure_local(workload, inputs, local, record)
                kind, gradients = local.expected, local.gradients(workload)
            if kind not in expected:
                expected[kind] = impls.expected_results(workload, inputs, kind)
            errors = relative_errors(results, expected[kind], gradients)
            if all(math.isfinite(e) for e in errors.values()):
                record["rel_err_parts"] = errors
                record["rel_err"] = max(errors.values())
            else:
                record["rel_err_parts"] = {
                    k: e if math.isfinite(e) else str(e) for k, e in errors.items()
                }
                record["error"] = "non-finite output or gradient"
        except Exception as error:
            record["error"] = f"{type(error).__name__}: {error}"
        finally:
            if torch.device(config.device).type == "cuda":
                torch.cuda.empty_cache()
        if workload.op == "msda":
            _bandwidth(record, inputs, torch.device(config.device).type == "cuda")
        return record

    def run(self) -> list[dict[str, Any]]:
        """Measure everything in :func:`plan` order; the records."""
        items = plan(self.config)
        progress = Progress(sum(len(names) for _, _, names in items))
        try:
            for workload, dtype, names in items:
                inputs = make_inputs(workload, DTYPES[dtype], self.config.device, self.config.seed)
                expected: dict[str, dict[str, Tensor]] = {}
                for name in names:
                    progress.step(f"{workload.op} {workload.name} {dtype} {name}")
                    self.records.append(self._one(workload, dtype, name, inputs, expected))
                    self._save()
                del inputs, expected
        finally:
            progress.close()
            if self.peer is not None:
                self.peer.close()
            self.scratch.cleanup()
        return self.records
