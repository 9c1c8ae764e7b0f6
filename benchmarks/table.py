"""Markdown tables, and a GMACs-vs-img/s plot, from benchmark.py --json outputs.

    python benchmarks/table.py benchmarks/results/cpu/*.json [--plot speed.png]
    python benchmarks/table.py benchmarks/results/train_speed_cpu/train_speed.jsonl

A file holding one object (a --vs run) gives a row of the comparison table, or of the token-reduction table when it
compares a reduced model with its plain self (``--vs plain``: speed-up, MAC ratio, speed-up as a fraction of it); a
``.jsonl`` file holds such objects one a line; a file holding a list (--all) gives the per-config table. Conditions
(device, threads, batch, amp, versions) are printed above each table. ``--plot`` draws every measured model of the
files: its GMACs (recorded by benchmark.py) against its median img/s.
"""
import argparse
import json
import os
import sys
from typing import List


def _rate(stats: dict) -> str:
    return f"{stats['img_per_s']['median']:.1f} ({stats['img_per_s']['min']:.1f}-{stats['img_per_s']['max']:.1f})"


def _clean(stats: dict) -> str:
    c = stats.get('clean')
    if not c:
        return 'n/a'
    rate = f"{c['img_per_s_median']:.1f}" if c['img_per_s_median'] else '-'
    return f"{rate} ({c['iters_kept']}/{c['iters_total']})"


def _conditions(r: dict) -> str:
    return (f"{r['mode']}, {r['device_name']}, {r['threads']} threads, batch {r['batch_size']}, "
            f"{r['input_size']} px, fp32 + amp {r['amp']}, channels_last {r['channels_last']}, compile "
            f"{r['compile']}, warm-up {r['warmup']}, {r['repeats']} runs x {r['iters']} iters, torch {r['torch']}, "
            f"timm {r['timm']}")


def vs_table(rows) -> str:
    lines = [f'Conditions: {_conditions(rows[0])}', '',
             '| ours | reference | ours img/s median (min-max) | reference img/s | ratio ours/ref (median of runs) '
             '| clean ours img/s (kept/total) | clean ref img/s | clean ratio |',
             '|---|---|---|---|---|---|---|---|']
    for r in rows:
        v = r['vs']
        clean_ratio = f"{v['clean_ratio']:.3f}" if v.get('clean_ratio') else '-'
        lines.append(f"| {r['config']} ({r['model']}) | {v['name']} | {_rate(r)} | {_rate(v)} | {v['ratio']:.3f} "
                     f"| {_clean(r)} | {_clean(v)} | {clean_ratio} |")
    return '\n'.join(lines)


def _percent(value) -> str:
    return f'{value:.0%}' if value is not None else '-'


def _times(value) -> str:
    return f'{value:.2f}x' if value is not None else '-'


