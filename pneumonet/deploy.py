"""Pin the RayService of a kustomize overlay to one model version (``pneumonet models pin``).

The Serve config is one string (``serveConfigV2``) restated whole in each overlay's RayService patch, so
the pin edits the single ``model:`` line of the ``pneumonet`` application's args in that patch file, in
place (comments and layout stay), and checks the result by parsing it again. A new version in the spec
is what makes ``kubectl apply -k`` roll the model out: KubeRay hands the changed serveConfigV2 to the
running cluster, and Serve replaces the replicas one by one with replicas of the new version.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from pneumonet.errors import ConfigError

APP_NAME = "pneumonet"
_KEY = "serveConfigV2"


def serve_patch(overlay: str | Path) -> Path:
    """The one YAML file under ``overlay`` that sets the RayService's ``serveConfigV2``."""
    overlay = Path(overlay)
    if not overlay.is_dir():
        raise ConfigError(f"{overlay}: no such overlay folder (e.g. k8s/overlays/dev)")
    found = sorted(p for p in overlay.rglob("*.yaml") if _KEY in p.read_text())
    if len(found) != 1:
        listing = ", ".join(map(str, found)) or "none"
        raise ConfigError(f"{overlay}: expected one file that sets {_KEY}, found {len(found)} ({listing})")
    return found[0]


def _serve_config(patch: Path) -> dict[str, Any]:
    ops = yaml.safe_load(patch.read_text())
    values = [op["value"] for op in ops or [] if isinstance(op, dict) and str(op.get("path", "")).endswith("/" + _KEY)]
    if len(values) != 1:
        raise ConfigError(f"{patch}: expected one patch operation on /spec/{_KEY}, found {len(values)}")
    return yaml.safe_load(values[0])


def pinned_model(patch: Path) -> str:
    """The ``model`` argument of the ``pneumonet`` application in a RayService patch."""
    apps = [app for app in _serve_config(patch).get("applications") or [] if app.get("name") == APP_NAME]
    if len(apps) != 1 or "model" not in (apps[0].get("args") or {}):
        raise ConfigError(f"{patch}: no application {APP_NAME!r} with args.model in its {_KEY}")
    return str(apps[0]["args"]["model"])


def pin(patch: Path, uri: str) -> str:
    """Write ``uri`` as the model of the patch's Serve application; returns the model it named before."""
    old = pinned_model(patch)
    text = patch.read_text()
    line = re.compile(rf"^(\s+model:\s*){re.escape(old)}\s*$", re.M)
    if len(line.findall(text)) != 1:
        raise ConfigError(f"{patch}: cannot find exactly one line 'model: {old}' to replace")
    patch.write_text(line.sub(lambda m: m.group(1) + uri, text))
    if pinned_model(patch) != uri:  # the edit must have changed exactly that value
        patch.write_text(text)
        raise ConfigError(f"{patch}: the edit did not set args.model to {uri}; file left as it was")
    return old
