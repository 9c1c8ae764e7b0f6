"""Training and evaluation loops. Device-agnostic; everything comes in as arguments (no argparse state)."""
import contextlib
import math
import time
from typing import Optional

import torch
import torch.nn.functional as F
from timm.utils import dispatch_clip_grad

import utils


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf on some rank; raised on every rank together."""


def autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def train_one_epoch(model, criterion, data_loader, optimizer, device, epoch: int, loss_scaler=None,
                    amp_dtype=None, max_norm: Optional[float] = None, model_ema=None, mixup_fn=None,
                    set_training_mode: bool = True, accum_steps: int = 1, lr_scheduler=None,
                    num_updates: int = 0, print_freq: int = 10, max_steps: int = 0, channels_last: bool = False):
    """One epoch. Returns (averaged stats, number of optimizer updates so far).

    The loss of every step is summed over ranks before the backward pass, so a NaN/Inf on any rank stops all ranks
    at the same step (before the weights are touched) with :class:`NonFiniteLossError`. With ``accum_steps > 1`` the
    gradients of that many batches are accumulated (DDP ``no_sync`` in between) before one optimizer step.
    ``lr_scheduler`` is stepped per update when given (``--sched-on-updates``); otherwise the caller steps it per epoch.
    """
    model.train(set_training_mode)
    logger = utils.MetricLogger()
    header = f'Epoch: [{epoch}]'
    steps = len(data_loader) if not max_steps else min(max_steps, len(data_loader))
    world_size = utils.get_world_size()
    optimizer.zero_grad(set_to_none=True)
    start = time.time()
    n_images = 0
    for step, (samples, targets) in enumerate(logger.log_every(_limit(data_loader, steps), print_freq, header)):
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if channels_last:
            samples = samples.contiguous(memory_format=torch.channels_last)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        need_update = (step + 1) % accum_steps == 0 or step + 1 == steps
        with autocast(device, amp_dtype):
            outputs = model(samples)
            loss = criterion(samples, outputs, targets)

        loss_sum = utils.all_reduce_sum([loss.item()], device)[0]
        if not math.isfinite(loss_sum):
            raise NonFiniteLossError(f'loss is {loss_sum} at epoch {epoch}, step {step}')

        sync = contextlib.nullcontext() if need_update or not hasattr(model, 'no_sync') else model.no_sync()
        with sync:
            scaled = loss / accum_steps
            if loss_scaler is not None:
                loss_scaler(scaled, optimizer, clip_grad=max_norm, parameters=model.parameters(),
                            need_update=need_update)
            else:
                scaled.backward()
                if need_update:
                    if max_norm is not None:
                        dispatch_clip_grad(model.parameters(), max_norm)
                    optimizer.step()
        if need_update:
            optimizer.zero_grad(set_to_none=True)
            num_updates += 1
            if lr_scheduler is not None:
                lr_scheduler.step_update(num_updates=num_updates)
            if model_ema is not None:
                model_ema.update(getattr(model, 'module', model), step=num_updates)

        n_images += samples.shape[0]
        logger.update(loss=loss_sum / world_size, n=samples.shape[0])
        logger.update(lr=optimizer.param_groups[0]['lr'])
    logger.synchronize_between_processes(device)
    elapsed = time.time() - start
    stats = {k: meter.global_avg for k, meter in logger.meters.items()}
    stats['lr'] = optimizer.param_groups[0]['lr']
    stats['epoch_time'] = elapsed
    stats['images_per_sec'] = n_images * world_size / max(elapsed, 1e-9)
    print('Averaged stats:', logger, flush=True)
    return stats, num_updates


def _limit(loader, steps: int):
    """The first ``steps`` batches of ``loader``, with a length (for progress lines)."""
    class Limited:
        def __len__(self):
            return steps

        def __iter__(self):
            for i, batch in enumerate(loader):
                if i >= steps:
                    break
                yield batch
    return Limited()


@torch.no_grad()
def evaluate(data_loader, model, device, amp_dtype=None, print_freq: int = 10, channels_last: bool = False):
    """Top-1, top-5 and mean cross-entropy over the whole loader. Sums stay on the device (no host sync per batch)
    and are added over ranks once at the end, so ranks may hold different numbers of samples."""
    model.eval()
    logger = utils.MetricLogger()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, samples
    for images, target in logger.log_every(data_loader, print_freq, 'Test:'):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            output = model(images)
        output = output.float()
        topk = output.topk(min(5, output.shape[1]), dim=1).indices
        hits = topk == target[:, None]
        totals += torch.stack([F.cross_entropy(output, target, reduction='sum'), hits[:, 0].sum(),
                               hits.any(dim=1).sum(), torch.tensor(images.shape[0], device=device)]).double()
    loss_sum, correct1, correct5, n = utils.all_reduce_sum(totals.tolist(), device)
    n = int(round(n))
    stats = {'loss': loss_sum / max(n, 1), 'acc1': 100.0 * correct1 / max(n, 1),
             'acc5': 100.0 * correct5 / max(n, 1), 'n_samples': n}
    print(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f} "
          f"({n} images)", flush=True)
    return stats
