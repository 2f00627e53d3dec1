"""How many CPUs a training worker reserves, and so how many TensorFlow threads it runs.

Kept free of TensorFlow, so the Kubernetes tests can size a RayJob as the job would.
"""

from __future__ import annotations

import math

from pneumonet.config import Config
from pneumonet.errors import ConfigError
from pneumonet.local_ray import machine_cpus


def _floor4(value: float) -> float:
    """Ray keeps resources to 4 decimals: round down, so ``workers`` shares never exceed the whole."""
    return math.floor(value * 10_000) / 10_000


def auto_worker_cpus(node_cpus: list[float], workers: int) -> float:
    """``cpus_per_worker: auto`` on a cluster whose nodes have ``node_cpus``: the largest node's CPUs, or
    an equal whole-CPU share of them all when there are more workers than such nodes; 0 without CPUs."""
    cpus = [c for c in node_cpus if c > 0]
    if not cpus:
        return 0.0
    share = min(max(cpus), sum(cpus) / workers)
    return float(max(1, math.floor(share))) if share >= 1 else _floor4(share)


def worker_cpus(config: Config, local: bool) -> float:
    """The CPUs each worker reserves: ``distributed.cpus_per_worker``, or for ``auto`` the machine's cores
    shared by the workers (``local``) or :func:`auto_worker_cpus` of the connected cluster's nodes."""
    import ray

    dist = config.distributed
    if dist.cpus_per_worker != "auto":
        return float(dist.cpus_per_worker)
    if local:
        return _floor4(machine_cpus() / dist.workers)
    cpus = auto_worker_cpus([node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]], dist.workers)
    if not cpus:
        raise ConfigError("distributed.cpus_per_worker=auto follows the cluster's nodes, but none has CPUs yet "
                          "(an autoscaler starting from zero?): pass --cpus-per-worker")  # fmt: skip
    return cpus
