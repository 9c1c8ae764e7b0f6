"""What every token-reduction method shares: spec checking, the block hooks, the per-forward state, tensor ops.

A method is a :class:`TokenReduction` subclass registered with :func:`register_method`. Its instance holds the
validated spec only (plain values, never changed during a forward), so a reduced model stays deep-copyable,
picklable and re-entrant. Everything a forward accumulates (token sizes, running class attention, clustering
memory) lives in a :class:`TokenState` made by :meth:`TokenReduction.new_state` at the start of each forward and
passed to every block. ``models.layers.Block`` calls the hooks; the defaults below are the plain block.
"""
import math
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch

REQUIRED = object()


# --------------------------------------------------------------------------------------------------- spec checking

def _fail(method: str, name: str, expected: str, value) -> None:
    raise ValueError(f"token_reduction {method}: '{name}' must be {expected}, got {value!r}")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Param:
    """One spec parameter: its default (``REQUIRED`` if none) and a checker that raises a one-line ValueError."""
    default: Any
    check: Callable[[str, str, Any], None]


def int_param(low: Optional[int] = None, default=REQUIRED, allow_none: bool = False, high: Optional[int] = None,
              why: str = '') -> Param:
    """An integer in [low, high]; ``why`` says what the upper bound protects (named in the error)."""
    def check(method, name, value):
        if value is None and allow_none:
            return
        if not is_int(value) or (low is not None and value < low):
            _fail(method, name, f'an integer >= {low}' if low is not None else 'an integer', value)
        if high is not None and value > high:
            reason = f' ({why})' if why else ''
            raise ValueError(f"token_reduction {method}: '{name}' must be at most {high}{reason}, got {value!r}")
    return Param(default, check)


# torch.Generator.manual_seed takes seeds in [0, 2**64 - 1] (larger ones raise OverflowError mid-forward)
MAX_SEED = 2 ** 64 - 1


def seed_param() -> Param:
    """An optional generator seed: null (the global RNG) or an integer in the generator's range."""
    return int_param(0, None, allow_none=True, high=MAX_SEED, why="the random generator's seed range, 2**64 - 1")


def float_param(low: float, high: float, low_open: bool = False, default=REQUIRED) -> Param:
    def check(method, name, value):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (low < value if low_open else low <= value) and value <= high
        if not ok:
            _fail(method, name, f"a number in {'(' if low_open else '['}{low}, {high}]", value)
    return Param(default, check)


def positive_float_param(default=REQUIRED) -> Param:
    def check(method, name, value):
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                and value > 0):
            _fail(method, name, 'a positive number', value)
    return Param(default, check)


def bool_param(default=REQUIRED) -> Param:
    def check(method, name, value):
        if not isinstance(value, bool):
            _fail(method, name, 'true or false', value)
    return Param(default, check)


def choice_param(choices: Sequence[str], default=REQUIRED) -> Param:
    def check(method, name, value):
        if value not in choices:
            _fail(method, name, f"one of {', '.join(repr(c) for c in choices)}", value)
    return Param(default, check)


def int_list_param(low: int = 0, default=REQUIRED, allow_none: bool = False) -> Param:
    def check(method, name, value):
        if value is None and allow_none:
            return
        if not isinstance(value, (list, tuple)) or not value or not all(is_int(v) and v >= low for v in value):
            _fail(method, name, f'a non-empty list of integers >= {low}', value)
    return Param(default, check)


def check_block_index(method: str, name: str, index: int, depth: int, allow_end: bool = False) -> None:
    """Block indices are 0-based; ``allow_end`` also accepts ``depth`` (after the last block)."""
    high = depth if allow_end else depth - 1
    if not 0 <= index <= high:
        raise ValueError(f"token_reduction {method}: '{name}' {index} is outside the model's blocks; "
                         f"use 0 to {high}{' (' + str(depth) + ' = after the last block)' if allow_end else ''}")


# ----------------------------------------------------------------------------------------------------- the state

# the list that :func:`record_states` collects into, for the forwards run in this context (None: not recording)
_RECORDING: ContextVar[Optional[list]] = ContextVar('token_states_recording', default=None)


@contextmanager
def record_states():
    """Collect the :class:`TokenState` of every forward run inside the ``with`` block (this thread/context only)::

        with record_states() as states:
            model(images)
        states[-1].counts()   # e.g. the mean tokens per block of a data-dependent method
        states[-1].records    # per block, what the method did to the input patches (TokenState.record)

    Only while recording do the methods compute what ``records`` holds; other forwards skip it."""
    states: list = []
    token = _RECORDING.set(states)
    try:
        yield states
    finally:
        _RECORDING.reset(token)


# the training progress of the forwards run in this context, in epochs (None: not training)
_TRAINING_PROGRESS: ContextVar[Optional[float]] = ContextVar('token_reduction_training_progress', default=None)


