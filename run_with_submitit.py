"""Submit main.py to SLURM with submitit: one task per GPU, requeue on timeout/pre-emption, resume from the last
checkpoint.

    python run_with_submitit.py --nodes 2 --ngpus 8 --partition gpu --timeout 2800 \\
        --config config/hvt-s-1.json --data-set IMNET --data-path /imagenet --output_dir /checkpoint/hvt-s-1

Every flag of main.py is accepted and passed through; main.py's arguments and config are checked here, before
anything is submitted. ``--executor local`` runs the job on this machine through submitit's LocalExecutor (used by
the tests). A run that fails (main.py's exit code is not 0) fails the job.
"""
import os
import subprocess
import sys
import uuid
from pathlib import Path

import submitit

from framework import options
import utils
from utils import ArgumentParser, UserError


class RunFailed(RuntimeError):
    """main.py returned a non-zero exit code inside the job: raised so that submitit marks the job as failed."""


def parse_args(argv=None):
    parser = ArgumentParser(
        'run_with_submitit.py', allow_abbrev=False,
        description='Submit main.py to SLURM through submitit (requeued on timeout, resumed from the last '
                    'checkpoint).',
        epilog='Every other flag goes to main.py (see python main.py --help) and is checked before submitting. '
               'The output folder is --output_dir, or the output_dir / exp_name of the --config.')
    parser.add_argument('--ngpus', type=int, default=8, help='GPUs (tasks) per node')
    parser.add_argument('--nodes', type=int, default=1)
    parser.add_argument('--timeout', type=int, default=2800, help='minutes per job; the job is requeued after it')
    parser.add_argument('--partition', type=str, default='')
    parser.add_argument('--account', type=str, default='')
    parser.add_argument('--qos', type=str, default='')
    parser.add_argument('--constraint', type=str, default='')
    parser.add_argument('--comment', type=str, default='')
    parser.add_argument('--cpus_per_task', '--cpus-per-task', type=int, default=10)
    parser.add_argument('--mem_per_gpu', '--mem-per-gpu', type=int, default=40, help='GB')
    parser.add_argument('--job_dir', '--job-dir', type=str, default='', help='submitit logs; default output_dir/submitit')
    parser.add_argument('--executor', choices=['slurm', 'local'], default='slurm')
    parser.add_argument('--max_num_timeout', '--max-num-timeout', type=int, default=30, help='requeues allowed')
    args, main_argv = parser.parse_known_args(argv)
    return args, main_argv


class Trainer:
    """The submitted callable: sets the rendezvous from submitit's job environment and runs main.py in it."""

    def __init__(self, main_argv, init_file: str):
        self.main_argv = list(main_argv)
        self.init_file = init_file

    def __call__(self):
        env = submitit.JobEnvironment()
        os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank))
        argv = self.main_argv
        if env.num_tasks > 1:
            argv = argv + ['--dist-url', f'file://{self.init_file}']
            os.environ.setdefault('MASTER_ADDR', env.hostnames[0])
            os.environ.setdefault('MASTER_PORT', '29500')
        main_py = Path(__file__).resolve().parent / 'main.py'
        sys.stdout.flush()
        code = subprocess.call([sys.executable, str(main_py), *argv])   # output and errors go to the job's logs
        if code != 0:
            raise RunFailed(f'main.py exited with code {code} (its error is above)')
        return code

    def checkpoint(self):
        """Called by submitit on timeout or pre-emption: requeue the same job; main.py auto-resumes from
        output_dir/checkpoint.pth."""
        init_file = _new_init_file(Path(self.init_file).parent)
        return submitit.helpers.DelayedSubmission(Trainer(self.main_argv, init_file))


def _new_init_file(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f'{uuid.uuid4().hex}_init'
    if path.exists():
        path.unlink()
    return str(path)


def check(argv):
    """Parse our flags and check main.py's arguments, config and output folder as main.py would; returns
    (our args, main.py's argv, main.py's output folder) or raises :class:`UserError`."""
    args, main_argv = parse_args(argv)
    main_args = options.parse_args(main_argv)
    if not main_args.output_dir:
        raise UserError('pass --output_dir (or output_dir in the config): checkpoints must outlive the job for '
                        'requeue-to-resume')
    utils.check_output_dir(main_args.output_dir)
    return args, main_argv, main_args.output_dir


def submit(argv=None):
    """Submit the job; returns it, or 2 after a one-line error (nothing submitted)."""
    try:
        args, main_argv, output_dir = check(argv)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    job_dir = Path(args.job_dir or os.path.join(output_dir, 'submitit'))
    job_dir.mkdir(parents=True, exist_ok=True)
    if args.executor == 'local':
        executor = submitit.LocalExecutor(folder=job_dir, max_num_timeout=args.max_num_timeout)
        executor.update_parameters(timeout_min=args.timeout, gpus_per_node=args.ngpus, tasks_per_node=args.ngpus,
                                   nodes=args.nodes)
    else:
        executor = submitit.AutoExecutor(folder=job_dir, slurm_max_num_timeout=args.max_num_timeout)
        extra = {k: v for k, v in (('slurm_partition', args.partition), ('slurm_account', args.account),
                                   ('slurm_qos', args.qos), ('slurm_constraint', args.constraint),
                                   ('slurm_comment', args.comment)) if v}
        executor.update_parameters(
            mem_gb=args.mem_per_gpu * args.ngpus, gpus_per_node=args.ngpus, tasks_per_node=args.ngpus,
            cpus_per_task=args.cpus_per_task, nodes=args.nodes, timeout_min=args.timeout,
            slurm_signal_delay_s=120, name='hvt', **extra)
    trainer = Trainer(main_argv, _new_init_file(job_dir))
    job = executor.submit(trainer)
    print(f'Submitted job {job.job_id}; logs in {job_dir}')
    return job


if __name__ == '__main__':
    result = submit()
    sys.exit(result if isinstance(result, int) else 0)
