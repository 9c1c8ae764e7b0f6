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
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.models import clean_state_dict

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
                    drop_mismatched_head: bool = True, log: Optional[Callable[[str], None]] = print
                    ) -> Tuple[list, list]:
    """Load weights from a file or a checkpoint dict into ``model``; returns (missing, unexpected) keys.

    Classifier heads (``head*``) whose shape differs are dropped (fine-tuning to another class count), or raise
    :class:`ClassCountError` with ``drop_mismatched_head=False``; any other shape mismatch is an error. Missing and
    unexpected keys are printed through ``log``.
    """
    ckpt = load_checkpoint_file(source) if not isinstance(source, dict) else source
    state_dict = convert_state_dict(model, extract_state_dict(ckpt, use_ema=use_ema))
    own = model.state_dict()
    dropped, wrong = [], []
    for key in list(state_dict):
        if key in own and state_dict[key].shape != own[key].shape:
            if key.startswith('head') and drop_mismatched_head:
                dropped.append(key)
                del state_dict[key]
            elif key.startswith('head') and key.endswith('weight'):
                raise ClassCountError(state_dict[key].shape[0], own[key].shape[0])
            else:
                wrong.append(f'{key} {tuple(state_dict[key].shape)} vs model {tuple(own[key].shape)}')
    if wrong:
        raise CheckpointError(f'checkpoint does not fit the model: {"; ".join(wrong[:3])}'
                              + (f' (+{len(wrong) - 3} more)' if len(wrong) > 3 else ''))
    result = model.load_state_dict(state_dict, strict=False)
    if log is not None:
        if dropped:
            log(f'dropped classifier weights of another class count: {", ".join(dropped)}')
        log(f'missing keys: {result.missing_keys or "none"}')
        log(f'unexpected keys: {result.unexpected_keys or "none"}')
    return result.missing_keys, result.unexpected_keys
