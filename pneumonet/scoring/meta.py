"""An artifact's metadata without TensorFlow, for the processes that only coordinate.

The batch-scoring driver runs on the Ray head pod (1 GiB in the dev overlay) and the Serve app
builder imports ``serve.app`` there too; importing :mod:`pneumonet.artifact` would load TensorFlow
(~0.7 GB) into them for a JSON file. The workers that run the model still call
:func:`pneumonet.artifact.load_artifact`, which checks everything (format, model digest).
"""

from __future__ import annotations

import json
from typing import Any

from pneumonet import storage
from pneumonet.errors import ArtifactError

META_FILE = "pneumonet.json"  # pneumonet.artifact.META_FILE
NEEDED = ("name", "version", "image_size", "threshold")


def read_metadata(uri: str) -> dict[str, Any]:
    """``pneumonet.json`` of the artifact at ``uri``; ArtifactError naming it when absent or unusable."""
    meta_uri = storage.join(uri, META_FILE)
    if not storage.exists(meta_uri):
        raise ArtifactError(f"artifact {uri} does not exist or is incomplete ({META_FILE} is missing)")
    try:
        meta = json.loads(storage.read_text(meta_uri))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"artifact {uri}: {META_FILE} is not valid JSON ({exc})") from None
    missing = [key for key in NEEDED if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise ArtifactError(f"artifact {uri}: {META_FILE} lacks {', '.join(missing)}")
    return meta
