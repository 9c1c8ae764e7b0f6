"""The embedded demo backbone of ``study.py`` and ``visualize.py``: a 6-block, width-64 plain ViT trained on
scikit-learn's DIGITS (``config/demo-digits-vit.json``), and the demo sweep (``data/study-digits-sweep.json``).

The backbone lives in its own folder (:data:`DEMO_BACKBONE_DIR`), apart from the config's ``output_dir`` (where
``main.py --config config/demo-digits-vit.json`` trains), so neither run resumes from or overwrites the other.
Training saves an epoch checkpoint (``training.pth``: model, optimizer, lr schedule, epoch) after every epoch, so an
interrupted training resumes from its last finished epoch; the finished weights are ``checkpoint.pth``."""
import contextlib
import json
import os
import sys
import time

import torch
from timm.utils import random_seed

from engine import LoopOptions, evaluate, train_one_epoch
from framework import builders
from utils import UserError
import utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO, 'config', 'demo-digits-vit.json')
DEMO_SWEEP = os.path.join(REPO, 'data', 'study-digits-sweep.json')
DEMO_BACKBONE_DIR = os.path.join('outputs', 'study-digits', 'backbone')
WEIGHTS_FILE = 'checkpoint.pth'      # the finished backbone: {'model', 'args', 'acc1'}
TRAINING_FILE = 'training.pth'       # the last finished epoch: {'model', 'optimizer', 'lr_scheduler', 'epoch', 'args'}
LOG_FILE = 'train.log'
# the settings that make a backbone what it is: a saved backbone trained with others is not reused
TRAINING_SETTINGS = ('model', 'data_set', 'input_size', 'patch_size', 'embed_dim', 'depth', 'num_heads', 'epochs',
                     'batch_size', 'lr', 'min_lr', 'warmup_epochs', 'weight_decay', 'drop_path', 'smoothing', 'seed',
                     'max_steps_per_epoch')


def training_settings(args) -> dict:
    """The values of :data:`TRAINING_SETTINGS` (model arguments included) of a resolved config."""
    merged = {**vars(args), **getattr(args, 'model_kwargs', {})}
    return {k: merged.get(k) for k in TRAINING_SETTINGS}


def settings_differ(saved: dict, args) -> dict:
    """The recorded training settings that differ from ``args``'s: {name: (saved, now)}."""
    now = training_settings(args)
    return {k: (v, now[k]) for k, v in saved.items() if k in now and v != now[k]}


def _saved_config(args) -> dict:
    return json.loads(json.dumps({k: v for k, v in vars(args).items() if k not in ('model_kwargs', 'given')},
                                 default=str))


def train_demo(args, device: torch.device, path: str, verbose: bool = False) -> None:
    """Train the demo backbone as ``main.py`` trains a config (builders + engine loops), save its weights to
    ``path`` (atomically, ``{'model', 'args', 'acc1'}``). Every epoch is saved to ``training.pth`` beside it, and a
    training found there (same settings) is resumed. The loops' progress lines go to ``train.log`` beside it unless
    ``verbose``; one line every 10 epochs is printed."""
    folder = os.path.dirname(path) or '.'
    os.makedirs(folder, exist_ok=True)
    state_path = os.path.join(folder, TRAINING_FILE)
    log_path = os.path.join(folder, LOG_FILE)
    random_seed(args.seed, 0)
    dist = utils.DistInfo(device=str(device))
    dataset_train, dataset_val, num_classes = builders.build_datasets(args)
    loader_train = builders.build_train_loader(dataset_train, args, dist)
    loader_val = builders.build_val_loader(dataset_val, args, dist)
    model = builders.build_model(args, num_classes, plain=True).to(device)
    steps = builders.steps_per_epoch(loader_train, args)
    opt = builders.build_optimization(args, model, steps, 1, device, None)
    criterion = builders.build_criterion(args, None, None)
    loop = LoopOptions(device, print_freq=args.print_freq, max_steps=args.max_steps_per_epoch)
    start_epoch = 0
    if os.path.isfile(state_path):
        state = torch.load(state_path, map_location='cpu', weights_only=True)
        if 'settings' in state and not settings_differ(state['settings'], args):
            model.load_state_dict(state['model'])
            utils.load_optimizer_state(opt.optimizer, state['optimizer'])
            opt.lr_scheduler.load_state_dict(state['lr_scheduler'])
            utils.set_rng_state(state['rng'])
            start_epoch = state['epoch'] + 1
    num_updates = builders.resume_schedule(opt, args, start_epoch, steps)
    where = 'the terminal' if verbose else log_path
    if start_epoch:
        print(f'resuming the demo backbone\'s training at epoch {start_epoch} of {args.epochs} from {state_path} '
              f'(progress lines: {where})', flush=True)
    else:
        print(f'training the demo backbone ({args.model} on {args.data_set}, {args.epochs} epochs) into {folder} '
              f'(progress lines: {where})', flush=True)
    start = time.time()
    terminal = sys.stdout
    with open(log_path, 'a', encoding='utf-8') as log, \
            (contextlib.nullcontext() if verbose else contextlib.redirect_stdout(log)):
        for epoch in range(start_epoch, args.epochs):
            stats, num_updates = train_one_epoch(model, criterion, loader_train, opt, loop, epoch, num_updates)
            opt.lr_scheduler.step(epoch + 1)
            utils.save_on_master({'model': model.state_dict(), 'optimizer': opt.optimizer.state_dict(),
                                  'lr_scheduler': opt.lr_scheduler.state_dict(), 'epoch': epoch,
                                  'settings': training_settings(args), 'rng': utils.get_rng_state()}, state_path)
            if (epoch + 1) % 10 == 0 or epoch + 1 == args.epochs:
                print(f"demo backbone: epoch {epoch + 1}/{args.epochs}, loss {stats['loss']:.3f}, "
                      f"{time.time() - start:.0f} s", file=terminal, flush=True)
        stats = evaluate(loader_val, model, loop)
    print(f"demo backbone: top-1 {stats['acc1']:.2f}% after {args.epochs} epochs ({time.time() - start:.0f} s)",
          flush=True)
    utils.save_on_master({'model': model.state_dict(), 'args': {**_saved_config(args), **args.model_kwargs},
                          'settings': training_settings(args), 'acc1': stats['acc1']}, path)


def backbone_path(args, folder: str = DEMO_BACKBONE_DIR) -> str:
    """Where the demo backbone's weights live (``folder``/checkpoint.pth); ``args``: the resolved demo config."""
    return os.path.join(folder, WEIGHTS_FILE)


def ensure_backbone(args, device: torch.device, distributed: bool = False, folder: str = DEMO_BACKBONE_DIR,
                    verbose: bool = False) -> str:
    """The path of the demo backbone's weights, training it first (in this process) when they are missing or were
    trained with other settings than ``args`` (:data:`TRAINING_SETTINGS`: a user's error, said in one line)."""
    path = backbone_path(args, folder)
    if os.path.isfile(path):
        saved = torch.load(path, map_location='cpu', weights_only=True).get('settings')
        differ = settings_differ(saved or {}, args)
        if differ:
            differ = ', '.join(f'{k} {old} (now {new})' for k, (old, new) in differ.items())
            raise UserError(f'the demo backbone in {folder} was trained with other settings: {differ}; remove that '
                            f'folder or train into another one')
        return path
    if distributed:
        raise UserError(f'the demo backbone is not trained yet ({path}); run the command once in one process '
                        f'to train it')
    train_demo(args, device, path, verbose)
    return path
