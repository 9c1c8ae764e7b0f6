"""Expedit-SWAG's token-reduction study (Liang et al., NeurIPS 2022) for one backbone: GFLOPs (the ``expedit``
counter) and GMACs, FPS at batch 1, throughput at a large batch, and top-1/top-5 when a validation set is given, for
every method and setting; optionally each reduced setting fine-tuned; tables and plots.

    python study.py                                                # embedded demo: plain ViT on DIGITS, every method
    python study.py --finetune-epochs 2                            # ... and every reduced row fine-tuned 2 epochs
    python study.py --config config/swag-vit-l16.json --checkpoint vit_l16_in1k.torch \\
        --data-set IMNET --data-path /imagenet --output-dir outputs/study-l16      # Expedit-SWAG's published rows
    torchrun --nproc_per_node=8 study.py --config C --sweep my_sweep.json --data-set IMNET --data-path /imagenet

Writes ``D/results.jsonl`` (one JSON object per row, appended as each row finishes; the same command started again
skips the rows already measured on the same checkpoint, data, input size and fine-tuning settings, and sets the
others aside), ``D/table.md`` (one section per method, the published numbers beside ours where
``data/published.json`` has them) and two plots (``D/top1_vs_gflops.png``, ``D/speedup_vs_flops_ratio.png``).
Fine-tuning (``--finetune-epochs N``) writes one folder per row under ``D/finetune/`` (epoch checkpoint, log); a
killed study resumes inside a row from its last finished epoch.

The sweep: ``--sweep FILE`` (a JSON list of token-reduction specs or {"name", "spec"} objects; null = plain), else for
``swag_vit_l16`` / ``swag_vit_h14`` at their resolution Expedit-SWAG's published settings, else (no ``--config``) the
demo's ``data/study-digits-sweep.json``. Accuracy is measured as ``main.py --eval`` measures it (every validation image
once, whatever the number of processes) when the config or the command line names a data set; timing and counting
run on the first process only. Any other flag (``--input-size``, ``--data-path``, ``--device`` ...) is a ``main.py``
option applied to the config. See docs/token_reduction.md.
"""
import contextlib
import copy
import hashlib
import math
import os
import re
import sys
import time
from types import SimpleNamespace
from typing import List, Optional

import torch
from timm.utils import random_seed

import engine
from engine import LoopOptions, evaluate, resolve_amp, train_one_epoch
from framework import study_results as rs
from framework import builders, counting, options, published, timing
from framework.demo import DEMO_BACKBONE_DIR, DEMO_CONFIG, DEMO_SWEEP, ensure_backbone
import models
from models.token_reduction import METHODS, resolve_method
from models.token_reduction.core import build_method
import utils
from utils import ArgumentParser, UserError

FINETUNE_DIR = 'finetune'
FINETUNE_CHECKPOINT = 'checkpoint.pth'   # {'model', 'optimizer', 'lr_scheduler', 'epoch', 'key', ...}, every epoch
LOG_FILE = 'study.log'


