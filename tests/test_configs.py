"""Bad config values and flags: one line on stderr, exit 2, and nothing written (no new folder, no rewritten config).

They run ``main.main`` in this process (it returns the exit code and prints the one-line error)."""
import pytest

from conftest import DIGITS, one_error_line
import main


def bad_value_cases(tmp):
    def config(name, text):
        path = tmp / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ['--config', str(path)]

    return {
        'null model': (config('m.json', '{"model": null}'), "'model' in"),
        'null epochs': (config('e.json', '{"epochs": null}'), "'epochs' in"),
        'null batch_size': (config('b.json', '{"batch_size": null}'), "'batch_size' in"),
        'negative lr': (['--lr', '-0.1'], '--lr must be >= 0'),
        'zero epochs': (['--epochs', '0'], '--epochs must be >= 1'),
        'negative epochs in config': (config('n.json', '{"epochs": -3}'), '--epochs must be >= 1'),
        'negative num_workers': (['--num-workers', '-1'], '--num-workers must be >= 0'),
        'zero input_size': (['--input-size', '0'], '--input-size must be >= 1'),
        'zero patch_size': (config('p.json', '{"model": "hvt_model", "patch_size": 0}'), "'patch_size' must be > 0"),
        'binary config': (config('bin.json', bytes(range(256)) * 4), 'is not UTF-8 text'),
        'duplicate key': (config('d.json', '{"lr": 0.1, "epochs": 2, "lr": 0.2}'), "key 'lr' twice"),
    }


BAD_VALUE_CASES = ['null model', 'null epochs', 'null batch_size', 'negative lr', 'zero epochs',
                   'negative epochs in config', 'negative num_workers', 'zero input_size', 'zero patch_size',
                   'binary config', 'duplicate key']


@pytest.mark.parametrize('case', BAD_VALUE_CASES)
def test_bad_value_is_one_line_and_writes_nothing(case, tmp_path, capsys):
    flags, message = bad_value_cases(tmp_path)[case]
    fresh, previous = tmp_path / 'fresh', tmp_path / 'previous'
    previous.mkdir()
    (previous / 'config.json').write_text('{"epochs": 7}\n')
    for out in (fresh, previous):   # (no model flags here: they would override the config's values)
        assert main.main([*DIGITS, '--max-steps-per-epoch', '1', *flags, '--output_dir', str(out)]) == 2
        assert message in one_error_line(capsys.readouterr().err)
    assert not fresh.exists()                                          # no empty folder left behind
    assert (previous / 'config.json').read_text() == '{"epochs": 7}\n'  # nor a rewritten config
