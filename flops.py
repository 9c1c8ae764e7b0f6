"""Parameters and GMACs of a config's model, beside the numbers the seeds publish.

    python flops.py --config config/hvt-s-1.json [--input-size 384] [--detail] [--json | --csv] [--convention C]
    python flops.py --all [--json | --csv] [--convention C] [--jobs 2]

Counting policy (shared/DESIGN.md, "FLOPs policy"): published "FLOPs" are multiply-accumulates (MACs) of one image at
the evaluation resolution, attention matmuls included. We count with fvcore's ``FlopCountAnalysis`` (one fused
multiply-add = one flop, i.e. MACs) plus a handle for ``aten::scaled_dot_product_attention`` (fvcore skips it), and
refuse to report a number when any matmul-like op went uncounted. The model is built exactly as training builds it
(``options.parse_args`` + ``main.build_model``) at the config's class count and resolution, batch 1, eval mode.

The seeds counted with different tools, so a *convention* names what is summed (``--convention``):

- ``fvcore``: fvcore's default handles (conv, linear/matmul/bmm/einsum, LayerNorm/BatchNorm/GroupNorm at fvcore's
  per-element cost, adaptive average pooling, upsampling) plus attention; what timm's benchmark, DeiT and mmengine
  (HiViT) report. Reproduces the DeiT, PiT (distilled) and HiViT tables.
- ``ptflops``: only conv / linear / matmul / attention MACs; norms, pools and element-wise ops are not counted. HVT
  counted with ptflops <= 0.6.4 plus an attention hook (shared/reference/hvt.md section 3.2); fvcore's LayerNorm term
  would turn HVT-S-1's 2.402 into 2.407 -> "2.41" against the published 2.40. (ptflops also added conv-bias, one
  Linear-bias row and max-pool input terms, under 0.0002 G for every HVT model; they are not counted here.)
- ``pit-paper``: ``fvcore`` on the model's ``<name>_distilled`` twin (two class tokens). The PiT README's FLOPs equal
  the fvcore counts of the distilled models (0.708 / 1.411 / 2.903 / 12.500 G -> 0.71 / 1.4 / 2.9 / 12.5); the
  non-distilled models count 0.702 / 1.399 / 2.877 / 12.420 G. That the table reused the distilled numbers is an
  inference from those counts (shared/reference/pit.md section 3.2), not something the authors state. Parameters are
  always those of the configured model.

``--all`` counts each published row in the convention of its seed (``--convention`` overrides that for every row); a
single ``--config`` run uses the seed convention of a config in :data:`PUBLISHED`, else ``fvcore``. The convention
used is always printed.
"""
import argparse
import csv
import io
import json
import math
import os
import re
import sys
import warnings
from collections import Counter
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

import counting
from utils import ArgumentParser, UserError

REPO = os.path.dirname(os.path.abspath(__file__))
CONFIG_DIR = os.path.join(REPO, 'config')


# ---------------------------------------------------------------------------------------------------- published numbers

@dataclass(frozen=True)
class Published:
    """One row of a seed's table: GMACs and params (millions) as printed (strings keep the printed precision)."""
    family: str
    gmacs: str
    params_m: Optional[str]
    convention: str
    source: str
    resolution: int = 224
    num_classes: int = 1000
    note: str = ''


_HVT = 'HVT README (seed 000), "FLOPs (G)" / "Params (M)"; ptflops 0.6.4 + attention hook'
_PIT = 'PiT README (seed 002), main table "FLOPs" / "# params"'
_PIT_D = 'PiT README (seed 002), pretrained-weights table "FLOPs" (no params given for distilled models)'
_DEIT = 'PiT README (seed 002), DeiT rows of the main table'
_HIVIT = 'HiViT README (seed 001), mmpretrain table "Params (M)" / "Flops (G)"; mmengine counter, backbone + neck'
_PIT_TI_PARAMS = ('params: exact 4,847,272 = 4.8 M at one decimal; the seed prints 4.9, i.e. double rounding '
                  '4.847 -> 4.85 -> 4.9 (shared/reference/pit.md section 3.2)')

