"""benchmark.py: the JSON record of a run (throughput, memory, every condition), train steps that really train, the
interleaved --vs comparison, the clean-iteration filter; benchmarks/table.py's plot. No wall-clock limits are
asserted."""
import json
import statistics
import pytest
import timm
import torch

from conftest import run_script

import benchmark
from benchmarks import table
from framework import counting, timing
import models

SMALL = ['--batch-size', '2', '--iters', '2', '--warmup', '1', '--repeats', '2', '--json', '--input-size', '64']
TINY_RUN = ['--warmup', '0', '--iters', '1', '--repeats', '1', '--batch-size', '1', '--json']
CONDITIONS = ['mode', 'device', 'device_name', 'dtype', 'amp', 'batch_size', 'input_size', 'threads', 'channels_last',
              'compile', 'warmup', 'iters', 'repeats', 'torch', 'timm', 'python']


def _check_rate(stats: dict, repeats: int):
    r = stats['img_per_s']
    assert len(r['per_repeat']) == repeats
    assert all(v > 0 for v in r['per_repeat'])
    assert r['min'] <= r['median'] <= r['max']
    assert r['min'] == min(r['per_repeat']) and r['max'] == max(r['per_repeat'])


@pytest.mark.parametrize('mode', ['infer', 'train'])
def test_single_config_json(mode):
    result = run_script(['--config', 'config/hvt-ti-1.json', '--mode', mode, *SMALL], script='benchmark.py')
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    assert set(CONDITIONS) <= set(out)
    assert out['config'] == 'hvt-ti-1' and out['model'] == 'hvt_ti_1' and out['mode'] == mode
    assert (out['batch_size'], out['input_size'], out['iters'], out['repeats'], out['warmup']) == (2, 64, 2, 2, 1)
    assert out['device'] == 'cpu' and out['device_name'] and out['dtype'] == 'float32' and out['amp'] == 'none'
    assert out['threads'] == 1  # conftest's runner sets OMP_NUM_THREADS=1
    assert out['channels_last'] is False and out['compile'] is False
    assert out['torch'] == torch.__version__ and out['timm'] == timm.__version__
    model = models.create_model('hvt_ti_1', img_size=64)
    assert out['params'] == sum(p.numel() for p in model.parameters())
    assert out['gmacs'] == round(counting.count_macs(model, 64)[0] / 1e9, 4) and out['token_reduction'] is None
    _check_rate(out, 2)
    assert out['peak_memory_kind'] == 'cpu_peak_rss_process' and out['peak_memory_mb'] > 0
    clean = out['clean']
    assert clean['iters_total'] == 4 and 0 <= clean['iters_kept'] <= 4 and clean['min_cpu_wall_ratio'] == 0.9
    assert 'vs' not in out


def test_vs_timm_reports_a_ratio():
    result = run_script(['--config', 'config/deit-ti.json', '--vs', 'timm:deit_tiny_patch16_224', *SMALL],
                        script='benchmark.py')
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    vs = out['vs']
    assert vs['name'] == 'timm:deit_tiny_patch16_224'
    # the same architecture at the same resolution and class count: identical parameter counts
    assert vs['params'] == out['params'] == 5_682_856
    _check_rate(vs, 2)
    assert len(vs['ratios']) == 2
    for ours, theirs, ratio in zip(out['img_per_s']['per_repeat'], vs['img_per_s']['per_repeat'], vs['ratios']):
        assert ratio == pytest.approx(ours / theirs)
    assert vs['ratio'] > 0 and vs['ratio'] == pytest.approx(sorted(vs['ratios'])[0] / 2 + sorted(vs['ratios'])[1] / 2)


def _runner(mode, model=None):
    options = timing.TimingOptions(mode=mode, batch_size=2)
    model = model or models.create_model('hvt_model', img_size=32, patch_size=8, num_heads=2, head_dim=8,
                                         num_blocks=2, pool_block_width=1)
    return timing.Runner('tiny', model, options, torch.device('cpu'), num_classes=1000, input_size=32)


