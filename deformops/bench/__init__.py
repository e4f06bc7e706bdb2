"""Benchmark harness behind ``python -m deformops bench``.

Modules:

- :mod:`.workloads` and :mod:`.timing` import nothing but torch, so that the peer worker
  (:mod:`.peers_worker`, which must not import this package because the published peer
  has the same top-level name) loads them by file path and generates the very same
  inputs and measures them the very same way.
- :mod:`.impls`: the implementations measured in this process and the float64 references.
- :mod:`.peers`: the parent side of the peer worker subprocess.
- :mod:`.runner`: the measurement loop and the JSON records.
- :mod:`.report`: markdown table, bar charts and progress bar.
- :mod:`.cli`: the ``bench`` subcommand's arguments and entry point.
"""
