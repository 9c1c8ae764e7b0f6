"""Markdown tables from benchmark.py --json outputs.

    python benchmarks/table.py benchmarks/results/cpu/*.json

A file holding one object (a --vs run) gives a row of the comparison table; a file holding a list (--all) gives the
per-config table. Conditions (device, threads, batch, amp, versions) are printed above each table.
"""
import json
import sys


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


def main(paths) -> int:
    single, lists = [], []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        (lists.extend(data) if isinstance(data, list) else single.append(data))
    if single:
        print(vs_table(single))
    if lists:
        print()
        print(all_table(lists))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
