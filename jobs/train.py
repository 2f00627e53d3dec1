r"""Ray job entrypoint: train one Pneumonet variant or all three with Ray Train.

    python jobs/train.py --config /etc/pneumonet/config.yaml --variant all \
        --data s3://BUCKET/data/chest_xray --storage s3://BUCKET --run-id RUN --resume-if-exists \
        --workers 2 --cpus-per-worker 3 [--gpus-per-worker 1] [--resume [--run-id ID]] [key=value ...]

The flags are those of `pneumonet train` (one shared definition); see docs/distributed-training.md.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pneumonet.training.args import run_job

if __name__ == "__main__":
    sys.exit(run_job(prog="jobs/train.py", description=__doc__))