def get_parser() -> ArgumentParser:
    p = ArgumentParser(description="Expedit-SWAG's token-reduction study of one backbone (see the module "
                                   "docstring).")
    p.add_argument('--config', default=None, help='backbone config (default: the DIGITS demo, trained if needed)')
    p.add_argument('--sweep', default=None, help='JSON list of specs (default: Expedit-SWAG\'s published settings '
                                                 '/ the demo sweep)')
    p.add_argument('--checkpoint', '--resume', default=None, help='weights of the backbone (ours, SWAG, torchvision'
                                                                  ', timm); default random, or the demo\'s own')
    p.add_argument('--output-dir', '--output_dir', default=None, help='default: outputs/study-digits for the demo, '
                                                                      'else outputs/study-<model>')
    p.add_argument('--backbone-dir', default=DEMO_BACKBONE_DIR, help='demo only: where the demo backbone is trained '
                                                                     '(and found)')
    p.add_argument('--batch-size', '--batch_size', type=int, default=None,
                   help='throughput batch (default 256 on CUDA, 32 on CPU); FPS is at batch 1')
    p.add_argument('--warmup', type=int, default=12, help='untimed iterations (Expedit-SWAG: 12 of 50 runs)')
    p.add_argument('--iters', type=int, default=38, help='timed iterations per run (Expedit-SWAG: 38)')
    p.add_argument('--repeats', type=int, default=1, help='timed runs; the median is reported')
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads')
    p.add_argument('--finetune-epochs', type=int, default=0,
                   help='fine-tune every reduced row this many epochs from the checkpoint (the config\'s recipe, '
                        'no warm-up) and measure top-1 again; 0 = no fine-tuning')
    p.add_argument('--finetune-lr', type=float, default=None, help='fine-tuning lr (default: the config\'s lr / 10; '
                                                                   'scaled with the batch as --lr is)')
    p.add_argument('--verbose', action='store_true', help='print the training and evaluation loops\' progress '
                                                          'lines instead of writing them to log files')
    p.add_argument('--published', default=published.DATA_FILE, help='published numbers file')
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
        study.output_dir = os.path.join('outputs', 'study-digits' if demo else f'study-{args.model}')
    for name in ('warmup', 'iters', 'repeats'):
        if getattr(study, name) < (0 if name == 'warmup' else 1):
            raise UserError(f"--{name} must be >= {0 if name == 'warmup' else 1}")
    if study.batch_size is not None and study.batch_size < 1:
        raise UserError('--batch-size must be >= 1')
    if study.finetune_epochs < 0:
        raise UserError('--finetune-epochs must be >= 0')
    if study.finetune_lr is None:
        study.finetune_lr = args.lr / 10
    elif not study.finetune_lr > 0:
        raise UserError('--finetune-lr must be > 0')
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
        entries = rs.published_sweep(rows, args.model, args.input_size)
        if len(entries) == 1:
            raise UserError(f"{study.published} has no Expedit-SWAG rows for {args.model} at {args.input_size} px; "
                            f"give --sweep FILE (a JSON list of token-reduction specs)")
    else:
        raise UserError(f'give --sweep FILE (a JSON list of token-reduction specs) for {args.model}; only the SWAG '
                        f'backbones have Expedit-SWAG\'s settings built in')
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
    if not os.path.isfile(path):
        raise UserError(f'--checkpoint {path}: not found')
    try:
        models.load_pretrained(model, path, drop_mismatched_head=False, strict=True, log=None)
    except models.CheckpointError as e:
        raise UserError(f'--checkpoint {path} does not fit {model_name}: {str(e).splitlines()[0]}') from None


def checkpoint_identity(path: Optional[str]) -> Optional[dict]:
    """What tells a checkpoint file apart: its absolute path, size and modification time."""
    if not path:
        return None
    st = os.stat(path)
    return dict(path=os.path.abspath(path), size=st.st_size, mtime_ns=st.st_mtime_ns)


def measured_on(args, checkpoint: Optional[str], evaluates: bool) -> dict:
    """The part of a row's key that says what it was measured on."""
    return dict(backbone=args.model, checkpoint=checkpoint_identity(checkpoint),
                data_set=args.data_set if evaluates else None,
                data_path=os.path.abspath(args.data_path) if evaluates and args.data_path else None,
                convention=rs.STUDY_CONVENTION, input_size=args.input_size)


def finetune_settings(study, full_spec: Optional[dict]) -> Optional[dict]:
    """The fine-tuning settings of a row (None: the plain row, or no fine-tuning)."""
    if full_spec is None or not study.finetune_epochs:
        return None
    return dict(epochs=study.finetune_epochs, lr=study.finetune_lr)


@contextlib.contextmanager
def progress_to(log_path: Optional[str], verbose: bool):
    """The loops' progress lines (epochs, ``* Acc@1``) appended to ``log_path`` unless ``verbose``."""
    if verbose or log_path is None:
        yield
        return
    with open(log_path, 'a', encoding='utf-8') as log, contextlib.redirect_stdout(log):
        yield


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


def row_label(entry: dict) -> str:
    """``row 'hg' (hourglass location=1, num_clusters=4)``: a row named with its setting."""
    return f"row '{entry['name']}'" + (f" ({rs.entry_name(entry['spec'])})" if entry['spec'] else '')


def evaluate_row(model, entry: dict, ctx) -> dict:
    """Top-1/top-5 over the validation set; a loss that is not finite is a one-line error naming the row."""
    try:
        with progress_to(ctx.log_path, ctx.study.verbose):
            stats = evaluate(ctx.loader_val, model, LoopOptions(ctx.device, print_freq=10 ** 6))
    except engine.NonFiniteLossError as e:
        raise UserError(f'{row_label(entry)}: {e}') from None
    if not math.isfinite(stats['loss']):
        raise UserError(f"{row_label(entry)}: the evaluation loss is {stats['loss']} (the weights or the setting "
                        f"give non-finite outputs)")
    return stats


