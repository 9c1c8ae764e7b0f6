"""Train or evaluate HVT / PiT / HiViT / DeiT models (DeiT's main.py, made launch-agnostic and resumable).

    torchrun --nproc_per_node=8 main.py --config config/hvt-s-1.json --data-set IMNET --data-path /imagenet
    python main.py --config config/hvt-s-1.json --eval --resume ckpt.pth --data-set IMNET --data-path /imagenet
"""
import datetime
import json
import os
import sys
import time

import timm
import torch
import torch.backends.cudnn as cudnn
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, NativeScaler

import models
import options
import utils
from datasets import build_dataset
from engine import NonFiniteLossError, evaluate, train_one_epoch
from losses import DistillationLoss
from samplers import ExactDistributedSampler, RASampler
from utils import UserError


def main(argv=None) -> int:
    args = None
    claim = utils.OutputClaim()
    try:
        args = options.parse_args(argv)
        utils.init_distributed_mode(args)
        for note in options.adapt_to_machine(args):
            print(f'note: {note}')
        claim = utils.claim_output_dir(args.output_dir)
        return run(args)
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
        last = os.path.join(args.output_dir, 'checkpoint.pth') if args.output_dir else ''
        kept = f'the last good checkpoint is kept ({last})' if last and os.path.isfile(last) else 'no checkpoint yet'
        if utils.is_main_process():
            print(f'error: training stopped on every rank: {e}; {kept}. Try a lower --lr, --clip-grad, '
                  f'or --amp bf16/none.', file=sys.stderr, flush=True)
        return 1
    finally:
        claim.release()
        utils.cleanup_distributed()


