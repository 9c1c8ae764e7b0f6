"""study.py: the table layout (methods by their papers' names, columns by the specs' parameter names), the row
record (FLOPs equal to the counting library's, accuracy over every validation image), Expedit-SWAG's published rows
taken from the data file, resume after a kill, and bad inputs (one line, exit 2, finished rows kept). Backbone:
swag_vit_l16 narrowed to 2 blocks of width 64 at 64 px, random weights, FAKE data."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO

from framework import counting
from framework import study_results as rs
import models
import study

# swag_vit_l16 at 64 px (4x4 patches + class token), narrowed so a row takes well under a second
SMALL_BACKBONE = {'model': 'swag_vit_l16', 'input_size': 64, 'depth': 2, 'embed_dim': 64, 'num_heads': 2,
                  'batch_size': 4, 'num_workers': 0}
FAST = ['--warmup', '0', '--iters', '1', '--batch-size', '2', '--threads', '1']
FAKE = ['--data-set', 'FAKE', '--fake-val-size', '6', '--fake-num-classes', '10']

# the setting columns of each method's section: the specs' own parameter names
METHOD_COLUMNS = {
    'Hourglass (Expedit-SWAG)': ['location', 'num_clusters'],
    'EViT': ['keep_rate'],
    'ToMe': ['r'],
    'ACT': ['q_hashes'],
    'ATS': ['locations', 'num_tokens'],
    'Evo-ViT': ['location', 'keep_ratio'],
    'SMYRF': ['location', 'n_hashes', 'q_cluster_size', 'k_cluster_size'],
}
METHOD_ORDER = list(METHOD_COLUMNS)


@pytest.fixture
def config(tmp_path):
    path = tmp_path / 'small-swag.json'
    path.write_text(json.dumps(SMALL_BACKBONE))
    return str(path)


def write_sweep(tmp_path, items, name='sweep.json'):
    path = tmp_path / name
    path.write_text(json.dumps(items))
    return str(path)


def sections(table: str) -> dict:
    """'### Title' -> (header cells, body rows as cell lists)."""
    out, title = {}, None
    for line in table.splitlines():
        if line.startswith('### '):
            title = line[4:]
            out[title] = ([], [])
        elif title and line.startswith('|') and not line.startswith('| ---'):
            cells = [c.strip() for c in line.strip('|').split('|')]
            if not out[title][0]:
                out[title][0].extend(cells)
            else:
                out[title][1].append(cells)
    return out


def synthetic_row(spec, method, gflops, grid=(32, 32)):
    conditions = dict(batch_size=256, warmup=12, iters=38, repeats=1, device_name='gpu', dtype='float32', threads=1,
                      torch='x', data_set='IMNET', n_images=50000)
    return dict(key=json.dumps(spec), backbone='swag_vit_l16', input_size=512, name='x', spec=spec, full_spec=spec,
                method=method, grid=list(grid), depth=24, gflops=gflops, gmacs=gflops, fps=10.0, throughput=12.0,
                acc1=88.0, conditions=conditions)


def test_table_names_methods_and_parameters():
    """One section per method in Expedit-SWAG's order, titled by the paper's name; the setting columns are the
    specs' parameter names; the plain row first; the published number in parentheses beside ours."""
    specs = [None,
             {'method': 'smyrf', 'location': 12, 'n_hashes': 32, 'q_cluster_size': 64, 'k_cluster_size': 64},
             {'method': 'tome', 'r': 10},
             {'method': 'hourglass', 'location': 12, 'num_clusters': 529},
             {'method': 'evit', 'keep_rate': 0.8},
             {'method': 'act', 'q_hashes': 16},
             {'method': 'ats', 'locations': [20], 'num_tokens': 1025},
             {'method': 'evo_vit', 'location': 18, 'keep_ratio': 0.4}]
    rows = [synthetic_row(s, s and s['method'], 300.0 - i) for i, s in enumerate(specs)]

    class Pub:
        gmacs, fps, throughput, acc1 = '275.8', '15.8', '19.5', '87.8'

    table = rs.render_table(rows, lambda row: Pub() if row['method'] == 'hourglass' else None)
    found = sections(table)
    assert list(found) == METHOD_ORDER
    for title, (header, body) in found.items():
        assert header == ['Method', 'Backbone', 'input', *METHOD_COLUMNS[title], 'GFLOPs', 'GMACs', 'FPS',
                          'Throughput (im/s)', 'Top-1 (%)']
        assert [r[0] for r in body] == ['SWAG', f'SWAG + {title}'] and all(r[1] == 'ViT-L/16' for r in body)
        assert body[0][3:3 + len(METHOD_COLUMNS[title])] == ['-'] * len(METHOD_COLUMNS[title])
    hourglass = found['Hourglass (Expedit-SWAG)'][1][1]
    assert hourglass[3:9] == ['12', '529', '297.0 (275.8)', '297.0', '10.0 (15.8)', '12.0 (19.5)']
    assert hourglass[9] == '88.0 (87.8)'
    assert found['SMYRF'][1][1][3:7] == ['12', '32', '64', '64']
    assert found['Evo-ViT'][1][1][3:5] == ['18', '0.4'] and found['ATS'][1][1][3:5] == ['20', '1025']
    for word in ('Ours', 'alpha', 'pruning', 'seed'):
        assert word not in table