def seed_row(seed: int, rank: int, epoch: Optional[int] = None) -> None:
    """Seed the random draws of one row (ACT and SMYRF hashes, ATS sampling, shuffling, drop path) so that a row
    measures the same whatever rows ran before it and whether or not it was resumed: evaluations from ``seed``,
    fine-tuning epoch ``e`` from ``seed + 1000 (e + 1)`` (main.py's rule when it re-seeds a resumed run)."""
    random_seed(seed if epoch is None else seed + 1000 * (epoch + 1), rank)


def row_folder(output_dir: str, entry: dict, key: str) -> str:
    """``D/finetune/<name>-<hash of the row key>``: one folder per row and setting."""
    slug = re.sub(r'[^A-Za-z0-9._=-]+', '-', entry['name']).strip('-')[:60]
    return os.path.join(output_dir, FINETUNE_DIR, f"{slug}-{hashlib.sha1(key.encode()).hexdigest()[:8]}")


def finetune_row(model, entry: dict, key: str, settings: dict, ctx) -> dict:
    """Fine-tune ``model`` (reduction applied) ``settings['epochs']`` epochs with the config's recipe (optimizer,
    schedule, loss; lr overridden, no warm-up); every epoch saved (model, optimizer, schedule, epoch) to the row's
    folder, and a checkpoint of the same row key found there is resumed. Returns the fine-tuning record."""
    args = copy.copy(ctx.args)
    args.lr, args.epochs, args.warmup_epochs = settings['lr'], settings['epochs'], 0
    folder = row_folder(ctx.study.output_dir, entry, key)
    path = os.path.join(folder, FINETUNE_CHECKPOINT)
    if utils.is_main_process():
        os.makedirs(folder, exist_ok=True)
    train_model = builders.wrap_for_training(model, args, ctx.dist)
    steps = builders.steps_per_epoch(ctx.loader_train, args)
    opt = builders.build_optimization(args, model, steps, ctx.dist.world_size, ctx.device, ctx.amp_dtype)
    criterion = builders.build_criterion(args, None, None)
    loop = LoopOptions(ctx.device, ctx.amp_dtype, print_freq=args.print_freq, max_steps=args.max_steps_per_epoch)
    start_epoch, seconds, images = 0, 0.0, 0.0
    if os.path.isfile(path):
        state = torch.load(path, map_location='cpu', weights_only=True)
        if state.get('key') == key:
            model.load_state_dict(state['model'])
            utils.load_optimizer_state(opt.optimizer, state['optimizer'])
            opt.lr_scheduler.load_state_dict(state['lr_scheduler'])
            start_epoch, seconds, images = state['epoch'] + 1, state['seconds'], state['images']
            print(f"  resuming the fine-tuning of '{entry['name']}' at epoch {start_epoch} of {args.epochs} "
                  f"from {path}", flush=True)
    num_updates = builders.resume_schedule(opt, args, start_epoch, steps)
    log_path = os.path.join(folder, 'finetune.log') if utils.is_main_process() else None
    with progress_to(log_path, ctx.study.verbose):
        for epoch in range(start_epoch, args.epochs):
            if hasattr(ctx.loader_train.sampler, 'set_epoch'):
                ctx.loader_train.sampler.set_epoch(epoch)
            seed_row(args.seed, ctx.dist.rank, epoch)
            stats, num_updates = train_one_epoch(train_model, criterion, ctx.loader_train, opt, loop, epoch,
                                                 num_updates)
            opt.lr_scheduler.step(epoch + 1)
            seconds += stats['epoch_time']
            images += stats['images_per_sec'] * stats['epoch_time']
            utils.save_on_master({'model': model.state_dict(), 'optimizer': opt.optimizer.state_dict(),
                                  'lr_scheduler': opt.lr_scheduler.state_dict(), 'epoch': epoch, 'key': key,
                                  'seconds': seconds, 'images': images, 'spec': entry['spec']}, path)
    model.eval()
    return dict(epochs=args.epochs, lr=settings['lr'], seconds=seconds, images_per_s=images / max(seconds, 1e-9),
                checkpoint=path)


