"""Command line + JSON config -> one resolved ``argparse.Namespace``.

Precedence: built-in defaults < JSON config (``--config``) < flags given on the command line. Every option has both
spellings (``--batch-size`` and ``--batch_size``). A config key is either an option (underscore form) or a constructor
argument of the chosen model (``patch_size``, ``pool_block_width`` ...); model arguments may also be given on the
command line (``--pool-block-width 6``). Unknown keys are errors that name the closest valid keys.
"""
import argparse
import difflib
import json
import os
from typing import List, Optional

import torch
from timm.data import resolve_data_config

import models
import utils
from utils import ArgumentParser, UserError

# model constructor arguments that main.py sets itself from its own options
MANAGED_MODEL_ARGS = {'img_size': 'input_size', 'num_classes': 'data_set', 'drop_rate': 'drop',
                      'drop_path_rate': 'drop_path'}
# config keys of earlier versions (and of DeiT) -> the option they now set
CONFIG_KEY_ALIASES = {'eval_crop_ratio': 'crop_pct'}
# the evaluation preprocessing a model registers (models.data_config); each option overrides one field
DATA_CONFIG_OPTIONS = ('input_size', 'interpolation', 'crop_pct', 'mean', 'std')
INTERPOLATIONS = ('bicubic', 'bilinear', 'nearest', 'lanczos', 'box', 'hamming')


