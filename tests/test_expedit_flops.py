"""Expedit-SWAG's FLOP counter (the ``expedit`` convention) and the GFLOPs rows of its tables (Liang et al., NeurIPS
2022: token reduction on SWAG ViT-L/16 and ViT-H/14).

The convention is an op-handle table in ``framework/counting.py``; it is checked against the closed form of that
counter (``vit_reference.expedit_gmacs``) on a small ViT, then every published row of a data-independent method is
counted on the real backbone at the real resolution (a trace: one forward of batch 1) and compared at the printed
precision. Rows that differ from the published number are differences of the upstream graph, each named here and in
the row's note in data/published.json.
"""
import json
from decimal import ROUND_HALF_UP, Decimal

import pytest
import torch

from framework import counting, published
import models
from models.token_reduction import METHODS, apply_token_reduction, token_schedule
from vit_reference import expedit_gmacs, tiny_vit

EXPEDIT_SWAG_ROWS = [row for row in published.load() if row.source == 'expedit-swag']
DATA_DEPENDENT = {name for name, cls in METHODS.items() if cls.data_dependent}


def rounds_to(exact_units: Decimal, printed: str) -> bool:
    decimals = len(printed.split('.')[1]) if '.' in printed else 0
    return exact_units.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP) == Decimal(printed)


def test_convention_equals_the_closed_form_on_a_small_vit():
    """Plain ViT: linear with bias as an input, SDPA as q-scale + q·kᵀ + softmax + attn·v, LN 4, GELU, dropout and
    adds per element; our head has a dropout (D elements) that the SWAG head lacks."""
    model = tiny_vit(img_size=64, patch_size=8, embed_dim=32, depth=3, num_heads=2).eval()
    pairs = [(65, 65)] * 3
    expected = expedit_gmacs(pairs, 32, 2, 8, 64, num_classes=model.num_classes) * 1e9 + 32
    assert counting.count_macs(model, 64, 'expedit')[0] == round(expected)


def test_convention_counts_the_additive_mask_and_the_merge_ops_of_tome():
    """ToMe: log-size mask (one add per logit), the matching matmul, size-weighted mul/div: closed form."""
    model = tiny_vit(img_size=64, patch_size=8, embed_dim=32, depth=3, num_heads=2).eval()
    apply_token_reduction(model, {'method': 'tome', 'r': 8})
    pairs = [(b['attention'], b['mlp']) for b in token_schedule(model)['blocks']]
    head_dim, heads, D = 16, 2, 32
    extra = 32  # head dropout
    for index, (n, n_mlp) in enumerate(pairs):
        if index > 0:
            extra += heads * n * n                        # log(size) added to every logit (first block: no sizes)
        extra += n * head_dim                             # metric / its norm (the norm itself is not counted)
        extra += ((n + 1) // 2) * (n // 2) * head_dim     # even · oddᵀ
        extra += n * D + n_mlp * D                        # x * size before the merge, x / size after it
    counted = counting.count_macs(model, 64, 'expedit')[0]
    closed = expedit_gmacs(pairs, D, heads, 8, 64, num_classes=model.num_classes) * 1e9
    assert counted == round(closed) + extra


def _quick_backbone(name: str) -> torch.nn.Module:
    """The real backbone without its 10-30 s weight initialisation: allocated empty, filled with N(0, 0.02)
    (the counts of data-independent methods do not depend on the values)."""
    with torch.device('meta'):
        model = models.create_model(name)
    model.to_empty(device='cpu')
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=generator)
    return model.eval()


@pytest.fixture(scope='module')
def backbones():
    cache = {}

    def get(config: str) -> torch.nn.Module:
        if config not in cache:
            cache.clear()  # one 300 M / 630 M parameter model at a time
            cache[config] = _quick_backbone(config.replace('-', '_'))
        return cache[config]
    return get


def _upstream_hourglass_dropout(model) -> int:
    """Upstream's HourglassViT runs a no-op dropout on the tokens before every block, and its counter counts it
    (tokens x width per block); our graph has no such op."""
    schedule = token_schedule(model)['blocks']
    return sum(b['attention'] for b in schedule) * model.embed_dim


def _rows(config: str):
    rows = [r for r in EXPEDIT_SWAG_ROWS if r.config == config and (r.token_reduction or {}).get('method') not in
            DATA_DEPENDENT]
    return [pytest.param(r, id=json.dumps(r.token_reduction, sort_keys=True)) for r in rows]


