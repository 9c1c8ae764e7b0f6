"""A resolved config (``options.parse_args``) -> what the scripts need: model, data sets, loaders, teacher, criterion,
data config, optimizer + lr schedule + loss scaler + EMA (one :class:`engine.Optimization`), the DDP-wrapped model.

``main.py``, ``flops.py`` and ``benchmark.py`` build through here, so the model trained, counted and timed for a config
is the same model, with its class count from one rule (:func:`build_model`).
"""
import os
from typing import List, Optional, Sequence

import timm
import torch
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, NativeScaler

import datasets
from engine import Optimization
from framework import options
from losses import DistillationLoss
import models
from samplers import ExactDistributedSampler, RASampler
from utils import DistInfo, UserError


CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'config')


def config_files(config_dir: str = CONFIG_DIR) -> List[str]:
    """The JSON configs of a folder, sorted by name."""
    if not os.path.isdir(config_dir):
        raise UserError(f"config folder '{config_dir}' not found")
    return sorted(os.path.join(config_dir, f) for f in os.listdir(config_dir) if f.endswith('.json'))


def load_args(config_path: Optional[str] = None, argv: Sequence[str] = ()):
    """``options.parse_args`` of a config file plus overriding flags (``['--input-size', '384']`` ...)."""
    return options.parse_args((['--config', config_path] if config_path else []) + list(argv))


# -------------------------------------------------------------------------------------------------------------- model

def build_model(args, num_classes: Optional[int] = None, model_name: Optional[str] = None, plain: bool = False):
    """The config's model: ``args.model`` (or ``model_name``, e.g. a distilled twin) with the config's constructor
    arguments, input size, dropout rates and token reduction (none with ``plain``).

    ``num_classes``: the data set's class count when the data is at hand (an ImageNet folder may hold any number of
    classes); by default the nominal count of ``args.data_set`` (ImageNet 1000, CIFAR 100 ...). A bad constructor
    argument or token-reduction setting is a :class:`UserError`."""
    name = model_name or args.model
    if num_classes is None:
        num_classes = datasets.num_classes_of(args)
    try:
        return models.create_model(name, token_reduction=None if plain else args.token_reduction,
                                   num_classes=num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path,
                                   img_size=args.input_size, **args.model_kwargs)
    except (ValueError, TypeError) as e:
        raise UserError(f"cannot build model '{name}': {e}") from None


def data_config(args) -> dict:
    """The evaluation preprocessing in timm's data-config form (the model's registered one, with the config's
    overrides already merged by ``options``): input_size (C, H, W), interpolation, crop_pct, mean, std."""
    return dict(input_size=(3, args.input_size, args.input_size), interpolation=args.interpolation,
                crop_pct=args.crop_pct, mean=tuple(args.mean), std=tuple(args.std))


def build_teacher(args, device, num_classes: int):
    """The distillation teacher in eval mode, frozen, on ``device``; None without distillation.

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


# --------------------------------------------------------------------------------------------------------------- data

def build_datasets(args, with_train: bool = True):
    """(training set or None, validation set, class count). The class count is the validation set's; a training set
    with another count is an error."""
    dataset_val, num_classes = datasets.build_dataset(is_train=False, args=args)
    dataset_train = None
    if with_train:
        dataset_train, num_train = datasets.build_dataset(is_train=True, args=args)
        if num_train != num_classes:
            raise UserError(f'train set has {num_train} classes but val set {num_classes}')
    return dataset_train, dataset_val, num_classes


def loader_kwargs(args) -> dict:
    kwargs = dict(num_workers=args.num_workers, pin_memory=args.pin_mem and str(args.device).startswith('cuda'))
    if args.num_workers > 0:
        kwargs.update(persistent_workers=args.persistent_workers, prefetch_factor=args.prefetch_factor)
    return kwargs


def build_val_loader(dataset, args, dist: DistInfo):
    """Every validation sample exactly once over all processes (no padding), in order."""
    sampler = ExactDistributedSampler(dataset, dist.world_size, dist.rank) if dist.distributed \
        else torch.utils.data.SequentialSampler(dataset)
    return torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=max(1, int(args.eval_batch_scale * args.batch_size)),
        drop_last=False, **loader_kwargs(args))


def build_train_loader(dataset, args, dist: DistInfo):
    """Shuffled batches; repeated augmentation (RASampler) in distributed runs unless ``--no-repeated-aug``.
    DataLoader workers seed numpy and ``random`` from torch's per-worker seed themselves (torch >= 1.9)."""
    if dist.distributed:
        sampler = RASampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True) \
            if args.repeated_aug else torch.utils.data.DistributedSampler(
                dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=args.seed)
    else:
        sampler = torch.utils.data.RandomSampler(dataset)
    if len(sampler) < args.batch_size:
        raise UserError(f'the training set gives {len(sampler)} images per process, fewer than one batch of '
                        f'{args.batch_size}; lower --batch-size')
    return torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=args.batch_size, drop_last=True,
                                       **loader_kwargs(args))


