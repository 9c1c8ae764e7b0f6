"""Counting multiply-accumulates (MACs) and parameters of a model, under named conventions.

A *convention* is data: a complete op-handle table for fvcore's JIT tracer (op name -> handle that returns the op's
count, or ``None`` for an op that is known and not counted), a description, and optionally the twin model the
convention counts instead of the one given. Adding a convention is adding one entry to :data:`CONVENTIONS` (plus its
handle functions). Every count is of one image (batch 1) in eval mode on a seeded input, with the global random
generator seeded for the trace (the caller's stream is restored afterwards), so two runs give the same number even for
models whose graph depends on the input or on random draws (ACT's and SMYRF's hash projections).

This module knows nothing of configs, data sets or published numbers (``flops.py`` and ``data/published.json`` do).
Any op left without a handle whose name looks like a matmul stops the count with :class:`UncountedOpError`: a MAC
count missing a matmul would be silently too low.
"""
import contextlib
import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # fvcore's import touches torch.jit.script, deprecated in torch 2.x
    from fvcore.nn import FlopCountAnalysis, flop_count_table, parameter_count
    from fvcore.nn import jit_handles as fv

Handle = Callable[[list, list], Union[int, Counter]]  # fvcore op handle: (JIT inputs, JIT outputs) -> count
InputSize = Union[int, Sequence[int]]                 # 224 or (3, 224, 224)


class UncountedOpError(RuntimeError):
    """A matmul-like op had no counting handle, so the total would be too low."""


def sdpa_flop_jit(inputs, outputs) -> int:
    """MACs of ``scaled_dot_product_attention(q, k, v, attn_mask, ...)``: q @ k^T (B.heads.Nq.Nk.D) plus
    attn @ v (B.heads.Nq.Nk.Dv). The optional ``attn_mask`` is an element-wise add and, like softmax and the scale,
    not counted. Grouped-query attention counts per query head."""
    q, k, v = (fv.get_shape(inputs[i]) for i in range(3))
    return math.prod(int(d) for d in q[:-1]) * int(k[-2]) * (int(q[-1]) + int(v[-1]))


SDPA_OPS = ('aten::scaled_dot_product_attention', 'aten::_scaled_dot_product_attention_math',
            'aten::_scaled_dot_product_flash_attention', 'aten::_scaled_dot_product_flash_attention_for_cpu',
            'aten::_scaled_dot_product_efficient_attention', 'aten::_scaled_dot_product_cudnn_attention')

# multiply-accumulates of matmuls and convolutions, one fused multiply-add = 1 (fvcore's handles)
MATMUL_HANDLES: Dict[str, Optional[Handle]] = {
    'aten::addmm': fv.addmm_flop_jit,
    'aten::bmm': fv.bmm_flop_jit,
    'aten::_convolution': fv.conv_flop_jit,
    'aten::einsum': fv.einsum_flop_jit,
    'aten::matmul': fv.matmul_flop_jit,
    'aten::mm': fv.matmul_flop_jit,
    'aten::linear': fv.linear_flop_jit,
    **{op: sdpa_flop_jit for op in SDPA_OPS},
}
# the rest of fvcore's default table: norms, pooling and resampling at fvcore's per-element costs
NON_MATMUL_HANDLES: Dict[str, Optional[Handle]] = {
    'aten::batch_norm': fv.batchnorm_flop_jit,
    'aten::group_norm': fv.norm_flop_counter(2),
    'aten::layer_norm': fv.norm_flop_counter(2),
    'aten::instance_norm': fv.norm_flop_counter(1),
    'aten::upsample_nearest2d': fv.elementwise_flop_counter(0, 1),
    'aten::upsample_bilinear2d': fv.elementwise_flop_counter(0, 4),
    'aten::adaptive_avg_pool2d': fv.elementwise_flop_counter(1, 0),
    'aten::grid_sampler': fv.elementwise_flop_counter(0, 4),
}


# ------------------------------------------------------------------------------ Expedit-SWAG's counter ("expedit")
# Expedit-SWAG's tools/flop_count.py + jit_handles.py (a detectron2-derived JIT counter): one multiply-accumulate is
# one, a linear's bias counts as one more input, and element-wise ops are counted per output element. Ops it lists
# as ignored (indexing, gather, scatter, sort, mean, sum, exp, log, sqrt, pow ...) and ops it does not know cost 0.