def run(args) -> int:
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError('--device cuda given but CUDA is not available; use --device cpu')
    amp_dtype = resolve_amp(args.amp, device)
    utils.seed_everything(args.seed + args.rank)
    cudnn.benchmark = not args.deterministic
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    dataset_val, nb_classes = build_dataset(is_train=False, args=args)
    dataset_train = None
    if not args.eval:
        dataset_train, nb_train = build_dataset(is_train=True, args=args)
        if nb_train != nb_classes:
            raise UserError(f'train set has {nb_train} classes but val set {nb_classes}')
    loader_val = build_val_loader(dataset_val, args)

    model = build_model(args, nb_classes)
    if args.distillation_type != 'none' and not args.eval and not hasattr(model, 'head_dist'):
        raise UserError(f"--distillation-type {args.distillation_type} needs a model with a distillation token "
                        f"(e.g. pit_s_distilled); '{args.model}' has none")
    if args.finetune:
        try:
            models.load_pretrained(model, args.finetune)
        except models.CheckpointError as e:
            raise UserError(f'--finetune: {e}') from None
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    print(f'number of params: {n_parameters}' + (f' (total {n_total})' if n_total != n_parameters else ''))

    resume_path = find_resume(args)
    checkpoint = load_resume_checkpoint(resume_path, model, nb_classes, args) if resume_path else None
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    if args.eval:
        return evaluate_only(args, model, loader_val, device, amp_dtype, resume_path, checkpoint)

    output_dir = args.output_dir
    if output_dir and utils.is_main_process():
        os.makedirs(output_dir, exist_ok=True)

    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay, device='cpu' if args.model_ema_force_cpu else None)
    model_without_ddp = model
    train_model = torch.compile(model) if args.compile else model
    if args.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[args.local_rank] if device.type == 'cuda' else None)

    loader_train = build_train_loader(dataset_train, args)
    steps_per_epoch = len(loader_train) if not args.max_steps_per_epoch else \
        min(args.max_steps_per_epoch, len(loader_train))
    total_batch = args.batch_size * args.world_size * args.accum_steps
    lr = args.lr if args.unscale_lr else args.lr * total_batch / 512.0
    optimizer = create_optimizer_v2(model_without_ddp, opt=args.opt, lr=lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum, layer_decay=args.layer_decay,
                                    **optimizer_kwargs(args))
    loss_scaler = NativeScaler(device=device.type) if amp_dtype == torch.float16 else None
    updates_per_epoch = (steps_per_epoch + args.accum_steps - 1) // args.accum_steps
    lr_scheduler, _ = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        cooldown_epochs=args.cooldown_epochs, patience_epochs=args.patience_epochs, decay_rate=args.decay_rate,
        min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, noise=args.lr_noise,
        noise_pct=args.lr_noise_pct, noise_std=args.lr_noise_std, step_on_epochs=not args.sched_on_updates,
        updates_per_epoch=updates_per_epoch)
    mixup_fn = build_mixup(args, nb_classes)
    criterion = DistillationLoss(build_base_criterion(args, mixup_fn), build_teacher(args, device, nb_classes),
                                 args.distillation_type, args.distillation_alpha, args.distillation_tau)

    state = {'epoch': -1, 'max_accuracy': 0.0, 'best_epoch': -1, 'max_accuracy_ema': 0.0}
    if checkpoint is not None:
        state = restore_training_state(checkpoint, optimizer, lr_scheduler, loss_scaler, model_ema, args)
    start_epoch = max(args.start_epoch, state['epoch'] + 1)
    if start_epoch > 0 and args.sched_on_updates:   # as timm's train.py: this run's schedule, at the epoch reached
        lr_scheduler.step_update(start_epoch * updates_per_epoch)
    elif start_epoch > 0:
        lr_scheduler.step(start_epoch)
    log_path = os.path.join(output_dir, 'log.txt') if output_dir else None
    if log_path and utils.is_main_process():
        utils.truncate_log(log_path, start_epoch - 1)
        utils.write_json_atomic(options.resolved_config(args), os.path.join(output_dir, 'config.json'))

    print(f'Start training for {args.epochs} epochs from epoch {start_epoch} (lr {lr:.3g}, total batch '
          f'{total_batch})')
    start_time = time.time()
    num_updates = start_epoch * updates_per_epoch
    for epoch in range(start_epoch, args.epochs):
        if hasattr(loader_train.sampler, 'set_epoch'):
            loader_train.sampler.set_epoch(epoch)
        train_stats, num_updates = train_one_epoch(
            train_model, criterion, loader_train, optimizer, device, epoch, loss_scaler, amp_dtype,
            args.clip_grad, model_ema, mixup_fn, set_training_mode=args.train_mode, accum_steps=args.accum_steps,
            lr_scheduler=lr_scheduler if args.sched_on_updates else None, num_updates=num_updates,
            print_freq=args.print_freq, max_steps=args.max_steps_per_epoch, channels_last=args.channels_last)
        if not args.sched_on_updates:
            lr_scheduler.step(epoch + 1)
        test_stats = evaluate(loader_val, model_without_ddp, device, amp_dtype, args.print_freq, args.channels_last)
        print(f"Accuracy of the network on the {test_stats['n_samples']} test images: {test_stats['acc1']:.1f}%")
        is_best = test_stats['acc1'] > state['max_accuracy']
        if is_best:
            state['max_accuracy'], state['best_epoch'] = test_stats['acc1'], epoch
        print(f"Max accuracy: {state['max_accuracy']:.2f}%")
        log_stats = {**{f'train_{k}': v for k, v in train_stats.items()},
                     **{f'test_{k}': v for k, v in test_stats.items()},
                     'epoch': epoch, 'n_parameters': n_parameters, 'n_parameters_total': n_total}
        is_best_ema = False
        if model_ema is not None:
            ema_stats = evaluate(loader_val, model_ema.module, device, amp_dtype, args.print_freq)
            is_best_ema = ema_stats['acc1'] > state['max_accuracy_ema']
            state['max_accuracy_ema'] = max(state['max_accuracy_ema'], ema_stats['acc1'])
            log_stats.update({f'test_{k}_ema': v for k, v in ema_stats.items() if k != 'n_samples'})
        state['epoch'] = epoch
        rng_states = gather_rng_states()
        if output_dir:
            utils.append_log(log_stats, log_path)
            ckpt = build_checkpoint(model_without_ddp, optimizer, lr_scheduler, loss_scaler, model_ema, state,
                                    rng_states, args)
            utils.save_on_master(ckpt, os.path.join(output_dir, 'checkpoint.pth'))
            if is_best:
                utils.save_on_master(ckpt, os.path.join(output_dir, 'best_checkpoint.pth'))
            if is_best_ema:
                utils.save_on_master(ckpt, os.path.join(output_dir, 'best_checkpoint_ema.pth'))
    total_time = datetime.timedelta(seconds=int(time.time() - start_time))
    print(f'Training time {total_time}')
    if args.epochs > start_epoch:
        print(f"Final top-1: {test_stats['acc1']:.2f}% (best {state['max_accuracy']:.2f}% at epoch "
              f"{state['best_epoch']})")
    return 0


# ----------------------------------------------------------------------------------------------------------- builders

def resolve_amp(amp: str, device: torch.device):
    if amp == 'none' or (amp == 'auto' and device.type != 'cuda'):
        return None
    if amp == 'fp16':
        return torch.float16
    if amp == 'bf16' or (device.type == 'cuda' and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def build_model(args, num_classes: int):
    try:
        return models.create_model(args.model, num_classes=num_classes, drop_rate=args.drop,
                                   drop_path_rate=args.drop_path, img_size=args.input_size, **args.model_kwargs)
    except (ValueError, TypeError) as e:
        raise UserError(f"cannot build model '{args.model}': {e}") from None


def build_val_loader(dataset, args):
    sampler = ExactDistributedSampler(dataset, args.world_size, args.rank) if args.distributed \
        else torch.utils.data.SequentialSampler(dataset)
    return torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=max(1, int(args.eval_batch_scale * args.batch_size)),
        drop_last=False, **loader_kwargs(args))


