"""The Ray Serve application of Pneumonet: ``serve.app:app_builder``.

Used by ``serve run serve/config.yaml`` (from the repository root), by the RayService's
serveConfigV2 (k8s/base/serve/rayservice.yaml) and, through the library, by ``pneumonet serve``.
``args``: ``{model: URI, config: FILE (optional), overrides: [key=value, ...] (optional)}``.
The endpoint's API is documented in :mod:`pneumonet.scoring.online`.
"""

from pneumonet.scoring.online import app_builder

__all__ = ["app_builder"]
