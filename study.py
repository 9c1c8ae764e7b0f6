"""Seed 003's token-reduction study for one backbone: GFLOPs (seed's counter) and GMACs, FPS at batch 1, throughput at
a large batch, and top-1/top-5 when a validation set is given, for every method and setting; tables and plots.

    python study.py                                                # embedded demo: plain ViT on DIGITS, every method
    python study.py --config config/swag-vit-l16.json --checkpoint vit_l16_in1k.torch \\
        --data-set IMNET --data-path /imagenet --output-dir outputs/study-l16      # the seed's rows of the backbone
    torchrun --nproc_per_node=8 study.py --config C --sweep my_sweep.json --data-set IMNET --data-path /imagenet

Writes ``D/results.jsonl`` (one JSON object per row, appended as each row finishes; the same command started again
skips the rows already there), ``D/table.md`` (the seed's layout, the seed's numbers beside ours where
``data/published.json`` has them) and two plots (``D/top1_vs_gflops.png``, ``D/speedup_vs_flops_ratio.png``).

The sweep: ``--sweep FILE`` (a JSON list of token-reduction specs or {"name", "spec"} objects; null = plain), else for
``swag_vit_l16`` / ``swag_vit_h14`` at their resolution the seed's published settings, else (no ``--config``) the
demo's ``data/study-digits-sweep.json``. Accuracy is measured as ``main.py --eval`` measures it (every validation image
once, whatever the number of processes) when the config or the command line names a data set; timing and counting
run on the first process only. Any other flag (``--input-size``, ``--data-path``, ``--device`` ...) is a ``main.py``
option applied to the config.
"""
import os
import sys
import time
from types import SimpleNamespace
from typing import List, Optional

import torch

from engine import LoopOptions, evaluate
from framework import study_results as rs
from framework import builders, counting, options, published, timing
from framework.demo import DEMO_CONFIG, DEMO_SWEEP, ensure_backbone
import models
from models.token_reduction import METHODS, resolve_method
from models.token_reduction.core import build_method
import utils
from utils import ArgumentParser, UserError



def get_parser() -> ArgumentParser:
    p = ArgumentParser(description="Seed 003's token-reduction study of one backbone (see the module docstring).")
    p.add_argument('--config', default=None, help='backbone config (default: the DIGITS demo, trained if needed)')
    p.add_argument('--sweep', default=None, help='JSON list of specs (default: the seed\'s rows / the demo sweep)')
    p.add_argument('--checkpoint', '--resume', default=None, help='weights of the backbone (ours, SWAG, torchvision'
                                                                  ', timm); default random, or the demo\'s own')
    p.add_argument('--output-dir', '--output_dir', default=None, help='default: the config\'s output_dir, else '
                                                                      'outputs/study-<model>')
    p.add_argument('--batch-size', '--batch_size', type=int, default=None,
                   help='throughput batch (default 256 on CUDA, 32 on CPU); FPS is at batch 1')
    p.add_argument('--warmup', type=int, default=12, help='untimed iterations (seed: 12 of 50 runs)')
    p.add_argument('--iters', type=int, default=38, help='timed iterations per run (seed: 38)')
    p.add_argument('--repeats', type=int, default=1, help='timed runs; the median is reported')
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads')
    p.add_argument('--published', default=published.DATA_FILE, help='published numbers file (seed 003 rows)')
    return p


# ------------------------------------------------------------------------------------------------------------ setup

def resolve(argv: Optional[List[str]]):
    """(study flags, resolved main.py options, whether this is the embedded demo)."""
    study, rest = get_parser().parse_known_args(argv)
    demo = study.config is None
    config = DEMO_CONFIG if demo else study.config
    args = builders.load_args(config, rest)
    for note in options.adapt_to_machine(args):
        print(f'note: {note}')
    if study.output_dir is None:
        study.output_dir = args.output_dir or os.path.join('outputs', f'study-{args.model}')
    for name in ('warmup', 'iters', 'repeats'):
        if getattr(study, name) < (0 if name == 'warmup' else 1):
            raise UserError(f"--{name} must be >= {0 if name == 'warmup' else 1}")
    if study.batch_size is not None and study.batch_size < 1:
        raise UserError('--batch-size must be >= 1')
    if study.threads is not None:
        if study.threads < 1:
            raise UserError('--threads must be >= 1')
        torch.set_num_threads(study.threads)
    return study, args, demo


