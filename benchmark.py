"""Throughput (img/s) and peak memory of a config's model, inference or training, with every condition recorded.

    python benchmark.py --config config/deit-s.json --mode infer --batch-size 32 --threads 2 --json
    python benchmark.py --config config/deit-s.json --vs timm:deit_small_patch16_224     # same process, interleaved
    python benchmark.py --config config/hvt-s-1.json --vs config/deit-s.json             # two of our configs
    python benchmark.py --config C --token-reduction '{"method": "tome", "r": 8}' --vs plain   # reduced vs plain
    python benchmark.py --config C --token-reduction J --vs plain --mode train                # the same, training
    python benchmark.py --all --iters 3 --repeats 3 --json > all.json                    # every config
    python benchmarks/table.py all.json --plot speed.png                                 # GMACs vs img/s

Method: build the model exactly as training does (``builders``, random init) at the model's input size unless
``--input-size`` says otherwise, put it on the device (``--channels-last``, ``--compile`` optional), run ``--warmup``
iterations, then ``--repeats`` timed runs of ``--iters`` iterations each on one synthetic batch; img/s of a run =
batch x iters / wall time, with
``torch.cuda.synchronize`` before and after each run on CUDA. Inference runs under ``torch.inference_mode()`` in eval
mode; training times forward + cross-entropy + backward + AdamW step in train mode (drop path as configured).
``--amp bf16|fp16`` runs the forward under ``torch.autocast`` (fp16 training adds a GradScaler).

The median, min and max over the runs are reported. On CPU every iteration's wall and process CPU time are also
recorded: an iteration in which CPU time / wall time < ``--clean-ratio`` x threads did not have all its cores (other
processes were running) and is left out of the "clean" figure (``benchmarks/README.md``, Protocol). With ``--vs`` the
two models alternate run by run (ours, theirs, ours, theirs ...) so both see the same machine state, and the ratio
ours / theirs is reported per run (median) and on the clean iterations. Each result records the model's GMACs
(``counting``, fvcore convention, at the measured input size) for the GMACs-vs-img/s plot of ``benchmarks/table.py``;
training records add ``train_gmacs`` = 3 x GMACs (forward + backward, the backward counted as twice the forward). With
``--vs`` the record also holds ``mac_ratio`` = reference GMACs / ours (the speed-up the MACs predict, the same for
forward and forward + backward under that convention) and the measured speed-up as a fraction of it. On CPU each
result also has ``cpu_time`` (images per process CPU second) and ``--vs`` its ratio ``cpu_time_ratio``: on a machine
shared with other jobs, with ``--threads 1``, the comparison that contention does not distort.
"""
import argparse
import json
import os
import statistics
import sys
from typing import List, Optional

import torch
import torch.nn as nn

from framework import builders, options
from framework.timing import AMP_DTYPES, MODES, Runner, TimingOptions, conditions, measure, peak_rss_mb
from utils import ArgumentParser, UserError

REPO = os.path.dirname(os.path.abspath(__file__))
# training MACs per image under the convention of the training records: forward + backward, the backward counted as
# twice the forward (the gradients of the inputs and of the weights of every matmul)
TRAIN_MACS_FACTOR = 3
TRAIN_MACS_CONVENTION = 'forward + backward = 3 x forward GMACs (fvcore convention, batch 1)'


# -------------------------------------------------------------------------------------------------------------- models

def build_ours(config_path: str, argv=()):
    """(resolved args, model) of a config plus flag overrides, built as main.py builds it."""
    if not os.path.isfile(config_path):
        raise UserError(f"config file '{config_path}' not found")
    args = builders.load_args(config_path, argv)
    return args, builders.build_model(args)


def build_timm(name: str, input_size: int, num_classes: int, **kwargs) -> nn.Module:
    """A timm model with random init at our class count (plus ``kwargs``, e.g. the config's drop path);
    ``img_size`` is passed only when it differs from the model's default resolution."""
    import timm
    if name not in timm.list_models():
        raise UserError(f"unknown timm model '{name}'; see timm.list_models()")
    kwargs = dict(num_classes=num_classes, **kwargs)
    default = timm.get_pretrained_cfg(name)
    default_size = default.input_size[-1] if default is not None else None
    if default_size != input_size:
        kwargs['img_size'] = input_size
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise UserError(f"timm model '{name}' cannot be built at {input_size} px ({e}); use --input-size "
                        f"{default_size}") from None