def build_train_loader(dataset, args):
    if args.distributed:
        sampler = RASampler(dataset, num_replicas=args.world_size, rank=args.rank, shuffle=True) \
            if args.repeated_aug else torch.utils.data.DistributedSampler(
                dataset, num_replicas=args.world_size, rank=args.rank, shuffle=True, seed=args.seed)
    else:
        sampler = torch.utils.data.RandomSampler(dataset)
    if len(sampler) < args.batch_size:
        raise UserError(f'the training set gives {len(sampler)} images per process, fewer than one batch of '
                        f'{args.batch_size}; lower --batch-size')
    return torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=args.batch_size, drop_last=True,
                                       worker_init_fn=utils.seed_worker, **loader_kwargs(args))


def loader_kwargs(args) -> dict:
    kwargs = dict(num_workers=args.num_workers, pin_memory=args.pin_mem and str(args.device).startswith('cuda'))
    if args.num_workers > 0:
        kwargs.update(persistent_workers=args.persistent_workers, prefetch_factor=args.prefetch_factor)
    return kwargs


def optimizer_kwargs(args) -> dict:
    kwargs = {}
    if args.opt_eps is not None and args.opt not in ('sgd', 'momentum'):
        kwargs['eps'] = args.opt_eps
    if args.opt_betas:
        kwargs['betas'] = tuple(args.opt_betas)
    return kwargs


def build_mixup(args, num_classes: int):
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                     prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                     label_smoothing=args.smoothing, num_classes=num_classes)
    return None


def build_base_criterion(args, mixup_fn):
    if args.bce_loss:
        return BinaryCrossEntropy(smoothing=args.smoothing, target_threshold=0.2 if mixup_fn else None)
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()  # smoothing is folded into the mixed targets
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return torch.nn.CrossEntropyLoss()


def build_teacher(args, device, num_classes: int):
    """The distillation teacher in eval mode, frozen, on ``device``.

    ``--teacher-path`` written by this framework records its model and constructor arguments, which are used as they
    are; any other file is loaded into ``--teacher-model`` (our name or a timm name) built for ``num_classes``."""
    if args.distillation_type == 'none':
        return None
    if not args.teacher_path:
        raise UserError('distillation needs --teacher-path (a checkpoint of --teacher-model)')
    if args.finetune:
        raise UserError('distillation together with --finetune is not supported (as in DeiT)')
    try:
        ckpt = models.load_checkpoint_file(args.teacher_path)
    except models.CheckpointError as e:
        raise UserError(f'teacher: {e}') from None
    saved = ckpt.get('args') if isinstance(ckpt.get('args'), dict) else {}
    name, kwargs = args.teacher_model, {}
    if saved.get('model') in models.list_models():
        name = saved['model']
        accepted = set(models.model_arg_names(name)) - set(options.MANAGED_MODEL_ARGS)
        kwargs = {k: v for k, v in saved.items() if k in accepted}
        kwargs['img_size'] = saved.get('input_size', args.input_size)
    try:
        if name in models.list_models():
            teacher = models.create_model(name, num_classes=num_classes, **{'img_size': args.input_size, **kwargs})
        else:
            teacher = timm.create_model(name, pretrained=False, num_classes=num_classes)
        models.load_pretrained(teacher, ckpt, drop_mismatched_head=False, strict=True, log=None)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"teacher '{name}' from {args.teacher_path}: {str(e).splitlines()[0]}") from None
    print(f'teacher: {name} from {args.teacher_path}')
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


# ----------------------------------------------------------------------------------------------------------- checkpoints

def find_resume(args) -> str:
    if args.resume:
        return args.resume
    if args.auto_resume and args.output_dir and not args.eval:
        path = os.path.join(args.output_dir, 'checkpoint.pth')
        if os.path.isfile(path):
            return path
    return ''