def test_rows_tables_and_plots(config, tmp_path):
    """Every row measured: MACs equal the counting library's for the same model and setting, accuracy over every
    FAKE validation image, conditions recorded; table.md and both plots written."""
    out = tmp_path / 'out'
    sweep = write_sweep(tmp_path, [{'method': 'tome', 'r': 2},
                                   {'name': 'hg', 'spec': {'method': 'hourglass', 'location': 1,
                                                           'num_clusters': 4}}])
    assert study.main(['--config', config, '--sweep', sweep, '--output-dir', str(out), *FAST, *FAKE]) == 0
    rows = rs.read_results(str(out / rs.RESULTS_FILE))
    assert [r['spec'] for r in rows] == [None, {'method': 'tome', 'r': 2},
                                         {'method': 'hourglass', 'location': 1, 'num_clusters': 4}]
    assert [r['name'] for r in rows] == ['plain', 'tome r=2', 'hg']
    assert rows[1]['full_spec'] == {'method': 'tome', 'r': 2, 'prop_attn': True}
    kwargs = {k: v for k, v in SMALL_BACKBONE.items() if k in ('depth', 'embed_dim', 'num_heads')}
    for row in rows:
        model = models.apply_token_reduction(
            models.create_model('swag_vit_l16', img_size=64, num_classes=10, **kwargs), row['spec'])
        assert row['gmacs'] == pytest.approx(counting.count_macs(model, 64, 'fvcore')[0] / 1e9, rel=1e-9)
        assert row['params'] == counting.count_params(model)[0]
        assert row['fps'] > 0 and row['throughput'] > 0
        assert 0 <= row['acc1'] <= row['acc5'] <= 100
        c = row['conditions']
        assert (c['n_images'], c['data_set'], c['batch_size'], c['fps_batch_size'], c['input_size']) == \
            (6, 'FAKE', 2, 1, 64)
        assert c['device'] == 'cpu' and c['torch'] == torch.__version__ and c['date']
        if 'expedit' not in counting.CONVENTIONS:
            assert row['gflops'] is None
    assert rows[0]['gmacs'] > rows[1]['gmacs'] > rows[2]['gmacs']
    assert rows[2]['tokens_out'] == 1 + 4
    found = sections((out / rs.TABLE_FILE).read_text())
    assert list(found) == ['Hourglass (Expedit-SWAG)', 'ToMe']
    assert found['ToMe'][1][1][3] == '2'
    header, body = found['Hourglass (Expedit-SWAG)']
    assert header[3:6] == ['name', 'location', 'num_clusters'] and body[1][3:6] == ['hg', '1', '4']
    for plot in (rs.ACCURACY_PLOT, rs.SPEEDUP_PLOT):
        assert (out / plot).read_bytes()[:4] == b'\x89PNG'


