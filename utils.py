"""Distributed helpers, metric logging, RNG state, atomic checkpoint writes."""
import argparse
import datetime
import errno
import fcntl
import json
import os
import random
import shutil
import socket
import subprocess
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Dict, Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist


class UserError(Exception):
    """An error the user caused (bad config, data, checkpoint, flags): one line, exit code 2, no traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse without its own exit: a bad flag raises :class:`UserError` (one line, exit code 2, by the caller)."""

    def error(self, message):
        raise UserError(message)


# ----------------------------------------------------------------------------------------------------------- distributed

@dataclass(frozen=True)
class DistInfo:
    """What the launcher says about this process. ``device`` is where it computes (``cuda:LOCAL_RANK`` under a
    launcher on CUDA); ``backend`` is None when the process group was not initialised (a single process)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = 'cpu'
    backend: Optional[str] = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed_mode(device: str, dist_url: str = 'env://', timeout_minutes: int = 30,
                          local_rank: Optional[int] = None) -> DistInfo:
    """Find rank, world size and local rank, init the process group when there are several processes, and return
    what was found (the caller's options are not modified).

    Reads torchrun / ``torch.distributed.launch`` variables (RANK, WORLD_SIZE, LOCAL_RANK) first, then SLURM's
    (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR from the node list when unset). A single plain process
    runs undistributed. ``local_rank`` is the ``--local-rank`` flag of the legacy launcher (used when LOCAL_RANK is
    unset). Backend: nccl for CUDA, gloo otherwise.
    """
    env = os.environ
    if 'RANK' in env and 'WORLD_SIZE' in env:
        rank, world_size = int(env['RANK']), int(env['WORLD_SIZE'])
        local_rank = int(env.get('LOCAL_RANK', local_rank or 0))
    elif 'SLURM_PROCID' in env and int(env.get('SLURM_NTASKS', '1')) > 1:
        rank, world_size = int(env['SLURM_PROCID']), int(env['SLURM_NTASKS'])
        local_rank = int(env.get('SLURM_LOCALID', 0))
        env.setdefault('MASTER_ADDR', _slurm_master_addr())
        env.setdefault('MASTER_PORT', '29500')
        env['RANK'], env['WORLD_SIZE'], env['LOCAL_RANK'] = str(rank), str(world_size), str(local_rank)
    else:
        return DistInfo(device=str(device))
    on_cuda = str(device).startswith('cuda')
    if on_cuda:
        torch.cuda.set_device(local_rank)
        device = f'cuda:{local_rank}'
    if world_size == 1:
        return DistInfo(rank, world_size, local_rank, str(device))
    backend = 'nccl' if on_cuda else 'gloo'
    dist.init_process_group(backend=backend, init_method=dist_url, world_size=world_size, rank=rank,
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    dist.barrier()
    setup_for_distributed(rank == 0)
    return DistInfo(rank, world_size, local_rank, str(device), backend)


def _slurm_master_addr() -> str:
    nodes = os.environ.get('SLURM_JOB_NODELIST') or os.environ.get('SLURM_NODELIST', '127.0.0.1')
    try:
        out = subprocess.run(['scontrol', 'show', 'hostnames', nodes], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodes.split(',')[0]


def setup_for_distributed(is_master: bool) -> None:
    """Silence ``print`` on non-master ranks (``print(..., force=True)`` still prints)."""
    import builtins
    builtin_print = builtins.print

    def print_(*args, **kwargs):
        if kwargs.pop('force', False) or is_master:
            builtin_print(*args, **kwargs)

    builtins.print = print_


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def all_reduce_sum(values: Iterable[float], device) -> list:
    """Sum a few numbers over all ranks (float64, on ``device`` so nccl works)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if is_dist():
        dist.all_reduce(t)
    return t.tolist()


def cleanup_distributed() -> None:
    if is_dist():
        dist.destroy_process_group()


def first_on_main(fn):
    """Run ``fn()`` on rank 0 only and return its result there (None elsewhere). A :class:`UserError` it raises is
    raised on every rank, so no process waits for a peer that has stopped."""
    result, message = None, None
    if is_main_process():
        try:
            result = fn()
        except UserError as e:
            message = str(e)
    if is_dist():
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message:
        raise UserError(message)
    return result


def cpu_count() -> int:
    """CPUs this process may run on (the figure DataLoader's worker warning uses)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------------------------------------- logging

class SmoothedValue:
    """A window median and a global average (weighted by ``n``)."""

    def __init__(self, window_size: int = 20, fmt: str = '{median:.4f} ({global_avg:.4f})'):
        self.deque = deque(maxlen=window_size)
        self.total, self.count, self.fmt = 0.0, 0, fmt

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self, device) -> None:
        self.count, self.total = all_reduce_sum([self.count, self.total], device)

    @property
    def median(self) -> float:
        return float(np.median(self.deque)) if self.deque else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else 0.0

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, global_avg=self.global_avg, value=self.value)


class MetricLogger:
    def __init__(self, delimiter: str = '  '):
        self.meters: Dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, n: int = 1, **kwargs) -> None:
        for k, v in kwargs.items():
            self.meters[k].update(float(v), n=n)

    def synchronize_between_processes(self, device) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes(device)

    def __str__(self) -> str:
        return self.delimiter.join(f'{name}: {meter}' for name, meter in self.meters.items())

    def log_every(self, iterable, print_freq: int, header: str = ''):
        """Yield from ``iterable``; every ``print_freq`` steps print progress, eta, step and data time, img/s."""
        total = len(iterable)
        width = len(str(total))
        start = end = time.time()
        step_time, data_time = SmoothedValue(fmt='{avg:.4f}'), SmoothedValue()
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            step_time.update(time.time() - end)
            end = time.time()
            if i % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(step_time.global_avg * (total - i - 1)))
                batch = obj[0].shape[0] if isinstance(obj, (tuple, list)) and torch.is_tensor(obj[0]) else 0
                img_s = batch / max(step_time.median, 1e-9)
                mem = ''
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    mem = f'  max mem: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f}MB'
                print(f'{header} [{i:>{width}}/{total}]  eta: {eta}  {self}  time: {step_time.median:.4f}  '
                      f'data: {data_time.median:.4f}  img/s: {img_s:.1f}{mem}', flush=True)
        total_time = time.time() - start
        print(f'{header} Total time: {datetime.timedelta(seconds=int(total_time))} '
              f'({total_time / max(total, 1):.4f} s / it)', flush=True)


# ----------------------------------------------------------------------------------------------------------- RNG state

def get_rng_state() -> dict:
    """RNG states as tensors and plain Python values (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    state = {
        'torch': torch.get_rng_state(),
        'numpy': {'keys': torch.from_numpy(np_state[1].astype(np.int64)), 'pos': int(np_state[2]),
                  'has_gauss': int(np_state[3]), 'cached_gaussian': float(np_state[4])},
        'python': _to_lists(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state['torch'])
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    random.setstate(_to_tuples(state['python']))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


# ----------------------------------------------------------------------------------------------------------- files

def save_on_master(obj, path: str) -> None:
    """``torch.save`` atomically (temporary file in the same folder, then ``os.replace``), rank 0 only.

    A failed write (disk full, quota, file-size limit) or an interruption removes the partial temporary file and
    leaves the previous ``path`` as it was; a failed write raises :class:`UserError`."""
    if not is_main_process():
        return
    write_atomic(path, lambda f: torch.save(obj, f))


def write_json_atomic(obj, path: str) -> None:
    write_text_atomic(json.dumps(obj, indent=2) + '\n', path)


def write_text_atomic(text: str, path: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically: readers see the old file or the new one, never a part."""
    write_atomic(path, lambda f: f.write(text.encode('utf-8')))


def write_atomic(path: str, write) -> None:
    """``write(f)`` into ``path.tmp`` (a binary Python file, so every failed write raises), fsync, then
    ``os.replace``; on any failure the temporary file is removed, ``path`` is left as it was and a failed write is a
    one-line :class:`UserError`."""
    tmp = f'{path}.tmp'
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:   # torch.save reports a failed write as RuntimeError
        _remove_quietly(tmp)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else 'the write failed'
        kept = 'the previous file is kept' if os.path.exists(path) else 'no previous file'
        raise UserError(f'cannot write {path}: {reason} ({_free_space(path)}); {kept}') from None
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _free_space(path: str) -> str:
    try:
        return f'{shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2 ** 20:.0f} MB free there'
    except OSError:
        return 'free space unknown'


def load_optimizer_state(optimizer, state: dict) -> None:
    """Restore the optimizer's moments and step counts from ``state`` but keep the hyperparameters its param
    groups have now (lr, initial_lr, weight decay, betas, eps, lr_scale): the command line of the resumed run wins."""
    current = [{k: v for k, v in group.items() if k != 'params'} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, settings in zip(optimizer.param_groups, current):
        group.update(settings)


def resume_hint(output_dir: str) -> str:
    """Where an interrupted run can be resumed from, in words."""
    path = os.path.join(output_dir, 'checkpoint.pth') if output_dir else ''
    if path and os.path.isfile(path):
        return f'{path} holds the last completed epoch; the same command resumes from it'
    return 'no checkpoint was written'


# ----------------------------------------------------------------------------------------------------- output folder

LOCK_NAME = 'run.lock'


def check_output_dir(path: str) -> None:
    """Check, without creating or writing anything, that ``path`` can become the output folder: an existing folder we
    may write into, or a path whose nearest existing parent is one. Raises a one-line :class:`UserError` that says
    what is wrong (a file in the way, no write permission, a name too long) and to choose another output folder."""
    hint = 'choose another output folder'
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UserError(f"output folder '{path}' is {_what_is(path)}, not a folder; {hint}")
    existing = os.path.abspath(path)
    while not os.path.lexists(existing):
        parent = os.path.dirname(existing)
        try:
            os.stat(existing)
        except OSError as e:
            if e.errno == errno.ENAMETOOLONG:
                raise UserError(f"cannot create output folder '{path}': {e.strerror}; {hint}") from None
        existing = parent
    if not os.path.isdir(existing):
        raise UserError(f"cannot create output folder '{path}': '{existing}' is {_what_is(existing)}, not a folder; "
                        f"{hint}")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = '' if existing == os.path.abspath(path) else f" (its parent '{existing}')"
        raise UserError(f"output folder '{path}'{where} is not writable: permission denied; {hint}")


def _what_is(path: str) -> str:
    """'a file', 'a device file', 'a broken link' ...: what sits at ``path`` instead of a folder."""
    if os.path.islink(path) and not os.path.exists(path):
        return 'a broken link'
    if os.path.isfile(path):
        return 'a file'
    return 'a device or other special file'


def make_output_dir(path: str) -> bool:
    """:func:`check_output_dir`, then create ``path`` and prove it writable (a probe file is written, synced and
    removed), so that an unusable output folder fails now, in one line, and not after the first epoch.
    Returns True if the folder was created here (the caller removes it again if it stays empty)."""
    check_output_dir(path)
    hint = 'choose another output folder'
    created = not os.path.exists(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder '{path}': {e.strerror}; {hint}") from None
    probe = os.path.join(path, f'.write-probe-{os.getpid()}')
    try:
        with open(probe, 'wb') as f:
            f.write(b'\0' * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if created:
            _remove_empty_folder(path)
        raise UserError(f"output folder '{path}' is not writable: {e.strerror}; {hint}") from None
    finally:
        _remove_quietly(probe)
    return created


def _remove_empty_folder(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


def lock_output_dir(path: str):
    """Take ``path/run.lock`` (an flock: released by the kernel when the process ends, even when killed) and write
    our pid and host into it. A second run into the same folder gets :class:`UserError` naming the holder."""
    lock_path = os.path.join(path, LOCK_NAME)
    while True:
        f = open(lock_path, 'a+')
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                f.close()
                raise UserError(f"cannot lock output folder '{path}': {e.strerror}") from None
            f.seek(0)
            holder = f.read().strip() or 'another process'
            f.close()
            raise UserError(f"output folder '{path}' is in use by {holder}; wait for that run to end or choose "
                            f"another --output_dir") from None
        try:
            same_file = os.stat(lock_path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:   # not a file its previous holder removed between our open and our lock
            break
        f.close()
    f.seek(0)
    f.truncate()
    f.write(f'pid {os.getpid()} on host {socket.gethostname()} (since {time.strftime("%Y-%m-%d %H:%M:%S")})\n')
    f.flush()
    return f


def unlock_output_dir(lock) -> None:
    """Remove the lock file, then release the lock."""
    _remove_quietly(lock.name)
    lock.close()


class OutputClaim:
    """The output folder of this run, checked and locked on rank 0 (see :func:`claim_output_dir`)."""

    def __init__(self, path: str = '', created: bool = False, lock=None):
        self.path, self.created, self.lock = path, created, lock

    def release(self) -> None:
        """Unlock; a folder this run created and left empty (it failed before writing anything) is removed."""
        if self.lock is not None:
            unlock_output_dir(self.lock)
            self.lock = None
        if self.created and os.path.isdir(self.path) and not os.listdir(self.path):
            os.rmdir(self.path)


def claim_output_dir(path: str) -> OutputClaim:
    """Check ``path`` (created, writable) and lock it, on rank 0; every rank raises the same :class:`UserError`."""
    if not path:
        return OutputClaim()

    def claim():
        created = make_output_dir(path)
        try:
            return OutputClaim(path, created, lock_output_dir(path))
        except UserError:
            OutputClaim(path, created).release()
            raise

    return first_on_main(claim) or OutputClaim()


def write_result_json(obj, path: str) -> None:
    """Write a result file; replacing an earlier one is said, never silent."""
    if os.path.isfile(path):
        print(f'note: replacing {path}')
    write_json_atomic(obj, path)


def read_log(path: str) -> list:
    """The JSON lines of a ``log.txt``."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_log(path: str, last_epoch: int) -> None:
    """Keep only the log lines of epochs <= ``last_epoch`` (a run killed after logging but before its checkpoint)."""
    kept = [rec for rec in read_log(path) if rec.get('epoch', -1) <= last_epoch]
    write_text_atomic(''.join(json.dumps(rec) + '\n' for rec in kept), path)


def append_log(record: dict, path: str) -> None:
    if is_main_process():
        with open(path, 'a') as f:
            f.write(json.dumps(record) + '\n')
            f.flush()
            os.fsync(f.fileno())
