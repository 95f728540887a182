"""The layering the README describes, checked by importing modules with the layers above them blocked."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bnguard"

# Loads bnguard's modules as the package "layer" without running bnguard/__init__.py, with some imports made
# to fail; prints OK when the named modules import.
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


@pytest.mark.parametrize("modules, blocked", [
    (["policy", "validation", "records", "confidence"], ["torch", "numpy", "accelerate", "wandb"]),
    (["stats", "spread"], ["accelerate", "wandb", "numpy", "tqdm"]),
    (["recalibration", "accumulator", "report", "layers", "distributed", "batches", "isolation",
      "stopping", "recalibration_warnings", "storing"],
     ["accelerate", "wandb", "tensorboard"]),
    (["cli"], ["accelerate", "wandb", "tensorboard", "lightning", "transformers"]),  # each framework when asked
    (sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")), ["layer.cli"]),
])
def test_lower_layers_import_without_the_upper_ones(modules, blocked):
    result = imports_with_blocked(modules, blocked)
    assert result.stdout.strip() == "OK", result.stderr


def test_the_check_itself_catches_a_forbidden_import():
    result = imports_with_blocked(["tracking"], ["wandb", "accelerate", "numpy"])
    assert "ImportError" in result.stderr or "ModuleNotFoundError" in result.stderr


def test_bnguard_imports_without_the_frameworks_it_integrates_with():
    code = ("import sys\nfor name in ('lightning', 'pytorch_lightning', 'transformers'):\n"
            "    sys.modules[name] = None\nimport bnguard\nprint('OK')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "OK", result.stderr


def test_files_and_classes_stay_small():
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text()
        assert source.count("\n") <= 350, f"{path.name}: {source.count(chr(10))} lines"
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):
                length = node.end_lineno - node.lineno + 1
                assert length <= 150, f"{path.name}: class {node.name} has {length} lines"