def load_sweep(study, args, demo: bool, rows: List[published.Published]) -> List[dict]:
    """The sweep entries, plain first. The demo sweep drops methods this build does not have (said so); a user's
    sweep file with an unknown method is an error."""
    if study.sweep:
        entries = rs.load_sweep_file(study.sweep)
        for entry in entries:
            if entry['spec'] is not None and entry['spec']['method'] not in METHODS:
                raise UserError(f"sweep file '{study.sweep}': unknown method '{entry['spec']['method']}' in "
                                f"'{entry['name']}'; methods: {', '.join(sorted(METHODS))}")
    elif demo:
        entries = rs.load_sweep_file(DEMO_SWEEP)
        missing = sorted({e['spec']['method'] for e in entries if e['spec'] and e['spec']['method'] not in METHODS})
        if missing:
            print(f"note: this build has no {', '.join(missing)}; their demo rows are skipped")
        entries = [e for e in entries if e['spec'] is None or e['spec']['method'] in METHODS]
    elif args.model in rs.BACKBONE_LABELS:
        entries = rs.seed_sweep(rows, args.model, args.input_size)
        if len(entries) == 1:
            raise UserError(f"{study.published} has no seed-003 rows for {args.model} at {args.input_size} px; give "
                            f"--sweep FILE (a JSON list of token-reduction specs)")
    else:
        raise UserError(f'give --sweep FILE (a JSON list of token-reduction specs) for {args.model}; only the SWAG '
                        f'backbones have the seed\'s settings built in')
    return rs.with_plain_first(entries)


def check_specs(model, entries: List[dict], source: str) -> List[Optional[dict]]:
    """Every spec checked against the model before anything runs; the full specs (defaults filled in)."""
    full = []
    for entry in entries:
        try:
            method = resolve_method(model, entry['spec'])
        except ValueError as e:
            raise UserError(f"{source}, '{entry['name']}': {e}") from None
        full.append(None if method is None else method.spec())
    return full


def load_weights(model, path: str, model_name: str) -> None:
    try:
        models.load_pretrained(model, path, drop_mismatched_head=False, strict=True, log=None)
    except models.CheckpointError as e:
        raise UserError(f'--checkpoint {path} does not fit {model_name}: {str(e).splitlines()[0]}') from None


# ------------------------------------------------------------------------------------------------------------- demo

# -------------------------------------------------------------------------------------------------------- measuring

def count_gflops(model, input_size: int, convention: str) -> Optional[float]:
    """GFLOPs (or GMACs) of one image under a counting convention; None when this build lacks the convention."""
    if convention not in counting.CONVENTIONS:
        return None
    try:
        return counting.count_macs(model, input_size, convention)[0] / 1e9
    except counting.UncountedOpError as e:
        print(f'note: {e}')
        return None


def time_model(model, device: torch.device, input_size: int, num_classes: int, batch_size: int, study) -> dict:
    """Median img/s at ``batch_size`` with the shared timing protocol (warm-up, timed runs, device sync)."""
    settings = timing.TimingOptions(mode='infer', batch_size=batch_size, warmup=study.warmup, iters=study.iters,
                                    repeats=study.repeats)
    runner = timing.Runner('model', model, settings, device, num_classes, input_size, count_macs=False)
    return timing.measure([runner], settings)[0]


def measure_row(model, entry: dict, full_spec, ctx) -> dict:
    """One row: FLOPs in both conventions, FPS, throughput (first process) and top-1/top-5 (all processes)."""
    models.apply_token_reduction(model, entry['spec'])
    acc = dict(acc1=None, acc5=None, loss=None, n_samples=0)
    if ctx.loader_val is not None:
        acc = evaluate(ctx.loader_val, model, LoopOptions(ctx.device, print_freq=10 ** 6))
    row = dict(key=rs.row_key(ctx.args.model, full_spec, ctx.args.input_size), backbone=ctx.args.model,
               input_size=ctx.args.input_size, name=entry['name'], spec=entry['spec'], full_spec=full_spec,
               method=full_spec['method'] if full_spec else None, grid=list(model.patch_embed.grid_size),
               depth=len(model.blocks))
    if not utils.is_main_process():
        return row
    model.eval()
    schedule = models.token_schedule(model)
    fps = time_model(model, ctx.device, ctx.args.input_size, ctx.num_classes, 1, ctx.study)
    throughput = time_model(model, ctx.device, ctx.args.input_size, ctx.num_classes, ctx.batch_size, ctx.study)
    row.update(gflops=count_gflops(model, ctx.args.input_size, rs.SEED_CONVENTION),
               gflops_convention=rs.SEED_CONVENTION,
               gmacs=count_gflops(model, ctx.args.input_size, 'fvcore'), params=counting.count_params(model)[0],
               tokens_out=schedule['tokens_out'], data_dependent=schedule['data_dependent'],
               fps=fps['img_per_s']['median'], throughput=throughput['img_per_s']['median'],
               acc1=acc['acc1'], acc5=acc['acc5'], checkpoint=ctx.checkpoint,
               conditions=dict(device=str(ctx.device), device_name=timing.device_name(ctx.device), dtype='float32',
                               fps_batch_size=1, batch_size=ctx.batch_size, threads=torch.get_num_threads(),
                               warmup=ctx.study.warmup, iters=ctx.study.iters, repeats=ctx.study.repeats,
                               torch=torch.__version__, input_size=ctx.args.input_size,
                               data_set=ctx.args.data_set if ctx.loader_val is not None else None,
                               n_images=acc['n_samples'], world_size=ctx.world_size, date=rs.now()))
    return row


