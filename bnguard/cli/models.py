"""The network a checkpoint's tensors are loaded into, from ``--model``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .checkpoints import HF, Checkpoint
from .errors import InputError
from .forms import MODEL_FORMS
from .specs import call, load_object


def build_model(spec: str | None, kwargs: dict[str, Any], checkpoint: Checkpoint) -> nn.Module:
    """A freshly built model; a Hugging Face folder needs no ``--model`` (its config.json says which)."""
    if spec is None:
        if checkpoint.kind != HF:
            raise InputError(f"which network does {checkpoint.path} hold? give it with {MODEL_FORMS}")
        spec = f"hf:{checkpoint.path}"
    source, _, name = spec.partition(":")
    if source == "torchvision" and name:
        model = _torchvision(name, kwargs)
    elif source == "hf" and name:
        model = _transformers(Path(name), kwargs)
    else:
        _suggest_torchvision(spec)
        factory = load_object(spec, "--model")
        model = _from_pretrained_class(factory, checkpoint) if checkpoint.kind == HF else None
        model = model if model is not None else call(factory, kwargs, "--model")
    if not isinstance(model, nn.Module):
        raise InputError(f"--model {spec} gave a {type(model).__name__}, not a torch.nn.Module")
    return model


def _torchvision(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models():
        raise InputError(f"--model torchvision:{name}: torchvision has no model {name!r} "
                         "(torchvision.models.list_models() lists them, e.g. resnet18)")
    return call(lambda **given: torchvision.models.get_model(name, **given), kwargs, "--model")


def _suggest_torchvision(spec: str) -> None:
    """A bare torchvision model name is most likely meant as one."""
    if ":" in spec:
        return
    import torchvision

    if spec in torchvision.models.list_models():
        raise InputError(f"--model {spec}: give torchvision's model as --model torchvision:{spec}")


def _transformers(folder: Path, kwargs: dict[str, Any]) -> nn.Module:
    transformers = _import_transformers()
    if not (folder / "config.json").is_file():
        raise InputError(f"--model hf:{folder}: {folder} has no config.json (a save_pretrained folder has one)")
    config = transformers.AutoConfig.from_pretrained(str(folder), **kwargs)
    architecture = (getattr(config, "architectures", None) or [None])[0]
    model_class = getattr(transformers, architecture or "", None)
    if model_class is None:
        raise InputError(f"--model hf:{folder}: its config names architecture {architecture!r}, which transformers "
                         "does not have: give the class with --model package.module:Class")
    return model_class(config)


def _from_pretrained_class(factory: Any, checkpoint: Checkpoint) -> nn.Module | None:
    """A transformers model class given for a Hugging Face folder is built from the folder's config."""
    config_class = getattr(factory, "config_class", None)
    if not (isinstance(factory, type) and hasattr(config_class, "from_pretrained")):
        return None
    return factory(config_class.from_pretrained(str(checkpoint.path)))


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise InputError("--model hf:... needs transformers: pip install transformers") from None
    return transformers
