"""``openinfra bench <name>``: one harness, one routine per component.

A routine is a function registered with :func:`openinfra.bench.harness.routine`; it lives in a
module of ``openinfra.bench.routines`` (discovered automatically) and returns a
:class:`~openinfra.bench.harness.BenchResult`: rows for the table plus a summary. The harness
prints the table, then one JSON line last, and with ``--save`` writes
``benchmarks/results/<name>_<hardware>_<date>.json`` with the command that produced it.

Every routine measures its peers in the same run and reports ratios (ours / peer, ours /
physical limit); GPU routines report the device copy bandwidth measured in the same run.
"""

from openinfra.bench.harness import (
    BenchResult,
    copy_bandwidth_gbps,
    cpu_time_s,
    gpu_time_ms,
    hardware_name,
    routine,
    save_result,
)

__all__ = ["BenchResult", "routine", "gpu_time_ms", "cpu_time_s", "copy_bandwidth_gbps", "hardware_name", "save_result"]