def build_vs(spec: str, cfg, num_classes: int):
    """``plain`` (the config's model without its token reduction), ``timm:NAME`` or a config path (``config:PATH``
    or ``*.json``) -> (label, model), at the input size of ``cfg`` (the resolved config measured). A timm model gets
    the config's dropout and drop-path rates, so training runs compare like with like."""
    if spec == 'plain':
        if cfg.token_reduction is None:
            raise UserError('--vs plain compares the token-reduced model with the plain one, and this config has no '
                            'token_reduction; give --token-reduction')
        return f'{cfg.model} (plain)', builders.build_model(cfg, num_classes, plain=True)
    if spec.startswith('timm:'):
        return spec, build_timm(spec[len('timm:'):], cfg.input_size, num_classes, drop_rate=cfg.drop,
                                drop_path_rate=cfg.drop_path)
    path = spec[len('config:'):] if spec.startswith('config:') else spec
    if not path.endswith('.json'):
        raise UserError(f"--vs takes plain, timm:NAME or a config path (*.json), got '{spec}'")
    args, model = build_ours(path, ['--input-size', str(cfg.input_size)])
    return f'{args.model} ({path})', model

# ---------------------------------------------------------------------------------------------------------- benchmarks

def timing_options(args) -> TimingOptions:
    return TimingOptions(mode=args.mode, batch_size=args.batch_size, amp=args.amp, channels_last=args.channels_last,
                         compile=args.compile, warmup=args.warmup, iters=args.iters, repeats=args.repeats,
                         clean_ratio=args.clean_ratio)


def add_train_macs(result: dict) -> None:
    """Training GMACs per image beside the forward ones (see ``TRAIN_MACS_CONVENTION``)."""
    gmacs = result.get('gmacs')
    result['train_gmacs'] = None if gmacs is None else round(TRAIN_MACS_FACTOR * gmacs, 4)


def compare(ours: dict, vs: dict) -> dict:
    """Speed-up of ours over vs (per run, on clean iterations and, on CPU, per process CPU second: the median of the
    per-run ratios of img per CPU second, which other processes on the machine barely move with --threads 1), and the
    MAC ratio it can be held against: vs GMACs / our GMACs (the same for forward and forward + backward under
    ``TRAIN_MACS_CONVENTION``) and both speed-ups as a fraction of it."""
    ratios = [a / b for a, b in zip(ours['img_per_s']['per_repeat'], vs['img_per_s']['per_repeat'])]
    clean_ratio = None
    if ours.get('clean') and vs.get('clean') and ours['clean']['img_per_s_median'] and \
            vs['clean']['img_per_s_median']:
        clean_ratio = ours['clean']['img_per_s_median'] / vs['clean']['img_per_s_median']
    cpu_time_ratio = None
    if ours.get('cpu_time') and vs.get('cpu_time'):
        cpu_time_ratio = statistics.median(a / b for a, b in zip(ours['cpu_time']['per_repeat'],
                                                                  vs['cpu_time']['per_repeat']))
    ratio = statistics.median(ratios)
    mac_ratio = vs['gmacs'] / ours['gmacs'] if ours.get('gmacs') and vs.get('gmacs') else None
    return dict(ratio=ratio, ratios=ratios, clean_ratio=clean_ratio, cpu_time_ratio=cpu_time_ratio,
                mac_ratio=mac_ratio, fraction_of_mac_ratio=ratio / mac_ratio if mac_ratio else None,
                cpu_time_fraction_of_mac_ratio=cpu_time_ratio / mac_ratio if mac_ratio and cpu_time_ratio else None)


