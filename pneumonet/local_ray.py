"""The one Ray bootstrap of every door: the cluster ``RAY_ADDRESS`` names (a RayJob's, a RayService's),
or a Ray of this command's own on this machine (:func:`connect`).

Each ``pneumonet`` command (train, score, serve, demo) that finds no ``RAY_ADDRESS`` starts its own
local Ray and stops it at the end, so two commands at once on one machine never share or steal each
other's cluster (a training run and a scoring run side by side). That needs two things Ray does not
do by itself when several local instances are up:

- ``ray.init(address="local")``: always a new instance, never one that ``ray start`` left running;
- every process of this instance must find *its* cluster's State API: Ray Train's placement-group
  cleaner asks for an address with none given and fails with "Found multiple active Ray instances"
  otherwise. The dashboard (which serves that API) gets a port chosen here, and
  ``RAY_API_SERVER_ADDRESS`` names it in this process's environment before Ray starts, so the
  cluster's processes inherit it.

Its workers run at the command's own priority: Ray's default adds 15 to their niceness, so a training
on a workstation would yield its cores to everything else running there (measured: nice 15 here).

On a very busy machine (load average 30-40 on 2 cores) Ray's own start-up can fail: the raylet waits
15 s for its metrics agent ("Timed out waiting for file .../metrics_agent_port_…") and gives up; run the
command again. (``agent_register_timeout_ms`` does not lengthen that wait.)
"""

from __future__ import annotations

import logging
import os
import socket

from pneumonet import console

log = logging.getLogger(__name__)

API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
# Ray's system config for a local cluster (see the module docstring).
SYSTEM_CONFIG = {"worker_niceness": 0}


def machine_cpus() -> int:
    """Cores this process may run on (its CPU affinity: a container's or ``taskset``'s share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(num_cpus: int, dashboard: bool = True) -> None:
    """Start a local Ray with ``num_cpus`` logical CPUs for this process (see the module docstring).

    ``dashboard``: Ray Train V2 watches its controller through the State API the dashboard serves;
    scoring and serving do without it.
    """
    import ray

    kwargs: dict = {"include_dashboard": dashboard}
    if dashboard:
        port = _free_port()
        os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
        kwargs.update(dashboard_host="127.0.0.1", dashboard_port=port)
    context = ray.init(address="local", num_cpus=num_cpus, logging_level=logging.WARNING, log_to_driver=True,
                       _system_config=SYSTEM_CONFIG, **kwargs)  # fmt: skip
    if dashboard and context.dashboard_url and not context.dashboard_url.endswith(f":{port}"):
        # Another process took the port between the probe and Ray's bind: this cluster's processes
        # would ask that one's State API. Rare; refuse rather than train against the wrong cluster.
        ray.shutdown()
        raise RuntimeError(f"the local Ray's dashboard did not get port {port} ({context.dashboard_url}); run the command again")
    console.route_ray_output()
    log.info("started a local Ray with %d logical CPUs", num_cpus)


def connect(num_cpus: int | None = None, dashboard: bool = True) -> bool:
    """Join the cluster ``RAY_ADDRESS`` names, or :func:`start` a local Ray with ``num_cpus`` (default:
    :func:`machine_cpus`); False when Ray was up already in this process.

    A local Ray's workers inherit this process's environment at start (S3 settings, tokens), so set
    those before the first call.
    """
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level=logging.WARNING, log_to_driver=True)
    else:
        start(num_cpus or machine_cpus(), dashboard)
    return True