def _jit_shape(value) -> List[int]:
    """Shape of a traced value as that counter read it: tensors their sizes ([1] for 0-d), numbers [1]."""
    if value.isCompleteTensor():
        return [int(d) for d in value.type().sizes()] or [1]
    return [1] if value.type().kind() in ('IntType', 'FloatType') else [0]


def _expedit_linear(inputs, outputs) -> int:
    """``aten::linear``: rows x out x (in + 1), the bias counted as one more input (with or without a bias)."""
    *rows, in_dim = _jit_shape(inputs[0])
    return math.prod(rows) * _jit_shape(inputs[1])[0] * (in_dim + 1)


def _expedit_matmul(inputs, outputs) -> int:
    """``aten::matmul``: numel(A) x B's last dimension."""
    return math.prod(_jit_shape(inputs[0])) * _jit_shape(inputs[1])[-1]


def _expedit_broadcast(inputs, outputs) -> int:
    """Element-wise ops: the element count of the inputs' broadcast shape."""
    shapes = [_jit_shape(v) for v in inputs]
    ndim = max(len(shape) for shape in shapes)
    padded = [[1] * (ndim - len(shape)) + shape for shape in shapes]
    return math.prod(max(dims) for dims in zip(*padded))


def _expedit_per_element(factor: int) -> Handle:
    """``factor`` per element of the first input: layer/batch norm 4, softmax 5, rsqrt 2, dropout 1."""
    return lambda inputs, outputs: factor * math.prod(_jit_shape(inputs[0]))


def _expedit_sdpa(inputs, outputs) -> int:
    """``scaled_dot_product_attention`` as the explicit path the counter saw on torch 1.10: the query scaling (q
    numel), q·kᵀ and attn·v, softmax (5 per logit) and, with an additive mask, one add per logit."""
    q, k, v = (_jit_shape(inputs[i]) for i in range(3))
    logits = math.prod(q[:-1]) * k[-2]
    masked = len(inputs) > 3 and inputs[3].type().kind() != 'NoneType'
    return math.prod(q) + logits * (q[-1] + v[-1]) + 5 * logits + (logits if masked else 0)


_EXPEDIT_ELEMENTWISE = ('add', 'add_', 'mul', 'sub', 'div', 'exp_', 'floor_divide', 'relu', 'relu_',
                        'gelu', 'linalg_norm', 'cumsum')
EXPEDIT_HANDLES: Dict[str, Optional[Handle]] = {
    'aten::linear': _expedit_linear,
    'aten::addmm': fv.addmm_flop_jit,
    'aten::matmul': _expedit_matmul,
    'aten::mm': _expedit_matmul,
    'aten::bmm': fv.bmm_flop_jit,
    'aten::einsum': fv.einsum_flop_jit,
    'aten::_convolution': fv.conv_flop_jit,
    'aten::layer_norm': _expedit_per_element(4),
    'aten::batch_norm': _expedit_per_element(4),
    'aten::softmax': _expedit_per_element(5),
    'aten::rsqrt': _expedit_per_element(2),
    'aten::dropout': _expedit_per_element(1),
    **{f'aten::{op}': _expedit_broadcast for op in _EXPEDIT_ELEMENTWISE},
    **{op: _expedit_sdpa for op in SDPA_OPS},
}


@dataclass(frozen=True)
class Convention:
    """What one counter sums.

    ``handles`` is the complete op table given to fvcore (op name -> handle, or ``None``: known and not counted);
    ops outside it are reported as unsupported, which is fine for element-wise ops and an error for matmul-like ones.
    ``twin_suffix``: the convention counts the model ``<name><twin_suffix>`` instead of ``<name>`` (the caller builds
    it; parameters stay those of the model itself). ``unit``: what the upstream tables call the count, in billions
    (``GMACs``; ``GFLOPs`` for Expedit-SWAG's counter, whose "GFLOPs" are MACs plus element-wise ops)."""
    description: str
    handles: Mapping[str, Optional[Handle]]
    twin_suffix: Optional[str] = None
    unit: str = 'GMACs'


