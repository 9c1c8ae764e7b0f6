"""Submit main.py to SLURM with submitit: one task per GPU, requeue on timeout/pre-emption, resume from the last
checkpoint.

    python run_with_submitit.py --nodes 2 --ngpus 8 --partition gpu --timeout 2800 \\
        --config config/hvt-s-1.json --data-set IMNET --data-path /imagenet --output_dir /checkpoint/hvt-s-1

Every flag of main.py is accepted and passed through. ``--executor local`` runs the job on this machine through
submitit's LocalExecutor (used by the tests).
"""
import argparse
import os
import sys
import uuid
from pathlib import Path

import submitit


def parse_args(argv=None):
    parser = argparse.ArgumentParser('Submit main.py through submitit', allow_abbrev=False)
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


def _output_dir(main_argv):
    """The --output_dir / --output-dir value among main.py's flags (required: checkpoints must outlive the job)."""
    for i, token in enumerate(main_argv):
        for flag in ('--output_dir', '--output-dir'):
            if token == flag and i + 1 < len(main_argv):
                return main_argv[i + 1]
            if token.startswith(flag + '='):
                return token.split('=', 1)[1]
    return ''


class Trainer:
    """The submitted callable: sets the rendezvous from submitit's job environment and runs main.main()."""

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
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import main
        return main.main(argv)

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


def submit(argv=None):
    args, main_argv = parse_args(argv)
    output_dir = _output_dir(main_argv)
    if not output_dir:
        print('error: pass --output_dir (checkpoints must outlive the job for requeue-to-resume)', file=sys.stderr)
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
