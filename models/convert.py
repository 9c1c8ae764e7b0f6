"""Reading checkpoints of every supported layout and loading them into our models.

``load_pretrained(model, path)`` accepts this project's checkpoints and the upstream formats: a bare state dict or one
under ``model`` / ``state_dict`` / ``model_ema`` / ``state_dict_ema`` / ``module``, with ``module.`` (DDP),
``_orig_mod.`` (torch.compile) or ``backbone.``-style prefixes handled by the model's own ``checkpoint_filter``.
Family-specific renames and position-embedding resizing live in each model's ``checkpoint_filter(state_dict)``.
"""
import argparse
import pathlib
import pickle
import zipfile
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.models import clean_state_dict

from .registry import create_model, list_models, model_arg_names

StateDict = Dict[str, torch.Tensor]
STATE_DICT_KEYS = ('model', 'state_dict', 'module')
EMA_STATE_DICT_KEYS = ('model_ema', 'state_dict_ema')
# classes that legacy DeiT/HVT training checkpoints pickle inside 'args'; allowed for weights_only loading
LEGACY_SAFE_GLOBALS = [argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: missing, corrupt, truncated, or not matching the model."""


class ClassCountError(CheckpointError):
    """The checkpoint's classifier has another class count than the model (and heads are not to be dropped)."""

    def __init__(self, checkpoint_classes: int, model_classes: int):
        super().__init__(f'checkpoint has {checkpoint_classes} classes, the model {model_classes}')
        self.checkpoint_classes, self.model_classes = checkpoint_classes, model_classes


def load_checkpoint_file(path: Union[str, pathlib.Path]) -> dict:
    """``torch.load(weights_only=True)``; legacy checkpoints holding an argparse.Namespace load through an allowlist."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f'checkpoint not found: {path}')
    try:
        with torch.serialization.safe_globals(LEGACY_SAFE_GLOBALS):
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
            AttributeError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f'cannot read checkpoint {path} (corrupt, truncated or not a PyTorch file): '
                              f'{first_line}') from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'checkpoint {path} holds a {type(ckpt).__name__}, not a state dict')
    return ckpt


def extract_state_dict(ckpt: dict, use_ema: bool = False) -> StateDict:
    """The model weights inside a checkpoint dict, with ``module.`` / ``_orig_mod.`` prefixes removed."""
    keys = EMA_STATE_DICT_KEYS if use_ema else STATE_DICT_KEYS
    state_dict = next((ckpt[k] for k in keys if isinstance(ckpt.get(k), dict)), None)
    if state_dict is None:
        if use_ema:
            raise CheckpointError('checkpoint has no EMA weights (model_ema / state_dict_ema)')
        state_dict = ckpt
    if not all(torch.is_tensor(v) for v in state_dict.values()):
        raise CheckpointError('checkpoint holds no recognisable state dict (expected tensors under '
                              f'{" / ".join(STATE_DICT_KEYS)} or at the top level)')
    return clean_state_dict(state_dict)


def convert_state_dict(model: nn.Module, state_dict: StateDict) -> StateDict:
    """Apply the model family's converter (upstream key names, position-embedding resizing)."""
    state_dict = dict(state_dict)
    if hasattr(model, 'checkpoint_filter'):
        state_dict = model.checkpoint_filter(state_dict)
    return state_dict


def load_pretrained(model: nn.Module, source: Union[str, pathlib.Path, dict], use_ema: bool = False,
                    drop_mismatched_head: bool = True, strict: bool = False,
                    log: Optional[Callable[[str], None]] = print) -> Tuple[list, list]:
    """Load weights from a file or a checkpoint dict into ``model``; returns (missing, unexpected) keys.

    Classifier heads (``head*``) that differ only in their class count are dropped (fine-tuning to another class
    count), or raise :class:`ClassCountError` with ``drop_mismatched_head=False``. Any other shape mismatch, and with
    ``strict`` any missing or unexpected key, raises :class:`CheckpointError` saying which keys and shapes differ and
    what the checkpoint was written for. Missing and unexpected keys are printed through ``log``.
    """
    ckpt = load_checkpoint_file(source) if not isinstance(source, dict) else source
    raw = extract_state_dict(ckpt, use_ema=use_ema)
    state_dict = convert_state_dict(model, raw)
    own = model.state_dict()
    heads, wrong = [], []
    for key in state_dict:
        if key in own and state_dict[key].shape != own[key].shape:
            only_classes = state_dict[key].shape[1:] == own[key].shape[1:]
            (heads if key.startswith('head') and only_classes else wrong).append(key)
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if wrong or (strict and (missing or unexpected)):
        raise CheckpointError(_mismatch(state_dict, own, wrong, missing, unexpected) + '; ' + _origin(ckpt, raw))
    if heads and not drop_mismatched_head:
        weight = next((k for k in heads if k.endswith('weight')), heads[0])
        raise ClassCountError(state_dict[weight].shape[0], own[weight].shape[0])
    for key in heads:
        del state_dict[key]
    result = model.load_state_dict(state_dict, strict=False)
    if log is not None:
        if heads:
            log(f'dropped classifier weights of another class count: {", ".join(heads)}')
        log(f'missing keys: {result.missing_keys or "none"}')
        log(f'unexpected keys: {result.unexpected_keys or "none"}')
    return result.missing_keys, result.unexpected_keys


def _mismatch(state_dict: StateDict, own: StateDict, wrong: list, missing: list, unexpected: list) -> str:
    """``checkpoint does not fit the model: 3 of 40 tensors have other shapes (k (a, b) vs model (c, d); ...), ...``"""
    def first(items: list) -> str:
        return '; '.join(items[:3]) + (f'; +{len(items) - 3} more' if len(items) > 3 else '')

    parts = []
    if wrong:
        shapes = [f'{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}' for k in wrong]
        parts.append(f'{len(wrong)} of {len(own)} tensors have other shapes ({first(shapes)})')
    if missing:
        parts.append(f'{len(missing)} of {len(own)} keys missing ({first(missing)})')
    if unexpected:
        parts.append(f'{len(unexpected)} unexpected keys ({first(unexpected)})')
    return 'checkpoint does not fit the model: ' + ', '.join(parts)


def _origin(ckpt: dict, state_dict: StateDict) -> str:
    """What the checkpoint was made for: the model and settings it records (our checkpoints, DeiT's), else the
    registered models whose default architecture it fits."""
    saved = ckpt.get('args')
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else saved
    if isinstance(saved, dict) and isinstance(saved.get('model'), str):
        name = saved['model']
        try:
            names = ['input_size', *model_arg_names(name)]
        except ValueError:   # a model this project does not have (a DeiT or timm name)
            names = ['input_size']
        settings = ', '.join(f'{k}={saved[k]}' for k in names if k in saved)
        return f"it was written for model '{name}'" + (f' ({settings})' if settings else '')
    matches = guess_architecture(state_dict)
    if matches:
        return f"it looks like a {' or '.join(matches[:3])} checkpoint"
    return 'it fits none of our models at their default settings'


def guess_architecture(state_dict: StateDict) -> List[str]:
    """The registered models (at default settings, built on the meta device) whose every non-head key and shape the
    state dict, converted by that model's own filter, matches exactly."""
    matches = []
    for name in list_models():
        try:
            with torch.device('meta'):
                candidate = create_model(name)
            converted = convert_state_dict(candidate, state_dict)
        except Exception:   # noqa: BLE001 -- a converter that cannot read this layout: not a match
            continue
        own = {k: v.shape for k, v in candidate.state_dict().items() if not k.startswith('head')}
        body = {k: v.shape for k, v in converted.items() if not k.startswith('head')}
        if own == body:
            matches.append(name)
    return matches