CONVENTIONS: Dict[str, Convention] = {
    'fvcore': Convention(
        'fvcore default handles (conv, linear/matmul, norms at fvcore cost, adaptive avg-pool) + attention '
        'matmuls; as timm, DeiT, mmengine',
        {**MATMUL_HANDLES, **NON_MATMUL_HANDLES}),
    'ptflops': Convention(
        'conv/linear/matmul/attention MACs only, norms and pools not counted; as HVT (ptflops 0.6.4 + attention '
        'hook)',
        {**MATMUL_HANDLES, **{op: None for op in NON_MATMUL_HANDLES}}),
    'pit-paper': Convention(
        'fvcore on the <model>_distilled twin (two class tokens): the PiT paper\'s FLOPs equal those counts '
        '(our inference, not stated by the authors)',
        {**MATMUL_HANDLES, **NON_MATMUL_HANDLES}, twin_suffix='_distilled'),
    'expedit': Convention(
        'the counter of Expedit-SWAG\'s tools/flop_count.py: MACs, a linear\'s bias as one more input, '
        'LayerNorm 4 and softmax 5 per element, adds, muls, divs, GELU and dropout 1 per element; what its tables '
        'print as "GFLOPs"',
        EXPEDIT_HANDLES, unit='GFLOPs'),
}

# ops that are (or may hide) multiply-accumulates; uncounted, they make the count wrong, so counting stops
_MATMUL_LIKE = re.compile(r'mm|matmul|linear|conv|einsum|scaled_dot_product|attention|tensordot|addmv|::mv$|::dot$'
                          r'|::vdot$|::inner$|::outer$|::ger$|::kron$|PythonOp', re.IGNORECASE)
# operators whose MACs are the attention matmuls (q k^T and attn v) in a block's per-operator count
ATTENTION_OPERATORS = ('scaled_dot_product_attention', 'matmul', 'bmm', 'einsum')


def get_convention(name: str) -> Convention:
    if name not in CONVENTIONS:
        raise ValueError(f"unknown convention '{name}'; use one of {', '.join(CONVENTIONS)}")
    return CONVENTIONS[name]


def example_input(input_size: InputSize, device='cpu', seed: int = 0) -> torch.Tensor:
    """One seeded image, (1, 3, S, S) for an int ``input_size`` or (1, *input_size) for a shape."""
    shape = (3, input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, *shape, generator=gen).to(device)


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device('cpu')


@contextlib.contextmanager
def _seeded_global_rng(device: torch.device, seed: int):
    """Run a trace with the global generators (CPU, and ``device``'s when it is not the CPU) seeded with ``seed``;
    the caller's random streams are restored on exit."""
    accelerators = [] if device.type == 'cpu' else [device]
    with torch.random.fork_rng(devices=accelerators, device_type=device.type if accelerators else None):
        torch.manual_seed(seed)
        yield


def analyze(model: nn.Module, input_size: InputSize, convention: str = 'fvcore', seed: int = 0,
            image: Optional[torch.Tensor] = None) -> FlopCountAnalysis:
    """Trace ``model`` (eval mode, batch 1, no grad, seeded input) under ``convention``'s op table and return fvcore's
    analysis, after checking that every matmul-like op was counted (:class:`UncountedOpError` names it otherwise)."""
    table = get_convention(convention).handles
    was_training = model.training
    model.eval()
    try:
        device = _device_of(model)
        with torch.no_grad(), warnings.catch_warnings(), _seeded_global_rng(device, seed):
            warnings.simplefilter('ignore')
            if image is None:
                image = example_input(input_size, device, seed)
            analysis = FlopCountAnalysis(model, image)
            analysis.clear_op_handles()
            analysis.set_op_handle(**table)
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            analysis.tracer_warnings('none')
            analysis.total()  # runs the trace
            unsupported = analysis.unsupported_ops()
    finally:
        model.train(was_training)
    uncounted = sorted(op for op in unsupported if _MATMUL_LIKE.search(op))
    if uncounted:
        raise UncountedOpError(
            f"uncounted matmul-like op{'s' if len(uncounted) > 1 else ''} "
            f"{', '.join(f'{op} (x{unsupported[op]})' for op in uncounted)} in {type(model).__name__}: the MAC "
            f"count would be too low; add a handle for it to the '{convention}' convention in counting.py")
    return analysis


def count_macs(model: nn.Module, input_size: InputSize, convention: str = 'fvcore',
               seed: int = 0) -> Tuple[int, Dict[str, int]]:
    """MACs of one image and MACs per module name ('' = whole model) under ``convention``'s op table.

    The model given is the model counted; a convention with a ``twin_suffix`` expects the caller to pass the twin."""
    analysis = analyze(model, input_size, convention, seed)
    return int(analysis.total()), {name: int(v) for name, v in analysis.by_module().items()}