def _add(parser, name: str, *aliases: str, **kwargs):
    """Add ``--name-with-dashes`` and ``--name_with_underscores`` (plus aliases) for dest ``name``."""
    flags = list(dict.fromkeys([f'--{name.replace("_", "-")}', f'--{name}', *aliases]))
    parser.add_argument(*flags, dest=name, **kwargs)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = ArgumentParser('HVT / PiT / HiViT training and evaluation', add_help=add_help, allow_abbrev=False)
    on_off = argparse.BooleanOptionalAction
    _add(p, 'config', type=str, default='', help='JSON config: options and model constructor arguments')

    g = p.add_argument_group('run')
    _add(g, 'batch_size', type=int, default=64, help='images per process per step')
    _add(g, 'epochs', type=int, default=300)
    _add(g, 'accum_steps', type=int, default=1, help='gradient accumulation: batches per optimizer step')
    _add(g, 'output_dir', type=str, default='', help='where checkpoints, log.txt and config.json go; empty = none')
    _add(g, 'exp_name', type=str, default='', help='HVT compatibility: output_dir defaults to outputs/<exp_name>')
    _add(g, 'device', type=str, default='cuda' if _cuda_available() else 'cpu')
    _add(g, 'seed', type=int, default=0)
    _add(g, 'resume', type=str, default='', help='checkpoint to resume from (full state) or to score with --eval')
    _add(g, 'auto_resume', action=on_off, default=True, help='resume from output_dir/checkpoint.pth if present')
    _add(g, 'start_epoch', type=int, default=0)
    _add(g, 'eval', action='store_true', help='only evaluate (--resume or --finetune weights) and write eval.json')
    _add(g, 'eval_ema', action='store_true', help='with --eval: score the EMA weights of the checkpoint')
    _add(g, 'random_weights', action='store_true', help='with --eval and no --resume/--finetune: score the randomly '
                                                        'initialised model (a chance-level baseline) on purpose')
    _add(g, 'print_freq', type=int, default=10)
    _add(g, 'max_steps_per_epoch', type=int, default=0, help='cap on training steps per epoch (smoke tests); 0 = all')
    _add(g, 'amp', type=str, default='auto', choices=['auto', 'bf16', 'fp16', 'none'],
         help='autocast dtype; auto = bf16 on CUDA (fp16 + GradScaler if bf16 is unsupported), none on CPU')
    _add(g, 'channels_last', action='store_true')
    _add(g, 'compile', action='store_true', help='torch.compile the model (before DDP)')
    _add(g, 'deterministic', action='store_true', help='cudnn.benchmark off, deterministic algorithms')

    g = p.add_argument_group('model')
    _add(g, 'model', type=str, default='deit_small', help=f'one of: {", ".join(models.list_models())}')
    _add(g, 'input_size', type=int, default=None, help="also the model's img_size; default: the model's (224 for "
                                                       "DeiT, HVT, PiT, HiViT)")
    _add(g, 'token_reduction', type=parse_token_reduction, default=None,
         help='token reduction of a plain ViT, in training and evaluation: a JSON object such as '
              '\'{"method": "tome", "r": 8}\' (ToMe, EViT, Evo-ViT, ATS, ACT, SMYRF, Hourglass of Expedit-SWAG), '
              'or null for the plain model')
    _add(g, 'drop', type=float, default=0.0, help='dropout rate')
    _add(g, 'drop_path', type=float, default=0.1, help='stochastic depth rate')
    _add(g, 'finetune', type=str, default='', help='initial weights: ours or an upstream layout (head dropped if '
                                                   'the class count differs, position embeddings resized)')
    _add(g, 'model_ema', action=on_off, default=False, help='keep an EMA of the weights; evaluated and checkpointed')
    _add(g, 'model_ema_decay', type=float, default=0.99996)
    _add(g, 'model_ema_force_cpu', action='store_true')

    g = p.add_argument_group('optimizer and schedule (timm create_optimizer_v2 / create_scheduler_v2)')
    _add(g, 'opt', type=str, default='adamw')
    _add(g, 'opt_eps', type=float, default=1e-8)
    _add(g, 'opt_betas', type=float, nargs='+', default=None)
    _add(g, 'momentum', type=float, default=0.9)
    _add(g, 'weight_decay', type=float, default=0.05)
    _add(g, 'layer_decay', type=float, default=None, help='layer-wise lr decay (needs model.group_matcher)')
    _add(g, 'clip_grad', type=float, default=None, help='gradient norm clipping; none by default')
    _add(g, 'sched', type=str, default='cosine')
    _add(g, 'lr', type=float, default=5e-4, help='base lr for a total batch of 512 (scaled unless --unscale-lr)')
    _add(g, 'unscale_lr', action='store_true', help='use --lr as given, without batch_size * world_size / 512')
    _add(g, 'lr_noise', type=float, nargs='+', default=None)
    _add(g, 'lr_noise_pct', type=float, default=0.67)
    _add(g, 'lr_noise_std', type=float, default=1.0)
    _add(g, 'warmup_lr', type=float, default=1e-6)
    _add(g, 'min_lr', type=float, default=1e-5)
    _add(g, 'decay_epochs', type=float, default=30)
    _add(g, 'warmup_epochs', type=int, default=5)
    _add(g, 'cooldown_epochs', type=int, default=10, help='as in DeiT: training stops at --epochs regardless')
    _add(g, 'patience_epochs', type=int, default=10)
    _add(g, 'decay_rate', '--dr', type=float, default=0.1)
    _add(g, 'sched_on_updates', action='store_true', help='step the lr schedule every update, not every epoch')

    g = p.add_argument_group('augmentation and loss')
    _add(g, 'color_jitter', type=float, default=0.3)
    _add(g, 'aa', type=str, default='rand-m9-mstd0.5-inc1', help='RandAugment policy; empty = none')
    _add(g, 'smoothing', type=float, default=0.1)
    _add(g, 'train_interpolation', type=str, default='bicubic')
    _add(g, 'repeated_aug', action=on_off, default=True, help='RASampler (distributed runs only, as DeiT)')
    _add(g, 'train_mode', action=on_off, default=True, help='--no-train-mode trains with dropout/drop-path off')
    _add(g, 'reprob', type=float, default=0.25)
    _add(g, 'remode', type=str, default='pixel')
    _add(g, 'recount', type=int, default=1)
    _add(g, 'mixup', type=float, default=0.8)
    _add(g, 'cutmix', type=float, default=1.0)
    _add(g, 'cutmix_minmax', type=float, nargs='+', default=None)
    _add(g, 'mixup_prob', type=float, default=1.0)
    _add(g, 'mixup_switch_prob', type=float, default=0.5)
    _add(g, 'mixup_mode', type=str, default='batch', choices=['batch', 'pair', 'elem'])
    _add(g, 'bce_loss', action='store_true', help='binary cross-entropy (DeiT III); needs --smoothing 0')

    g = p.add_argument_group('distillation')
    _add(g, 'teacher_model', type=str, default='regnety_160', help='our model name or a timm model name')
    _add(g, 'teacher_path', type=str, default='')
    _add(g, 'distillation_type', type=str, default='none', choices=['none', 'soft', 'hard'])
    _add(g, 'distillation_alpha', type=float, default=0.5)
    _add(g, 'distillation_tau', type=float, default=1.0)

    g = p.add_argument_group('data')
    _add(g, 'data_set', type=str, default='IMNET', choices=['IMNET', 'CIFAR', 'CIFAR10', 'DIGITS', 'FAKE'])
    _add(g, 'data_path', type=str, default='')
    _add(g, 'crop_pct', '--eval-crop-ratio', '--eval_crop_ratio', type=float, default=None,
         help="evaluation: resize to input_size / crop_pct, centre crop; default: the model's (0.875)")
    _add(g, 'interpolation', type=str, default=None, choices=INTERPOLATIONS,
         help="evaluation resize interpolation; default: the model's (bicubic)")
    _add(g, 'mean', type=float, nargs='+', default=None, help="normalisation mean (1 or 3 numbers); default: the "
                                                              "model's (ImageNet)")
    _add(g, 'std', type=float, nargs='+', default=None, help="normalisation std (1 or 3 numbers); default: the "
                                                             "model's (ImageNet)")
    _add(g, 'skip_corrupt', action='store_true', help='IMNET: check every image file first and leave out those '
                                                      'that cannot be read (else one would stop the run)')
    _add(g, 'num_workers', type=int, default=10)
    _add(g, 'pin_mem', action=on_off, default=True)
    _add(g, 'persistent_workers', action=on_off, default=True)
    _add(g, 'prefetch_factor', type=int, default=2)
    _add(g, 'eval_batch_scale', type=float, default=1.5, help='eval batch = this x --batch-size')
    _add(g, 'fake_train_size', type=int, default=1280)
    _add(g, 'fake_val_size', type=int, default=256)
    _add(g, 'fake_num_classes', type=int, default=1000)
    _add(g, 'dist_eval', action='store_true', help='accepted for DeiT compatibility: evaluation is always '
                                                  'distributed and exact')

    g = p.add_argument_group('distributed')
    _add(g, 'dist_url', type=str, default='env://')
    _add(g, 'dist_timeout', type=int, default=30, help='minutes')
    _add(g, 'local_rank', type=int, default=None, help='set by torch.distributed.launch without --use_env')
    _add(g, 'world_size', type=int, default=1, help='informational; taken from the launcher')
    return p


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def _parser(suppress_defaults: bool) -> argparse.ArgumentParser:
    """The option parser; with ``suppress_defaults`` it returns only the options given on the command line."""
    parser = get_args_parser()
    if suppress_defaults:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
    return parser