def load_resume_checkpoint(path: str, model, nb_classes: int, args) -> dict:
    """Load the weights of ``path`` into ``model`` strictly; returns the whole checkpoint dict.

    Upstream layouts (official HVT, timm, ...) go through the model's converter; a class count that differs from the
    data set's is an error (use --finetune to start from weights of another class count)."""
    try:
        ckpt = models.load_checkpoint_file(path)
        models.load_pretrained(model, ckpt, use_ema=args.eval_ema, drop_mismatched_head=False, strict=True, log=None)
    except models.ClassCountError as e:
        raise UserError(f"checkpoint {path} has {e.checkpoint_classes} classes but data set {args.data_set} has "
                        f"{nb_classes}; use --finetune to start from it with a new head") from None
    except models.CheckpointError as e:
        raise UserError(f'{path}: {e}') from None
    print(f'loaded weights from {path}' + (' (EMA)' if args.eval_ema else ''))
    return ckpt


def restore_training_state(ckpt: dict, optimizer, lr_scheduler, loss_scaler, model_ema, args) -> dict:
    """Restore optimizer, scaler, EMA and RNG from one of our checkpoints (weights-only files: nothing).

    The optimizer keeps this run's hyperparameters (lr, weight decay, betas); the lr schedule is not restored but
    rebuilt from this run's settings by the caller (as timm), so a changed --epochs or --lr takes effect."""
    if 'optimizer' not in ckpt or 'epoch' not in ckpt:
        print('checkpoint has weights only: training starts at epoch 0 with a fresh optimizer')
        return {'epoch': -1, 'max_accuracy': 0.0, 'best_epoch': -1, 'max_accuracy_ema': 0.0}
    try:
        utils.load_optimizer_state(optimizer, ckpt['optimizer'])   # keeps this run's lr, weight decay, ...
        if loss_scaler is not None and ckpt.get('scaler'):
            loss_scaler.load_state_dict(ckpt['scaler'])
        if model_ema is not None and ckpt.get('model_ema'):
            model_ema.module.load_state_dict(ckpt['model_ema'])
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(f'cannot restore the training state of the checkpoint (different optimizer or model '
                        f'settings?): {str(e).splitlines()[0]}') from None
    rng = ckpt.get('rng_states')
    if rng and len(rng) == args.world_size:
        utils.set_rng_state(rng[args.rank])
    else:
        utils.seed_everything(args.seed + args.rank + 1000 * (ckpt['epoch'] + 1))
    print(f"resumed from epoch {ckpt['epoch']} (best top-1 {ckpt.get('max_accuracy', 0.0):.2f}%)")
    changes = options.changed_since(ckpt.get('args'), args)
    if changes:
        print(f"resume: the command line changes {', '.join(changes)}; the schedule follows the new values")
    return {'epoch': ckpt['epoch'], 'max_accuracy': ckpt.get('max_accuracy', 0.0),
            'best_epoch': ckpt.get('best_epoch', -1), 'max_accuracy_ema': ckpt.get('max_accuracy_ema', 0.0)}


def gather_rng_states() -> list:
    """Every rank's RNG states, in rank order (one collective; all ranks must call it)."""
    state = utils.get_rng_state()
    if not utils.is_dist():
        return [state]
    gathered = [None] * utils.get_world_size()
    torch.distributed.all_gather_object(gathered, state)
    return gathered


def build_checkpoint(model, optimizer, lr_scheduler, loss_scaler, model_ema, state, rng_states, args) -> dict:
    """Tensors, dicts, lists, numbers and strings only: loadable with ``torch.load(weights_only=True)``."""
    return {
        'model': model.state_dict(),
        'optimizer': optimizer.state_dict(),
        'lr_scheduler': lr_scheduler.state_dict(),
        'scaler': loss_scaler.state_dict() if loss_scaler is not None else None,
        'model_ema': model_ema.module.state_dict() if model_ema is not None else None,
        'epoch': state['epoch'],
        'max_accuracy': state['max_accuracy'],
        'best_epoch': state['best_epoch'],
        'max_accuracy_ema': state['max_accuracy_ema'],
        'rng_states': rng_states,
        'args': json.loads(json.dumps(options.resolved_config(args), default=str)),
    }


def evaluate_only(args, model, loader_val, device, amp_dtype, resume_path, checkpoint) -> int:
    stats = evaluate(loader_val, model, device, amp_dtype, args.print_freq, args.channels_last)
    print(f"Accuracy of the network on the {stats['n_samples']} test images: {stats['acc1']:.2f}% "
          f"(top-5 {stats['acc5']:.2f}%)")
    if args.output_dir and utils.is_main_process():
        os.makedirs(args.output_dir, exist_ok=True)
        result = {**stats, 'checkpoint': resume_path or args.finetune or None, 'ema': args.eval_ema,
                  'model': args.model, 'input_size': args.input_size, 'eval_crop_ratio': args.eval_crop_ratio,
                  'data_set': args.data_set, 'world_size': args.world_size}
        utils.write_result_json(result, os.path.join(args.output_dir, 'eval.json'))
    return 0


if __name__ == '__main__':
    sys.exit(main())