PUBLISHED: Dict[str, Published] = {
    'hvt-ti-1': Published('HVT', '0.64', '5.74', 'ptflops', _HVT),
    'hvt-s-0': Published('HVT', '4.57', '22.05', 'ptflops', _HVT),
    'hvt-s-1': Published('HVT', '2.40', '22.09', 'ptflops', _HVT),
    'hvt-s-2': Published('HVT', '1.94', '22.11', 'ptflops', _HVT),
    'hvt-s-3': Published('HVT', '1.62', '22.11', 'ptflops', _HVT),
    'hvt-s-4': Published('HVT', '1.39', '22.12', 'ptflops', _HVT),
    'scale-hvt-ti-4': Published('HVT', '1.39', '22.12', 'ptflops', _HVT),
    'deit-ti': Published('DeiT', '1.3', '5.7', 'fvcore', _DEIT),
    'deit-s': Published('DeiT', '4.6', '22.1', 'fvcore', _DEIT),
    'deit-b': Published('DeiT', '17.6', '86.6', 'fvcore', _DEIT),
    'pit-ti': Published('PiT', '0.71', '4.9', 'pit-paper', _PIT, note=_PIT_TI_PARAMS),
    'pit-xs': Published('PiT', '1.4', '10.6', 'pit-paper', _PIT),
    'pit-s': Published('PiT', '2.9', '23.5', 'pit-paper', _PIT),
    'pit-b': Published('PiT', '12.5', '73.8', 'pit-paper', _PIT),
    'pit-ti-distilled': Published('PiT', '0.71', None, 'fvcore', _PIT_D),
    'pit-xs-distilled': Published('PiT', '1.4', None, 'fvcore', _PIT_D),
    'pit-s-distilled': Published('PiT', '2.9', None, 'fvcore', _PIT_D),
    'pit-b-distilled': Published('PiT', '12.5', None, 'fvcore', _PIT_D),
    'hivit-tiny': Published('HiViT', '4.60', '19.18', 'fvcore', _HIVIT),
    'hivit-small': Published('HiViT', '9.07', '37.53', 'fvcore', _HIVIT),
    'hivit-base': Published('HiViT', '18.47', '79.05', 'fvcore', _HIVIT),
}

# ---------------------------------------------------------------------------------------------------------- counting

from counting import UncountedOpError, count_macs, count_params as params, detail  # noqa: E402

CONVENTIONS = {name: c.description for name, c in counting.CONVENTIONS.items()}
_OP_SET = {'fvcore': 'fvcore', 'ptflops': 'ptflops', 'pit-paper': 'fvcore'}


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise UserError(f"unknown convention '{convention}'; use one of {', '.join(CONVENTIONS)}")



# ------------------------------------------------------------------------------------------------------------ reports

def config_name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def build(config_path: str, input_size: Optional[int] = None, model_name: Optional[str] = None):
    """(args, model) built exactly as main.py builds it for training, from a config (plus overrides)."""
    import datasets
    import main as train_main
    import options
    argv = ['--config', config_path]
    if input_size is not None:
        argv += ['--input-size', str(input_size)]
    args = options.parse_args(argv)
    if model_name is not None:
        args.model = model_name
    model = train_main.build_model(args, datasets.num_classes_of(args))
    return args, model.eval()


def twin_name(model_name: str) -> str:
    """The distilled twin ``pit-paper`` counts: ``<name>_distilled`` (a distilled model is its own twin)."""
    import models
    if model_name.endswith('_distilled'):
        return model_name
    twin = f'{model_name}_distilled'
    if twin not in models.list_models():
        raise UserError(f"convention 'pit-paper' counts the distilled twin of a model, and '{model_name}' has none "
                        f"('{twin}' is not a registered model); use --convention fvcore or ptflops")
    return twin


def _round(value: Decimal, decimals: int) -> Decimal:
    return value.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)


def _decimals(printed: str) -> int:
    return len(printed.split('.')[1]) if '.' in printed else 0


def _compare(exact_units: Decimal, printed: Optional[str]) -> Tuple[Optional[float], Optional[bool]]:
    if printed is None:
        return None, None
    diff = float(exact_units - Decimal(printed))
    return round(diff, 4), _round(exact_units, _decimals(printed)) == Decimal(printed)