def option_names() -> List[str]:
    return [a.dest for a in get_args_parser()._actions if a.dest != 'help']


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Resolve defaults, the JSON config and the command line into one namespace (``args.model_kwargs`` holds the
    model's constructor arguments). Raises :class:`UserError` with one line on any bad key or value."""
    args, extras = _parser(False).parse_known_args(argv)
    explicit = vars(_parser(True).parse_known_args(argv)[0])
    model_kwargs, config = {}, {}
    if args.config:
        config = load_json_config(args.config)
        actions = {a.dest: a for a in get_args_parser()._actions}
        for key, value in config.items():
            key = CONFIG_KEY_ALIASES.get(key, key)
            if key in actions and key != 'config':
                if key not in explicit:
                    setattr(args, key, _coerce(actions[key], key, value, args.config))
            else:
                model_kwargs[key] = value
    cli_model_kwargs = _parse_extras(extras)
    _check_model_kwargs(args.model, model_kwargs, args.config)
    _check_model_kwargs(args.model, cli_model_kwargs, '')
    model_kwargs.update(cli_model_kwargs)
    args.model_kwargs = model_kwargs
    _resolve_data_config(args)
    if not args.output_dir and args.exp_name:
        args.output_dir = os.path.join('outputs', args.exp_name)
    _check_values(args)
    if args.eval and args.output_dir and 'output_dir' not in explicit:
        args.output_dir = os.path.join(args.output_dir, eval_folder_name(args))
    args.given = sorted(set(explicit) | set(config))
    return args


def eval_folder_name(args) -> str:
    """The folder an --eval run writes into when --output_dir is not on the command line (the config's output_dir
    is the training run's): named after the scored weights, e.g. ``eval-best_checkpoint`` or ``eval-ema-checkpoint``."""
    weights = args.resume or args.finetune
    stem = os.path.splitext(os.path.basename(os.path.normpath(weights)))[0] if weights else 'random-weights'
    return f"eval-{'ema-' if args.eval_ema else ''}{stem}"


def load_json_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"config file '{path}' not found")
    try:
        with open(path, encoding='utf-8') as f:
            config = json.load(f, object_pairs_hook=lambda pairs: _no_duplicates(pairs, f"config file '{path}'"))
    except RecursionError:
        raise UserError(f"config file '{path}' nests its JSON too deeply to read; a config is a flat JSON object") \
            from None
    except UnicodeDecodeError as e:
        raise UserError(f"config file '{path}' is not UTF-8 text (byte {e.start}); a config is a JSON file") from None
    except json.JSONDecodeError as e:
        raise UserError(f"config file '{path}' is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") \
            from None
    if not isinstance(config, dict):
        raise UserError(f"config file '{path}' must hold one JSON object, not a {type(config).__name__}")
    return config


