"""The timing protocol shared by ``benchmark.py`` and ``study.py``: one model set up for one mode on one device
(:class:`Runner`), timed runs with device sync (:func:`timed_run`), their summary with the clean-iteration filter on CPU
(:func:`summarize`), interleaved measurement of several models (:func:`measure`), and the conditions of a measurement
(device, threads, versions).

``measure`` warms every runner up (``warmup`` untimed iterations, then a device sync), then alternates ``repeats``
timed runs of ``iters`` iterations; img/s of a run = batch x iters / wall time, with ``torch.cuda.synchronize`` before
and after each run on CUDA. The Expedit-SWAG tables' protocol (ToMe's ``benchmark``: 50 runs, the first 12
discarded as warm-up) is ``warmup=12, iters=38, repeats=1``.
"""
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine import autocast
from framework import counting

AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'none': None}
MODES = ('infer', 'train')


@dataclass
class TimingOptions:
    """How a measurement runs. ``mode``: ``infer`` (forward under ``inference_mode``, eval mode) or ``train`` (forward,
    cross-entropy, backward, AdamW step, train mode); ``amp``: a key of :data:`AMP_DTYPES`; ``clean_ratio``: on CPU an
    iteration is clean when process CPU time / wall time >= clean_ratio x threads."""
    mode: str = 'infer'
    batch_size: int = 32
    amp: str = 'none'
    channels_last: bool = False
    compile: bool = False
    warmup: int = 3
    iters: int = 10
    repeats: int = 5
    clean_ratio: float = 0.9

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {self.amp!r}")


# ---------------------------------------------------------------------------------------------------------- conditions

def cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    if device.type == 'cpu':
        return f'{cpu_name()} ({os.cpu_count()} logical CPUs)'
    return str(device)


def conditions(options: TimingOptions, device: torch.device, input_size: int) -> dict:
    import timm
    return dict(mode=options.mode, device=str(device), device_name=device_name(device), dtype='float32',
                amp=options.amp, batch_size=options.batch_size, input_size=input_size,
                threads=torch.get_num_threads(), channels_last=options.channels_last, compile=options.compile,
                warmup=options.warmup, iters=options.iters, repeats=options.repeats, torch=torch.__version__,
                timm=timm.__version__, python=platform.python_version(), platform=platform.platform(),
                cuda=torch.version.cuda if device.type == 'cuda' else None)


# -------------------------------------------------------------------------------------------------------------- timing

class Runner:
    """One model set up for one mode on one device; ``step()`` runs one iteration on a fixed synthetic batch."""

    def __init__(self, label: str, model: nn.Module, options: TimingOptions, device: torch.device, num_classes: int,
                 input_size: int, count_macs: bool = True):
        self.label = label
        self.params = counting.count_params(model)[0]
        self.gmacs = gmacs_of(model, input_size) if count_macs else None
        self.device = device
        self.train = options.mode == 'train'
        self.amp_dtype = AMP_DTYPES[options.amp]
        memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
        model = model.to(device=device, memory_format=memory_format)
        model.train(self.train)
        gen = torch.Generator().manual_seed(0)
        size = input_size
        self.x = torch.randn(options.batch_size, 3, size, size, generator=gen).to(device, memory_format=memory_format)
        self.y = torch.randint(0, max(1, num_classes), (options.batch_size,), generator=gen).to(device)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4) if self.train else None
        self.scaler = torch.amp.GradScaler(device.type) if self.train and options.amp == 'fp16' else None
        self.model = torch.compile(model) if options.compile else model
        self.peak_memory_mb = 0.0

    def static_bytes(self) -> int:
        """Bytes this runner keeps between steps: weights, gradients, optimizer state, the batch."""
        tensors = list(self.model.parameters()) + list(self.model.buffers()) + [self.x, self.y]
        tensors += [p.grad for p in self.model.parameters() if p.grad is not None]
        if self.optimizer is not None:
            tensors += [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def step(self) -> None:
        if not self.train:
            with torch.inference_mode(), autocast(self.device, self.amp_dtype):
                self.model(self.x)
            return
        with autocast(self.device, self.amp_dtype):
            out = self.model(self.x)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            loss = sum(F.cross_entropy(o.float(), self.y) for o in outs)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()


def gmacs_of(model: nn.Module, input_size: int) -> Optional[float]:
    """GMACs of one image (fvcore convention), or None when the model uses an op the counter has no handle for."""
    try:
        return round(counting.count_macs(model, input_size, 'fvcore')[0] / 1e9, 4)
    except counting.UncountedOpError:
        return None


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed_run(runner: Runner, iters: int) -> dict:
    """One timed run: total wall seconds, and per-iteration wall and process-CPU seconds on CPU."""
    device = runner.device
    per_iter = device.type == 'cpu'
    walls, cpus = [], []
    if device.type == 'cuda':
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        if per_iter:
            t, c = time.perf_counter(), time.process_time()
        runner.step()
        if per_iter:
            walls.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
    sync(device)
    wall = time.perf_counter() - start
    if device.type == 'cuda':
        # this model's own peak: what the run allocated on top of everything resident (other models in --vs
        # included), plus what this model keeps resident itself
        peak = torch.cuda.max_memory_allocated(device) - before + runner.static_bytes()
        runner.peak_memory_mb = max(runner.peak_memory_mb, peak / 2 ** 20)
    return dict(wall=wall, iter_wall=walls, iter_cpu=cpus)


def summarize(runs: List[dict], batch: int, iters: int, threads: int, clean_ratio: float) -> dict:
    rates = [batch * iters / r['wall'] for r in runs]
    out = dict(img_per_s=dict(median=statistics.median(rates), min=min(rates), max=max(rates), per_repeat=rates))
    walls = [w for r in runs for w in r['iter_wall']]
    cpus = [c for r in runs for c in r['iter_cpu']]
    if walls:
        threshold = clean_ratio * threads
        kept = [w for w, c in zip(walls, cpus) if c / w >= threshold]
        out['clean'] = dict(min_cpu_wall_ratio=round(threshold, 3), iters_kept=len(kept), iters_total=len(walls),
                            cpu_wall_ratio_median=statistics.median(c / w for w, c in zip(walls, cpus)),
                            img_per_s_median=batch / statistics.median(kept) if kept else None)
        # images per second of process CPU time: what the run cost the cores it had, whatever else was running
        cpu_rates = [batch * len(r['iter_cpu']) / sum(r['iter_cpu']) for r in runs]
        out['cpu_time'] = dict(img_per_cpu_s_median=statistics.median(cpu_rates), per_repeat=cpu_rates)
    else:
        out['clean'] = out['cpu_time'] = None
    return out


def measure(runners: List[Runner], options: TimingOptions) -> List[dict]:
    """Warm every runner up, then alternate timed runs (r1, r2, r1, r2 ...); one summary per runner."""
    for runner in runners:
        for _ in range(options.warmup):
            runner.step()
        sync(runner.device)
    runs = [[] for _ in runners]
    for _ in range(options.repeats):
        for i, runner in enumerate(runners):
            runs[i].append(timed_run(runner, options.iters))
    threads = torch.get_num_threads()
    out = []
    for runner, r in zip(runners, runs):
        s = summarize(r, options.batch_size, options.iters, threads, options.clean_ratio)
        s.update(model=runner.label, params=runner.params, gmacs=runner.gmacs)
        if runner.device.type == 'cuda':
            s.update(peak_memory_mb=round(runner.peak_memory_mb, 1), peak_memory_kind='cuda_max_memory_allocated')
        out.append(s)
    return out


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == 'darwin' else rss / 2 ** 10
