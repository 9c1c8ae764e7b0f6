"""The output folder: checked before any work (a file in the way, no permission, a name too long, a folder in use by
another run), each a one-line error with exit 2 that names the problem."""
import os

import pytest

from conftest import SHORT, one_error_line, run_script, snapshot
import main
import utils


def test_unusable_output_folder_fails_before_any_work(tmp_path, capsys):
    a_file = tmp_path / 'a_file'
    a_file.write_text('x')
    cases = {a_file: 'is a file, not a folder', a_file / 'sub': f"'{a_file}' is a file, not a folder",
             '/dev/full': 'is a device or other special file, not a folder', tmp_path / ('x' * 300): 'name too long'}
    for out, message in cases.items():
        assert main.main([*SHORT, '--epochs', '1', '--output_dir', str(out)]) == 2
        captured = capsys.readouterr()
        assert message in one_error_line(captured.err)
        assert 'number of params' not in captured.out    # nothing was built


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into read-only folders')
def test_read_only_output_folder_fails_before_any_work(tmp_path, capsys):
    out = tmp_path / 'ro'
    out.mkdir()
    out.chmod(0o555)
    assert main.main([*SHORT, '--epochs', '1', '--output_dir', str(out)]) == 2
    assert 'is not writable' in one_error_line(capsys.readouterr().err)


def test_second_run_into_a_locked_output_folder_stops(trained):
    out, _ = trained
    before = snapshot(out)
    lock = utils.lock_output_dir(str(out))      # this process plays the first run
    try:
        res = run_script([*SHORT, '--epochs', '2', '--output_dir', out])
    finally:
        utils.unlock_output_dir(lock)
    assert res.returncode == 2
    line = one_error_line(res.stderr)
    assert f'pid {os.getpid()}' in line and 'in use' in line
    assert snapshot(out) == before


def test_output_folder_that_is_a_file_says_so(tmp_path):
    """Not "is not writable: File exists": the message says a file is in the way."""
    a_file = tmp_path / 'a_file'
    a_file.write_text('x')
    res = run_script([*SHORT, '--epochs', '1', '--output_dir', a_file])
    assert res.returncode == 2
    assert one_error_line(res.stderr) == (f"error: output folder '{a_file}' is a file, not a folder; choose another "
                                          f"output folder")
    assert a_file.read_text() == 'x'


def test_check_output_dir_creates_nothing(tmp_path):
    """``utils.check_output_dir`` only checks (a run's own creation is ``make_output_dir``, which says whether it
    created the folder)."""
    target = tmp_path / 'a' / 'b'
    utils.check_output_dir(str(target))
    assert not (tmp_path / 'a').exists()
    assert utils.make_output_dir(str(target)) is True and target.is_dir() and not list(target.iterdir())
    assert utils.make_output_dir(str(target)) is False