def test_train_step_updates_weights_with_adamw():
    runner = _runner('train')
    assert runner.model.training
    before = [p.detach().clone() for p in runner.model.parameters()]
    runner.step()
    assert isinstance(runner.optimizer, torch.optim.AdamW)
    assert all('exp_avg' in runner.optimizer.state[p] for p in runner.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, runner.model.parameters()))


def test_infer_step_does_not_touch_weights():
    runner = _runner('infer')
    assert not runner.model.training and runner.optimizer is None
    before = [p.detach().clone() for p in runner.model.parameters()]
    runner.step()
    assert all(torch.equal(a, b) for a, b in zip(before, runner.model.parameters()))


def test_train_step_accepts_tuple_outputs():
    """Distilled models return (cls, dist) logits in training; both get a loss."""
    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(3 * 32 * 32, 1000), torch.nn.Linear(3 * 32 * 32, 1000)

        def forward(self, x):
            return self.a(x.flatten(1)), self.b(x.flatten(1))

    runner = _runner('train', TwoHeads())
    before = runner.model.b.weight.detach().clone()
    runner.step()
    assert runner.optimizer.state[runner.model.a.weight] and runner.optimizer.state[runner.model.b.weight]
    assert runner.model.b.weight.grad is not None and runner.model.b.weight.grad.abs().sum() > 0
    assert not torch.equal(before, runner.model.b.weight)


def test_clean_filter_keeps_iterations_with_all_cores():
    runs = [dict(wall=3.0, iter_wall=[1.0, 1.0, 1.0], iter_cpu=[2.0, 1.0, 1.9]),
            dict(wall=2.0, iter_wall=[0.5, 1.5], iter_cpu=[0.95, 1.5])]
    s = timing.summarize(runs, batch=4, iters=3, threads=2, clean_ratio=0.9)
    assert s['img_per_s']['per_repeat'] == [4.0, 6.0]
    assert s['clean']['min_cpu_wall_ratio'] == 1.8
    assert (s['clean']['iters_kept'], s['clean']['iters_total']) == (3, 5)  # 2.0/1, 1.9/1, 0.95/0.5
    assert s['clean']['img_per_s_median'] == pytest.approx(4 / 1.0)
    # images per process CPU second, per run: 4 x 3 / 4.9 and 4 x 2 / 2.45
    assert s['cpu_time']['per_repeat'] == pytest.approx([12 / 4.9, 8 / 2.45])
    assert s['cpu_time']['img_per_cpu_s_median'] == pytest.approx((12 / 4.9 + 8 / 2.45) / 2)
    cuda_like = timing.summarize([dict(wall=1.0, iter_wall=[], iter_cpu=[])], 8, 2, 1, 0.9)
    assert cuda_like['clean'] is None and cuda_like['cpu_time'] is None and cuda_like['img_per_s']['median'] == 16.0


def test_measure_interleaves_runs(monkeypatch):
    order = []
    monkeypatch.setattr(timing, 'timed_run', lambda runner, iters: order.append(runner.label) or
                        dict(wall=1.0, iter_wall=[1.0], iter_cpu=[1.0]))
    a, b = _runner('infer'), _runner('infer')
    a.label, b.label = 'ours', 'theirs'
    options = timing.TimingOptions(warmup=0, repeats=3, iters=1, batch_size=2)
    results = timing.measure([a, b], options)
    assert order == ['ours', 'theirs'] * 3
    assert [r['model'] for r in results] == ['ours', 'theirs']


def test_model_default_input_size_is_measured(tmp_path, monkeypatch, capsys):
    """Without input_size in the config or on the command line, the model's registered input size is measured."""
    monkeypatch.setitem(models.registry._DATA_CONFIGS, 'deit_tiny',
                        {**models.data_config('deit_tiny'), 'input_size': 48})
    cfg = tmp_path / 'c.json'
    cfg.write_text(json.dumps({'model': 'deit_tiny'}))
    code = benchmark.main(['--config', str(cfg), *TINY_RUN])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)['input_size'] == 48
    code = benchmark.main(['--config', str(cfg), *TINY_RUN, '--input-size', '32'])
    assert code == 0 and json.loads(capsys.readouterr()[0])['input_size'] == 32


