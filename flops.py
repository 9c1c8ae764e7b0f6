"""Parameters and GMACs of a config's model, beside the published numbers.

    python flops.py --config config/hvt-s-1.json [--input-size 384] [--token-reduction '<json>'] [--detail]
                    [--json | --csv] [--convention C]
    python flops.py --all [--source PAPER] [--json | --csv] [--convention C] [--jobs 2]

GMACs are multiply-accumulates of one image (batch 1, eval mode) at the evaluation resolution, attention matmuls
included, counted by ``framework/counting.py`` under a named convention (``counting.CONVENTIONS``); the ``expedit``
convention is Expedit-SWAG's counter and its count is labelled "GFLOPs", as that paper's tables do. The model is built
as training builds it (``builders``). Published numbers come from ``data/published.json``: a config with a published row
at its token-reduction setting is counted in that row's convention unless ``--convention`` says otherwise, any other
in ``fvcore``. ``--all`` counts every config of ``--config-dir`` and every published row naming a setting no config
has.
"""
import argparse
import csv
import io
import json
import os
import sys
from dataclasses import dataclass
from decimal import Decimal
from typing import List, Optional, Sequence

import torch

import datasets
from framework import builders, counting, options, published
from framework.counting import UncountedOpError
import models
from models.token_reduction import record_states, token_schedule
from utils import ArgumentParser, UserError

REPO = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Job:
    """One thing to count: a config file, or a published row without one (model + setting), plus flag overrides."""
    config_path: Optional[str]
    argv: Sequence[str] = ()
    num_classes: Optional[int] = None
    label: Optional[str] = None


def config_name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def twin_name(model_name: str, suffix: str) -> str:
    """The twin a convention counts (``pit-paper``: ``<name>_distilled``; a distilled model is its own twin)."""
    if model_name.endswith(suffix):
        return model_name
    twin = f'{model_name}{suffix}'
    if twin not in models.list_models():
        raise UserError(f"this convention counts the '{suffix}' twin of a model, and '{model_name}' has none "
                        f"('{twin}' is not a registered model); use --convention fvcore or ptflops")
    return twin


@dataclass(frozen=True)
class ImageSource:
    """Images for data-dependent methods (ATS, ACT): ``num_images`` seeded random images, or the first
    ``num_images`` image files under ``data_path`` (sorted, any depth) with the model's evaluation transform."""
    num_images: int = 4
    data_path: Optional[str] = None


IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.ppm', '.tif', '.tiff')