# ------------------------------------------------------------------------------------------------------------- run

def published_lookup(rows: List[published.Published]):
    """row -> the seed's published row for it (same backbone, resolution and full spec), or None."""
    def find(row: dict):
        for pub in rs.seed_rows(rows, row['backbone'], row['input_size']):
            spec = pub.token_reduction
            if spec is not None:
                try:
                    spec = build_method(spec, row['depth'], tuple(row['grid'])).spec()
                except ValueError:
                    continue
            if spec == row['full_spec']:
                return pub
        return None
    return find


def write_outputs(output_dir: str, rows: List[published.Published]) -> None:
    results = rs.read_results(os.path.join(output_dir, rs.RESULTS_FILE))
    results = [r for r in results if 'conditions' in r]
    if not results:
        return
    table = rs.render_table(results, published_lookup(rows))
    path = os.path.join(output_dir, rs.TABLE_FILE)
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
        f.write(table)
    os.replace(path + '.tmp', path)
    written = [path]
    for plot, fn in ((rs.ACCURACY_PLOT, rs.plot_accuracy), (rs.SPEEDUP_PLOT, rs.plot_speedup)):
        if fn(results, os.path.join(output_dir, plot)):
            written.append(os.path.join(output_dir, plot))
    print(f"wrote {', '.join(written)}")


def run(argv: Optional[List[str]]) -> int:
    study, args, demo = resolve(argv)
    dist = utils.init_distributed_mode(args.device, args.dist_url, args.dist_timeout, args.local_rank)
    device = torch.device(dist.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f'--device {args.device} given but CUDA is not available; use --device cpu')
    try:
        pub_rows = published.load(study.published)
    except ValueError as e:
        raise UserError(str(e)) from None
    entries = load_sweep(study, args, demo, pub_rows)
    if utils.is_main_process():
        rs.check_output_dir(study.output_dir)

    evaluate_data = demo or 'data_set' in args.given or 'data_path' in args.given
    loader_val, num_classes = None, None
    if evaluate_data:
        _, dataset_val, num_classes = builders.build_datasets(args, with_train=False)
        loader_val = builders.build_val_loader(dataset_val, args, dist)
    model = builders.build_model(args, num_classes, plain=True)
    num_classes = model.num_classes
    full_specs = check_specs(model, entries, f"sweep file '{study.sweep}'" if study.sweep else 'sweep')

    checkpoint = study.checkpoint
    if demo and checkpoint is None:
        checkpoint = ensure_backbone(args, device, dist.distributed)
    if checkpoint:
        load_weights(model, checkpoint, args.model)
    else:
        print('note: no --checkpoint: the backbone has random weights (accuracy is chance level)')
    model.to(device).eval()

    results_path = os.path.join(study.output_dir, rs.RESULTS_FILE)
    done = {r['key'] for r in rs.read_results(results_path)}
    todo = [(e, s) for e, s in zip(entries, full_specs)
            if rs.row_key(args.model, s, args.input_size) not in done]
    if len(todo) < len(entries):
        print(f'resuming: {len(entries) - len(todo)} of {len(entries)} rows already in {results_path}')
    batch_size = study.batch_size or (256 if device.type == 'cuda' else 32)
    ctx = SimpleNamespace(args=args, study=study, device=device, loader_val=loader_val, num_classes=num_classes,
                          batch_size=batch_size, checkpoint=checkpoint, world_size=dist.world_size)
    start = time.time()
    for i, (entry, full_spec) in enumerate(todo):
        row = measure_row(model, entry, full_spec, ctx)
        if utils.is_main_process():
            rs.append_result(row, results_path)
            method = row['method'] or 'plain'
            acc = '' if row['acc1'] is None else f", top-1 {row['acc1']:.2f}"
            gflops = row['gflops'] if row['gflops'] is not None else row['gmacs']
            print(f"[{i + 1}/{len(todo)}] {method} {rs.setting_text(entry['spec'])}: {gflops:.4g} G, "
                  f"{row['fps']:.1f} FPS, {row['throughput']:.1f} im/s{acc}; elapsed {time.time() - start:.0f} s, "
                  f"{len(todo) - i - 1} rows left", flush=True)
    if utils.is_main_process():
        write_outputs(study.output_dir, pub_rows)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    try:
        return run(argv)
    except UserError as e:
        if utils.is_main_process():
            print(f'error: {e}', file=sys.stderr, flush=True)
        return 2
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not options.is_out_of_memory(e):
            raise
        batch_size = getattr(get_parser().parse_known_args(argv)[0], 'batch_size', None) or 'default'
        print(f'error: {options.out_of_memory_message(e, batch_size)}', file=sys.stderr)
        return 2
    finally:
        utils.cleanup_distributed()


if __name__ == '__main__':
    sys.exit(main())