def measure_row(base_model, entry: dict, full_spec, key: str, ctx) -> dict:
    """One row: FLOPs in both conventions, FPS, throughput (first process), top-1/top-5 (all processes) without
    retraining, and after fine-tuning when the study fine-tunes."""
    model = copy.deepcopy(base_model) if finetune_settings(ctx.study, full_spec) else base_model
    models.apply_token_reduction(model, entry['spec'])
    acc = dict(acc1=None, acc5=None, loss=None, n_samples=0)
    if ctx.loader_val is not None:
        seed_row(ctx.args.seed, ctx.dist.rank)
        acc = evaluate_row(model, entry, ctx)
    row = dict(key=key, backbone=ctx.args.model, input_size=ctx.args.input_size, name=entry['name'],
               named=entry.get('named', False), spec=entry['spec'], full_spec=full_spec,
               method=full_spec['method'] if full_spec else None, grid=list(model.patch_embed.grid_size),
               depth=len(model.blocks))
    if utils.is_main_process():
        model.eval()
        schedule = models.token_schedule(model)
        fps = time_model(model, ctx.device, ctx.args.input_size, ctx.num_classes, 1, ctx.study)
        throughput = time_model(model, ctx.device, ctx.args.input_size, ctx.num_classes, ctx.batch_size, ctx.study)
        row.update(gflops=count_gflops(model, ctx.args.input_size, rs.STUDY_CONVENTION),
                   gflops_convention=rs.STUDY_CONVENTION,
                   gmacs=count_gflops(model, ctx.args.input_size, 'fvcore'), params=counting.count_params(model)[0],
                   tokens_out=schedule['tokens_out'], data_dependent=schedule['data_dependent'],
                   fps=fps['img_per_s']['median'], throughput=throughput['img_per_s']['median'],
                   acc1=acc['acc1'], acc5=acc['acc5'], checkpoint=ctx.checkpoint,
                   conditions=dict(device=str(ctx.device), device_name=timing.device_name(ctx.device),
                                   dtype='float32', fps_batch_size=1, batch_size=ctx.batch_size,
                                   threads=torch.get_num_threads(), warmup=ctx.study.warmup, iters=ctx.study.iters,
                                   repeats=ctx.study.repeats, torch=torch.__version__,
                                   input_size=ctx.args.input_size,
                                   data_set=ctx.args.data_set if ctx.loader_val is not None else None,
                                   n_images=acc['n_samples'], world_size=ctx.world_size, date=rs.now()))
    settings = finetune_settings(ctx.study, full_spec)
    row['finetune'] = None
    if settings:
        try:
            record = finetune_row(model, entry, key, settings, ctx)
        except engine.NonFiniteLossError as e:
            raise UserError(f'fine-tuning {row_label(entry)}: {e}') from None
        seed_row(ctx.args.seed, ctx.dist.rank)
        tuned = evaluate_row(model, entry, ctx)
        row['finetune'] = dict(record, acc1=tuned['acc1'], acc5=tuned['acc5'])
    return row


# ------------------------------------------------------------------------------------------------------------- run

def published_lookup(rows: List[published.Published]):
    """row -> Expedit-SWAG's published row for it (same backbone, resolution and full spec), or None."""
    def find(row: dict):
        for pub in rs.published_rows(rows, row['backbone'], row['input_size']):
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


def write_outputs(output_dir: str, keys: List[str], rows: List[published.Published]) -> None:
    """table.md and the plots of the rows of this study (``keys``, in sweep order)."""
    by_key = {r['key']: r for r in rs.read_results(os.path.join(output_dir, rs.RESULTS_FILE)) if 'conditions' in r}
    results = [by_key[k] for k in keys if k in by_key]
    if not results:
        return
    table = rs.render_table(results, published_lookup(rows))
    path = os.path.join(output_dir, rs.TABLE_FILE)
    utils.write_text_atomic(table, path)
    written = [path]
    for plot, fn in ((rs.ACCURACY_PLOT, rs.plot_accuracy), (rs.SPEEDUP_PLOT, rs.plot_speedup)):
        if fn(results, os.path.join(output_dir, plot)):
            written.append(os.path.join(output_dir, plot))
    print(f"wrote {', '.join(written)}")


