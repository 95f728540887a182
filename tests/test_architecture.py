"""The layers README describes, checked on the tree: which folder may import which (by reading the imports),
which outside packages each folder does without (by importing it with them blocked), the public names, and
the size of files and classes."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import bnguard

PACKAGE = Path(bnguard.__file__).resolve().parent

# A folder may import its own modules and those of a lower layer, never a higher one.
LAYER = {"utils": 0, "stats": 1, "recalibration": 2, "hooks": 3, "drivers": 4, "integrations": 5, "cli": 5}
# Beyond the layers: the command line repairs files and runs no hooks; integrations and the command line
# stand apart.
NEVER = {("cli", "hooks"), ("cli", "drivers"), ("cli", "integrations"), ("integrations", "cli")}

PUBLIC = ["HOOK_TOLERANCE", "AutoRecalibrate", "BNStatsLogger", "Decision", "DivergencePolicy", "Event", "Guard",
          "Hook", "HookError", "HookRunner", "LayerReport", "Loop", "NonFiniteLossError", "PreciseBN",
          "RecalibrationReport", "RecordKeys", "State", "Trackers", "TrainingBatches", "Verdict", "accuracy",
          "bn_statistics", "default_forward", "log_bn_stats", "loss_from_model", "recalibrate",
          "shared_output_dir", "start_trackers"]


def imported_folders(path: Path, package: Path) -> list[str]:
    """The bnguard folders (or top-level modules) that the file at ``path`` imports from, relative or
    absolute."""
    parts = path.relative_to(package).parts[:-1]  # the file's folders below bnguard/
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(parts[:len(parts) - (node.level - 1)])
            target = base + (node.module.split(".") if node.module else [node.names[0].name])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bnguard."):
            target = node.module.split(".")[1:]
        elif isinstance(node, ast.Import):
            target = next((a.name.split(".")[1:] for a in node.names if a.name.startswith("bnguard.")), [])
        else:
            continue
        if target:
            found.append(target[0])
    return found


def layer_violations(package: Path) -> list[str]:
    """Every import in ``package``'s layer folders that goes up a layer or across a forbidden line."""
    violations = []
    for folder in LAYER:
        for path in sorted((package / folder).rglob("*.py")):
            for target in imported_folders(path, package):
                if target == folder:
                    continue
                if target not in LAYER:
                    violations.append(f"{folder}/{path.name} imports bnguard.{target}, which is in no layer")
                elif LAYER[target] > LAYER[folder] or (folder, target) in NEVER:
                    violations.append(f"{folder}/{path.name} imports {target}/")
    return violations


def test_every_module_sits_in_a_layer_folder():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert loose == []
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(LAYER)


def test_no_folder_imports_a_higher_layer():
    assert layer_violations(PACKAGE) == []


def test_the_direction_check_catches_a_planted_import(tmp_path):
    copy = tmp_path / "bnguard"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "hooks" / "planted.py").write_text("from ..drivers.metrics import MetricSums\n")
    (copy / "cli" / "planted.py").write_text("def f():\n    from ..hooks.base import Hook\n")
    (copy / "stats" / "planted.py").write_text("import bnguard.recalibration.layers\n")
    assert layer_violations(copy) == ["stats/planted.py imports recalibration/", "hooks/planted.py imports drivers/",
                                      "cli/planted.py imports hooks/"]


# Loads a bnguard folder's modules as the package "layer" without running bnguard/__init__.py, with some
# imports made to fail; prints OK when they import.
IMPORT_WITH_BLOCKED = """
import sys, types, importlib
for name in {blocked!r}:
    sys.modules[name] = None  # any import of it now raises ImportError
package = types.ModuleType("layer")
package.__path__ = [{path!r}]
sys.modules["layer"] = package
for module in {modules!r}:
    importlib.import_module("layer." + module)
print("OK")
"""


def imports_with_blocked(modules, blocked):
    code = IMPORT_WITH_BLOCKED.format(blocked=blocked, path=str(PACKAGE), modules=modules)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def modules_of(folder):
    return [f"{folder}.{p.stem}" for p in sorted((PACKAGE / folder).glob("*.py")) if p.stem != "__init__"]


FRAMEWORKS = ["lightning", "pytorch_lightning", "transformers"]
TRACKERS = ["mlflow", "aim"]  # optional extras, imported only when a run logs to them


@pytest.mark.parametrize("modules, blocked", [
    (["stats.confidence", "hooks.policy", "hooks.record_keys", "utils.validation"], ["torch", "numpy"]),
    (modules_of("utils"), ["accelerate", "wandb", "tensorboard", *FRAMEWORKS]),
    (modules_of("stats"), ["accelerate", "wandb", "numpy", "tqdm"]),
    (modules_of("recalibration"), ["accelerate", "wandb", "tensorboard", *FRAMEWORKS]),
    (modules_of("hooks"), ["accelerate", *FRAMEWORKS, *TRACKERS]),
    (modules_of("drivers"), [*FRAMEWORKS, *TRACKERS]),
    (["cli"], ["accelerate", "wandb", "tensorboard", *FRAMEWORKS]),  # each framework when asked for
], ids=["torch-free", "utils", "stats", "recalibration", "hooks", "drivers", "cli"])
def test_each_folder_imports_without_the_packages_it_must_not_need(modules, blocked):
    result = imports_with_blocked(modules, blocked)
    assert result.stdout.strip() == "OK", result.stderr


def test_the_blocked_import_check_catches_a_forbidden_import():
    result = imports_with_blocked(["hooks.trackers"], ["numpy"])
    assert "ImportError" in result.stderr or "ModuleNotFoundError" in result.stderr


def test_every_public_name_imports_without_the_frameworks_and_trackers_it_integrates_with():
    code = (f"import sys\nfor name in {FRAMEWORKS + TRACKERS!r}:\n    sys.modules[name] = None\nimport bnguard\n"
            "[getattr(bnguard, name) for name in bnguard.__all__]\nprint('OK')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "OK", result.stderr


def test_the_public_names_stay_those_listed_and_each_is_importable():
    assert sorted(bnguard.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(bnguard, name) is not None


def test_layer_folders_show_nothing_in_their_init():
    for folder in set(LAYER) - {"cli"}:
        tree = ast.parse((PACKAGE / folder / "__init__.py").read_text())
        assert len(tree.body) == 1 and isinstance(tree.body[0].value, ast.Constant), f"{folder}/__init__.py"


def test_files_and_classes_stay_small():
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text()
        assert source.count("\n") <= 350, f"{path.name}: {source.count(chr(10))} lines"
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):
                length = node.end_lineno - node.lineno + 1
                assert length <= 150, f"{path.name}: class {node.name} has {length} lines"