def reduction_table(rows) -> str:
    """One row per token-reduction setting measured against the plain model (benchmark.py --vs plain)."""
    train = rows[0]['mode'] == 'train'
    macs = 'MAC ratio (forward + backward = 3 x forward)' if train else 'MAC ratio'
    lines = [f'Conditions: {_conditions(rows[0])}', '',
             f'| method | setting | reduced img/s median (min-max) | plain img/s | speed-up (median of runs) | {macs} '
             f'| speed-up / MAC ratio | clean speed-up | speed-up per CPU second | its / MAC ratio |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        v = r['vs']
        spec = dict(r['token_reduction'])
        method = spec.pop('method')
        setting = ', '.join(f'{k} {json.dumps(value)}' for k, value in spec.items())
        lines.append(f"| {method} | {setting} | {_rate(r)} | {_rate(v)} | {v['ratio']:.2f}x | "
                     f"{_times(v.get('mac_ratio'))} | {_percent(v.get('fraction_of_mac_ratio'))} | "
                     f"{_times(v.get('clean_ratio'))} | {_times(v.get('cpu_time_ratio'))} | "
                     f"{_percent(v.get('cpu_time_fraction_of_mac_ratio'))} |")
    return '\n'.join(lines)


def all_table(rows) -> str:
    ok = [r for r in rows if 'error' not in r]
    cpu = bool(ok) and ok[0].get('peak_memory_kind', '').startswith('cpu')
    memory = 'process peak RSS so far, MiB' if cpu else 'peak memory MiB'
    lines = [f'Conditions: {_conditions(ok[0])}' if ok else '', '',
             f'| config | model | params | img/s median (min-max) | clean img/s (kept/total) | {memory} |',
             '|---|---|---|---|---|---|']
    for r in rows:
        if 'error' in r:
            lines.append(f"| {r['config']} | error: {r['error']} | | | | |")
            continue
        lines.append(f"| {r['config']} | {r['model']} | {r['params'] / 1e6:.2f} M | {_rate(r)} | {_clean(r)} | "
                     f"{r.get('peak_memory_mb', '')} |")
    return '\n'.join(lines)


def _family(config: str) -> str:
    name = config.split('-')[0]
    return 'hvt' if name == 'scale' else name


def plot(results: List[dict], path: str) -> None:
    """GMACs (fvcore convention, of the model measured, as benchmark.py records it) against median img/s, log-log,
    one labelled point per model, one colour per family. Results without GMACs (errors, uncountable models) are
    left out."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 6))
    colours = {}
    shown = [r for r in results if 'error' not in r and r.get('gmacs')]
    for i, r in enumerate(shown):
        rate = r['img_per_s']['median']
        family = _family(r['config'])
        first = family not in colours
        colour = colours.setdefault(family, f'C{len(colours)}')
        ax.scatter(r['gmacs'], rate, color=colour, label=family if first else None)
        label = r['config'] + (f" ({r['input_size']} px)" if r['input_size'] != 224 else '')
        ax.annotate(label, (r['gmacs'], rate), textcoords='offset points', xytext=(4, 4 if i % 2 else -10),
                    fontsize=7, color=colour)
    if shown:
        r = shown[0]
        ax.set_title(f"{r['mode']}, {r['device_name'][:40]}, batch {r['batch_size']}, fp32 + amp {r['amp']}, "
                     f"threads {r['threads']}, torch {r.get('torch', '?')}", fontsize=8)
        ax.legend(fontsize=8)
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('GMACs per image (fvcore convention, model as measured)')
    ax.set_ylabel('img/s (median of runs)')
    ax.grid(True, which='both', alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read(path: str):
    """The records of a benchmark.py --json output: an object, a list, or (``.jsonl``) one object a line."""
    with open(path) as f:
        if path.endswith('.jsonl'):
            return [json.loads(line) for line in f if line.strip()], False
        data = json.load(f)
    return (data, True) if isinstance(data, list) else ([data], False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description='Markdown tables (and a plot) from benchmark.py --json files.')
    parser.add_argument('paths', nargs='+', help='benchmark.py --json outputs')
    parser.add_argument('--plot', default=None, help='PNG: GMACs against img/s of every model measured')
    args = parser.parse_args(argv)
    folder = os.path.dirname(os.path.abspath(args.plot)) if args.plot else ''
    if args.plot and not os.path.isdir(folder):
        print(f"error: --plot {args.plot}: folder '{folder}' does not exist", file=sys.stderr)
        return 2
    single, lists = [], []
    for path in args.paths:
        try:
            records, is_list = read(path)
        except (OSError, json.JSONDecodeError) as e:
            print(f'error: cannot read {path}: {e}', file=sys.stderr)
            return 2
        (lists if is_list else single).extend(records)
    reduced = [r for r in single if r['vs']['name'] == 'plain' and r.get('token_reduction')]
    others = [r for r in single if r not in reduced]
    if reduced:
        print(reduction_table(reduced))
    if others:
        print(vs_table(others))
    if lists:
        print()
        print(all_table(lists))
    if args.plot:
        plot(lists or single, args.plot)
        print(f'plot written to {args.plot}', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