@contextmanager
def training_progress(epochs: float):
    """Tell the methods where in training the forwards run inside the ``with`` block are: ``epochs`` done, counted
    in fractional epochs (epoch + step / steps per epoch). The training loop sets it around each training forward;
    every :class:`TokenState` made inside reads it (``state.progress``). Outside it (evaluation, inference) the
    progress is None and every method runs its spec's target setting (e.g. EViT's ``keep_rate``)::

        with training_progress(epoch + step / steps):
            loss = criterion(model(images), targets)
    """
    token = _TRAINING_PROGRESS.set(float(epochs))
    try:
        yield
    finally:
        _TRAINING_PROGRESS.reset(token)


class TokenState:
    """Per-forward state, made by :meth:`TokenReduction.new_state` at the start of every forward.

    ``index`` is the block about to run (set by the model's block loop), ``depth`` the number of blocks,
    ``grid_size`` the patch grid (rows, cols) of the input, ``progress`` the training progress in epochs
    (:func:`training_progress`; None outside training). Methods subclass it for what they carry."""

    def __init__(self, method: 'TokenReduction', grid_size: Tuple[int, int], depth: int):
        self.method = method
        self.grid_size = tuple(grid_size)
        self.depth = depth
        self.index = 0
        self.progress: Optional[float] = _TRAINING_PROGRESS.get()
        # while :func:`record_states` records: per block, what the method did to the input patches (see
        # :meth:`record`); None otherwise, and then no method computes anything for it
        self.records: Optional[List[Dict[str, torch.Tensor]]] = None
        recording = _RECORDING.get()
        if recording is not None:
            recording.append(self)
            self.records = [{} for _ in range(depth)]

    @property
    def recording(self) -> bool:
        return self.records is not None

    def record(self, **values: torch.Tensor) -> None:
        """Note what the current block did, per input patch (P = grid rows x cols, raster order); methods call it
        only when :attr:`recording`. Keys:

        - ``tokens`` (B, P) long: the token (sequence index, class token 0) that stands for each input patch after
          this block's reduction, -1 where the patch was dropped (EViT, ATS, ToMe's merges, Hourglass's clusters);
        - ``updated`` (B, P) bool: the patches whose tokens this block's attention and MLP updated (Evo-ViT);
        - ``clusters`` (B, P) or (B, heads, P) long: each patch's cluster in this block (Hourglass's nearest centre,
          ACT's query cluster, SMYRF's chunk in the first hash round)."""
        self.records[self.index].update(values)

    def patch_tokens(self, index: Optional[int] = None) -> Optional[torch.Tensor]:
        """The ``tokens`` map in force after block ``index`` (default: the current block): (B, P), or None when no
        block up to it changed the tokens (patch p is still token 1 + p)."""
        index = self.index if index is None else index
        for block in reversed(self.records[:index + 1]):
            if 'tokens' in block:
                return block['tokens']
        return None

    def record_moved(self, new_from_old: torch.Tensor) -> None:
        """Record that the tokens moved: ``new_from_old`` (B, N) is the new index of each current token, -1 if gone."""
        old = self.patch_tokens()
        if old is None:
            patches = self.grid_size[0] * self.grid_size[1]
            old = torch.arange(1, patches + 1, device=new_from_old.device).expand(new_from_old.shape[0], -1)
        self.record(tokens=new_from_old.gather(1, old.clamp(min=0)).masked_fill(old < 0, -1))

    def record_kept(self, kept: torch.Tensor, num_tokens: int, real: Optional[torch.Tensor] = None) -> None:
        """Record that only the tokens ``kept`` (B, K) (indices into the current ``num_tokens``, in their new order)
        go on; ``real`` (B, K) marks the slots that hold a token (False: padding)."""
        if real is not None:
            kept = kept.masked_fill(~real, num_tokens)
        slots = torch.arange(kept.shape[1], device=kept.device).expand(kept.shape[0], -1)
        new_from_old = kept.new_full((kept.shape[0], num_tokens + 1), -1).scatter(1, kept, slots)
        self.record_moved(new_from_old[:, :num_tokens])

    def counts(self) -> Optional[Dict[str, Any]]:
        """What a data-dependent method did in this forward, per block: ``{'what': 'tokens' | 'clusters',
        'per_block': [mean over the batch (None: block not reduced)]}``; None for methods whose counts are the
        closed-form schedule."""
        return None


# ---------------------------------------------------------------------------------------------------- the method

