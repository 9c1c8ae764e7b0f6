"""run_with_submitit.py: the command is checked before anything is submitted, a failing run fails its job, and the
help says where the other flags go. Jobs run on submitit's local executor."""
import json

import pytest

from conftest import FAST, TINY_HVT, one_error_line, run_script


def test_submitit_validates_before_submitting(tmp_path, capsys):
    import run_with_submitit
    bad = tmp_path / 'bad.json'
    bad.write_text(json.dumps({'epochs': 1, 'batch_sise': 4, 'output_dir': str(tmp_path / 'out')}))
    assert run_with_submitit.submit(['--executor', 'local', '--config', str(bad)]) == 2
    assert "unknown config key 'batch_sise'" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / 'out').exists()    # nothing submitted, no job folder


def test_submitit_failing_run_fails_the_job(tmp_path):
    import submitit
    import run_with_submitit
    config = tmp_path / 'c.json'   # the output folder comes from the config
    config.write_text(json.dumps({'epochs': 1, 'output_dir': str(tmp_path / 'out')}))
    job = run_with_submitit.submit(['--executor', 'local', '--ngpus', '1', '--timeout', '10', '--config', str(config),
                                    *TINY_HVT, *FAST, '--device', 'cpu', '--data-set', 'IMNET',
                                    '--data-path', str(tmp_path / 'no_imagenet')])
    with pytest.raises(submitit.core.utils.FailedJobError):
        job.result()
    assert (tmp_path / 'out' / 'submitit').is_dir()      # the job folder went under the config's output_dir
    assert 'does not exist' in job.stderr()


def test_submitit_help_says_where_other_flags_go():
    res = run_script(['--help'], script='run_with_submitit.py')
    assert res.returncode == 0 and 'every other flag goes to main.py' in ' '.join(res.stdout.lower().split())