def parse_token_reduction(text: str) -> Optional[dict]:
    """The value of ``--token-reduction``: a JSON object (method and parameters) or ``null`` (the plain model)."""
    try:
        value = json.loads(text, object_pairs_hook=lambda pairs: _no_duplicates(pairs, 'the JSON object'))
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    except RecursionError:
        raise argparse.ArgumentTypeError('nests its JSON too deeply to read; give one object such as '
                                         '\'{"method": "tome", "r": 8}\'') from None
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f'not valid JSON ({e.msg} at column {e.colno}): {_clip(text)!r}') from None
    if value is not None and not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f'must be a JSON object such as \'{{"method": "tome", "r": 8}}\' or null, '
                                         f'got {_clip(text)!r}')
    return value


def _clip(text: str, limit: int = 200) -> str:
    """``text`` for an error line: at most ``limit`` characters."""
    return text if len(text) <= limit else text[:limit] + '...'


def _resolve_data_config(args) -> None:
    """Fill the data-config options the user left unset from the model's registered data config (timm's
    ``resolve_data_config`` does the merge, as for timm's ``pretrained_cfg``)."""
    for key in ('mean', 'std'):
        value = getattr(args, key)
        if value is not None and len(value) not in (1, 3):
            raise UserError(f'--{key} takes 1 or 3 numbers (one per channel), got {len(value)}')
    if args.crop_pct is not None and args.crop_pct <= 0:
        raise UserError(f'--crop-pct must be > 0, got {args.crop_pct}')
    default = models.data_config(args.model)
    size = default['input_size']
    resolved = resolve_data_config(
        args=dict(img_size=args.input_size, interpolation=args.interpolation, crop_pct=args.crop_pct,
                  mean=args.mean, std=args.std),
        pretrained_cfg={**default, 'input_size': (3, size, size)})
    args.input_size = int(resolved['input_size'][-1])
    args.interpolation, args.crop_pct = resolved['interpolation'], float(resolved['crop_pct'])
    args.mean, args.std = [float(v) for v in resolved['mean']], [float(v) for v in resolved['std']]