# the H/14 rows trace a 1 T-MAC forward each: marked slow (run them with pytest -m slow)
@pytest.mark.parametrize('row', _rows('swag-vit-l16') + [
    pytest.param(p.values[0], id=p.id, marks=pytest.mark.slow) for p in _rows('swag-vit-h14')])
def test_published_gflops_row(row, backbones):
    model = backbones(row.config)
    apply_token_reduction(model, row.token_reduction)
    macs = counting.count_macs(model, row.resolution, 'expedit')[0]
    method = (row.token_reduction or {}).get('method')
    if method == 'hourglass':
        macs += _upstream_hourglass_dropout(model)
    ours = Decimal(macs) / Decimal(10) ** 9
    assert rounds_to(ours, row.gmacs), (float(ours), row.gmacs)


def _flops_json(capsys, argv):
    import flops
    code = flops.main([*argv, '--json'])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_data_dependent_methods_count_the_mean_over_images(capsys):
    """ATS and ACT: the mean of one trace per image, with the per-block tokens / clusters the method recorded."""
    ats = {'method': 'ats', 'locations': [4], 'num_tokens': 197}
    row = _flops_json(capsys, ['--config', 'config/deit-ti.json', '--token-reduction', json.dumps(ats),
                               '--convention', 'expedit', '--num-images', '3'])
    info = row['images']
    assert info['num_images'] == 3 and len(info['macs_per_image']) == 3 and info['counted'] == 'tokens'
    assert row['macs'] == round(sum(info['macs_per_image']) / 3)
    assert info['mean_per_block'][:5] == [197] * 5                    # before and at the ATS block: every token
    assert all(0 < t < 197 for t in info['mean_per_block'][5:])       # after it: duplicates removed
    assert row['macs'] < counting.count_macs(models.create_model('deit_tiny'), 224, 'expedit')[0]

    act = {'method': 'act', 'q_hashes': 8, 'seed': 0}
    row = _flops_json(capsys, ['--config', 'config/deit-ti.json', '--token-reduction', json.dumps(act),
                               '--num-images', '2'])
    assert row['images']['counted'] == 'clusters' and len(row['images']['mean_per_block']) == 12
    assert all(1 <= c <= 197 for c in row['images']['mean_per_block'])


def test_data_dependent_counting_reads_a_folder(tmp_path, capsys):
    from PIL import Image
    folder = tmp_path / 'images' / 'class_a'
    folder.mkdir(parents=True)
    for i, colour in enumerate(['red', 'blue']):
        Image.new('RGB', (40 + i, 30), colour).save(folder / f'{i}.png')
    ats = json.dumps({'method': 'ats', 'locations': [2], 'num_tokens': 197})
    row = _flops_json(capsys, ['--config', 'config/deit-ti.json', '--token-reduction', ats, '--num-images', '5',
                               '--data-path', str(tmp_path / 'images')])
    assert row['images']['num_images'] == 2 and row['images']['source'] == str(tmp_path / 'images')
    import flops
    empty = tmp_path / 'empty'
    empty.mkdir()
    assert flops.main(['--config', 'config/deit-ti.json', '--token-reduction', ats, '--data-path', str(empty)]) == 2
    assert 'holds no image files' in capsys.readouterr().err


def test_expedit_convention_is_labelled_gflops(capsys):
    """Expedit-SWAG's tables call this count "GFLOPs": the text output says so and names the convention beside it."""
    import flops
    assert flops.main(['--config', 'config/deit-ti.json', '--input-size', '32', '--convention', 'expedit']) == 0
    out = capsys.readouterr().out
    assert 'GFLOPs        ' in out and 'expedit convention' in out and 'GMACs' not in out
    assert flops.main(['--all', '--config-dir', 'config', '--source', 'nobody']) == 2
    assert capsys.readouterr().err.strip() == ("error: --source 'nobody' has no published rows; use one of "
                                               "expedit-swag, hivit, hvt, pit")


def test_count_of_a_method_drawing_from_the_global_generator_is_reproducible():
    """ACT without a seed draws its hash projections from the global generator: the trace seeds it, so the count
    is the same whatever state the caller left it in, and the caller's stream is not advanced by counting."""
    model = tiny_vit(img_size=64, patch_size=8, embed_dim=32, depth=3, num_heads=2).eval()
    apply_token_reduction(model, {'method': 'act', 'q_hashes': 4})
    counts = []
    for state in (1, 2):
        torch.manual_seed(state)
        before = torch.get_rng_state()
        counts.append(counting.count_macs(model, 64, 'expedit')[0])
        assert torch.equal(torch.get_rng_state(), before)
    assert counts[0] == counts[1]
