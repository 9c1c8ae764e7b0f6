"""Expedit-SWAG's token-reduction study (Liang et al., NeurIPS 2022) as data: the sweep (which settings), the rows
measured (``results.jsonl``), the tables (``table.md``) and the two plots. ``study.py`` runs it; this module knows
nothing of argparse.

A sweep is a list of entries ``{'name': str, 'spec': dict or None}`` (None = the plain model). A sweep file is a JSON
list whose items are specs or ``{"name": ..., "spec": ...}`` objects. How a method's rows are shown is one entry of
:data:`METHOD_TABLES`: its paper's name, the spec parameters always shown, and the parameter its plot lines sweep.
Any other parameter that varies within a method's rows gets a column too.
"""
import datetime
import json
import os
from decimal import ROUND_HALF_UP, Decimal
from typing import Dict, List, Optional, Sequence, Tuple

from framework import published
import utils
from utils import UserError

EXPEDIT_SWAG_ROWS = 'expedit-swag'   # the source key of Expedit-SWAG's rows in data/published.json
RESULTS_FILE = 'results.jsonl'
TABLE_FILE = 'table.md'
ACCURACY_PLOT = 'top1_vs_gflops.png'
SPEEDUP_PLOT = 'speedup_vs_flops_ratio.png'
# the GFLOPs counter of Expedit-SWAG's tables (docs/token_reduction.md); 'fvcore' gives plain MACs
STUDY_CONVENTION = 'expedit'

# per method: the paper's name, the spec parameters always shown (in this order), the parameter a plot line sweeps
METHOD_TABLES: Dict[str, dict] = {
    'hourglass': dict(title='Hourglass (Expedit-SWAG)', columns=['location', 'num_clusters'], swept='num_clusters'),
    'evit': dict(title='EViT', columns=['keep_rate'], swept='keep_rate'),
    'tome': dict(title='ToMe', columns=['r'], swept='r'),
    'act': dict(title='ACT', columns=['q_hashes'], swept='q_hashes'),
    'ats': dict(title='ATS', columns=['locations', 'num_tokens'], swept='locations'),
    'evo_vit': dict(title='Evo-ViT', columns=['location', 'keep_ratio'], swept='keep_ratio'),
    'smyrf': dict(title='SMYRF', columns=['location', 'n_hashes', 'q_cluster_size', 'k_cluster_size'],
                  swept='q_cluster_size'),
}
# the backbone labels of Expedit-SWAG's tables (Method column "SWAG + EViT", Backbone column "ViT-L/16")
BACKBONE_LABELS = {'swag_vit_l16': ('SWAG', 'ViT-L/16'), 'swag_vit_h14': ('SWAG', 'ViT-H/14')}


def method_title(method: Optional[str]) -> str:
    """The paper's name of a method ('plain' for None)."""
    if method is None:
        return 'plain'
    return METHOD_TABLES.get(method, {}).get('title', method)


# ------------------------------------------------------------------------------------------------------------ sweeps

def setting_text(spec: Optional[dict]) -> str:
    """``'r=4'``, ``'location=2, num_clusters=16'``; ``''`` for None."""
    if spec is None:
        return ''
    return ', '.join(f'{k}={json.dumps(v)}' for k, v in spec.items() if k != 'method')


def entry_name(spec: Optional[dict]) -> str:
    """``'plain'``, ``'tome r=4'``: the name of a sweep entry that was given none."""
    return 'plain' if spec is None else f"{spec['method']} {setting_text(spec)}"


def normalize_sweep(items, source: str) -> List[dict]:
    """A sweep file's list -> entries ``{'name', 'spec', 'named'}`` (``named``: the file gave the name); a malformed
    item is a :class:`UserError` naming it."""
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
        named = isinstance(name, str) and bool(name)
        entries.append(dict(name=name if named else entry_name(spec), spec=spec, named=named))
    return entries