def test_vs_plain_times_the_model_without_token_reduction(tmp_path, monkeypatch, capsys):
    """--vs plain builds the config's model a second time without its token reduction (the reductions applied are
    recorded here) and reports the ratio."""
    specs = []
    real = models.registry.apply_token_reduction

    def apply_token_reduction(model, spec):
        specs.append(spec)
        return real(model, spec)

    monkeypatch.setattr(models.registry, 'apply_token_reduction', apply_token_reduction)   # what create_model calls
    spec = {'method': 'tome', 'r': 1}
    code = benchmark.main(['--config', 'config/deit-ti.json', '--input-size', '64', '--token-reduction',
                           json.dumps(spec), '--vs', 'plain', *TINY_RUN])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert specs == [spec]   # the plain twin gets none
    assert result['token_reduction'] == spec and result['vs']['name'] == 'plain'
    assert result['vs']['model'] == 'deit_tiny (plain)' and result['vs']['params'] == result['params']
    assert result['vs']['ratio'] == pytest.approx(result['img_per_s']['median'] / result['vs']['img_per_s']['median'])


def test_train_vs_plain_records_both_rows_and_the_mac_ratio(capsys):
    """--mode train --vs plain: training img/s of the reduced and the plain model, interleaved, with forward +
    backward GMACs (3 x forward) and the MAC ratio computed from the two models' own counts."""
    spec = {'method': 'tome', 'r': 1}
    code = benchmark.main(['--config', 'config/deit-ti.json', '--input-size', '64', '--mode', 'train',
                           '--token-reduction', json.dumps(spec), '--vs', 'plain', '--warmup', '0', '--iters', '1',
                           '--repeats', '2', '--batch-size', '2', '--json'])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    vs = result['vs']
    assert result['mode'] == 'train' and result['token_reduction'] == spec and vs['name'] == 'plain'
    _check_rate(result, 2)
    _check_rate(vs, 2)
    reduced = models.apply_token_reduction(models.create_model('deit_tiny', img_size=64), spec)
    plain = models.create_model('deit_tiny', img_size=64)
    reduced_gmacs = round(counting.count_macs(reduced, 64)[0] / 1e9, 4)
    plain_gmacs = round(counting.count_macs(plain, 64)[0] / 1e9, 4)
    assert (result['gmacs'], vs['gmacs']) == (reduced_gmacs, plain_gmacs) and reduced_gmacs < plain_gmacs
    assert result['train_gmacs'] == round(3 * reduced_gmacs, 4) and vs['train_gmacs'] == round(3 * plain_gmacs, 4)
    assert '3 x forward' in result['train_macs_convention']
    assert vs['mac_ratio'] == pytest.approx(plain_gmacs / reduced_gmacs)
    assert vs['ratio'] == pytest.approx(statistics.median(vs['ratios']))
    assert vs['fraction_of_mac_ratio'] == pytest.approx(vs['ratio'] / vs['mac_ratio'])
    cpu_ratios = [a / b for a, b in zip(result['cpu_time']['per_repeat'], vs['cpu_time']['per_repeat'])]
    assert vs['cpu_time_ratio'] == pytest.approx(statistics.median(cpu_ratios))
    assert vs['cpu_time_fraction_of_mac_ratio'] == pytest.approx(vs['cpu_time_ratio'] / vs['mac_ratio'])


