"""The embedded demo backbone of ``study.py`` and ``visualize.py``: a 6-block, width-64 plain ViT trained on
scikit-learn's DIGITS (``config/demo-digits-vit.json``), and the demo sweep (``data/study-digits-sweep.json``)."""
import json
import os
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


def train_demo(args, device: torch.device, path: str) -> None:
    """Train the demo backbone as ``main.py`` trains a config (builders + engine loops), save its weights to
    ``path`` (atomically, ``{'model', 'args', 'acc1'}``)."""
    print(f'training the demo backbone ({args.model} on {args.data_set}, {args.epochs} epochs) into {path}')
    random_seed(args.seed, 0)
    dist = utils.DistInfo(device=str(device))
    dataset_train, dataset_val, num_classes = builders.build_datasets(args)
    loader_train = builders.build_train_loader(dataset_train, args, dist)
    loader_val = builders.build_val_loader(dataset_val, args, dist)
    model = builders.build_model(args, num_classes, plain=True).to(device)
    opt = builders.build_optimization(args, model, builders.steps_per_epoch(loader_train, args), 1, device, None)
    criterion = builders.build_criterion(args, None, None)
    loop = LoopOptions(device, print_freq=10 ** 6)
    start = time.time()
    for epoch in range(args.epochs):
        train_one_epoch(model, criterion, loader_train, opt, loop, epoch)
        opt.lr_scheduler.step(epoch + 1)
    stats = evaluate(loader_val, model, loop)
    print(f"demo backbone: top-1 {stats['acc1']:.2f}% after {args.epochs} epochs ({time.time() - start:.0f} s)")
    config = json.loads(json.dumps({k: v for k, v in vars(args).items() if k not in ('model_kwargs', 'given')},
                                   default=str))
    utils.save_on_master({'model': model.state_dict(), 'args': {**config, **args.model_kwargs},
                          'acc1': stats['acc1']}, path)


def backbone_path(args) -> str:
    """Where the demo backbone's weights live for the resolved demo config ``args``."""
    return os.path.join(args.output_dir, 'checkpoint.pth')


def ensure_backbone(args, device: torch.device, distributed: bool = False) -> str:
    """The path of the demo backbone's weights, training it first (in this process) when they are missing."""
    path = backbone_path(args)
    if not os.path.isfile(path):
        if distributed:
            raise UserError(f'the demo backbone is not trained yet ({path}); run the command once in one process '
                            f'to train it')
        train_demo(args, device, path)
    return path
