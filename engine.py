"""Training and evaluation loops. Device-agnostic; everything comes in as arguments (no argparse state)."""
import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from timm.utils import dispatch_clip_grad

from models.token_reduction import training_progress
import utils


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf on some rank (training) or the summed evaluation loss is not finite; raised on every
    rank together."""


def resolve_amp(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """``--amp`` (auto / bf16 / fp16 / none) -> the autocast dtype, None for fp32. ``auto``: bf16 on a CUDA device
    that supports it, fp16 on an older one, fp32 elsewhere."""
    if amp == 'none' or (amp == 'auto' and device.type != 'cuda'):
        return None
    if amp == 'fp16':
        return torch.float16
    if amp == 'bf16' or (device.type == 'cuda' and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    """Autocast to ``amp_dtype`` on ``device``; a no-op context for fp32 (None)."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


@dataclass
class Optimization:
    """What an optimizer update uses and changes. ``lr_scheduler`` is stepped per update by the loop when
    ``step_lr_per_update`` (``--sched-on-updates``), else per epoch by the caller; ``loss_scaler`` is timm's
    NativeScaler (fp16 only); ``max_norm`` clips the gradient norm; ``model_ema`` is updated after every update."""
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any = None
    step_lr_per_update: bool = False
    loss_scaler: Any = None
    max_norm: Optional[float] = None
    accum_steps: int = 1
    model_ema: Any = None


@dataclass
class LoopOptions:
    """How a loop runs: device, autocast dtype (None = fp32), channels-last inputs, progress lines every
    ``print_freq`` steps, at most ``max_steps`` steps per epoch (0 = all), and whether training runs in train mode."""
    device: torch.device
    amp_dtype: Optional[torch.dtype] = None
    channels_last: bool = False
    print_freq: int = 10
    max_steps: int = 0
    train_mode: bool = True


def train_one_epoch(model, criterion, data_loader, opt: Optimization, loop: LoopOptions, epoch: int,
                    num_updates: int = 0, mixup_fn=None):
    """One epoch. Returns (averaged stats, number of optimizer updates so far).

    The loss of every step is summed over ranks before the backward pass, so a NaN/Inf on any rank stops all ranks
    at the same step (before the weights are touched) with :class:`NonFiniteLossError`. With ``opt.accum_steps > 1``
    the gradients of that many batches are accumulated (DDP ``no_sync`` in between) before one optimizer step.
    Each forward runs inside ``training_progress(epoch + step / steps)``, which token-reduction methods with a
    training schedule read (EViT's keep-rate shrinking); evaluation forwards run outside it.
    """
    device, optimizer, accum_steps = loop.device, opt.optimizer, opt.accum_steps
    model.train(loop.train_mode)
    logger = utils.MetricLogger()
    header = f'Epoch: [{epoch}]'
    steps = len(data_loader) if not loop.max_steps else min(loop.max_steps, len(data_loader))
    world_size = utils.get_world_size()
    optimizer.zero_grad(set_to_none=True)
    start = time.time()
    n_images = 0
    for step, (samples, targets) in enumerate(logger.log_every(_limit(data_loader, steps), loop.print_freq, header)):
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if loop.channels_last:
            samples = samples.contiguous(memory_format=torch.channels_last)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        need_update = (step + 1) % accum_steps == 0 or step + 1 == steps
        with autocast(device, loop.amp_dtype), training_progress(epoch + step / steps):
            outputs = model(samples)
            loss = criterion(samples, outputs, targets)

        loss_sum = utils.all_reduce_sum([loss.item()], device)[0]
        if not math.isfinite(loss_sum):
            raise NonFiniteLossError(f'loss is {loss_sum} at epoch {epoch}, step {step}')

        sync = contextlib.nullcontext() if need_update or not hasattr(model, 'no_sync') else model.no_sync()
        with sync:
            scaled = loss / accum_steps
            if opt.loss_scaler is not None:
                opt.loss_scaler(scaled, optimizer, clip_grad=opt.max_norm, parameters=model.parameters(),
                                need_update=need_update)
            else:
                scaled.backward()
                if need_update:
                    if opt.max_norm is not None:
                        dispatch_clip_grad(model.parameters(), opt.max_norm)
                    optimizer.step()
        if need_update:
            optimizer.zero_grad(set_to_none=True)
            num_updates += 1
            if opt.step_lr_per_update:
                opt.lr_scheduler.step_update(num_updates=num_updates)
            if opt.model_ema is not None:
                opt.model_ema.update(getattr(model, 'module', model), step=num_updates)

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
def evaluate(data_loader, model, loop: LoopOptions):
    """Top-1, top-5 and mean cross-entropy over the whole loader. Sums stay on the device (no host sync per batch)
    and are added over ranks once at the end, so ranks may hold different numbers of samples. A loss sum that is
    not finite (NaN/Inf logits on some rank) raises :class:`NonFiniteLossError` on every rank, since every rank
    sees the same added sums."""
    device = loop.device
    model.eval()
    logger = utils.MetricLogger()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, samples
    for images, target in logger.log_every(data_loader, loop.print_freq, 'Test:'):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        if loop.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, loop.amp_dtype):
            output = model(images)
        output = output.float()
        topk = output.topk(min(5, output.shape[1]), dim=1).indices
        hits = topk == target[:, None]
        totals += torch.stack([F.cross_entropy(output, target, reduction='sum'), hits[:, 0].sum(),
                               hits.any(dim=1).sum(), torch.tensor(images.shape[0], device=device)]).double()
    loss_sum, correct1, correct5, n = utils.all_reduce_sum(totals.tolist(), device)
    n = int(round(n))
    if not math.isfinite(loss_sum):
        raise NonFiniteLossError(f'evaluation loss is {loss_sum} ({n} images)')
    stats = {'loss': loss_sum / max(n, 1), 'acc1': 100.0 * correct1 / max(n, 1),
             'acc5': 100.0 * correct5 / max(n, 1), 'n_samples': n}
    print(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f} "
          f"({n} images)", flush=True)
    return stats
