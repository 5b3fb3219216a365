"""The package's layering (docs/architecture.md): module-level imports between subpackages go one way only."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "compressor"
# compressor.pruner (the Pruner the training loop and a user's loop drive) sits between prune and train; the
# framework integrations over it sit beside app
# the tasks (what depends on what a model predicts: loss, metrics, parity) sit above models, deploy and the dataset
# readers, and below training
ALLOWED = {"core": set(), "datasets": {"core"}, "models": {"core"}, "deploy": {"core"},
           "tasks": {"core", "datasets", "models", "deploy"}, "prune": {"core", "models", "deploy"},
           "pruner": {"core", "models", "deploy", "prune"},
           "train": {"core", "datasets", "models", "prune", "pruner", "tasks"},
           "app": {"core", "datasets", "models", "deploy", "prune", "pruner", "tasks", "train"},
           "integrations": {"core", "models", "deploy", "prune", "pruner", "tasks", "train"}}


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 2 and parts[1] == "pruner":
        return "pruner"
    return parts[1] if len(parts) > 2 and parts[1] in ALLOWED else "core"


def module_level_imports(path: Path) -> set[str]:
    """compressor modules imported at module level (imports inside functions and TYPE_CHECKING blocks run late)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("compressor"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names
                         if (PACKAGE.parent / f"{node.module}.{a.name}".replace(".", "/")).with_suffix(".py").exists())
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("compressor"))
    return found


def test_subpackages_import_only_the_layers_below():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "__main__.py":  # the entry point enters through app.cli
            continue
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        for target in module_level_imports(path):
            if layer(target) != layer(module) and layer(target) not in ALLOWED[layer(module)]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, wrong


def test_the_check_sees_a_wrong_import(tmp_path):
    path = tmp_path / "x.py"
    path.write_text("from compressor.app.recipe import Recipe\n\ndef f():\n    from compressor.train.loop import fit\n")
    assert module_level_imports(path) == {"compressor.app.recipe"}
    assert "app" not in ALLOWED[layer("compressor.deploy.bench")]