class TokenReduction:
    """Base class of the methods: validated spec, no-op hooks (the plain block), token schedule.

    Subclasses set ``name``, ``params`` (name -> :class:`Param`) and ``main_param`` (named in the error when a
    setting leaves no patch token), override the hooks they need, :meth:`check` (model-dependent limits) and
    :meth:`schedule`. Data-dependent methods set ``data_dependent`` and return an upper bound from schedule."""
    name: str = ''
    params: Dict[str, Param] = {}
    main_param: str = ''
    data_dependent: bool = False

    def __init__(self, **values):
        self.values = dict(values)
        for key, value in values.items():
            setattr(self, key, value)

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.spec()})'

    def spec(self) -> dict:
        """The full spec, defaults filled in (JSON-ready)."""
        return {'method': self.name, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in self.values.items()}}

    # ---- model-dependent checks and the closed-form token counts

    def check(self, depth: int, grid_size: Tuple[int, int]) -> None:
        """Raise a one-line ValueError for a setting this model cannot take (block index, grid, ...)."""

    def schedule(self, num_tokens: int, grid_size: Tuple[int, int], depth: int) -> List[Tuple[int, int]]:
        """(tokens seen by attention, tokens seen by the MLP) of each block, class token included; for
        data-dependent methods an upper bound."""
        return [(num_tokens, num_tokens)] * depth

    def output_tokens(self, num_tokens: int, grid_size: Tuple[int, int], depth: int) -> int:
        """Tokens after the last block (what the final norm and ``forward_features`` see)."""
        schedule = self.schedule(num_tokens, grid_size, depth)
        return schedule[-1][1] if schedule else num_tokens

    # ---- hooks (called by models.layers.Block and VisionTransformer.forward_features)

    def new_state(self, x: torch.Tensor, grid_size: Tuple[int, int], depth: int) -> TokenState:
        return TokenState(self, grid_size, depth)

    def before_block(self, block, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        return x

    def attention(self, attn, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        """The attention branch on the normed tokens ``x`` (B, N, C), with the block's own ``attn`` module."""
        return attn(x)

    def attention_residual(self, block, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        """The attention branch with its residual add, ``x + DropPath(attention(LN(x)))``; a method that changes the
        residual itself (ATS's ``expedit-swag`` variant) overrides this instead of :meth:`attention`."""
        return x + block.drop_path(self.attention(block.attn, block.norm1(x), state))

    def after_attention(self, block, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        return x

    def after_block(self, block, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        return x

    def finish(self, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        """After the last block, before the final norm."""
        return x


METHODS: Dict[str, Type[TokenReduction]] = {}


def register_method(cls: Type[TokenReduction]) -> Type[TokenReduction]:
    METHODS[cls.name] = cls
    return cls


def build_method(spec: dict, depth: int, grid_size: Tuple[int, int], num_prefix_tokens: int = 1) -> TokenReduction:
    """Check a spec against the method's parameters and the model (depth, patch grid); return the method."""
    if not isinstance(spec, dict):
        raise ValueError(f'token_reduction must be a JSON object with a "method" key, got {spec!r}')
    if 'method' not in spec:
        raise ValueError(f"token_reduction: 'method' is required; methods: {', '.join(sorted(METHODS))}")
    name = spec.get('method')
    if name not in METHODS:
        raise ValueError(f"token_reduction: unknown method {name!r}; methods: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    unknown = sorted(set(spec) - set(cls.params) - {'method'})
    if unknown:
        raise ValueError(f"token_reduction {name}: unknown parameter{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(unknown)}; {name} takes {', '.join(cls.params) or 'no parameters'}")
    values = {}
    for key, param in cls.params.items():
        if key not in spec:
            if param.default is REQUIRED:
                raise ValueError(f"token_reduction {name}: '{key}' is required")
            values[key] = param.default
            continue
        param.check(name, key, spec[key])
        values[key] = tuple(spec[key]) if isinstance(spec[key], list) else spec[key]
    method = cls(**values)
    method.check(depth, grid_size)
    num_tokens = num_prefix_tokens + grid_size[0] * grid_size[1]
    for index, (attn_tokens, mlp_tokens) in enumerate(method.schedule(num_tokens, grid_size, depth)):
        if min(attn_tokens, mlp_tokens) <= num_prefix_tokens:
            raise ValueError(f"token_reduction {name}: '{method.main_param}' {values.get(method.main_param)!r} "
                             f"leaves no patch token at block {index} of {depth} ({num_tokens} tokens in)")
    return method


# ----------------------------------------------------------------------------------------------------- tensor ops

def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (B, K) of tokens ``x`` (B, N, C) -> (B, K, C)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def class_attention(q: torch.Tensor, k: torch.Tensor, scale: float,
                    attn_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The class token's attention row per head, softmax(q_cls·kᵀ·scale + attn_bias): (B, heads, N). Computed beside
    the fused kernel: one query row instead of the whole map. ``attn_bias`` broadcasts to (B, heads, 1, N), e.g. the
    additive key-padding mask the fused kernel gets."""
    logits = (q[:, :, :1] * scale) @ k.transpose(-2, -1)
    if attn_bias is not None:
        logits = logits + attn_bias
    return logits.softmax(dim=-1).squeeze(2)


def mean_received_attention(attn: torch.Tensor) -> torch.Tensor:
    """Mean attention each token receives from every query, heads averaged: (B, heads, N, N) -> (B, N)."""
    return attn.mean(dim=1).mean(dim=1)
