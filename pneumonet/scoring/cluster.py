"""Where scoring runs: the Ray cluster of a RayJob/RayService, or a local one for this machine."""

from __future__ import annotations

import os


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (a RayJob), or start a local Ray sized for this machine.

    A local Ray's workers inherit this process's environment at start (S3 settings, tokens), so
    set those before the first call.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(ignore_reinit_error=True, log_to_driver=True)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, ignore_reinit_error=True, log_to_driver=True)