def benchmark(config_path: str, options: TimingOptions, device: torch.device, overrides=(),
              vs_spec: Optional[str] = None) -> dict:
    """One config (and with ``vs_spec`` its reference, interleaved): the JSON record of the measurement."""
    cfg, model = build_ours(config_path, overrides)
    num_classes = getattr(model, 'num_classes', 1000)
    runners = [Runner(cfg.model, model, options, device, num_classes, cfg.input_size)]
    if vs_spec:
        label, vs_model = build_vs(vs_spec, cfg, num_classes)
        runners.append(Runner(label, vs_model, options, device, num_classes, cfg.input_size))
    results = measure(runners, options)
    if options.mode == 'train':
        for result in results:
            add_train_macs(result)
    ours = results[0]
    out = dict(config=os.path.splitext(os.path.basename(config_path))[0], config_path=config_path,
               token_reduction=cfg.token_reduction, **ours, **conditions(options, device, cfg.input_size))
    if options.mode == 'train':
        out['train_macs_convention'] = TRAIN_MACS_CONVENTION
    if device.type == 'cpu':
        out.update(peak_memory_mb=round(peak_rss_mb(), 1), peak_memory_kind='cpu_peak_rss_process')
    if vs_spec:
        vs = results[1]
        vs.update(name=vs_spec, **compare(ours, vs))
        out['vs'] = vs
    return out


def _fmt_rate(s: dict) -> str:
    r = s['img_per_s']
    text = f"median {r['median']:.1f} img/s (min {r['min']:.1f}, max {r['max']:.1f})"
    c = s.get('clean')
    if c:
        clean = f"{c['img_per_s_median']:.1f} img/s" if c['img_per_s_median'] else 'none'
        text += (f"; clean iterations (cpu/wall >= {c['min_cpu_wall_ratio']:g}) {c['iters_kept']}/{c['iters_total']}:"
                 f" {clean}; median cpu/wall {c['cpu_wall_ratio_median']:.2f}")
    return text


def _fmt_reduction(r: dict) -> str:
    return '' if r.get('token_reduction') is None else f" with {json.dumps(r['token_reduction'])}"


def format_result(r: dict) -> str:
    lines = [f"{r['config']}: {r['model']}, {r['mode']}, {r['device']} ({r['device_name']}), batch {r['batch_size']}, "
             f"3x{r['input_size']}x{r['input_size']}, fp32 + amp {r['amp']}, threads {r['threads']}, channels_last "
             f"{r['channels_last']}, compile {r['compile']}, warmup {r['warmup']}, {r['repeats']} x {r['iters']} iters,"
             f" torch {r['torch']}, timm {r['timm']}",
             f"  ours  {r['model']}{_fmt_reduction(r)}: {_fmt_rate(r)}"]
    if 'vs' in r:
        v = r['vs']
        lines.append(f"  vs    {v['name']}: {_fmt_rate(v)}")
        clean = f", clean {v['clean_ratio']:.3f}" if v.get('clean_ratio') else ''
        per_run = ', '.join(f'{x:.3f}' for x in v['ratios'])
        lines.append(f"  ratio ours / vs: median {v['ratio']:.3f} (per run {per_run}){clean}")
        if v.get('cpu_time_ratio'):
            lines.append(f"  ratio ours / vs per process CPU second: median {v['cpu_time_ratio']:.3f}")
        if v.get('mac_ratio'):
            what = 'forward + backward GMACs' if r['mode'] == 'train' else 'GMACs'
            cpu = (f", by CPU time {v['cpu_time_fraction_of_mac_ratio']:.0%}"
                   if v.get('cpu_time_fraction_of_mac_ratio') else '')
            lines.append(f"  {what} ratio vs / ours {v['mac_ratio']:.3f}: the speed-up is "
                         f"{v['fraction_of_mac_ratio']:.0%} of it{cpu}")
    mem = r.get('peak_memory_mb')
    if mem is not None:
        kind = 'CUDA max_memory_allocated' if r['peak_memory_kind'].startswith('cuda') else 'peak RSS of the process'
        lines.append(f"  peak memory {mem:.0f} MiB ({kind})"
                     + (f", vs {r['vs']['peak_memory_mb']:.0f} MiB" if 'vs' in r and r['vs'].get('peak_memory_mb')
                        else ''))
    return '\n'.join(lines)


# ----------------------------------------------------------------------------------------------------------------- CLI

