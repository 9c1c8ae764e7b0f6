"""Seed 003's token-reduction study as data: the sweep (which settings), the rows measured (``results.jsonl``), the
tables in the seed's layout (``table.md``) and the two plots. ``study.py`` runs it; this module knows nothing of
argparse.

A sweep is a list of entries ``{'name': str, 'spec': dict or None}`` (None = the plain model). A sweep file is a JSON
list whose items are specs or ``{"name": ..., "spec": ...}`` objects. A method is a name plus a spec: how its rows
are shown in the seed's layout is one entry of :data:`METHOD_TABLES` (methods without one get a column per
parameter).
"""
import datetime
import json
import math
import os
from decimal import ROUND_HALF_UP, Decimal
from typing import Dict, List, Optional, Sequence, Tuple

from framework import published
from utils import UserError

SEED = '003'
RESULTS_FILE = 'results.jsonl'
TABLE_FILE = 'table.md'
ACCURACY_PLOT = 'top1_vs_gflops.png'
SPEEDUP_PLOT = 'speedup_vs_flops_ratio.png'
# seed 003's counter (token_reduction.md section 4.2); 'fvcore' gives plain MACs
SEED_CONVENTION = 'expedit'

# how the seed's README shows each method: section title, and the setting columns (header, spec key; 'hw' = the
# hourglass cluster grid h x w)
METHOD_TABLES: Dict[str, dict] = {
    'hourglass': dict(title='Ours', plot_label='Hourglass (Ours)',
                      columns=[('$\\alpha$', 'location'), ('h $\\times$ w', 'hw')]),
    'evit': dict(title='EViT', columns=[('keep rate', 'keep_rate')]),
    'tome': dict(title='ToMe', columns=[('r', 'r')]),
    'act': dict(title='ACT', columns=[('q_hashes', 'q_hashes')]),
    'ats': dict(title='ATS', columns=[('$\\alpha$', 'locations')]),
    'evo_vit': dict(title='Evo-ViT', columns=[('pruning location', 'location'), ('pruning ratio', 'keep_ratio')]),
    'smyrf': dict(title='SMYRF', columns=[('$\\alpha$', 'location'), ('rounds', 'n_hashes'),
                                          ('q_cluster_size', 'q_cluster_size'), ('k_cluster_size', 'k_cluster_size')]),
}
# the seed's backbone labels (Method column "SWAG + EViT", Backbone column "ViT-L/16")
BACKBONE_LABELS = {'swag_vit_l16': ('SWAG', 'ViT-L/16'), 'swag_vit_h14': ('SWAG', 'ViT-H/14')}


# ------------------------------------------------------------------------------------------------------------ sweeps

def setting_text(spec: Optional[dict]) -> str:
    """``'r=4'``, ``'location=2, num_clusters=16'``; ``'plain'`` for None."""
    if spec is None:
        return 'plain'
    return ', '.join(f'{k}={json.dumps(v)}' for k, v in spec.items() if k != 'method')


def entry_name(spec: Optional[dict]) -> str:
    return 'plain' if spec is None else f"{spec['method']} {setting_text(spec)}"


def normalize_sweep(items, source: str) -> List[dict]:
    """A sweep file's list -> entries ``{'name', 'spec'}``; a malformed item is a :class:`UserError` naming it."""
    if not isinstance(items, list):
        raise UserError(f'{source}: a sweep is a JSON list of token-reduction specs (or {{"name", "spec"}} '
                        f'objects), got a {type(items).__name__}')
    entries = []
    for i, item in enumerate(items):
        if isinstance(item, dict) and 'spec' in item:
            extra = set(item) - {'name', 'spec'}
            if extra:
                raise UserError(f"{source}, item {i}: unknown key(s) {', '.join(sorted(extra))}; an item is a spec "
                                f"or {{\"name\": ..., \"spec\": ...}}")
            spec, name = item['spec'], item.get('name')
        else:
            spec, name = item, None
        if spec is not None and not (isinstance(spec, dict) and isinstance(spec.get('method'), str)):
            raise UserError(f'{source}, item {i}: a spec is a JSON object with a "method" key, or null for the '
                            f'plain model; got {json.dumps(spec)}')
        entries.append(dict(name=name if isinstance(name, str) and name else entry_name(spec), spec=spec))
    return entries