def count_params(model: nn.Module) -> Tuple[int, int]:
    """(total, trainable) parameter counts, exact; shared parameters counted once."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return int(parameter_count(model)['']), int(trainable)


# ----------------------------------------------------------------------------------------------------------- per block

def _is_unit(module: nn.Module) -> bool:
    """A block-like module reported on its own line: our ``Block`` subclasses, and any non-torch module whose class
    name ends in Block, Merge or Pooling (HiViT stem blocks and merges, PiT pooling)."""
    from models.layers import Block
    if isinstance(module, Block):
        return True
    cls = type(module)
    return not cls.__module__.startswith('torch.') and re.search(r'(Block|Merge|Pooling)$', cls.__name__) is not None


def _tokens(t) -> Tuple[Optional[int], Optional[int]]:
    """(tokens, width) of a block input/output: (B, N, C) sequences, (B, C, H, W) maps, (B, N, s, s, C) unit grids."""
    if isinstance(t, (tuple, list)) and t:
        t = t[0]
    if not torch.is_tensor(t) or t.dim() < 3:
        return None, None
    if t.dim() == 3:
        return int(t.shape[1]), int(t.shape[2])
    if t.dim() == 4:
        return int(t.shape[2] * t.shape[3]), int(t.shape[1])
    return math.prod(int(d) for d in t.shape[1:-1]), int(t.shape[-1])


def block_shapes(model: nn.Module, input_size: InputSize, seed: int = 0) -> List[dict]:
    """Block-like modules in execution order with their input and output token counts (forward hooks, batch 1)."""
    names = {}
    units: List[str] = []
    for name, module in model.named_modules():
        if _is_unit(module) and not any(name.startswith(parent + '.') for parent in units):
            units.append(name)
            names[module] = name
    seen: List[dict] = []

    def hook(module, args, output):
        n_in, c_in = _tokens(args[0] if args else None)
        n_out, c_out = _tokens(output)
        seen.append(dict(name=names[module], type=type(module).__name__, tokens_in=n_in, dim_in=c_in,
                         tokens_out=n_out, dim_out=c_out))

    hooks = [module.register_forward_hook(hook) for module in names]
    was_training = model.training
    model.eval()
    try:
        device = _device_of(model)
        with torch.no_grad(), _seeded_global_rng(device, seed):
            model(example_input(input_size, device, seed))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return seen


def detail(model: nn.Module, input_size: InputSize, convention: str = 'fvcore', seed: int = 0) -> dict:
    """Total, then MACs per top-level module, per operator, per block (with token counts and the attention-matmul
    part) and per stage (a run of consecutive blocks with the same input token count and width); ``table`` is
    fvcore's ``flop_count_table`` (MACs and parameters per module, two levels deep)."""
    analysis = analyze(model, input_size, convention, seed)
    by_module = analysis.by_module()
    by_mod_op = analysis.by_module_and_operator()
    blocks = []
    for unit in block_shapes(model, input_size, seed):
        ops = by_mod_op.get(unit['name'], Counter())
        unit['macs'] = int(by_module.get(unit['name'], 0))
        unit['attn_macs'] = int(sum(ops.get(op, 0) for op in ATTENTION_OPERATORS))
        blocks.append(unit)
    stages: List[dict] = []
    for unit in blocks:
        key = (unit['tokens_in'], unit['dim_in'])
        if not stages or (stages[-1]['tokens_in'], stages[-1]['dim_in']) != key:
            stages.append(dict(stage=len(stages), tokens_in=key[0], dim_in=key[1], blocks=[], macs=0, attn_macs=0))
        stage = stages[-1]
        stage['blocks'].append(unit['name'])
        stage['macs'] += unit['macs']
        stage['attn_macs'] += unit['attn_macs']
    top = {name: int(by_module.get(name, 0)) for name, child in model.named_children()
           if by_module.get(name, 0) or any(True for _ in child.parameters())}
    operators = {k: int(v) for k, v in analysis.by_operator().items()}
    table = flop_count_table(analysis, max_depth=2, show_param_shapes=False)
    return dict(total=int(analysis.total()), modules=top, operators=operators, stages=stages, blocks=blocks,
                table=table)
