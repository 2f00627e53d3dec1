"""The package's shape: no import circle anywhere in pneumonet/, and Ray's processes import only what they run."""

from __future__ import annotations

import ast
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``path`` imports when it runs: at module level or inside a function
    (a lazy import closes a circle too), not under ``if TYPE_CHECKING:``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in child.names)  # `from pkg import module`
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {target for target in found if target in known and target != name}


def import_circles(root: Path) -> list[list[str]]:
    """Every group of modules under ``root`` that import each other round (strongly connected components)."""
    files = {_module_name(path, root): path for path in root.rglob("*.py")}
    graph = {name: sorted(_imports(path, name, set(files))) for name, path in files.items()}
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan's algorithm
        order[node] = low[node] = len(order)
        stack.append(node)
        for target in graph[node]:
            if target not in order:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], order[target])
        if low[node] == order[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
            if len(group) > 1:
                circles.append(sorted(group))

    for name in sorted(graph):
        if name not in order:
            connect(name)
    return circles


def test_the_circle_finder_finds_a_lazy_circle_and_ignores_type_checking_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("def later():\n    from ..c import x\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nimport pkg.a\nif TYPE_CHECKING:\n    from pkg import d\n")
    (package / "d.py").write_text("from pkg import c\n")
    assert import_circles(package) == [["pkg.a", "pkg.c", "pkg.sub.b"]]


def test_no_import_circle_in_pneumonet():
    assert import_circles(REPO / "pneumonet") == []


PROCESS_IMPORTS = """
import json, sys
import pneumonet.training.remote  # what the Train controller unpickles
controller = set(sys.modules)
import keras, tensorflow, ray.data, ray.train  # what a worker needs whatever it runs (Keras brings matplotlib)
baseline = set(sys.modules)
import pneumonet.training.worker
print(json.dumps({"controller": sorted(controller), "worker": sorted(set(sys.modules) - baseline)}))
"""


def test_ray_processes_import_only_what_they_run():
    """The Train controller gets no TensorFlow; a worker no evaluation, plotting, tracking or artifact writing."""
    result = subprocess.run([sys.executable, "-c", PROCESS_IMPORTS], cwd=REPO, capture_output=True, text=True,
                            timeout=300, check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})  # fmt: skip
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    assert not {"tensorflow", "keras"} & set(modules["controller"])
    worker = modules["worker"]
    assert "pneumonet.training.worker" in worker and "pneumonet.training.stages" in worker  # the diff is real
    unwanted = ("matplotlib", "wandb", "pneumonet.evaluation", "pneumonet.tracking", "pneumonet.training.finishing",
                "pneumonet.training.driver", "pneumonet.scoring")  # fmt: skip
    assert [name for name in worker if name.startswith(unwanted)] == []


def test_the_one_private_ray_name_is_where_ray_train_logs_its_reports():
    """pneumonet.training.ray_private fails to import when Ray moves the module; the logger must still be its."""
    from pneumonet.training import ray_private

    assert ray_private._train_context.logger.name == ray_private.REPORT_LOGGER
    ray_private.quiet_report_logs()
    assert not logging.getLogger(ray_private.REPORT_LOGGER).isEnabledFor(logging.INFO)