def load_sweep_file(path: str) -> List[dict]:
    try:
        with open(path, encoding='utf-8') as f:
            items = json.load(f)
    except OSError as e:
        raise UserError(f"sweep file '{path}' cannot be read: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"sweep file '{path}' is not valid JSON: {e}") from None
    except RecursionError:
        raise UserError(f"sweep file '{path}' nests its JSON too deeply to read; give a list of specs") from None
    return normalize_sweep(items, f"sweep file '{path}'")


def published_rows(rows: Sequence[published.Published], model: str, resolution: int) -> List[published.Published]:
    """The rows Expedit-SWAG published for ``model`` at ``resolution``, in file order."""
    return [r for r in rows if r.source == EXPEDIT_SWAG_ROWS and r.model == model and r.resolution == resolution]


def published_sweep(rows: Sequence[published.Published], model: str, resolution: int) -> List[dict]:
    """Expedit-SWAG's published settings of a backbone (plain first, each setting once)."""
    entries, seen = [dict(name='plain', spec=None, named=False)], {'null'}
    for row in published_rows(rows, model, resolution):
        key = json.dumps(row.token_reduction, sort_keys=True)
        if key not in seen:
            seen.add(key)
            entries.append(dict(name=entry_name(row.token_reduction), spec=row.token_reduction, named=False))
    return entries


def with_plain_first(entries: List[dict]) -> List[dict]:
    """The sweep with the plain model as its first entry (added when missing: every table and ratio needs it)."""
    plain = [e for e in entries if e['spec'] is None][:1] or [dict(name='plain', spec=None, named=False)]
    return plain + [e for e in entries if e['spec'] is not None]


def drop_repeats(entries: List[dict], full_specs: List[Optional[dict]]) -> Tuple[List[dict], List[Optional[dict]]]:
    """Each full spec (defaults filled in) once, at its first place in the sweep."""
    seen, kept_entries, kept_specs = set(), [], []
    for entry, full in zip(entries, full_specs):
        key = json.dumps(full, sort_keys=True)
        if key not in seen:
            seen.add(key)
            kept_entries.append(entry)
            kept_specs.append(full)
    return kept_entries, kept_specs


# ----------------------------------------------------------------------------------------------------------- results

def row_key(measured_on: dict, full_spec: Optional[dict], finetune: Optional[dict]) -> str:
    """What identifies a row for resuming: what it was measured on (backbone, checkpoint identity, data set and
    path, counting convention, input size), the full spec (defaults filled in) and the fine-tuning settings."""
    return json.dumps(dict(measured_on=measured_on, spec=full_spec, finetune=finetune), sort_keys=True)


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
    """:func:`utils.check_output_dir` (creates nothing), and an existing ``results.jsonl`` there must be writable."""
    utils.check_output_dir(path)
    results = os.path.join(path, RESULTS_FILE)
    if os.path.exists(results) and not os.access(results, os.W_OK):
        raise UserError(f"'{results}' is not writable; give another --output-dir")


def create_output_dir(path: str) -> None:
    """Create the output folder and its ``results.jsonl`` (after every check passed)."""
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
    """Half-up rounding as Expedit-SWAG prints: one decimal, three below 10 (small models' GFLOPs stay readable)."""
    if value is None:
        return '-'
    if digits is None:
        digits = 1 if abs(value) >= 10 else 3
    return str(Decimal(repr(float(value))).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def value_text(value) -> str:
    if value is None:
        return '-'
    if isinstance(value, list):
        return ', '.join(str(v) for v in value)
    return json.dumps(value) if isinstance(value, bool) else str(value)


def method_columns(method: str, specs: Sequence[dict]) -> List[str]:
    """The spec parameters shown for a method: its usual ones, then every other parameter that varies among its
    rows (so that no two rows look alike)."""
    keys = list(METHOD_TABLES.get(method, {}).get('columns', []))
    seen = []
    for spec in specs:
        seen += [k for k in spec if k != 'method' and k not in seen]
    if method not in METHOD_TABLES:
        return seen
    for key in seen:
        if key not in keys and len({json.dumps(s.get(key), sort_keys=True) for s in specs}) > 1:
            keys.append(key)
    return keys


def published_numbers(row: Optional[published.Published]) -> dict:
    """The printed numbers of a published row: GFLOPs, and FPS, throughput and top-1 where the data file has them."""
    if row is None:
        return {}
    return dict(gflops=row.gmacs, fps=getattr(row, 'fps', None), throughput=getattr(row, 'throughput', None),
                acc1=getattr(row, 'acc1', None))


def _cell(ours, theirs, digits: Optional[int] = None) -> str:
    text = fmt(ours, digits)
    return f'{text} ({theirs})' if theirs is not None else text


def _group_label(backbone: str) -> Tuple[str, str]:
    return BACKBONE_LABELS.get(backbone, ('ViT', backbone))


def has_finetuning(rows: Sequence[dict]) -> bool:
    return any(r.get('finetune') for r in rows)


def render_table(rows: List[dict], published_for) -> str:
    """``table.md``: one section per method (Expedit-SWAG's order, then any other), each with the plain row and the
    method's rows per backbone and input size; a column per spec parameter shown (:func:`method_columns`), the row's
    name when the sweep gave one, and the fine-tuned top-1 when the study fine-tuned. ``published_for(row)`` gives
    the published row for one of our rows, or None."""
    groups: Dict[Tuple[str, int], List[dict]] = {}
    for row in rows:
        groups.setdefault((row['backbone'], row['input_size']), []).append(row)
    methods = [m for m in METHOD_TABLES if any(r['method'] == m for r in rows)]
    methods += sorted({r['method'] for r in rows if r['method'] and r['method'] not in METHOD_TABLES})
    finetuned = has_finetuning(rows)
    any_published = False
    lines = ['# Token-reduction study', '']
    for method in methods:
        title = method_title(method)
        members_all = [r for r in rows if r['method'] == method]
        columns = method_columns(method, [r['full_spec'] for r in members_all])
        named = any(r.get('named') for r in members_all)
        header = ['Method', 'Backbone', 'input'] + (['name'] if named else []) + columns \
            + ['GFLOPs', 'GMACs', 'FPS', 'Throughput (im/s)', 'Top-1 (%)']
        if finetuned:
            header += ['Top-1 fine-tuned (%)']
        lines += [f'### {title}', '', '| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
        for (backbone, input_size), group in groups.items():
            members = [r for r in group if r['method'] == method]
            if not members:
                continue
            plain = [r for r in group if r['method'] is None][:1]
            family, arch = _group_label(backbone)
            for row in plain + members:
                theirs = published_numbers(published_for(row))
                any_published = any_published or bool(theirs)
                cells = [family if row['method'] is None else f'{family} + {title}', arch, str(input_size)]
                if named:
                    cells.append(row['name'] if row.get('named') else '-')
                cells += [value_text((row['full_spec'] or {}).get(key)) for key in columns]
                cells += [_cell(row.get('gflops'), theirs.get('gflops')), fmt(row.get('gmacs')),
                          _cell(row.get('fps'), theirs.get('fps'), 1),
                          _cell(row.get('throughput'), theirs.get('throughput'), 1),
                          _cell(row.get('acc1'), theirs.get('acc1'), 1)]
                if finetuned:
                    cells.append(fmt((row.get('finetune') or {}).get('acc1'), 1))
                lines.append('| ' + ' | '.join(cells) + ' |')
        lines.append('')
    lines += notes(rows, any_published)
    return '\n'.join(lines) + '\n'


def notes(rows: List[dict], any_published: bool) -> List[str]:
    """What the numbers are and how they were measured (the conditions of the first row)."""
    out = [f'GFLOPs: the counter of Expedit-SWAG\'s tables (`counting` convention `{STUDY_CONVENTION}`: one MAC is '
           'one, linear bias, norms, softmax, GELU, adds and dropout counted; "-" where this build has no such '
           'convention); GMACs: fvcore MACs (attention matmuls included). One image, batch 1.']
    if any_published:
        out.append('In parentheses: the number published in Expedit-SWAG\'s README (data/published.json).')
    if rows:
        c = rows[0]['conditions']
        out.append(f"FPS: img/s at batch 1; throughput: img/s at batch {c['batch_size']}; warm-up {c['warmup']} "
                   f"iterations, then {c['repeats']} x {c['iters']} timed iterations (median), "
                   f"{c['device_name']}, {c['dtype']}, {c['threads']} thread{'s' if c['threads'] != 1 else ''}, "
                   f"torch {c['torch']}. "
                   f"Top-1: without retraining, on {c['data_set'] or 'no data set'} ({c['n_images']} images).")
    tuned = [r['finetune'] for r in rows if r.get('finetune')]
    if tuned:
        f = tuned[0]
        out.append(f"Top-1 fine-tuned: after {f['epochs']} epochs of fine-tuning with the row's token reduction "
                   f"(the config's recipe, lr {f['lr']:g}, no warm-up) from the study's checkpoint.")
    return out


# ------------------------------------------------------------------------------------------------------------- plots

def _sort_value(value):
    return value if isinstance(value, list) else [value]


def plot_lines(rows: List[dict], x_of, y_of) -> List[Tuple[str, List[Tuple[float, float]]]]:
    """(label, points) per line: one line per method, backbone and value of the parameters other than the swept one
    (METHOD_TABLES' ``swept``, else the first that varies), points in the order of the swept parameter's value. The
    lines are made from every row with an x (the labels do not depend on ``y_of``); points without a y are left
    out."""
    groups = {(r['backbone'], r['input_size']) for r in rows}
    by_method: Dict[Tuple[str, str, int], List[dict]] = {}
    for row in rows:
        if row['method'] is not None and x_of(row) is not None:
            by_method.setdefault((row['method'], row['backbone'], row['input_size']), []).append(row)
    lines = []
    for (method, backbone, input_size), members in by_method.items():
        specs = [r['full_spec'] for r in members]
        varying = [k for k in method_columns(method, specs)
                   if len({json.dumps(s.get(k), sort_keys=True) for s in specs}) > 1]
        swept = METHOD_TABLES.get(method, {}).get('swept')
        if swept not in varying:
            swept = varying[0] if varying else swept
        tied = [k for k in varying if k != swept and _tied(specs, swept, k)]
        others = [k for k in varying if k != swept and k not in tied]
        suffix = f' ({backbone} @{input_size})' if len(groups) > 1 else ''
        split: Dict[str, List[dict]] = {}
        for row in members:
            fixed = ', '.join(f"{k}={value_text(row['full_spec'].get(k))}" for k in others)
            split.setdefault(fixed, []).append(row)
        for fixed, line_rows in split.items():
            line_rows.sort(key=lambda r: _sort_value(r['full_spec'].get(swept)))
            label = f"{method_title(method)}: {', '.join([swept] + tied)}" + (f' ({fixed})' if fixed else '') + suffix
            points = [(x_of(r), y_of(r)) for r in line_rows if y_of(r) is not None]
            if points:
                lines.append((label, points))
    return lines


def _tied(specs: Sequence[dict], a: str, b: str) -> bool:
    """Whether parameters ``a`` and ``b`` change together (each value of one goes with one value of the other), as
    SMYRF's q_cluster_size and k_cluster_size do: such a pair is swept as one."""
    pairs = {(json.dumps(s.get(a), sort_keys=True), json.dumps(s.get(b), sort_keys=True)) for s in specs}
    return len(pairs) == len({p[0] for p in pairs}) == len({p[1] for p in pairs})


def plain_points(rows: List[dict], x_of, y_of) -> List[Tuple[str, float, float]]:
    groups = {(r['backbone'], r['input_size']) for r in rows}
    out = []
    for row in rows:
        if row['method'] is None and x_of(row) is not None and y_of(row) is not None:
            suffix = f" ({row['backbone']} @{row['input_size']})" if len(groups) > 1 else ''
            out.append((f'plain{suffix}', x_of(row), y_of(row)))
    return out


def flops_of(row: dict) -> Optional[float]:
    return row['gflops'] if row.get('gflops') is not None else row.get('gmacs')


def flops_label(rows: List[dict]) -> str:
    if all(r.get('gflops') is not None for r in rows):
        return f'GFLOPs ({STUDY_CONVENTION} counter)'
    return 'GMACs (fvcore)'


def plot_title(rows: List[dict]) -> str:
    """Backbone, input size, data set and device/conditions of the study, e.g. ``deit_tiny @32 px, DIGITS (360
    images), CPU, 2 threads``."""
    c = rows[0]['conditions']
    backbones = ', '.join(sorted({f"{r['backbone']} @{r['input_size']} px" for r in rows}))
    data = f"{c['data_set']} ({c['n_images']} images)" if c.get('data_set') else 'no data set'
    threads = f"{c['threads']} thread" + ('s' if c['threads'] != 1 else '')
    return f"{backbones}, {data}\n{c['device_name']}, {c['dtype']}, {threads}"


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def line_colors(plt, labels: List[str]) -> Dict[str, tuple]:
    """One color per line label (tab20: up to 20 lines without a repeat)."""
    cmap = plt.get_cmap('tab20')
    return {label: cmap(i % 20) for i, label in enumerate(labels)}


def plot_accuracy(rows: List[dict], path: str) -> bool:
    """Top-1 against GFLOPs: one line per method and swept parameter (solid: fine-tuned, dashed: without retraining,
    when the study fine-tuned), the plain model as a star; False when no row has a top-1."""
    before = plot_lines(rows, flops_of, lambda r: r.get('acc1'))
    plains = plain_points(rows, flops_of, lambda r: r.get('acc1'))
    if not before and not plains:
        return False
    after = plot_lines(rows, flops_of, lambda r: (r.get('finetune') or {}).get('acc1'))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.0, 5.6))
    colors = line_colors(plt, [label for label, _ in before])
    tuned = {label for label, _ in after}
    for label, points in after:
        ax.plot([p[0] for p in points], [p[1] for p in points], marker='o', color=colors[label],
                label=f'{label}, fine-tuned')
    for label, points in before:
        ax.plot([p[0] for p in points], [p[1] for p in points], marker='o',
                markerfacecolor='none' if label in tuned else None, linestyle='--' if label in tuned else '-',
                color=colors[label], label=f'{label}, without retraining' if label in tuned else label)
    for label, x, y in plains:
        ax.plot([x], [y], marker='*', markersize=14, linestyle='none', color='black', label=label)
    ax.set_xlabel(flops_label(rows))
    ax.set_ylabel('top-1 (%)')
    return _finish_plot(plt, fig, ax, rows, path)


def _finish_plot(plt, fig, ax, rows: List[dict], path: str) -> bool:
    """Title (backbone, size, data set, device), grid, legend beside the axes; save and close."""
    ax.set_title(plot_title(rows), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc='center left', bbox_to_anchor=(1.01, 0.5))
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
    """Speed-up (throughput) against FLOPs reduction (plain / reduced), one line per method and swept parameter,
    with y = x."""
    points = {id(p['row']): p for p in speed_points(rows)}
    if not points:
        return False
    lines = plot_lines([r for r in rows if id(r) in points], lambda r: points[id(r)]['flops_ratio'],
                       lambda r: points[id(r)]['speedup'])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.0, 5.6))
    colors = line_colors(plt, [label for label, _ in lines])
    for label, pts in lines:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker='o', color=colors[label], label=label)
    values = [v for p in points.values() for v in (p['flops_ratio'], p['speedup'])]
    low, high = min(values + [1.0]) * 0.95, max(values + [1.0]) * 1.05
    ax.plot([low, high], [low, high], color='gray', linestyle='--', label='y = x')
    ax.set_xlabel(f'{flops_label(rows)} ratio (plain / reduced)')
    ax.set_ylabel(f"speed-up (throughput, batch {rows[0]['conditions']['batch_size']})")
    return _finish_plot(plt, fig, ax, rows, path)