def load_sweep_file(path: str) -> List[dict]:
    try:
        with open(path, encoding='utf-8') as f:
            items = json.load(f)
    except OSError as e:
        raise UserError(f"sweep file '{path}' cannot be read: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"sweep file '{path}' is not valid JSON: {e}") from None
    return normalize_sweep(items, f"sweep file '{path}'")


def seed_rows(rows: Sequence[published.Published], model: str, resolution: int) -> List[published.Published]:
    """The published seed-003 rows of ``model`` at ``resolution``, in file order."""
    return [r for r in rows if r.seed == SEED and r.model == model and r.resolution == resolution]


def seed_sweep(rows: Sequence[published.Published], model: str, resolution: int) -> List[dict]:
    """The seed's settings of a backbone, from its published rows (plain first, each setting once)."""
    entries, seen = [dict(name='plain', spec=None)], {'null'}
    for row in seed_rows(rows, model, resolution):
        key = json.dumps(row.token_reduction, sort_keys=True)
        if key not in seen:
            seen.add(key)
            entries.append(dict(name=entry_name(row.token_reduction), spec=row.token_reduction))
    return entries


def with_plain_first(entries: List[dict]) -> List[dict]:
    """The sweep with the plain model as its first entry (added when missing: every table and ratio needs it)."""
    plain = [e for e in entries if e['spec'] is None][:1] or [dict(name='plain', spec=None)]
    return plain + [e for e in entries if e['spec'] is not None]


# ----------------------------------------------------------------------------------------------------------- results

def row_key(backbone: str, full_spec: Optional[dict], input_size: int) -> str:
    """What identifies a row for resuming: backbone + spec (defaults filled in) + input size."""
    return json.dumps([backbone, full_spec, input_size], sort_keys=True)


def read_results(path: str) -> List[dict]:
    """The rows of ``results.jsonl``; a line cut short by a kill (the last one) is left out."""
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, encoding='utf-8') as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and 'key' in row:
                rows.append(row)
    return rows


def append_result(row: dict, path: str) -> None:
    """One row as one JSON line, flushed to disk (a killed run keeps every row written before)."""
    with open(path, 'a', encoding='utf-8') as f:
        f.write(json.dumps(row) + '\n')
        f.flush()
        os.fsync(f.fileno())


def check_output_dir(path: str) -> None:
    """Create the output folder and check that results can be appended to it (one-line UserError otherwise)."""
    try:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, RESULTS_FILE), 'a', encoding='utf-8'):
            pass
    except OSError as e:
        raise UserError(f"output folder '{path}' is not writable: {e.strerror}; give another --output-dir") from None


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


# ------------------------------------------------------------------------------------------------------------- table

