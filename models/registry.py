"""Model registry: our own names, also registered in timm (``timm.create_model('hvt_s_1')`` works).

Each entry point records the model class it builds, so the config layer can tell which JSON keys are
constructor arguments of the chosen model (``model_arg_names``).
"""
import difflib
import inspect
from typing import Callable, Dict, List, Optional, Type

import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import register_model as timm_register_model

from .token_reduction import apply_token_reduction

_ENTRYPOINTS: Dict[str, Callable[..., nn.Module]] = {}
_CLASSES: Dict[str, Type[nn.Module]] = {}
_DATA_CONFIGS: Dict[str, dict] = {}

# evaluation preprocessing of a model unless its registration says otherwise (timm's pretrained_cfg fields)
DEFAULT_DATA_CONFIG = dict(input_size=224, interpolation='bicubic', crop_pct=0.875,
                           mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)

# kwargs that timm.create_model passes to every entry point; our constructors do not take them
_TIMM_FACTORY_KWARGS = ('pretrained', 'pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir')
# kwargs DeiT-style scripts pass to every model; accepted by every entry point, dropped when None/unused
_COMMON_KWARGS = ('num_classes', 'img_size', 'drop_rate', 'drop_path_rate', 'drop_block_rate')


class UnknownModelError(ValueError):
    pass


def register_model(model_cls: Type[nn.Module], **data_config):
    """Decorator for an entry point ``fn(**kwargs) -> model_cls``: records it here and in timm's registry.

    ``data_config`` overrides fields of :data:`DEFAULT_DATA_CONFIG` (``input_size``, ``interpolation``,
    ``crop_pct``, ``mean``, ``std``): the model's default resolution and evaluation preprocessing."""
    unknown = set(data_config) - set(DEFAULT_DATA_CONFIG)
    if unknown:
        raise TypeError(f'unknown data config fields {sorted(unknown)}')

    def wrap(fn):
        name = fn.__name__

        def entrypoint(**kwargs):
            for key in _TIMM_FACTORY_KWARGS:
                if key == 'pretrained' and kwargs.get(key):
                    raise ValueError(f'{name}: no hub weights; load a file with models.load_pretrained(model, path)')
                kwargs.pop(key, None)
            if kwargs.get('drop_block_rate') is None:
                kwargs.pop('drop_block_rate', None)
            return fn(**kwargs)

        entrypoint.__name__ = name
        entrypoint.__doc__ = fn.__doc__
        entrypoint.__module__ = fn.__module__
        _ENTRYPOINTS[name] = entrypoint
        _CLASSES[name] = model_cls
        _DATA_CONFIGS[name] = {**DEFAULT_DATA_CONFIG, **data_config}
        timm_register_model(entrypoint)
        return entrypoint

    return wrap


def list_models() -> List[str]:
    return sorted(_ENTRYPOINTS)


def _check_name(name: str) -> None:
    if name not in _ENTRYPOINTS:
        close = difflib.get_close_matches(name, list_models(), n=3, cutoff=0.5)
        hint = f'; did you mean {", ".join(close)}?' if close else f'; known models: {", ".join(list_models())}'
        raise UnknownModelError(f"unknown model '{name}'{hint}")


def model_class(name: str) -> Type[nn.Module]:
    _check_name(name)
    return _CLASSES[name]


def data_config(name: str) -> dict:
    """Default input size, interpolation, crop fraction, mean and std of a registered model (a copy)."""
    _check_name(name)
    return dict(_DATA_CONFIGS[name])


def model_arg_names(name: str) -> List[str]:
    """Constructor arguments a config may set for this model (besides main.py's own options)."""
    params = inspect.signature(model_class(name).__init__).parameters
    return [p for p in params if p not in ('self', 'kwargs', 'args')]


def create_model(name: str, token_reduction: Optional[dict] = None, **kwargs) -> nn.Module:
    """Build a registered model. Keyword arguments go to the model's constructor (None values are dropped).

    ``token_reduction``: a spec (``{'method': 'tome', 'r': 8}``, see ``models.token_reduction``) applied to the built
    model with ``apply_token_reduction``, exactly as applying it afterwards; None for the plain model. A bad spec, or
    one given to a model that takes none, raises ``ValueError`` naming the parameter."""
    _check_name(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    accepted = set(model_arg_names(name))
    unknown = [k for k in kwargs if k not in accepted and k not in _COMMON_KWARGS]
    if unknown:
        raise ValueError(f"model '{name}' does not take {', '.join(unknown)}; it takes {', '.join(sorted(accepted))}")
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    model = _ENTRYPOINTS[name](**kwargs)
    if token_reduction is not None:
        apply_token_reduction(model, token_reduction)
    return model
