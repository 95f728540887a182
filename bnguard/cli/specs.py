"""``package.module:name`` and ``path/file.py:name`` specs, and the JSON keyword arguments given with them."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

from .errors import InputError


def load_object(spec: str, option: str) -> Any:
    """The object a spec names; modules are imported as from the current folder, as ``python -c`` would."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise InputError(f"{option} {spec!r}: expected package.module:name or path/to/file.py:name")
    try:
        module = _import(module_name)
    except ImportError as error:
        raise InputError(f"{option} {spec!r}: cannot import {module_name} ({error}); run bnguard from the folder "
                         "that holds it, or install it") from None
    found: Any = module
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise InputError(f"{option} {spec!r}: {module_name} has no {attribute}")
        found = getattr(found, part)
    return found


def _import(module_name: str) -> Any:
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ImportError(f"{path} does not exist")
        sys.path.insert(0, str(path.resolve().parent))  # so that it imports its neighbours
        name = path.stem if path.stem not in sys.modules else f"bnguard_spec_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[name] = module  # as an import would: dataclasses and pickling look modules up there
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        return module
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # a console script does not put the current folder there
    return importlib.import_module(module_name)


def json_kwargs(text: str | None, option: str) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except ValueError as error:
        raise InputError(f"{option} is not valid JSON ({error}): give an object, e.g. '{{\"num_classes\": 10}}'") \
            from None
    if not isinstance(value, dict):
        raise InputError(f"{option} must be a JSON object of keyword arguments, got {type(value).__name__}")
    return value


def call(factory: Any, kwargs: dict[str, Any], option: str) -> Any:
    """``factory(**kwargs)``, a refusal of the arguments said as bad input."""
    if not callable(factory):
        raise InputError(f"{option} names a {type(factory).__name__}, not a class or function to call")
    try:
        return factory(**kwargs)
    except TypeError as error:
        raise InputError(f"{option}: calling {getattr(factory, '__name__', factory)} with {kwargs} failed ({error}); "
                         f"give its arguments with {option}-kwargs") from None