def load_images(source: ImageSource, args) -> List[torch.Tensor]:
    """(1, 3, S, S) tensors: seeded N(0, 1) images, or files read and transformed as evaluation does."""
    if source.data_path is None:
        return [counting.example_input(args.input_size, seed=seed) for seed in range(source.num_images)]
    files = sorted(os.path.join(root, name) for root, _, names in os.walk(source.data_path) for name in names
                   if name.lower().endswith(IMAGE_SUFFIXES))[:source.num_images]
    if not files:
        raise UserError(f"--data-path '{source.data_path}' holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    from PIL import Image
    transform = datasets.build_transform(False, args)
    images = []
    for path in files:
        try:
            with Image.open(path) as image:
                images.append(transform(image.convert('RGB')).unsqueeze(0))
        except OSError as e:
            raise UserError(f"cannot read image '{path}': {e}") from None
    return images


def count_over_images(model, args, convention: str, source: ImageSource):
    """MACs of a data-dependent method as the mean over images (one trace each), with what it did per block.

    Returns (mean MACs rounded to an integer, a dict: number of images, their source, MACs per image, and the mean
    over images of the per-block counts the method records — tokens for ATS, query clusters for ACT)."""
    per_image, per_block, what = [], [], None
    for image in load_images(source, args):
        with record_states() as states:
            per_image.append(int(counting.analyze(model, args.input_size, convention, image=image).total()))
        counts = states[-1].counts() if states else None
        if counts:
            what = counts['what']
            per_block.append(counts['per_block'])
    mean_counts = [None if any(c[i] is None for c in per_block) else round(sum(c[i] for c in per_block)
                   / len(per_block), 2) for i in range(len(per_block[0]))] if per_block else []
    info = dict(num_images=len(per_image), source=source.data_path or 'seeded random N(0, 1) images',
                macs_per_image=per_image, counted=what, mean_per_block=mean_counts)
    return round(sum(per_image) / len(per_image)), info


def report(job: Job, table: List[published.Published], convention: Optional[str] = None,
           with_detail: bool = False, image_source: ImageSource = ImageSource()) -> dict:
    """Count one job: params (total, trainable), MACs under ``convention`` (default: the published row's, else
    fvcore) and the comparison with the published row when the resolution and class count are the published ones."""
    args = builders.load_args(job.config_path, job.argv)
    model = builders.build_model(args, job.num_classes).eval()
    name = config_name(job.config_path) if job.config_path else None
    spec = args.token_reduction
    pub = published.find(table, name, args.model, spec)
    convention = convention or (pub.convention if pub else 'fvcore')
    rule = counting.CONVENTIONS[convention]
    counted_name = twin_name(args.model, rule.twin_suffix) if rule.twin_suffix else args.model
    counted = model if counted_name == args.model else \
        builders.build_model(args, job.num_classes, model_name=counted_name).eval()
    details, images = None, None
    method = getattr(counted, 'token_reduction', None)
    if method is not None and method.data_dependent:
        macs, images = count_over_images(counted, args, convention, image_source)
    elif with_detail:
        details = counting.detail(counted, args.input_size, convention)
        macs = details.pop('total')
        if method is not None:
            details['schedule'] = token_schedule(counted)
    else:
        macs = counting.count_macs(counted, args.input_size, convention)[0]
    total, trainable = counting.count_params(model)
    num_classes = getattr(model, 'num_classes', None)
    config_path = job.config_path
    if config_path and os.path.isabs(config_path):
        config_path = os.path.relpath(config_path, REPO)
    row = dict(config=name, config_path=config_path, model=args.model, token_reduction=spec,
               counted_model=counted_name, input_size=args.input_size, num_classes=num_classes, batch=1,
               params=total, trainable_params=trainable, params_m=round(total / 1e6, 3), macs=macs,
               gmacs=round(macs / 1e9, 4), unit=rule.unit, convention=convention,
               convention_description=rule.description)
    if job.label:
        row['label'] = job.label
    if images is not None:
        row['images'] = images
    comparable = pub is not None and args.input_size == pub.resolution and num_classes == pub.num_classes
    row.update(published_gmacs=float(pub.gmacs) if comparable else None,
               published_params_m=float(pub.params_m) if comparable and pub.params_m else None,
               published_source=pub.citation if pub else None, published_convention=pub.convention if pub else None,
               published_note=pub.note if pub else None)
    gdiff, gmatch = published.compare(Decimal(macs) / Decimal(10) ** 9, pub.gmacs if comparable else None)
    pdiff, pmatch = published.compare(Decimal(total) / Decimal(10) ** 6, pub.params_m if comparable else None)
    row.update(gmacs_diff=gdiff, params_m_diff=pdiff, gmacs_match=gmatch, params_match=pmatch)
    if pub is not None and not comparable:
        row['published_note'] = (f'not compared: published at {pub.resolution} px and {pub.num_classes} classes, '
                                 f'counted at {args.input_size} px and {num_classes} classes')
    if details is not None:
        row['detail'] = details
    return row


def _setting(config_path: str) -> str:
    """A config's token-reduction setting as canonical JSON ('null' when absent; a broken config reports its own
    error when it is counted)."""
    try:
        return json.dumps(options.load_json_config(config_path).get('token_reduction'), sort_keys=True)
    except UserError:
        return 'null'


def all_jobs(config_dir: str, table: List[published.Published], argv: Sequence[str],
             token_reduction_given: bool, sources: Sequence[str] = ()) -> List[Job]:
    """Every config of ``config_dir``, then every published row whose setting no config has (a config at another
    token-reduction setting, or a model). With ``--token-reduction`` given, the configs only, at that setting.
    ``sources`` (e.g. ``['expedit-swag']``) keeps the rows of those papers and the configs that have no published
    row."""
    if sources:
        published_configs = {row.config for row in table if row.config}
        table = [row for row in table if row.source in sources]
        kept = {row.config for row in table if row.config}
        paths = [p for p in builders.config_files(config_dir)
                 if config_name(p) in kept or config_name(p) not in published_configs]
    else:
        paths = builders.config_files(config_dir)
    jobs = [Job(p, tuple(argv)) for p in paths]
    if token_reduction_given:
        return jobs
    counted = {(config_name(p), _setting(p)) for p in paths}
    by_name = {config_name(p): p for p in paths}
    for row in table:
        setting = json.dumps(row.token_reduction, sort_keys=True)
        row_argv = (*argv, '--token-reduction', setting)
        if row.config is None:
            size = () if '--input-size' in argv else ('--input-size', str(row.resolution))
            jobs.append(Job(None, ('--model', row.model, *size, *row_argv), row.num_classes, row.label))
        elif row.config in by_name and (row.config, setting) not in counted:
            jobs.append(Job(by_name[row.config], row_argv, label=f'{row.config} {setting}'))
    return jobs


def _report_or_error(job: Job, table, convention, with_detail, image_source=ImageSource()) -> dict:
    try:
        return report(job, table, convention, with_detail, image_source)
    except (UserError, UncountedOpError) as e:
        row = dict(config=config_name(job.config_path) if job.config_path else None, config_path=job.config_path,
                   error=str(e), error_kind='uncounted_op' if isinstance(e, UncountedOpError) else 'user')
        if job.label:
            row['label'] = job.label
        return row


def _worker_init() -> None:
    torch.set_num_threads(1)


def report_all(jobs: List[Job], table, convention: Optional[str] = None, with_detail: bool = False,
               processes: int = 1, image_source: ImageSource = ImageSource()) -> List[dict]:
    """One :func:`report` per job, in order; a row that cannot be counted carries ``error`` instead of numbers.
    ``processes > 1`` counts in that many processes of one thread each."""
    if processes <= 1 or len(jobs) <= 1:
        return [_report_or_error(job, table, convention, with_detail, image_source) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(max_workers=min(processes, len(jobs)), mp_context=multiprocessing.get_context('spawn'),
                             initializer=_worker_init) as pool:
        futures = [pool.submit(_report_or_error, job, table, convention, with_detail, image_source) for job in jobs]
        return [f.result() for f in futures]


# ---------------------------------------------------------------------------------------------------------- formatting

CSV_FIELDS = ['config', 'model', 'counted_model', 'input_size', 'num_classes', 'params', 'trainable_params', 'macs',
              'gmacs', 'convention', 'published_gmacs', 'gmacs_diff', 'gmacs_match', 'published_params_m',
              'params_m_diff', 'params_match', 'published_source', 'error']


def _name(row: dict) -> str:
    return row.get('label') or row['config']


def _printed(row: dict, table) -> Optional[published.Published]:
    """The published row a result was compared with (for its numbers as printed)."""
    if row.get('published_gmacs') is None:
        return None
    return published.find(table, row['config'], row['model'], row['token_reduction'])


def to_csv(rows: List[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, extrasaction='ignore', lineterminator='\n')
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ('' if row.get(k) is None else row.get(k)) for k in CSV_FIELDS})
    return out.getvalue()


def to_json(rows: List[dict], single: bool) -> str:
    """The rows as JSON; fvcore's formatted module table of ``--detail`` stays out (it is for the text output)."""
    rows = [{**r, 'detail': {k: v for k, v in r['detail'].items() if k != 'table'}} if 'detail' in r else r
            for r in rows]
    return json.dumps(rows[0] if single else rows, indent=1)


def _fmt_match(match: Optional[bool]) -> str:
    return '' if match is None else ('yes' if match else 'NO')


def _fmt_diff(diff: Optional[float]) -> str:
    return '' if diff is None else f'{diff:+.3f}'


def format_table(rows: List[dict], table) -> str:
    """One line per row; the count column is headed by the conventions' unit (GMACs, or GFLOPs for ``expedit``
    alone, "G" when the two are mixed: each row's convention is in its own column)."""
    units = sorted({r['unit'] for r in rows if 'unit' in r}) or ['GMACs']
    unit = units[0] if len(units) == 1 else 'G'
    head = ['config', 'model', 'convention', 'input', 'params', 'M', 'pub M', 'diff', 'ok', unit, 'pub G', 'diff',
            'ok']
    lines = []
    for r in rows:
        if 'error' in r:
            lines.append([_name(r), 'error: ' + r['error']])
            continue
        pub = _printed(r, table)
        model = r['model'] if r['counted_model'] == r['model'] else f"{r['model']} ({r['counted_model']})"
        lines.append([_name(r), model, r['convention'], str(r['input_size']), f"{r['params']:,}",
                      f"{r['params'] / 1e6:.3f}", pub.params_m if pub and pub.params_m else '',
                      _fmt_diff(r['params_m_diff']), _fmt_match(r['params_match']), f"{r['gmacs']:.4f}",
                      pub.gmacs if pub else '', _fmt_diff(r['gmacs_diff']), _fmt_match(r['gmacs_match'])])
    widths = [max(len(head[i]), *(len(l[i]) for l in lines if len(l) == len(head))) for i in range(len(head))]
    text = ['  '.join(h.ljust(w) if i < 3 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    for l in lines:
        if len(l) != len(head):
            text.append(f'{l[0].ljust(widths[0])}  {l[1]}')
        else:
            text.append('  '.join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(l, widths))))
    notes = sorted({f"{_name(r)}: {r['published_note']}" for r in rows if r.get('published_note')})
    text.append(f'{unit}: the count of one image in the row\'s convention (GMACs: multiply-accumulates, 1 fused '
                'multiply-add = 1, attention matmuls included; GFLOPs: Expedit-SWAG\'s count, the expedit convention); '
                'M = params in millions; "ok" = equal to the published number at its printed precision.')
    text += [f'conventions: {name}: {rule.description}' for name, rule in counting.CONVENTIONS.items()
             if any(r.get('convention') == name for r in rows)]
    text += [f'note {n}' for n in notes]
    return '\n'.join(text)


def format_report(row: dict, table) -> str:
    lines = [f"config        {row['config_path'] or row.get('label')}",
             f"model         {row['model']}" + (f"  (counted as {row['counted_model']})"
                                                if row['counted_model'] != row['model'] else ''),
             f"input size    3x{row['input_size']}x{row['input_size']}, batch 1, {row['num_classes']} classes",
             f"parameters    {row['params']:,} total ({row['params'] / 1e6:.2f} M), "
             f"{row['trainable_params']:,} trainable",
             f"{row['unit']:<14}{row['gmacs']:.4f} per image ({row['macs']:,} counted in the {row['convention']} "
             f"convention)",
             f"convention    {row['convention']}: {row['convention_description']}"]
    if row['token_reduction'] is not None:
        lines.insert(2, f"reduction     {json.dumps(row['token_reduction'])}")
    pub = _printed(row, table)
    if pub is not None:
        params_part = (f", {pub.params_m} M (diff {row['params_m_diff']:+.3f}, "
                       f"{'reproduced' if row['params_match'] else 'NOT reproduced'})") if pub.params_m else ''
        lines.append(f"published     {pub.gmacs} {row['unit']} (diff {row['gmacs_diff']:+.4f}, "
                     f"{'reproduced' if row['gmacs_match'] else 'NOT reproduced'}){params_part}")
        lines.append(f"source        {pub.citation}")
    if row.get('published_note'):
        lines.append(f"note          {row['published_note']}")
    if row.get('images'):
        info = row['images']
        lines.append(f"data-dependent: {row['unit']} are the mean over {info['num_images']} images "
                     f"({info['source']}); per image: {', '.join(f'{m / 1e9:.2f}' for m in info['macs_per_image'])}")
        if info['mean_per_block']:
            lines.append(f"mean {info['counted']} per block: "
                         + ', '.join('-' if c is None else f'{c:g}' for c in info['mean_per_block']))
    if 'detail' in row:
        lines.append(format_detail(row['detail'], row['unit']))
    return '\n'.join(lines)


def format_detail(d: dict, unit: str = 'GMACs') -> str:
    """The ``--detail`` breakdown; ``unit`` names the count (GMACs, or GFLOPs in the expedit convention)."""
    g = lambda v: f'{v / 1e9:.4f}'  # noqa: E731
    attn = f'attn {unit}'
    lines = []
    if d.get('schedule'):
        schedule = d['schedule']
        lines += ['', f"token schedule (class token included; {schedule['tokens_in']} in, {schedule['tokens_out']} "
                      f"out{', upper bounds: data-dependent' if schedule['data_dependent'] else ''}):",
                  '  block  attention  mlp']
        lines += [f"  {b['block']:>5}  {b['attention']:>9}  {b['mlp']:>3}" for b in schedule['blocks']]
    lines += ['', "by module (fvcore's flop_count_table; #flops are this convention's count):", d['table']]
    lines += [f'by operator ({unit}):'] + [f'  {name:<30} {g(v):>9}' for name, v in sorted(d['operators'].items())]
    lines += ['by stage (consecutive blocks with the same input tokens and width):',
              f"  {'stage':>5} {'blocks':>6} {'tokens in':>9} {'width':>6} {unit:>9} {attn:>10}"]
    lines += [f"  {s['stage']:>5} {len(s['blocks']):>6} {s['tokens_in']!s:>9} {s['dim_in']!s:>6} {g(s['macs']):>9} "
              f"{g(s['attn_macs']):>10}" for s in d['stages']]
    lines += ['by block:', f"  {'block':<26} {'type':<16} {'tokens in':>9} {'width':>6} {'tokens out':>10} "
                           f"{unit:>9} {attn:>10}"]
    lines += [f"  {b['name']:<26} {b['type']:<16} {b['tokens_in']!s:>9} {b['dim_in']!s:>6} {b['tokens_out']!s:>10} "
              f"{g(b['macs']):>9} {g(b['attn_macs']):>10}" for b in d['blocks']]
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------------------------- CLI

def get_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description='Parameters and GMACs (GFLOPs in the expedit convention) of a config, or of '
                                   'every config beside the published numbers.')
    what = p.add_mutually_exclusive_group()
    what.add_argument('--config', help='JSON config (model, input_size, data_set ...)')
    what.add_argument('--all', action='store_true', help='every config in --config-dir, beside the published numbers')
    p.add_argument('--config-dir', '--config_dir', default=builders.CONFIG_DIR,
                   help='where --all looks (default: config/)')
    p.add_argument('--input-size', '--input_size', type=int, default=None, help='override the config resolution')
    p.add_argument('--token-reduction', '--token_reduction', type=options.parse_token_reduction,
                   default=argparse.SUPPRESS, help="override the config's token reduction: a JSON object, or null")
    p.add_argument('--convention', default=None,
                   help=f"{' | '.join(counting.CONVENTIONS)}; default: the published row's, else fvcore")
    p.add_argument('--published', default=published.DATA_FILE, help='published numbers (default: data/published.json)')
    p.add_argument('--source', action='append', default=[], metavar='PAPER',
                   help="--all: only the published rows of this paper (hvt, pit (PiT and DeiT), hivit, expedit-swag "
                        "(token reduction on SWAG ViTs); repeatable) and the configs without a published row")
    p.add_argument('--jobs', type=int, default=1, help='--all: count in this many processes')
    p.add_argument('--num-images', '--num_images', type=int, default=4,
                   help='data-dependent methods (ATS, ACT): count the mean over this many images (default 4)')
    p.add_argument('--data-path', '--data_path', default=None,
                   help='data-dependent methods: read the images from this folder (any depth) instead of seeded '
                        'random ones, with the model\'s evaluation transform')
    p.add_argument('--detail', action='store_true', help='per module, operator, stage and block (token counts)')
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument('--json', action='store_true', help='JSON: one object (--config) or a list (--all)')
    fmt.add_argument('--csv', action='store_true', help='CSV with a header row')
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = None
    try:
        args = get_parser().parse_args(argv)
        if args.convention is not None and args.convention not in counting.CONVENTIONS:
            raise UserError(f"unknown convention '{args.convention}'; use one of {', '.join(counting.CONVENTIONS)}")
        if not args.all and not args.config:
            raise UserError('give --config PATH or --all')
        if args.input_size is not None and args.input_size < 1:
            raise UserError(f'--input-size must be positive, got {args.input_size}')
        if args.num_images < 1:
            raise UserError(f'--num-images must be >= 1, got {args.num_images}')
        if args.data_path is not None and not os.path.isdir(args.data_path):
            raise UserError(f"--data-path '{args.data_path}' is not a folder")
        image_source = ImageSource(args.num_images, args.data_path)
        try:
            table = published.load(args.published)
        except ValueError as e:
            raise UserError(str(e)) from None
        known_sources = sorted({row.source for row in table})
        for source in args.source:
            if source not in known_sources:
                raise UserError(f"--source '{source}' has no published rows; use one of {', '.join(known_sources)}")
        overrides = [] if args.input_size is None else ['--input-size', str(args.input_size)]
        given = 'token_reduction' in vars(args)
        if given:
            overrides += ['--token-reduction', json.dumps(args.token_reduction)]
        if args.all:
            jobs = all_jobs(args.config_dir, table, overrides, given, args.source)
            rows = report_all(jobs, table, args.convention, args.detail, args.jobs, image_source)
        else:
            rows = [report(Job(args.config, tuple(overrides)), table, args.convention, args.detail, image_source)]
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except UncountedOpError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not options.is_out_of_memory(e):
            raise
        print(f"error: {options.out_of_memory_message(e, 1, getattr(args, 'token_reduction', 'unknown'))}",
              file=sys.stderr)
        return 2
    if args.json:
        print(to_json(rows, single=not args.all))
    elif args.csv:
        sys.stdout.write(to_csv(rows))
    elif args.all:
        print(format_table(rows, table))
        for row in rows:
            if 'detail' in row:
                print(f"\n== {_name(row)}" + format_detail(row['detail'], row['unit']))
    else:
        print(format_report(rows[0], table))
    errors = [r for r in rows if 'error' in r]
    for r in errors:
        print(f"error: {_name(r) or r['config_path']}: {r['error']}", file=sys.stderr)
    if any(r.get('error_kind') == 'uncounted_op' for r in errors):
        return 1
    return 2 if errors else 0


if __name__ == '__main__':
    sys.exit(main())