def _no_duplicates(pairs, source: str) -> dict:
    """``json.load`` hook: a key given twice is an error (JSON itself would silently keep the last one)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise UserError(f"{source} has key '{key}' twice; keep one")
        out[key] = value
    return out


# options whose value may be null in a config: those that default to None, and these (null = timm's default)
NULLABLE = {'opt_eps'}


def _coerce(action, key, value, source):
    """Check a JSON value against the option's type and choices."""
    if value is None:
        if action.default is None or key in NULLABLE:
            return None
        kind = {int: 'an integer', float: 'a number', str: 'a string'}.get(action.type, 'true or false')
        raise UserError(f"'{key}' in {source} must be {kind}, got null")
    if action.type is parse_token_reduction:
        if not isinstance(value, dict):
            raise UserError(f"'{key}' in {source} must be a JSON object or null, got {value!r}")
        return value
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise UserError(f"'{key}' in {source} must be true or false, got {value!r}")
        return value
    try:
        if action.nargs in ('+', '*'):
            value = [action.type(v) for v in (value if isinstance(value, list) else [value])]
        elif action.type is not None:
            if isinstance(value, (list, dict)) or (action.type in (int, float) and isinstance(value, (str, bool))):
                raise ValueError
            if action.type is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            value = action.type(value)
    except (TypeError, ValueError):
        kind = {int: 'an integer', float: 'a number', str: 'a string'}.get(action.type, 'a valid value')
        raise UserError(f"'{key}' in {source} must be {kind}, got {value!r}") from None
    if action.choices and value not in action.choices:
        raise UserError(f"'{key}' in {source} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return value


def _parse_extras(extras: List[str]) -> dict:
    """``--key value`` / ``--key=value`` pairs left over by argparse: candidate model arguments (JSON values)."""
    out, i = {}, 0
    while i < len(extras):
        token = extras[i]
        if not token.startswith('--'):
            raise UserError(f"unexpected argument '{token}'")
        key, sep, value = token[2:].partition('=')
        if not sep:
            if i + 1 >= len(extras) or extras[i + 1].startswith('--'):
                raise UserError(f"unknown flag '--{key}'" + _suggest(key.replace('-', '_'), option_names()))
            value, i = extras[i + 1], i + 1
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out[key.replace('-', '_')] = parsed
        i += 1
    return out


def _suggest(key: str, candidates: List[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ''


def _check_model_kwargs(model: str, model_kwargs: dict, source: str) -> None:
    try:
        accepted = [a for a in models.model_arg_names(model) if a not in MANAGED_MODEL_ARGS]
    except models.UnknownModelError as e:
        raise UserError(str(e)) from None
    for key in model_kwargs:
        if key in MANAGED_MODEL_ARGS:
            raise UserError(f"'{key}' is set from --{MANAGED_MODEL_ARGS[key].replace('_', '-')}; "
                            f"remove it from {source or 'the command line'}")
        if key not in accepted:
            what = f"config key '{key}' in {source}" if source else f"flag '--{key.replace('_', '-')}'"
            raise UserError(f"unknown {what} (not an option, nor an argument of model '{model}')"
                            + _suggest(key, option_names() + accepted))


# numeric options and their lowest valid value (a wrong one would fail with a traceback, or only after an epoch)
AT_LEAST = {'epochs': 1, 'input_size': 1, 'print_freq': 1, 'prefetch_factor': 1, 'dist_timeout': 1,
            'fake_train_size': 1, 'fake_val_size': 1, 'fake_num_classes': 1, 'lr': 0, 'min_lr': 0, 'warmup_lr': 0,
            'weight_decay': 0, 'num_workers': 0, 'warmup_epochs': 0, 'cooldown_epochs': 0, 'start_epoch': 0,
            'max_steps_per_epoch': 0, 'drop': 0, 'drop_path': 0, 'smoothing': 0, 'mixup': 0, 'cutmix': 0,
            'reprob': 0, 'model_ema_decay': 0}
# model constructor arguments that are sizes or counts: every number in them must be positive
POSITIVE_MODEL_ARGS = ('patch_size', 'stride', 'embed_dim', 'base_dims', 'head_dim', 'num_heads', 'heads', 'depth',
                       'depths', 'num_blocks', 'in_chans', 'pool_kernel_size', 'pool_stride', 'mlp_ratio',
                       'stem_mlp_ratio')


def _check_values(args) -> None:
    if args.batch_size < 1 or args.accum_steps < 1:
        raise UserError('--batch-size and --accum-steps must be >= 1')
    for key, lowest in AT_LEAST.items():
        if getattr(args, key) < lowest:
            raise UserError(f"--{key.replace('_', '-')} must be >= {lowest}, got {getattr(args, key)}")
    if args.eval_batch_scale <= 0:
        raise UserError(f'--eval-batch-scale must be > 0, got {args.eval_batch_scale}')
    for key in POSITIVE_MODEL_ARGS:
        value = args.model_kwargs.get(key)
        numbers = value if isinstance(value, list) else [value]
        if any(isinstance(v, (int, float)) and not isinstance(v, bool) and v <= 0 for v in numbers):
            raise UserError(f"model argument '{key}' must be > 0, got {value!r}")
    if args.eval and not (args.resume or args.finetune or args.random_weights):
        raise UserError('--eval needs weights to score: --resume CHECKPOINT or --finetune WEIGHTS (add '
                        '--random-weights to score a randomly initialised model on purpose)')
    if args.random_weights and (args.resume or args.finetune or not args.eval):
        raise UserError('--random-weights only applies with --eval and without --resume/--finetune')
    if args.bce_loss and args.smoothing > 0:
        raise UserError('--bce-loss needs --smoothing 0 (with smoothing every BCE target becomes positive)')
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        raise UserError(f'mixup/cutmix need an even --batch-size, got {args.batch_size}')
    if args.eval_ema and not args.eval:
        raise UserError('--eval-ema only applies with --eval')


def adapt_to_machine(args) -> List[str]:
    """Fit the data-loading options to this machine; returns a note for each change the user should hear of.

    ``--num-workers`` is capped at the CPUs available (more only oversubscribes them, and DataLoader warns), and
    ``--pin-mem`` is off unless the device is CUDA (it has no effect otherwise). A default that is changed is not
    worth a note; a value the user gave (flag or config) is."""
    notes = []
    cpus = utils.cpu_count()
    if args.num_workers > cpus:
        if 'num_workers' in args.given:
            notes.append(f'--num-workers {args.num_workers} capped at the {cpus} CPUs available')
        args.num_workers = cpus
    if args.pin_mem and not str(args.device).startswith('cuda'):
        if 'pin_mem' in args.given:
            notes.append(f'--pin-mem has no effect without a CUDA device (device {args.device}); pinned memory '
                         f'is off')
        args.pin_mem = False
    return notes


# settings of the optimizer and schedule that a resumed run may change (see changed_since)
RESUMABLE_SETTINGS = ('epochs', 'lr', 'unscale_lr', 'min_lr', 'warmup_lr', 'warmup_epochs', 'cooldown_epochs',
                      'decay_epochs', 'decay_rate', 'sched', 'sched_on_updates', 'weight_decay', 'momentum',
                      'opt_eps', 'opt_betas', 'batch_size', 'accum_steps', 'world_size', 'clip_grad')


def changed_since(saved: Optional[dict], args) -> List[str]:
    """``['epochs 3 -> 5', 'lr 0.001 -> 0.002']``: optimizer and schedule settings of ``args`` that differ from the
    ``args`` a checkpoint recorded (``saved``)."""
    if not isinstance(saved, dict):
        return []
    return [f'{key} {saved[key]} -> {getattr(args, key)}' for key in RESUMABLE_SETTINGS
            if key in saved and saved[key] != getattr(args, key)]


def resolved_config(args) -> dict:
    """What config.json records: every option plus the model's constructor arguments."""
    skip = {'config', 'model_kwargs', 'rank', 'local_rank', 'distributed', 'given'}
    out = {k: v for k, v in vars(args).items() if k not in skip}
    out.update(args.model_kwargs)
    return out


# ------------------------------------------------------------------------------------------------- out of memory

def is_out_of_memory(error: BaseException) -> bool:
    """A device or host allocation failure: ``torch.OutOfMemoryError`` (CUDA, MPS), or CPU's RuntimeError from the
    default allocator ("DefaultCPUAllocator: not enough memory")."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ('not enough memory' in text or 'DefaultCPUAllocator' in text)


def out_of_memory_message(error: BaseException, batch_size, token_reduction='unknown') -> str:
    """One line naming the setting and the batch size that ran out of memory (``token_reduction`` 'unknown': not
    known to the caller; None: the plain model)."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    setting = ('' if token_reduction == 'unknown' else
               ', plain model' if token_reduction is None else f', token_reduction {json.dumps(token_reduction)}')
    return (f'out of memory at batch size {batch_size}{setting} ({_clip(first, 160)}); lower --batch-size, or the '
            f'setting\'s hash rounds, cluster sizes or iterations')
