"""Entrypoint of the batch-scoring RayJob (k8s/base/score/rayjob.yaml); same options as ``pneumonet score``.

    python jobs/batch_score.py --model URI --input URI --output URI [--workers N] [--batch-size B]
        [--gpus-per-worker G] [--config FILE] [key=value ...]

Inside a RayJob it joins the job's cluster (RAY_ADDRESS); elsewhere it starts a local Ray.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pneumonet.scoring.batch import main

if __name__ == "__main__":
    sys.exit(main())