def get_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description='Inference / training throughput of a config (or all), with its conditions.')
    what = p.add_mutually_exclusive_group()
    what.add_argument('--config', help='JSON config')
    what.add_argument('--all', action='store_true', help='every config in --config-dir')
    p.add_argument('--config-dir', '--config_dir', default=builders.CONFIG_DIR, help='where --all looks')
    p.add_argument('--mode', default='infer', help='infer | train (forward, backward, AdamW step)')
    p.add_argument('--batch-size', '--batch_size', type=int, default=None, help='default: 32 on CPU, 128 on CUDA')
    p.add_argument('--input-size', '--input_size', type=int, default=None, help="default: the config's, else the "
                                                                                 "model's")
    p.add_argument('--token-reduction', '--token_reduction', type=options.parse_token_reduction,
                   default=argparse.SUPPRESS, help="override the config's token reduction: a JSON object, or null")
    p.add_argument('--amp', default='none', help='bf16 | fp16 | none (autocast dtype)')
    p.add_argument('--channels-last', '--channels_last', action='store_true')
    p.add_argument('--compile', action='store_true', help='torch.compile the model(s); warm-up includes compiling')
    p.add_argument('--device', default=None, help='cuda, cuda:N or cpu (default: cuda when available)')
    p.add_argument('--warmup', type=int, default=3, help='untimed iterations per model')
    p.add_argument('--iters', type=int, default=10, help='iterations per timed run')
    p.add_argument('--repeats', type=int, default=5, help='timed runs per model')
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (CPU intra-op threads)')
    p.add_argument('--clean-ratio', '--clean_ratio', type=float, default=0.9,
                   help='CPU: an iteration is clean when CPU time / wall >= this x threads')
    p.add_argument('--vs', default=None, help='plain (the config without token reduction), timm:NAME or a config '
                                              'path, measured interleaved with ours')
    p.add_argument('--json', action='store_true', help='JSON: one object (--config) or a list (--all)')
    return p


def _check(args) -> torch.device:
    if not args.all and not args.config:
        raise UserError('give --config PATH or --all')
    if args.mode not in MODES:
        raise UserError(f"--mode must be infer or train, got '{args.mode}'")
    if args.amp not in AMP_DTYPES:
        raise UserError(f"--amp must be one of {', '.join(AMP_DTYPES)}, got '{args.amp}'")
    for name in ('iters', 'repeats'):
        if getattr(args, name) < 1:
            raise UserError(f'--{name} must be >= 1')
    if args.warmup < 0:
        raise UserError('--warmup must be >= 0')
    if args.vs and args.all:
        raise UserError('--vs compares one config; drop --all or --vs')
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f'--device {args.device} given but CUDA is not available; use --device cpu')
    if args.threads is not None:
        if args.threads < 1:
            raise UserError('--threads must be >= 1')
        torch.set_num_threads(args.threads)
    if args.batch_size is None:
        args.batch_size = 128 if device.type == 'cuda' else 32
    if args.batch_size < 1:
        raise UserError('--batch-size must be >= 1')
    return device


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = get_parser().parse_args(argv)
        device = _check(args)
        settings = timing_options(args)
        overrides = [] if args.input_size is None else ['--input-size', str(args.input_size)]
        if 'token_reduction' in vars(args):
            overrides += ['--token-reduction', json.dumps(args.token_reduction)]
        if args.all:
            results = []
            for path in builders.config_files(args.config_dir):
                try:
                    results.append(benchmark(path, settings, device, overrides))
                except UserError as e:
                    results.append(dict(config=os.path.splitext(os.path.basename(path))[0], config_path=path,
                                        error=str(e)))
                r = results[-1]
                text = format_result(r) if 'error' not in r else f"{r['config']}: error: {r['error']}"
                # with --json, stdout holds only the JSON list; progress goes to stderr
                print(text, file=sys.stderr if args.json else sys.stdout, flush=True)
        else:
            results = [benchmark(args.config, settings, device, overrides, args.vs)]
            if not args.json:
                print(format_result(results[0]))
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not options.is_out_of_memory(e):
            raise
        message = options.out_of_memory_message(e, args.batch_size, getattr(args, 'token_reduction', 'unknown'))
        print(f'error: {message}', file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results if args.all else results[0], indent=1))
    return 0 if not any('error' in r for r in results) else 2


if __name__ == '__main__':
    sys.exit(main())