def test_published_rows_come_from_the_data_file(config, tmp_path):
    """Without --sweep a SWAG backbone runs Expedit-SWAG's rows of the data file at its resolution, and the table
    shows the published number beside ours."""
    data = {'about': '', 'sources': {'expedit-swag': 'test'}, 'rows': [
        {'config': None, 'model': 'swag_vit_l16', 'token_reduction': {'method': 'tome', 'r': 1}, 'resolution': 64,
         'num_classes': 1000, 'family': 'SWAG', 'convention': 'fvcore', 'gmacs': '1.234', 'params_m': None,
         'source': 'expedit-swag', 'note': None},
        {'config': None, 'model': 'swag_vit_l16', 'token_reduction': {'method': 'tome', 'r': 3}, 'resolution': 512,
         'num_classes': 1000, 'family': 'SWAG', 'convention': 'fvcore', 'gmacs': '9.9', 'params_m': None,
         'source': 'expedit-swag', 'note': None}]}
    pub = tmp_path / 'published.json'
    pub.write_text(json.dumps(data))
    out = tmp_path / 'out'
    assert study.main(['--config', config, '--published', str(pub), '--output-dir', str(out), *FAST]) == 0
    rows = rs.read_results(str(out / rs.RESULTS_FILE))
    assert [r['spec'] for r in rows] == [None, {'method': 'tome', 'r': 1}]
    assert rows[0]['acc1'] is None and rows[0]['conditions']['n_images'] == 0
    tome = sections((out / rs.TABLE_FILE).read_text())['ToMe'][1]
    assert tome[1][4].endswith(' (1.234)') and '(' not in tome[0][4]


def test_resume_after_kill(config, tmp_path):
    """Killed after its first rows, the same command skips them (not recomputed) and completes the table."""
    out = tmp_path / 'out'
    sweep = write_sweep(tmp_path, [{'method': 'tome', 'r': r} for r in (1, 2, 3, 4)]
                        + [{'method': 'hourglass', 'location': a, 'num_clusters': n} for a in (0, 1) for n in (4, 9)])
    cmd = [sys.executable, 'study.py', '--config', config, '--sweep', sweep, '--output-dir', str(out),
           '--warmup', '0', '--iters', '30', '--batch-size', '2', '--threads', '1']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    results = out / rs.RESULTS_FILE
    log = open(tmp_path / 'first.log', 'w')
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and len(rs.read_results(str(results))) < 1:
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        log.close()
    before = rs.read_results(str(results))
    assert 1 <= len(before) < 9, (tmp_path / 'first.log').read_text()[-2000:]
    assert not (out / rs.TABLE_FILE).exists()
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f'resuming: {len(before)} of 9 rows already in' in again.stdout
    after = rs.read_results(str(results))
    assert after[:len(before)] == before          # finished rows kept as they were, not recomputed
    assert len(after) == 9 and len({r['key'] for r in after}) == 9
    found = sections((out / rs.TABLE_FILE).read_text())
    assert len(found['ToMe'][1]) == 1 + 4 and len(found['Hourglass (Expedit-SWAG)'][1]) == 1 + 4
    third = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and 'resuming: 9 of 9 rows' in third.stdout
    assert rs.read_results(str(results)) == after


def _bad(capsys, argv):
    code = study.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith('error: '), err
    return err[0]


def test_bad_inputs_one_line_and_rows_kept(config, tmp_path, capsys):
    out = tmp_path / 'out'
    ok_sweep = write_sweep(tmp_path, [{'method': 'tome', 'r': 1}], 'ok.json')
    assert study.main(['--config', config, '--sweep', ok_sweep, '--output-dir', str(out), *FAST]) == 0
    results = out / rs.RESULTS_FILE
    kept = results.read_bytes()
    capsys.readouterr()

    unknown = write_sweep(tmp_path, [{'method': 'tome', 'r': 1}, {'method': 'no_such_method'}], 'unknown.json')
    assert "unknown method 'no_such_method'" in _bad(capsys, ['--config', config, '--sweep', unknown,
                                                              '--output-dir', str(out), *FAST])
    rejected = write_sweep(tmp_path, [{'method': 'hourglass', 'location': 1, 'num_clusters': 5}], 'rej.json')
    line = _bad(capsys, ['--config', config, '--sweep', rejected, '--output-dir', str(out), *FAST])
    assert 'num_clusters' in line and 'hourglass' in line
    not_a_list = write_sweep(tmp_path, {'method': 'tome', 'r': 1}, 'obj.json')
    assert 'JSON list' in _bad(capsys, ['--config', config, '--sweep', not_a_list, '--output-dir', str(out), *FAST])
    nested = tmp_path / 'nested.json'
    nested.write_text('[' * 60000 + ']' * 60000)
    assert 'too deeply' in _bad(capsys, ['--config', config, '--sweep', str(nested), '--output-dir', str(out), *FAST])

    other = models.create_model('deit_tiny', img_size=64, num_classes=1000)
    ckpt = tmp_path / 'deit.pth'
    torch.save({'model': other.state_dict()}, ckpt)
    line = _bad(capsys, ['--config', config, '--sweep', ok_sweep, '--checkpoint', str(ckpt), '--output-dir',
                         str(out), *FAST])
    assert line.startswith(f'error: --checkpoint {ckpt} does not fit swag_vit_l16')

    blocker = tmp_path / 'a_file'
    blocker.write_text('x')
    line = _bad(capsys, ['--config', config, '--sweep', ok_sweep, '--output-dir', str(blocker / 'sub'), *FAST])
    assert 'is a file, not a folder' in line
    assert results.read_bytes() == kept