def test_timing_options_reject_unknown_modes():
    with pytest.raises(ValueError, match='mode must be one of infer, train'):
        timing.TimingOptions(mode='fly')
    with pytest.raises(ValueError, match='amp must be one of'):
        timing.TimingOptions(amp='fp8')


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip('matplotlib')
    conditions = dict(mode='infer', device_name='cpu', batch_size=2, amp='none', threads=1, input_size=64,
                      channels_last=False, compile=False, warmup=1, repeats=1, iters=1, torch='2', timm='1')
    results = [dict(config='hvt-ti-1', model='hvt_ti_1', params=5_000_000, clean=None, gmacs=0.07,
                    img_per_s=dict(median=10.0, min=9.0, max=11.0), **conditions),
               dict(config='deit-ti', config_path='config/deit-ti.json', error='cannot build')]
    (tmp_path / 'all.json').write_text(json.dumps(results))
    path = tmp_path / 'speed.png'
    assert table.main([str(tmp_path / 'all.json'), '--plot', str(path)]) == 0
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_reduction_table_from_json_lines(tmp_path, capsys):
    """train_speed.sh's JSON lines: one row per setting with the speed-up, the MAC ratio and the fraction."""
    conditions = dict(mode='train', device_name='cpu', batch_size=32, amp='none', threads=2, input_size=224,
                      channels_last=False, compile=False, warmup=1, repeats=2, iters=2, torch='2', timm='1')
    rate = dict(median=10.0, min=9.0, max=11.0, per_repeat=[9.0, 11.0])
    plain = dict(name='plain', model='deit_small (plain)', img_per_s=dict(median=5.0, min=4.5, max=5.5),
                 ratio=2.0, ratios=[2.0, 2.0], clean_ratio=None, mac_ratio=2.5, fraction_of_mac_ratio=0.8)
    record = dict(config='deit-s', model='deit_small', token_reduction={'method': 'tome', 'r': 13},
                  img_per_s=rate, vs=plain, **conditions)
    lines = tmp_path / 'train_speed.jsonl'
    lines.write_text(json.dumps(record) + '\n' + json.dumps({**record, 'token_reduction': {'method': 'evit',
                                                                                          'keep_rate': 0.7}}) + '\n')
    assert table.main([str(lines)]) == 0
    out = capsys.readouterr()[0]
    assert 'MAC ratio (forward + backward = 3 x forward)' in out
    assert '| tome | r 13 | 10.0 (9.0-11.0) | 5.0 (4.5-5.5) | 2.00x | 2.50x | 80% | - | - | - |' in out
    assert '| evit | keep_rate 0.7 |' in out


def test_plot_into_a_missing_folder_fails_before_reading(tmp_path, capsys):
    code = table.main([str(tmp_path / 'not-read-yet.json'), '--plot', str(tmp_path / 'nope' / 'speed.png')])
    out, err = capsys.readouterr()
    assert code == 2 and "folder '" in err and 'does not exist' in err and 'not-read-yet' not in err


@pytest.mark.parametrize('argv, needle', [
    (['--config', 'config/hvt-ti-1.json', '--mode', 'fly'], '--mode must be infer or train'),
    (['--config', 'config/hvt-ti-1.json', '--amp', 'fp8'], '--amp must be one of'),
    (['--config', 'config/hvt-ti-1.json', '--vs', 'deit_small'], '--vs takes plain, timm:NAME'),
    (['--config', 'config/hvt-ti-1.json', '--vs', 'plain'], 'this config has no token_reduction'),
    (['--config', 'config/hvt-ti-1.json', '--token-reduction', '{"r": '], 'not valid JSON'),
    (['--config', 'config/hvt-ti-1.json', '--vs', 'timm:no_such_model_xyz'], "unknown timm model"),
    (['--config', 'config/missing.json'], "config file 'config/missing.json' not found"),
    (['--config', 'config/hvt-ti-1.json', '--iters', '0'], '--iters must be >= 1'),
    ([], 'give --config PATH or --all'),
])
def test_user_errors_are_one_line(capsys, argv, needle):
    code = benchmark.main([*argv, '--warmup', '0', '--iters' if '--iters' not in argv else '--repeats', '1',
                           '--batch-size', '1', '--input-size', '32'])
    out, err = capsys.readouterr()
    assert code == 2 and out == ''
    assert err.startswith('error: ') and needle in err and len(err.strip().splitlines()) == 1