def fmt(value, digits: Optional[int] = None) -> str:
    """Half-up rounding as the seed prints: one decimal, three below 10 (small models' GFLOPs stay readable)."""
    if value is None:
        return '-'
    if digits is None:
        digits = 1 if abs(value) >= 10 else 3
    return str(Decimal(repr(float(value))).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def _column_value(key: str, spec: Optional[dict], grid: Sequence[int]) -> str:
    if key == 'hw':   # hourglass: cluster grid h x w; the plain model's full grid
        if spec is None:
            return f'{grid[0]} $\\times$ {grid[1]}'
        side = math.isqrt(spec['num_clusters'])
        return f'{side} $\\times$ {side}'
    if spec is None:
        return '-'
    value = spec.get(key)
    if isinstance(value, list):
        return ', '.join(str(v) for v in value)
    return '-' if value is None else str(value)


def method_columns(method: str, specs: Sequence[dict]) -> List[Tuple[str, str]]:
    if method in METHOD_TABLES:
        return METHOD_TABLES[method]['columns']
    keys = []
    for spec in specs:
        keys += [k for k in spec if k != 'method' and k not in keys]
    return [(k, k) for k in keys]


def seed_numbers(row: Optional[published.Published]) -> dict:
    """The seed's printed numbers of a published row: GFLOPs, and FPS, throughput and top-1 where the data file
    has them (fields ``fps``, ``throughput``, ``acc1``)."""
    if row is None:
        return {}
    return dict(gflops=row.gmacs, fps=getattr(row, 'fps', None), throughput=getattr(row, 'throughput', None),
                acc1=getattr(row, 'acc1', None))


def _cell(ours, seed, digits: Optional[int] = None) -> str:
    text = fmt(ours, digits)
    return f'{text} ({seed})' if seed is not None else text


def _group_label(backbone: str) -> Tuple[str, str]:
    return BACKBONE_LABELS.get(backbone, ('ViT', backbone))


def render_table(rows: List[dict], published_for) -> str:
    """``table.md``: one section per method in the seed's order (then any other), each with the plain row and the
    method's rows per backbone and input size, in the seed's columns. ``published_for(row)`` gives the seed's
    published row for one of our rows, or None."""
    groups: Dict[Tuple[str, int], List[dict]] = {}
    for row in rows:
        groups.setdefault((row['backbone'], row['input_size']), []).append(row)
    methods = [m for m in METHOD_TABLES if any(r['method'] == m for r in rows)]
    methods += sorted({r['method'] for r in rows if r['method'] and r['method'] not in METHOD_TABLES})
    any_seed = False
    lines = ['# Token-reduction study', '']
    for method in methods:
        title = METHOD_TABLES.get(method, {}).get('title', method)
        specs = [r['full_spec'] for r in rows if r['method'] == method]
        columns = method_columns(method, specs)
        lines += [f'### {title}', '',
                  '| Method | Backbone | input | ' + ' | '.join(h for h, _ in columns)
                  + ' | GFLOPs | GMACs | FPS | Throughput (im/s) | Acc. |',
                  '|' + ' --- |' * (len(columns) + 8)]
        for (backbone, input_size), group in groups.items():
            members = [r for r in group if r['method'] == method]
            if not members:
                continue
            plain = [r for r in group if r['method'] is None][:1]
            family, arch = _group_label(backbone)
            for row in plain + members:
                seed = seed_numbers(published_for(row))
                any_seed = any_seed or bool(seed)
                name = family if row['method'] is None else f'{family} + {title}'
                settings = [_column_value(key, row['full_spec'], row['grid']) for _, key in columns]
                acc = _cell(row.get('acc1'), seed.get('acc1'), 1)
                lines.append(f"| {name} | {arch} | {input_size} | " + ' | '.join(settings)
                             + f" | {_cell(row.get('gflops'), seed.get('gflops'))} | {fmt(row.get('gmacs'))}"
                             + f" | {_cell(row.get('fps'), seed.get('fps'), 1)}"
                             + f" | {_cell(row.get('throughput'), seed.get('throughput'), 1)} | {acc} |")
        lines.append('')
    lines += notes(rows, any_seed)
    return '\n'.join(lines) + '\n'


def notes(rows: List[dict], any_seed: bool) -> List[str]:
    """What the numbers are and how they were measured (the conditions of the first row)."""
    out = [f'GFLOPs: seed 003\'s counter (`counting` convention `{SEED_CONVENTION}`: one MAC is one, linear bias, '
           'norms, softmax, GELU, adds and dropout counted; "-" where this build has no such convention); GMACs: '
           'fvcore MACs (attention matmuls included). One image, batch 1.']
    if any_seed:
        out.append('In parentheses: the number published in seed 003\'s README (data/published.json).')
    if rows:
        c = rows[0]['conditions']
        out.append(f"FPS: img/s at batch 1; throughput: img/s at batch {c['batch_size']}; warm-up {c['warmup']} "
                   f"iterations, then {c['repeats']} x {c['iters']} timed iterations (median), "
                   f"{c['device_name']}, {c['dtype']}, {c['threads']} threads, torch {c['torch']}. "
                   f"Acc.: top-1 (%) on {c['data_set'] or 'no data set'} ({c['n_images']} images).")
    return out


# ------------------------------------------------------------------------------------------------------------- plots

def _curves(rows: List[dict], x_of, y_of) -> Tuple[Dict[str, List[Tuple[float, float]]], list]:
    """Points per (method, backbone) curve, and the plain points, for rows where x and y are known."""
    groups = {(r['backbone'], r['input_size']) for r in rows}
    curves: Dict[str, List[Tuple[float, float]]] = {}
    plains = []
    for row in rows:
        x, y = x_of(row), y_of(row)
        if x is None or y is None:
            continue
        suffix = f" ({row['backbone']} @{row['input_size']})" if len(groups) > 1 else ''
        if row['method'] is None:
            plains.append((f'plain{suffix}', x, y))
        else:
            table = METHOD_TABLES.get(row['method'], {})
            label = table.get('plot_label', table.get('title', row['method']))
            curves.setdefault(label + suffix, []).append((x, y))
    return curves, plains


def flops_of(row: dict) -> Optional[float]:
    return row['gflops'] if row.get('gflops') is not None else row.get('gmacs')


def plot_accuracy(rows: List[dict], path: str) -> bool:
    """Top-1 against GFLOPs, one curve per method, the plain model as a point; False when no row has a top-1."""
    curves, plains = _curves(rows, flops_of, lambda r: r.get('acc1'))
    if not curves and not plains:
        return False
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, points in curves.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker='o', label=label)
    for label, x, y in plains:
        ax.plot([x], [y], marker='*', markersize=14, linestyle='none', color='black', label=label)
    unit = 'GFLOPs (seed 003 counter)' if all(r.get('gflops') is not None for r in rows) else 'GMACs'
    ax.set_xlabel(unit)
    ax.set_ylabel('top-1 (%)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def speed_points(rows: List[dict]) -> List[dict]:
    """Per reduced row: FLOPs ratio (plain / reduced) and speed-up (reduced throughput / plain throughput)."""
    plain = {(r['backbone'], r['input_size']): r for r in rows if r['method'] is None}
    out = []
    for row in rows:
        base = plain.get((row['backbone'], row['input_size']))
        if row['method'] is None or base is None or not flops_of(row) or not row.get('throughput') \
                or not base.get('throughput'):
            continue
        out.append(dict(row=row, flops_ratio=flops_of(base) / flops_of(row),
                        speedup=row['throughput'] / base['throughput']))
    return out


def plot_speedup(rows: List[dict], path: str) -> bool:
    """Speed-up (throughput) against FLOPs reduction (plain / reduced), one curve per method, with y = x."""
    points = {id(p['row']): p for p in speed_points(rows)}
    if not points:
        return False
    curves, _ = _curves([r for r in rows if id(r) in points], lambda r: points[id(r)]['flops_ratio'],
                        lambda r: points[id(r)]['speedup'])
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, pts in curves.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker='o', label=label)
    values = [v for p in points.values() for v in (p['flops_ratio'], p['speedup'])]
    low, high = min(values + [1.0]) * 0.95, max(values + [1.0]) * 1.05
    ax.plot([low, high], [low, high], color='gray', linestyle='--', label='y = x')
    ax.set_xlabel('FLOPs ratio (plain / reduced)')
    ax.set_ylabel(f"speed-up (throughput, batch {rows[0]['conditions']['batch_size']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
