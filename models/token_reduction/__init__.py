"""Token reduction at inference for plain ViTs (``deit_*``, ``swag_vit_*``): seed 003's methods behind one interface.

    from models import create_model, apply_token_reduction
    m = create_model('swag_vit_l16', img_size=224, token_reduction={'method': 'tome', 'r': 8})
    apply_token_reduction(m, {'method': 'evit', 'keep_rate': 0.7})   # replaces the method
    apply_token_reduction(m, None)                                   # the plain model again

The spec is a dict: ``method`` plus that method's parameters (``shared/reference/token_interface.md``). Applying a
spec sets ``model.token_reduction`` to the checked method; the model's modules and state-dict keys never change.
"""
from typing import List, Optional, Tuple, Union

import torch.nn as nn

from .core import METHODS, TokenReduction, TokenState, build_method, record_states, training_progress
from . import act, ats, evit, evo_vit, hourglass, smyrf, tome  # noqa: F401  (each method file registers itself)

__all__ = ['apply_token_reduction', 'token_schedule', 'resolve_method', 'record_states', 'training_progress', 'METHODS',
           'TokenReduction', 'TokenState']


def _plain_vit_names() -> List[str]:
    from ..registry import list_models, model_class
    from ..vit import VisionTransformer
    return [name for name in list_models() if model_class(name) is VisionTransformer]


def _check_plain_vit(model: nn.Module) -> None:
    from ..vit import VisionTransformer
    if not isinstance(model, VisionTransformer):
        raise ValueError(f'token_reduction works on plain ViTs ({", ".join(_plain_vit_names())}), not on '
                         f'{type(model).__name__}')


def resolve_method(model: nn.Module, spec: Union[dict, TokenReduction, None],
                   grid_size: Optional[Tuple[int, int]] = None) -> Optional[TokenReduction]:
    """The checked method of ``spec`` for ``model`` (at ``grid_size``, default the model's), or None for plain."""
    if spec is None:
        return None
    _check_plain_vit(model)
    if isinstance(spec, TokenReduction):
        spec = spec.spec()
    grid_size = tuple(grid_size or model.patch_embed.grid_size)
    return build_method(spec, len(model.blocks), grid_size, model.num_prefix_tokens)


def apply_token_reduction(model: nn.Module, spec: Union[dict, TokenReduction, None]) -> nn.Module:
    """Make ``model`` run ``spec`` at inference (None: the plain model again). Returns the model.

    Raises ValueError (one line, naming the parameter) for an unknown method or parameter, a wrong type, a block
    index outside the model, or a setting that leaves no patch token; the model is unchanged then."""
    method = resolve_method(model, spec) if spec is not None else None
    if spec is None and not hasattr(model, 'token_reduction'):
        _check_plain_vit(model)
    model.token_reduction = method
    return model


def token_schedule(model: nn.Module, spec: Union[dict, TokenReduction, None] = 'current',
                   input_size: Optional[int] = None) -> dict:
    """How many tokens (class token included) each block's attention and MLP see, in closed form.

    ``spec`` defaults to the model's current method (None = plain); ``input_size`` to the model's. Returns
    ``{'blocks': [{'block': i, 'attention': n, 'mlp': n}, ...], 'tokens_in': n0, 'tokens_out': n_last,
    'data_dependent': bool}``; for data-dependent methods (ATS, ACT) the counts are upper bounds."""
    _check_plain_vit(model)
    if isinstance(spec, str) and spec == 'current':
        spec = model.token_reduction
    patch = model.patch_embed.patch_size
    grid = model.patch_embed.grid_size if input_size is None else (input_size // patch, input_size // patch)
    num_tokens = model.num_prefix_tokens + grid[0] * grid[1]
    depth = len(model.blocks)
    method = resolve_method(model, spec, grid)
    pairs = method.schedule(num_tokens, grid, depth) if method else [(num_tokens, num_tokens)] * depth
    blocks = [dict(block=i, attention=a, mlp=m) for i, (a, m) in enumerate(pairs)]
    tokens_out = method.output_tokens(num_tokens, grid, depth) if method else num_tokens
    return dict(blocks=blocks, tokens_in=num_tokens, tokens_out=tokens_out,
                data_dependent=bool(method and method.data_dependent))
