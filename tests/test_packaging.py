"""What a ``pip install`` of the package (not of a checkout) must carry besides the Python modules."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from pneumonet import web

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_ships_the_page_and_the_default_config(tmp_path: Path) -> None:
    """The endpoint serves the page from package data: a wheel without it would answer / with 404s."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "pneumonet", source / "pneumonet", ignore=shutil.ignore_patterns("__pycache__"))
    # With setuptools installed, build with it (no index needed); else pip fetches it, as `pip install` would.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(tmp_path), str(source)]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("pneumonet-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"pneumonet/web/static/{name}" for name in web.ASSETS} <= names, sorted(n for n in names if "web" in n)
    assert "pneumonet/configs/demo.yaml" in names