# MACs of a counted architecture (name, model kwargs, input size, classes, op set): pit-b under pit-paper and
# pit-b-distilled count the same network
_MAC_CACHE: Dict[tuple, int] = {}


def default_convention(config: str) -> str:
    row = PUBLISHED.get(config)
    return row.convention if row else 'fvcore'


def report(config_path: str, input_size: Optional[int] = None, convention: Optional[str] = None,
           with_detail: bool = False) -> dict:
    """Count one config: params (total, trainable), MACs under ``convention`` (default: the seed's, else fvcore) and
    the comparison with the published row when the resolution and class count match the seed's."""
    name = config_name(config_path)
    convention = convention or default_convention(name)
    _check_convention(convention)
    args, model = build(config_path, input_size)
    num_classes = getattr(model, 'num_classes', None)
    counted_name = twin_name(args.model) if convention == 'pit-paper' else args.model
    key = (counted_name, json.dumps(args.model_kwargs, sort_keys=True), args.input_size, num_classes,
           _OP_SET[convention])
    details = None
    if key not in _MAC_CACHE or with_detail:
        counted = model if counted_name == args.model else build(config_path, input_size, counted_name)[1]
        if with_detail:
            details = detail(counted, args.input_size, convention)
            details.pop('table')
            _MAC_CACHE[key] = details.pop('total')
        else:
            _MAC_CACHE[key] = count_macs(counted, args.input_size, convention)[0]
    macs = _MAC_CACHE[key]
    total, trainable = params(model)
    row = dict(config=name, config_path=os.path.relpath(config_path, REPO) if os.path.isabs(config_path)
               else config_path, model=args.model, counted_model=counted_name, input_size=args.input_size,
               num_classes=num_classes, batch=1, params=total, trainable_params=trainable,
               params_m=round(total / 1e6, 3), macs=macs, gmacs=round(macs / 1e9, 4), convention=convention,
               convention_description=CONVENTIONS[convention])
    pub = PUBLISHED.get(name)
    comparable = pub is not None and args.input_size == pub.resolution and num_classes == pub.num_classes
    row.update(published_gmacs=float(pub.gmacs) if comparable else None,
               published_params_m=float(pub.params_m) if comparable and pub.params_m else None,
               published_source=pub.source if pub else None, published_convention=pub.convention if pub else None,
               published_note=(pub.note or None) if pub else None)
    gdiff, gmatch = _compare(Decimal(macs) / Decimal(10) ** 9, pub.gmacs if comparable else None)
    pdiff, pmatch = _compare(Decimal(total) / Decimal(10) ** 6, pub.params_m if comparable else None)
    row.update(gmacs_diff=gdiff, params_m_diff=pdiff, gmacs_match=gmatch, params_match=pmatch)
    if pub is not None and not comparable:
        row['published_note'] = (f'not compared: published at {pub.resolution} px and {pub.num_classes} classes, '
                                 f'counted at {args.input_size} px and {num_classes} classes')
    if details is not None:
        row['detail'] = details
    return row


def all_configs(config_dir: str = CONFIG_DIR) -> List[str]:
    if not os.path.isdir(config_dir):
        raise UserError(f"config folder '{config_dir}' not found")
    return sorted(os.path.join(config_dir, f) for f in os.listdir(config_dir) if f.endswith('.json'))


def _report_or_error(path: str, input_size, convention, with_detail) -> dict:
    try:
        return report(path, input_size, convention, with_detail)
    except (UserError, UncountedOpError) as e:
        return dict(config=config_name(path), config_path=path, error=str(e),
                    error_kind='uncounted_op' if isinstance(e, UncountedOpError) else 'user')


def _worker_init() -> None:
    torch.set_num_threads(1)


def report_all(config_dir: str = CONFIG_DIR, input_size: Optional[int] = None, convention: Optional[str] = None,
               with_detail: bool = False, jobs: int = 1) -> List[dict]:
    """One :func:`report` per config in ``config_dir`` (published rows without a config are skipped), in file name
    order. A row that cannot be counted carries ``error`` instead of numbers. ``jobs > 1`` counts in that many
    processes of one thread each."""
    if convention is not None:
        _check_convention(convention)
    paths = all_configs(config_dir)
    if jobs <= 1 or len(paths) <= 1:
        return [_report_or_error(p, input_size, convention, with_detail) for p in paths]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(max_workers=min(jobs, len(paths)), mp_context=multiprocessing.get_context('spawn'),
                             initializer=_worker_init) as pool:
        futures = [pool.submit(_report_or_error, p, input_size, convention, with_detail) for p in paths]
        return [f.result() for f in futures]


