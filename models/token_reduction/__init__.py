"""Token reduction for plain ViTs (``deit_*``, ``swag_vit_*``): the methods Expedit-SWAG (Liang et al.,
NeurIPS 2022) ported to SWAG ViTs, behind one interface.

    from models import create_model, apply_token_reduction
    m = create_model('swag_vit_l16', img_size=224, token_reduction={'method': 'tome', 'r': 8})
    apply_token_reduction(m, {'method': 'evit', 'keep_rate': 0.7})   # replaces the method
    apply_token_reduction(m, None)                                   # the plain model again

The spec is a dict: ``method`` plus that method's parameters (``docs/token_reduction.md``). Applying a spec sets
``model.token_reduction`` to the checked method; the model's modules and state-dict keys never change.

Any model with what the methods use works, whatever its class: a ``token_reduction`` attribute that its forward
honours (making a :class:`TokenState` and running the blocks with it, as ``models.vit.VisionTransformer`` does),
``blocks`` whose forward takes ``state`` and whose ``attn`` has ``project_qkv`` / ``attend`` / ``project_out``
(``models.layers.Block``), ``patch_embed.grid_size`` and ``patch_embed.patch_size``, and ``num_prefix_tokens``.
"""
import inspect
from typing import List, Optional, Tuple, Union

import torch.nn as nn

from .core import METHODS, TokenReduction, TokenState, build_method, record_states, training_progress
from . import act, ats, evit, evo_vit, hourglass, smyrf, tome  # noqa: F401  (each method file registers itself)

__all__ = ['apply_token_reduction', 'token_schedule', 'resolve_method', 'record_states', 'training_progress', 'METHODS',
           'TokenReduction', 'TokenState']

ATTENTION_HOOKS = ('project_qkv', 'attend', 'project_out')


def _missing_capabilities(model: nn.Module) -> List[str]:
    """What ``model`` lacks of what the methods use (empty: it can run them)."""
    missing = [name for name in ('token_reduction', 'num_prefix_tokens') if not hasattr(model, name)]
    patch_embed = getattr(model, 'patch_embed', None)
    missing += [f'patch_embed.{name}' for name in ('grid_size', 'patch_size') if not hasattr(patch_embed, name)]
    blocks = getattr(model, 'blocks', None)
    if not isinstance(blocks, nn.Module) or not len(list(blocks.children())):
        return missing + ['blocks']
    for index, block in enumerate(blocks.children()):
        if 'state' not in inspect.signature(block.forward).parameters:
            missing.append(f'blocks[{index}].forward(..., state)')
        missing += [f'blocks[{index}].attn.{name}' for name in ATTENTION_HOOKS
                    if not callable(getattr(getattr(block, 'attn', None), name, None))]
        if missing:
            break
    return missing


def _check_capabilities(model: nn.Module) -> None:
    missing = _missing_capabilities(model)
    if missing:
        raise ValueError(f'token_reduction needs a ViT with the token-reduction hooks (such as deit_* and swag_vit_*); '
                         f'{type(model).__name__} has no {", ".join(missing[:3])}')


def resolve_method(model: nn.Module, spec: Union[dict, TokenReduction, None],
                   grid_size: Optional[Tuple[int, int]] = None) -> Optional[TokenReduction]:
    """The checked method of ``spec`` for ``model`` (at ``grid_size``, default the model's), or None for plain."""
    if spec is None:
        return None
    _check_capabilities(model)
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
        _check_capabilities(model)
    model.token_reduction = method
    return model


def _check_input_size(input_size, patch: int) -> None:
    """Square inputs the patch divides, at least one patch (as the patch embedding itself requires)."""
    if not (isinstance(input_size, int) and not isinstance(input_size, bool)) or input_size < patch \
            or input_size % patch:
        raise ValueError(f'input size {input_size!r} is not a positive multiple of the patch size {patch}; use '
                         f'{patch}, {2 * patch}, ... (the patch embedding takes whole patches only)')


def token_schedule(model: nn.Module, spec: Union[dict, TokenReduction, None] = 'current',
                   input_size: Optional[int] = None) -> dict:
    """How many tokens (class token included) each block's attention and MLP see, in closed form.

    ``spec`` defaults to the model's current method (None = plain); ``input_size`` to the model's. Returns
    ``{'blocks': [{'block': i, 'attention': n, 'mlp': n}, ...], 'tokens_in': n0, 'tokens_out': n_last,
    'data_dependent': bool}``; for data-dependent methods (ATS, ACT) the counts are upper bounds."""
    _check_capabilities(model)
    if isinstance(spec, str) and spec == 'current':
        spec = model.token_reduction
    patch = model.patch_embed.patch_size
    if input_size is not None:
        _check_input_size(input_size, patch)
    grid = model.patch_embed.grid_size if input_size is None else (input_size // patch, input_size // patch)
    num_tokens = model.num_prefix_tokens + grid[0] * grid[1]
    depth = len(model.blocks)
    method = resolve_method(model, spec, grid)
    pairs = method.schedule(num_tokens, grid, depth) if method else [(num_tokens, num_tokens)] * depth
    blocks = [dict(block=i, attention=a, mlp=m) for i, (a, m) in enumerate(pairs)]
    tokens_out = method.output_tokens(num_tokens, grid, depth) if method else num_tokens
    return dict(blocks=blocks, tokens_in=num_tokens, tokens_out=tokens_out,
                data_dependent=bool(method and method.data_dependent))