def progress_line(i: int, total: int, row: dict, elapsed: float) -> str:
    """``[2/9] ToMe r=2: 0.0123 GFLOPs, 812.0 FPS, 3100.0 im/s, top-1 95.10 (fine-tuned 97.20, 12 s); ...``"""
    what = rs.method_title(row['method'])
    setting = rs.setting_text(row['spec'])
    if setting:
        what += f' {setting}'
    if row.get('named'):
        what += f" ('{row['name']}')"
    flops = rs.flops_of(row)
    unit = 'GFLOPs' if row.get('gflops') is not None else 'GMACs'
    acc = '' if row.get('acc1') is None else f", top-1 {row['acc1']:.2f}"
    if row.get('finetune'):
        f = row['finetune']
        acc += f" (fine-tuned {f['acc1']:.2f}, {f['seconds']:.0f} s)"
    return (f"[{i + 1}/{total}] {what}: {flops:.4g} {unit}, {row['fps']:.1f} FPS, {row['throughput']:.1f} im/s{acc}; "
            f"elapsed {elapsed:.0f} s, {total - i - 1} rows left")


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
    rs.check_output_dir(study.output_dir)

    evaluates = demo or 'data_set' in args.given or 'data_path' in args.given
    if study.finetune_epochs and not evaluates:
        raise UserError('--finetune-epochs needs a data set (give --data-set and --data-path)')
    loader_val, loader_train, num_classes = None, None, None
    if evaluates:
        dataset_train, dataset_val, num_classes = builders.build_datasets(args, with_train=bool(study.finetune_epochs))
        loader_val = builders.build_val_loader(dataset_val, args, dist)
        if study.finetune_epochs:
            loader_train = builders.build_train_loader(dataset_train, args, dist)
    model = builders.build_model(args, num_classes, plain=True)
    num_classes = model.num_classes
    full_specs = check_specs(model, entries, f"sweep file '{study.sweep}'" if study.sweep else 'sweep')
    count = len(entries)
    entries, full_specs = rs.drop_repeats(entries, full_specs)
    if len(entries) < count:
        print(f'note: the sweep lists {count - len(entries)} setting(s) twice; each is measured once')

    checkpoint = study.checkpoint
    if demo and checkpoint is None:
        checkpoint = ensure_backbone(args, device, dist.distributed, study.backbone_dir, study.verbose)
    if checkpoint:
        load_weights(model, checkpoint, args.model)
    else:
        print('note: no --checkpoint: the backbone has random weights (accuracy is chance level)')
    model.to(device).eval()

    # every check passed: now the output folder
    if utils.is_main_process():
        rs.create_output_dir(study.output_dir)
    results_path = os.path.join(study.output_dir, rs.RESULTS_FILE)
    on = measured_on(args, checkpoint, evaluates)
    keys = [rs.row_key(on, s, finetune_settings(study, s)) for s in full_specs]
    previous = rs.read_results(results_path)
    done = {r['key'] for r in previous}
    set_aside = len({r['key'] for r in previous} - set(keys))
    if set_aside:
        print(f'note: {set_aside} row(s) of {results_path} were measured on another checkpoint, data set, input size, '
              f'sweep or fine-tuning setting; set aside (kept in the file, left out of table.md)')
    todo = [(e, s, k) for e, s, k in zip(entries, full_specs, keys) if k not in done]
    if len(todo) < len(entries):
        print(f'resuming: {len(entries) - len(todo)} of {len(entries)} rows already in {results_path}')
    batch_size = study.batch_size or (256 if device.type == 'cuda' else 32)
    log_path = os.path.join(study.output_dir, LOG_FILE) if utils.is_main_process() else None
    if not study.verbose and todo and utils.is_main_process():
        finetune_logs = os.path.join(study.output_dir, FINETUNE_DIR, '*', 'finetune.log')
        print(f'evaluation progress lines: {log_path}'
              + (f'; fine-tuning progress lines: {finetune_logs}' if study.finetune_epochs else ''))
    ctx = SimpleNamespace(args=args, study=study, device=device, dist=dist, loader_val=loader_val,
                          loader_train=loader_train, num_classes=num_classes, batch_size=batch_size,
                          checkpoint=checkpoint, world_size=dist.world_size, log_path=log_path,
                          amp_dtype=resolve_amp(args.amp, device))
    start = time.time()
    for i, (entry, full_spec, key) in enumerate(todo):
        row = measure_row(model, entry, full_spec, key, ctx)
        if utils.is_main_process():
            rs.append_result(row, results_path)
            print(progress_line(i, len(todo), row, time.time() - start), flush=True)
    if utils.is_main_process():
        write_outputs(study.output_dir, keys, pub_rows)
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
    except KeyboardInterrupt:
        print('error: interrupted; finished rows and epochs are saved, the same command resumes', file=sys.stderr,
              flush=True)
        return 130
    finally:
        utils.cleanup_distributed()


if __name__ == '__main__':
    sys.exit(main())
