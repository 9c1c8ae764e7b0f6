"""Train or evaluate HVT / PiT / HiViT / DeiT models (DeiT's main.py, made launch-agnostic and resumable).

    torchrun --nproc_per_node=8 main.py --config config/hvt-s-1.json --data-set IMNET --data-path /imagenet
    python main.py --config config/hvt-s-1.json --eval --resume ckpt.pth --data-set IMNET --data-path /imagenet
"""
import dataclasses
import datetime
import json
import os
import sys
import time
from typing import Optional

import torch
import torch.backends.cudnn as cudnn
from timm.utils import random_seed

from engine import LoopOptions, NonFiniteLossError, Optimization, evaluate, resolve_amp, train_one_epoch
from framework import builders, counting, options
import models
from models.token_reduction import resolve_method
import utils
from utils import DistInfo, UserError


def main(argv=None) -> int:
    args = None
    claim = utils.OutputClaim()
    try:
        args = options.parse_args(argv)
        dist = utils.init_distributed_mode(args.device, args.dist_url, args.dist_timeout, args.local_rank)
        for note in options.adapt_to_machine(args):
            print(f'note: {note}')
        claim = utils.claim_output_dir(args.output_dir)
        return run(args, dist)
    except UserError as e:
        if utils.is_main_process():
            print(f'error: {e}', file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        if utils.is_main_process():
            hint = utils.resume_hint(args.output_dir if args else '')
            print(f'error: interrupted; {hint}', file=sys.stderr, flush=True)
        return 130
    except NonFiniteLossError as e:
        if args.eval:
            if utils.is_main_process():
                print(f'error: {e} with model {args.model} and token_reduction {spec_json(args.token_reduction)}; '
                      f'this setting does not give finite logits on these weights (nothing written)',
                      file=sys.stderr, flush=True)
            return 2
        last = os.path.join(args.output_dir, 'checkpoint.pth') if args.output_dir else ''
        kept = f'the last good checkpoint is kept ({last})' if last and os.path.isfile(last) else 'no checkpoint yet'
        if utils.is_main_process():
            print(f'error: training stopped on every rank: {e}; {kept}. Try a lower --lr, --clip-grad, '
                  f'or --amp bf16/none.', file=sys.stderr, flush=True)
        return 1
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not options.is_out_of_memory(e):
            raise
        if utils.is_main_process():
            message = options.out_of_memory_message(e, getattr(args, 'batch_size', '?'),
                                                    getattr(args, 'token_reduction', 'unknown'))
            print(f'error: {message}', file=sys.stderr, flush=True)
        return 2
    finally:
        claim.release()
        utils.cleanup_distributed()


def run(args, dist: DistInfo) -> int:
    """Build data and model, load weights, then score once (``--eval``) or train epoch by epoch."""
    device = torch.device(dist.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError('--device cuda given but CUDA is not available; use --device cpu')
    loop = LoopOptions(device, resolve_amp(args.amp, device), args.channels_last, args.print_freq,
                       args.max_steps_per_epoch, args.train_mode)
    random_seed(args.seed, dist.rank)
    cudnn.benchmark = not args.deterministic
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    dataset_train, dataset_val, num_classes = builders.build_datasets(args, with_train=not args.eval)
    loader_val = builders.build_val_loader(dataset_val, args, dist)
    resume_path = find_resume(args)
    checkpoint = read_checkpoint(resume_path, '--resume') if resume_path else None
    weights = checkpoint if checkpoint is not None else (
        read_checkpoint(args.finetune, '--finetune') if args.eval and args.finetune else None)
    trained_spec = adopt_token_reduction(args, weights)
    model = build_model(args, num_classes)
    args.token_reduction = full_spec(model, args.token_reduction)
    if trained_spec is not NOT_RECORDED:
        check_token_reduction(args, full_spec(model, trained_spec), resume_path or args.finetune)
    if checkpoint is not None:
        load_resume_weights(checkpoint, resume_path, model, num_classes, args)
    model.to(device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    if args.eval:
        return evaluate_only(args, dist, model, loader_val, loop, resume_path,
                             None if trained_spec is NOT_RECORDED else full_spec(model, trained_spec))

    loader_train = builders.build_train_loader(dataset_train, args, dist)
    steps_per_epoch = builders.steps_per_epoch(loader_train, args)
    opt = builders.build_optimization(args, model, steps_per_epoch, dist.world_size, device, loop.amp_dtype)
    mixup_fn = builders.build_mixup(args, num_classes)
    criterion = builders.build_criterion(args, mixup_fn, builders.build_teacher(args, device, num_classes))
    state = TrainState()
    if checkpoint is not None:
        state = restore_checkpoint(checkpoint, opt, args.seed, dist)
        changes = options.changed_since(checkpoint.get('args'), args)
        if changes:
            print(f"resume: the command line changes {', '.join(changes)}; the schedule follows the new values")
    start_epoch = max(args.start_epoch, state.epoch + 1)
    num_updates = builders.resume_schedule(opt, args, start_epoch, steps_per_epoch)
    if args.output_dir and utils.is_main_process():
        os.makedirs(args.output_dir, exist_ok=True)
        utils.truncate_log(os.path.join(args.output_dir, 'log.txt'), start_epoch - 1)
        utils.write_json_atomic(run_config(args, dist), os.path.join(args.output_dir, 'config.json'))

    print(f'Start training for {args.epochs} epochs from epoch {start_epoch} (lr '
          f'{builders.scaled_lr(args, dist.world_size):.3g}, total batch '
          f'{builders.total_batch_size(args, dist.world_size)})')
    train_model = builders.wrap_for_training(model, args, dist)
    start_time = time.time()
    for epoch in range(start_epoch, args.epochs):
        if hasattr(loader_train.sampler, 'set_epoch'):
            loader_train.sampler.set_epoch(epoch)
        train_stats, num_updates = train_one_epoch(train_model, criterion, loader_train, opt, loop, epoch,
                                                   num_updates, mixup_fn)
        if not args.sched_on_updates:
            opt.lr_scheduler.step(epoch + 1)
        end_epoch(args, dist, model, opt, state, epoch, train_stats, loader_val, loop)
    print(f'Training time {datetime.timedelta(seconds=int(time.time() - start_time))}')
    if args.epochs > start_epoch:
        print(f"Final top-1: {state.last_accuracy:.2f}% (best {state.max_accuracy:.2f}% at epoch "
              f"{state.best_epoch})")
    return 0


def build_model(args, num_classes: int):
    """The config's model, with ``--finetune`` weights loaded; prints its parameter count."""
    model = builders.build_model(args, num_classes)
    if args.distillation_type != 'none' and not args.eval and not hasattr(model, 'head_dist'):
        raise UserError(f"--distillation-type {args.distillation_type} needs a model with a distillation token "
                        f"(e.g. pit_s_distilled); '{args.model}' has none")
    if args.finetune:
        try:
            models.load_pretrained(model, args.finetune)
        except models.CheckpointError as e:
            raise UserError(f'--finetune: {e}') from None
    n_total, n_parameters = counting.count_params(model)
    print(f'number of params: {n_parameters}' + (f' (total {n_total})' if n_total != n_parameters else ''))
    return model


def end_epoch(args, dist: DistInfo, model, opt: Optimization, state: 'TrainState', epoch: int, train_stats: dict,
              loader_val, loop: LoopOptions) -> None:
    """Evaluate (and the EMA), update ``state``, append to ``log.txt`` and save ``checkpoint.pth`` (and the best)."""
    test_stats = evaluate(loader_val, model, loop)
    print(f"Accuracy of the network on the {test_stats['n_samples']} test images: {test_stats['acc1']:.1f}%")
    is_best = test_stats['acc1'] > state.max_accuracy
    if is_best:
        state.max_accuracy, state.best_epoch = test_stats['acc1'], epoch
    state.last_accuracy = test_stats['acc1']
    print(f'Max accuracy: {state.max_accuracy:.2f}%')
    n_total, n_parameters = counting.count_params(model)
    log_stats = {**{f'train_{k}': v for k, v in train_stats.items()},
                 **{f'test_{k}': v for k, v in test_stats.items()},
                 'epoch': epoch, 'n_parameters': n_parameters, 'n_parameters_total': n_total,
                 'token_reduction': args.token_reduction}
    is_best_ema = False
    if opt.model_ema is not None:
        ema_stats = evaluate(loader_val, opt.model_ema.module, loop)
        is_best_ema = ema_stats['acc1'] > state.max_accuracy_ema
        state.max_accuracy_ema = max(state.max_accuracy_ema, ema_stats['acc1'])
        log_stats.update({f'test_{k}_ema': v for k, v in ema_stats.items() if k != 'n_samples'})
    state.epoch = epoch
    rng_states = gather_rng_states()
    if not args.output_dir:
        return
    utils.append_log(log_stats, os.path.join(args.output_dir, 'log.txt'))
    ckpt = checkpoint_contents(model, opt, state, rng_states, run_config(args, dist))
    utils.save_on_master(ckpt, os.path.join(args.output_dir, 'checkpoint.pth'))
    if is_best:
        utils.save_on_master(ckpt, os.path.join(args.output_dir, 'best_checkpoint.pth'))
    if is_best_ema:
        utils.save_on_master(ckpt, os.path.join(args.output_dir, 'best_checkpoint_ema.pth'))


# ----------------------------------------------------------------------------------------------------------- checkpoints

@dataclasses.dataclass
class TrainState:
    """Training progress saved beside the weights: last finished epoch, best top-1 and its epoch, best EMA top-1."""
    epoch: int = -1
    max_accuracy: float = 0.0
    best_epoch: int = -1
    max_accuracy_ema: float = 0.0
    last_accuracy: float = 0.0


def run_config(args, dist: DistInfo) -> dict:
    """The resolved options and model arguments, with the world size the launcher gave (config.json, checkpoints)."""
    return {**options.resolved_config(args), 'world_size': dist.world_size}


def checkpoint_contents(model, opt: Optimization, state: TrainState, rng_states: list, config: dict) -> dict:
    """Everything a resume needs, as tensors, dicts, lists, numbers and strings only (loadable with
    ``torch.load(weights_only=True)``). :func:`restore_checkpoint` reads it back. ``token_reduction`` is the full
    spec the weights were trained with (None: the plain model), also in ``args``."""
    return {
        'model': model.state_dict(),
        'optimizer': opt.optimizer.state_dict(),
        'lr_scheduler': opt.lr_scheduler.state_dict(),
        'scaler': opt.loss_scaler.state_dict() if opt.loss_scaler is not None else None,
        'model_ema': opt.model_ema.module.state_dict() if opt.model_ema is not None else None,
        **dataclasses.asdict(state),
        'rng_states': rng_states,
        'args': json.loads(json.dumps(config, default=str)),
        'token_reduction': config.get('token_reduction'),
    }


def restore_checkpoint(ckpt: dict, opt: Optimization, seed: int, dist: DistInfo) -> TrainState:
    """Restore optimizer, scaler, EMA and RNG from :func:`checkpoint_contents`; a weights-only file gives a fresh
    state. RNG states are restored when the checkpoint has one per process, else re-seeded per epoch.

    The optimizer keeps this run's hyperparameters (lr, weight decay, betas); the lr schedule is not restored but
    rebuilt from this run's settings by the caller (as timm), so a changed --epochs or --lr takes effect."""
    if 'optimizer' not in ckpt or 'epoch' not in ckpt:
        print('checkpoint has weights only: training starts at epoch 0 with a fresh optimizer')
        return TrainState()
    try:
        utils.load_optimizer_state(opt.optimizer, ckpt['optimizer'])   # keeps this run's lr, weight decay, ...
        if opt.loss_scaler is not None and ckpt.get('scaler'):
            opt.loss_scaler.load_state_dict(ckpt['scaler'])
        if opt.model_ema is not None and ckpt.get('model_ema'):
            opt.model_ema.module.load_state_dict(ckpt['model_ema'])
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(f'cannot restore the training state of the checkpoint (different optimizer or model '
                        f'settings?): {str(e).splitlines()[0]}') from None
    state = TrainState(**{f.name: ckpt.get(f.name, f.default) for f in dataclasses.fields(TrainState)})
    rng = ckpt.get('rng_states')
    if rng and len(rng) == dist.world_size:
        utils.set_rng_state(rng[dist.rank])
    else:
        random_seed(seed + 1000 * (state.epoch + 1), dist.rank)
    print(f'resumed from epoch {state.epoch} (best top-1 {state.max_accuracy:.2f}%)')
    return state


def gather_rng_states() -> list:
    """Every rank's RNG states, in rank order (one collective; all ranks must call it)."""
    state = utils.get_rng_state()
    if not utils.is_dist():
        return [state]
    gathered = [None] * utils.get_world_size()
    torch.distributed.all_gather_object(gathered, state)
    return gathered


def find_resume(args) -> str:
    if args.resume:
        return args.resume
    if args.auto_resume and args.output_dir and not args.eval:
        path = os.path.join(args.output_dir, 'checkpoint.pth')
        if os.path.isfile(path):
            return path
    return ''


def read_checkpoint(path: str, flag: str) -> dict:
    try:
        return models.load_checkpoint_file(path)
    except models.CheckpointError as e:
        raise UserError(f'{flag}: {e}') from None


def load_resume_weights(ckpt: dict, path: str, model, num_classes: int, args) -> None:
    """Load the weights of checkpoint ``ckpt`` (read from ``path``) into ``model`` strictly.

    Upstream layouts (official HVT, timm, ...) go through the model's converter; a class count that differs from the
    data set's is an error (use --finetune to start from weights of another class count)."""
    try:
        models.load_pretrained(model, ckpt, use_ema=args.eval_ema, drop_mismatched_head=False, strict=True, log=None)
    except models.ClassCountError as e:
        raise UserError(f"checkpoint {path} has {e.checkpoint_classes} classes but data set {args.data_set} has "
                        f"{num_classes}; use --finetune to start from it with a new head") from None
    except models.CheckpointError as e:
        raise UserError(f'{path}: {e}') from None
    print(f'loaded weights from {path}' + (' (EMA)' if args.eval_ema else ''))


# ---------------------------------------------------------------------------------------------- token reduction spec

NOT_RECORDED = object()   # a checkpoint that does not say which token reduction its weights were trained with


def recorded_token_reduction(ckpt: Optional[dict]):
    """The token-reduction spec a checkpoint of this framework was trained with (None: plain), or NOT_RECORDED
    (upstream weights, or no checkpoint)."""
    if not isinstance(ckpt, dict):
        return NOT_RECORDED
    if 'token_reduction' in ckpt and 'model' in ckpt:
        return ckpt['token_reduction']
    saved = ckpt.get('args')
    if isinstance(saved, dict) and 'token_reduction' in saved:
        return saved['token_reduction']
    return NOT_RECORDED


def adopt_token_reduction(args, ckpt: Optional[dict]):
    """Run the checkpoint's recorded spec unless the command line or config names one (``args.given``); returns
    the recorded spec (or NOT_RECORDED)."""
    trained = recorded_token_reduction(ckpt)
    if trained is not NOT_RECORDED and 'token_reduction' not in args.given:
        args.token_reduction = trained
    return trained


def full_spec(model, spec) -> Optional[dict]:
    """``spec`` with every parameter filled in (the method's defaults), None for the plain model; a spec this model
    cannot take is a :class:`UserError`."""
    if spec is None:
        return None
    try:
        return resolve_method(model, spec).spec()
    except ValueError as e:
        raise UserError(str(e)) from None


def spec_json(spec) -> str:
    return json.dumps(spec, sort_keys=False) if spec is not None else 'null (plain model)'


def check_token_reduction(args, trained: Optional[dict], path: str) -> None:
    """Compare this run's spec with the one the weights at ``path`` were trained with: ``--eval`` prints both when
    they differ; a resumed training run refuses another spec unless ``--finetune`` is given."""
    if trained == args.token_reduction:
        if trained is not None:
            print(f'token reduction (as trained): {spec_json(trained)}')
        return
    if args.eval:
        print(f'note: {path} was trained with token_reduction {spec_json(trained)}; evaluating with '
              f'{spec_json(args.token_reduction)} as the command line or config names')
    elif args.finetune:
        print(f'note: {path} was trained with token_reduction {spec_json(trained)}; fine-tuning with '
              f'{spec_json(args.token_reduction)}')
    else:
        raise UserError(f'cannot resume {path}: it was trained with token_reduction {spec_json(trained)}, this run '
                        f'sets {spec_json(args.token_reduction)}; resume with the same setting, or add --finetune '
                        f'{path} to continue from its weights with the new one')


# --------------------------------------------------------------------------------------------------------------- eval

def evaluate_only(args, dist: DistInfo, model, loader_val, loop: LoopOptions, resume_path: str,
                  trained_spec: Optional[dict]) -> int:
    """Score the model once; rank 0 writes ``eval.json`` with the scores, the setting (data config, token
    reduction, and the one the weights were trained with: None for plain or unrecorded) and the model's GMACs at
    that setting (fvcore convention, one image)."""
    stats = evaluate(loader_val, model, loop)
    print(f"Accuracy of the network on the {stats['n_samples']} test images: {stats['acc1']:.2f}% "
          f"(top-5 {stats['acc5']:.2f}%)")
    if args.output_dir and utils.is_main_process():
        os.makedirs(args.output_dir, exist_ok=True)
        macs = counting.count_macs(model, args.input_size, 'fvcore')[0]
        data = builders.data_config(args)
        result = {**stats, 'checkpoint': resume_path or args.finetune or None, 'ema': args.eval_ema,
                  'model': args.model, 'token_reduction': args.token_reduction,
                  'token_reduction_trained': trained_spec, 'gmacs': macs / 1e9,
                  'gmacs_convention': 'fvcore', 'input_size': args.input_size, 'crop_pct': data['crop_pct'],
                  'interpolation': data['interpolation'], 'mean': list(data['mean']), 'std': list(data['std']),
                  'data_set': args.data_set, 'world_size': dist.world_size}
        utils.write_result_json(result, os.path.join(args.output_dir, 'eval.json'))
    return 0


if __name__ == '__main__':
    sys.exit(main())