# ---------------------------------------------------------------------------------------------------------- criterion

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


def build_criterion(args, mixup_fn, teacher) -> DistillationLoss:
    """The training loss: the base criterion, wrapped in DeiT's distillation loss (a no-op without a teacher)."""
    return DistillationLoss(build_base_criterion(args, mixup_fn), teacher, args.distillation_type,
                            args.distillation_alpha, args.distillation_tau)


# ------------------------------------------------------------------------------------------------------- optimization

def total_batch_size(args, world_size: int) -> int:
    """Images per optimizer update: per-process batch x processes x accumulation steps."""
    return args.batch_size * world_size * args.accum_steps


def scaled_lr(args, world_size: int) -> float:
    """DeiT's rule: ``--lr`` is for a total batch of 512 and scales linearly with it, unless ``--unscale-lr``."""
    return args.lr if args.unscale_lr else args.lr * total_batch_size(args, world_size) / 512.0


def optimizer_kwargs(args) -> dict:
    """The optimizer arguments timm's ``create_optimizer_v2`` takes only when given (eps, betas)."""
    kwargs = {}
    if args.opt_eps is not None and args.opt not in ('sgd', 'momentum'):
        kwargs['eps'] = args.opt_eps
    if args.opt_betas:
        kwargs['betas'] = tuple(args.opt_betas)
    return kwargs


def build_optimization(args, model, steps_per_epoch: int, world_size: int, device: torch.device,
                       amp_dtype: Optional[torch.dtype]) -> Optimization:
    """Optimizer (timm, at :func:`scaled_lr`), lr schedule (timm, per epoch or per update), loss scaler (fp16 only)
    and EMA of ``model`` (unwrapped, on its device), as the training loop uses them."""
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=scaled_lr(args, world_size),
                                    weight_decay=args.weight_decay, momentum=args.momentum,
                                    layer_decay=args.layer_decay, **optimizer_kwargs(args))
    lr_scheduler, _ = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        cooldown_epochs=args.cooldown_epochs, patience_epochs=args.patience_epochs, decay_rate=args.decay_rate,
        min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, noise=args.lr_noise,
        noise_pct=args.lr_noise_pct, noise_std=args.lr_noise_std, step_on_epochs=not args.sched_on_updates,
        updates_per_epoch=updates_per_epoch(args, steps_per_epoch))
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay, device='cpu' if args.model_ema_force_cpu else None)
    return Optimization(optimizer, lr_scheduler, step_lr_per_update=args.sched_on_updates,
                        loss_scaler=NativeScaler(device=device.type) if amp_dtype == torch.float16 else None,
                        max_norm=args.clip_grad, accum_steps=args.accum_steps, model_ema=model_ema)


def updates_per_epoch(args, steps_per_epoch: int) -> int:
    return (steps_per_epoch + args.accum_steps - 1) // args.accum_steps


def resume_schedule(opt: Optimization, args, start_epoch: int, steps_per_epoch: int) -> int:
    """Put the lr of a run that starts at ``start_epoch`` where this run's schedule has it (as timm's train.py
    does; a restored optimizer keeps this run's base lr, so without this a resumed epoch would train at it).
    Returns the optimizer updates before ``start_epoch``, which the training loop counts on from."""
    num_updates = start_epoch * updates_per_epoch(args, steps_per_epoch)
    if start_epoch > 0 and args.sched_on_updates:
        opt.lr_scheduler.step_update(num_updates)
    elif start_epoch > 0:
        opt.lr_scheduler.step(start_epoch)
    return num_updates


def steps_per_epoch(loader, args) -> int:
    """Batches one epoch runs: the loader's length, capped by ``--max-steps-per-epoch``."""
    return min(args.max_steps_per_epoch, len(loader)) if args.max_steps_per_epoch else len(loader)


def wrap_for_training(model, args, dist: DistInfo):
    """The module the training loop calls: ``torch.compile`` (``--compile``) and DDP in distributed runs. The
    plain ``model`` stays the one to evaluate, save and average (EMA)."""
    train_model = torch.compile(model) if args.compile else model
    if dist.distributed:
        device_ids = [dist.local_rank] if str(dist.device).startswith('cuda') else None
        train_model = torch.nn.parallel.DistributedDataParallel(train_model, device_ids=device_ids)
    return train_model