# ---------------------------------------------------------------------------------------------------------- formatting

CSV_FIELDS = ['config', 'model', 'counted_model', 'input_size', 'num_classes', 'params', 'trainable_params', 'macs',
              'gmacs', 'convention', 'published_gmacs', 'gmacs_diff', 'gmacs_match', 'published_params_m',
              'params_m_diff', 'params_match', 'published_source', 'error']


def to_csv(rows: List[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, extrasaction='ignore', lineterminator='\n')
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ('' if row.get(k) is None else row.get(k)) for k in CSV_FIELDS})
    return out.getvalue()


def _fmt_match(match: Optional[bool]) -> str:
    return '' if match is None else ('yes' if match else 'NO')


def _fmt_diff(diff: Optional[float]) -> str:
    return '' if diff is None else f'{diff:+.3f}'


def format_table(rows: List[dict]) -> str:
    head = ['config', 'model', 'convention', 'input', 'params', 'M', 'pub M', 'diff', 'ok', 'GMACs', 'pub G', 'diff',
            'ok']
    lines = []
    for r in rows:
        if 'error' in r:
            lines.append([r['config'], 'error: ' + r['error']])
            continue
        model = r['model'] if r['counted_model'] == r['model'] else f"{r['model']} ({r['counted_model']})"
        lines.append([r['config'], model, r['convention'], str(r['input_size']), f"{r['params']:,}",
                      f"{r['params'] / 1e6:.3f}", '' if r['published_params_m'] is None else
                      _published(r, 'params_m'), _fmt_diff(r['params_m_diff']), _fmt_match(r['params_match']),
                      f"{r['gmacs']:.4f}", '' if r['published_gmacs'] is None else _published(r, 'gmacs'),
                      _fmt_diff(r['gmacs_diff']), _fmt_match(r['gmacs_match'])])
    widths = [max(len(head[i]), *(len(l[i]) for l in lines if len(l) == len(head))) for i in range(len(head))]
    text = ['  '.join(h.ljust(w) if i < 3 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    for l in lines:
        if len(l) != len(head):
            text.append(f'{l[0].ljust(widths[0])}  {l[1]}')
        else:
            text.append('  '.join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(l, widths))))
    notes = sorted({f"{r['config']}: {r['published_note']}" for r in rows if r.get('published_note')})
    text.append('GMACs: multiply-accumulates of one image (fvcore convention: 1 fused multiply-add = 1 flop), '
                'attention matmuls included; M = params in millions; "ok" = equal to the published number at its '
                'printed precision.')
    text += [f'conventions: {name}: {desc}' for name, desc in CONVENTIONS.items()
             if any(r.get('convention') == name for r in rows)]
    text += [f'note {n}' for n in notes]
    return '\n'.join(text)


def _published(row: dict, key: str) -> str:
    pub = PUBLISHED[row['config']]
    return pub.gmacs if key == 'gmacs' else pub.params_m


def format_report(row: dict) -> str:
    lines = [f"config        {row['config_path']}",
             f"model         {row['model']}" + (f"  (counted as {row['counted_model']})"
                                                if row['counted_model'] != row['model'] else ''),
             f"input size    3x{row['input_size']}x{row['input_size']}, batch 1, {row['num_classes']} classes",
             f"parameters    {row['params']:,} total ({row['params'] / 1e6:.2f} M), "
             f"{row['trainable_params']:,} trainable",
             f"GMACs         {row['gmacs']:.4f} per image ({row['macs']:,} MACs)",
             f"convention    {row['convention']}: {row['convention_description']}"]
    if row['published_gmacs'] is not None:
        pub = PUBLISHED[row['config']]
        params_part = (f", {pub.params_m} M (diff {row['params_m_diff']:+.3f}, "
                       f"{'reproduced' if row['params_match'] else 'NOT reproduced'})") if pub.params_m else ''
        lines.append(f"published     {pub.gmacs} GMACs (diff {row['gmacs_diff']:+.4f}, "
                     f"{'reproduced' if row['gmacs_match'] else 'NOT reproduced'}){params_part}")
        lines.append(f"source        {pub.source}")
    if row.get('published_note'):
        lines.append(f"note          {row['published_note']}")
    if 'detail' in row:
        lines.append(format_detail(row['detail']))
    return '\n'.join(lines)