def test_varying_parameters_are_shown_and_plot_lines_follow_the_swept_parameter(tmp_path):
    """Rows of a method that differ in a parameter outside its usual columns (ToMe's prop_attn) get that column;
    a plot line joins the rows that differ in the swept parameter only, in that parameter's order (not in x
    order); the plots are titled by backbone, input size, data set and device, x axis 'GFLOPs (expedit
    counter)'."""
    specs = [(None, 300.0),
             ({'method': 'hourglass', 'location': 3, 'num_clusters': 36}, 250.0),
             ({'method': 'hourglass', 'location': 2, 'num_clusters': 36}, 240.0),
             ({'method': 'hourglass', 'location': 2, 'num_clusters': 16}, 245.0),
             ({'method': 'tome', 'r': 2, 'prop_attn': True}, 280.0),
             ({'method': 'tome', 'r': 8, 'prop_attn': True}, 200.0),
             ({'method': 'tome', 'r': 4, 'prop_attn': True}, 260.0),
             ({'method': 'tome', 'r': 4, 'prop_attn': False}, 261.0),
             ({'method': 'smyrf', 'location': 3, 'q_cluster_size': 8, 'k_cluster_size': 8}, 270.0),
             ({'method': 'smyrf', 'location': 3, 'q_cluster_size': 4, 'k_cluster_size': 4}, 265.0)]
    rows = [synthetic_row(s, s and s['method'], g) for s, g in specs]
    found = sections(rs.render_table(rows, lambda row: None))
    header, body = found['ToMe']
    assert header[3:5] == ['r', 'prop_attn'] and [r[3:5] for r in body[1:]] == \
        [['2', 'true'], ['8', 'true'], ['4', 'true'], ['4', 'false']]
    lines = dict(rs.plot_lines(rows, rs.flops_of, lambda r: r['acc1']))
    assert lines['Hourglass (Expedit-SWAG): num_clusters (location=2)'] == [(245.0, 88.0), (240.0, 88.0)]
    assert lines['Hourglass (Expedit-SWAG): num_clusters (location=3)'] == [(250.0, 88.0)]
    assert [x for x, _ in lines['ToMe: r (prop_attn=true)']] == [280.0, 260.0, 200.0]
    assert [x for x, _ in lines['ToMe: r (prop_attn=false)']] == [261.0]
    assert lines['SMYRF: q_cluster_size, k_cluster_size'] == [(265.0, 88.0), (270.0, 88.0)]     # swept together
    assert rs.flops_label(rows) == 'GFLOPs (expedit counter)'
    assert rs.plot_title(rows) == 'swag_vit_l16 @512 px, IMNET (50000 images)\ngpu, float32, 1 thread'
    rows[4]['finetune'] = dict(epochs=1, lr=1e-4, seconds=1.0, images_per_s=1.0, checkpoint='x', acc1=90.0, acc5=99.0)
    assert rs.plot_accuracy(rows, str(tmp_path / 'a.png')) and rs.plot_speedup(rows, str(tmp_path / 's.png'))
    assert (tmp_path / 'a.png').read_bytes()[:4] == b'\x89PNG'
    assert found['ToMe'][0][-1] == 'Top-1 (%)' and \
        sections(rs.render_table(rows, lambda row: None))['ToMe'][0][-1] == 'Top-1 fine-tuned (%)'