def format_detail(d: dict) -> str:
    g = lambda v: f'{v / 1e9:.4f}'  # noqa: E731
    lines = ['', 'by top-level module (GMACs):']
    lines += [f'  {name:<24} {g(v):>9}' for name, v in d['modules'].items()]
    lines += ['by operator (GMACs):'] + [f'  {name:<30} {g(v):>9}' for name, v in sorted(d['operators'].items())]
    lines += ['by stage (consecutive blocks with the same input tokens and width):',
              f"  {'stage':>5} {'blocks':>6} {'tokens in':>9} {'width':>6} {'GMACs':>9} {'attn GMACs':>10}"]
    lines += [f"  {s['stage']:>5} {len(s['blocks']):>6} {s['tokens_in']!s:>9} {s['dim_in']!s:>6} {g(s['macs']):>9} "
              f"{g(s['attn_macs']):>10}" for s in d['stages']]
    lines += ['by block:', f"  {'block':<26} {'type':<16} {'tokens in':>9} {'width':>6} {'tokens out':>10} "
                           f"{'GMACs':>9} {'attn GMACs':>10}"]
    lines += [f"  {b['name']:<26} {b['type']:<16} {b['tokens_in']!s:>9} {b['dim_in']!s:>6} {b['tokens_out']!s:>10} "
              f"{g(b['macs']):>9} {g(b['attn_macs']):>10}" for b in d['blocks']]
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------------------------- CLI

def get_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description='Parameters and GMACs (fvcore convention: MACs) of a config, or of every config '
                            'beside the published numbers.')
    what = p.add_mutually_exclusive_group()
    what.add_argument('--config', help='JSON config (model, input_size, data_set ...)')
    what.add_argument('--all', action='store_true', help='every config in --config-dir, beside the seed tables')
    p.add_argument('--config-dir', '--config_dir', default=CONFIG_DIR, help='where --all looks (default: config/)')
    p.add_argument('--input-size', '--input_size', type=int, default=None, help='override the config resolution')
    p.add_argument('--convention', default=None,
                   help=f"{' | '.join(CONVENTIONS)}; default: the seed's for a published config, else fvcore")
    p.add_argument('--jobs', type=int, default=1, help='--all: count configs in this many processes')
    p.add_argument('--detail', action='store_true', help='per module, operator, stage and block (token counts)')
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument('--json', action='store_true', help='JSON: one object (--config) or a list (--all)')
    fmt.add_argument('--csv', action='store_true', help='CSV with a header row')
    return p


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = get_parser().parse_args(argv)
        if args.convention is not None:
            _check_convention(args.convention)
        if not args.all and not args.config:
            raise UserError('give --config PATH or --all')
        if args.input_size is not None and args.input_size < 1:
            raise UserError(f'--input-size must be positive, got {args.input_size}')
        if args.all:
            rows = report_all(args.config_dir, args.input_size, args.convention, args.detail, args.jobs)
        else:
            if not os.path.isfile(args.config):
                raise UserError(f"config file '{args.config}' not found")
            rows = [report(args.config, args.input_size, args.convention, args.detail)]
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except UncountedOpError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows if args.all else rows[0], indent=1))
    elif args.csv:
        sys.stdout.write(to_csv(rows))
    elif args.all:
        print(format_table(rows))
        for row in rows:
            if 'detail' in row:
                print(f"\n== {row['config']}" + format_detail(row['detail']))
    else:
        print(format_report(rows[0]))
    errors = [r for r in rows if 'error' in r]
    for r in errors:
        print(f"error: {r['config']}: {r['error']}", file=sys.stderr)
    if any(r.get('error_kind') == 'uncounted_op' for r in errors):
        return 1
    return 2 if errors else 0


if __name__ == '__main__':
    sys.exit(main())
