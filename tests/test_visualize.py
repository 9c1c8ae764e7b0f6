"""visualize.py and what ``record_states()`` records per block: ToMe's merge groups partition the patches and agree
with ToMe's own token sizes and the schedule, EViT/ATS/Evo-ViT keep the scheduled counts, every method gives a
per-patch map of the grid's shape, recording leaves the outputs unchanged, the script writes its PNG, and each bad
input is one line and exit 2. Models: tests/vit_reference.py's tiny ViT (8x8 patches, 4 blocks) and the DIGITS demo
config with random weights."""
import pytest
import torch
from PIL import Image

from conftest import run_script
from vit_reference import tiny_vit

from framework import token_maps
from models import apply_token_reduction, token_schedule
from models.token_reduction import record_states
import visualize

GRID = (8, 8)
PATCHES = GRID[0] * GRID[1]
# one valid setting per method for the 4-block tiny ViT
SPECS = {
    'tome': {'method': 'tome', 'r': 6},
    'evit': {'method': 'evit', 'keep_rate': 0.7, 'locations': [1, 2]},
    'evo_vit': {'method': 'evo_vit', 'location': 1, 'keep_ratio': 0.5},
    'ats': {'method': 'ats', 'locations': [1, 2], 'num_tokens': 40},
    'hourglass': {'method': 'hourglass', 'location': 1, 'num_clusters': 16},
    'act': {'method': 'act', 'q_hashes': 4, 'seed': 3},
    'smyrf': {'method': 'smyrf', 'location': 2, 'n_hashes': 2, 'q_cluster_size': 8, 'k_cluster_size': 8, 'seed': 3},
}


@pytest.fixture(scope='module')
def model():
    return tiny_vit(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2)


@pytest.fixture(scope='module')
def images():
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def recorded(model, images, spec):
    apply_token_reduction(model, spec)
    with torch.no_grad(), record_states() as states:
        out = model(images)
    return states[-1], out


def test_tome_groups_partition_the_patches(model, images):
    state, _ = recorded(model, images, SPECS['tome'])
    schedule = token_schedule(model)['blocks']
    for block in range(4):
        tokens = state.patch_tokens(block)
        assert tokens.shape == (3, PATCHES)
        assert (tokens >= 1).all()  # no patch is dropped or merged into the class token
        for one in tokens:
            assert len(one.unique()) == schedule[block]['mlp'] - 1
    # the groups after the last block are ToMe's own sizes (original tokens per token), class token apart
    tokens = state.patch_tokens(3)
    for image in range(3):
        sizes = torch.bincount(tokens[image], minlength=schedule[3]['mlp']).float()
        assert sizes[0] == 0 and sizes.sum() == PATCHES
        assert torch.equal(sizes[1:], state.size[image, 1:, 0])


def test_evit_kept_counts_equal_the_schedule(model, images):
    for fuse in (False, True):
        state, _ = recorded(model, images, {**SPECS['evit'], 'fuse': fuse})
        schedule = token_schedule(model)['blocks']
        assert state.patch_tokens(0) is None  # nothing reduced before block 1
        for block in range(1, 4):
            tokens = state.patch_tokens(block)
            kept = (tokens >= 0).sum(dim=1)
            if fuse and block > 1:  # the fused token of block 1 competes with the patches: kept or not
                assert ((kept == schedule[block]['mlp'] - 2) | (kept == schedule[block]['mlp'] - 3)).all()
            else:
                assert (kept == schedule[block]['mlp'] - 1 - int(fuse)).all()
            for one in tokens:  # each kept patch has its own token, never the class token's
                assert len(one[one >= 0].unique()) == int((one >= 0).sum()) and (one != 0).all()


def test_evo_vit_and_ats_counts(model, images):
    state, _ = recorded(model, images, SPECS['evo_vit'])
    schedule = token_schedule(model)['blocks']
    assert 'updated' not in state.records[0]
    for block in range(1, 4):
        assert (state.records[block]['updated'].sum(dim=1) == schedule[block]['attention'] - 1).all()
    state, _ = recorded(model, images, SPECS['ats'])
    for block in range(4):
        tokens = state.patch_tokens(block)
        kept = PATCHES if tokens is None else (tokens >= 0).sum(dim=1)
        assert torch.equal(torch.as_tensor(kept).expand(3) + 1, state.kept_tokens[block][:, 1])


def test_cluster_records(model, images):
    state, _ = recorded(model, images, SPECS['hourglass'])
    tokens = state.patch_tokens(3)
    assert tokens.min() >= 1 and tokens.max() <= 16
    assert torch.equal(state.records[1]['clusters'] + 1, tokens)
    # after a reconstruction every patch has its own token again: no clusters drawn there
    spec = {**SPECS['hourglass'], 'reconstruct_location': 3}
    state, _ = recorded(model, images, spec)
    assert torch.equal(state.patch_tokens(3)[0], torch.arange(1, PATCHES + 1))
    assert token_maps.patch_maps(state, 2)[0].title.endswith('clusters')
    assert token_maps.patch_maps(state, 3) is None
    state, _ = recorded(model, images, SPECS['act'])
    for block in range(4):
        labels = state.records[block]['clusters']
        assert labels.shape == (3, 2, PATCHES)
    state, _ = recorded(model, images, SPECS['smyrf'])
    assert 'clusters' not in state.records[1]
    labels = state.records[2]['clusters']
    assert labels.shape == (3, 2, PATCHES)
    # 65 tokens in chunks of 8: 9 chunks, the class token in one of them
    assert labels.max() == 8 and all(torch.bincount(row.flatten(), minlength=9).max() <= 8 for row in labels[0])


@pytest.mark.parametrize('method', sorted(SPECS))
def test_every_method_gives_a_patch_map_and_recording_changes_nothing(model, images, method):
    apply_token_reduction(model, SPECS[method])
    with torch.no_grad():
        plain = model(images)
        assert not model.forward_features(images).requires_grad
    maps = token_maps.record_maps(model, images, 3)
    assert len(maps) == 3 and all(m.labels.shape == GRID for m in maps)
    assert all(m.kind == token_maps.KIND_OF_METHOD[method] or m.kind == 'kept' for m in maps)
    _, out = recorded(model, images, SPECS[method])
    assert torch.allclose(out, plain, atol=1e-6, rtol=0)
    picture = token_maps.paint(token_maps.display_images(images, (0.5,) * 3, (0.5,) * 3)[0], maps[0])
    assert picture.shape == (128, 128, 3) and 0 <= picture.min() and picture.max() <= 1


def test_not_recording_keeps_nothing(model, images):
    apply_token_reduction(model, SPECS['tome'])
    state = model.token_reduction.new_state(torch.zeros(1, 65, 32), GRID, 4)
    assert state.records is None and not state.recording


# ------------------------------------------------------------------------------------------------------- the script

def test_script_writes_the_png(tmp_path):
    out = tmp_path / 'figure' / 'tokens.png'
    result = run_script(['--random-weights', '--output', out], script='visualize.py', timeout=600)
    assert result.returncode == 0, result.stderr
    with Image.open(out) as png:
        assert png.format == 'PNG' and png.size[0] > 1000 and png.size[1] > 1000  # 8 columns, 7 rows


def test_script_on_a_file_image(tmp_path):
    photo = tmp_path / 'photo.jpg'
    Image.new('RGB', (50, 40), (200, 30, 30)).save(photo)
    out = tmp_path / 'one.png'
    code = visualize.main(['--random-weights', '--image', str(photo), '--token-reduction',
                           '{"method": "tome", "r": 4}', '--block', '2', '--output', str(out)])
    assert code == 0 and out.is_file()


def bad_inputs(tmp_path):
    not_an_image = tmp_path / 'notes.png'
    not_an_image.write_text('not an image')
    junk = tmp_path / 'junk.pth'
    junk.write_text('junk\n')
    return {
        'unreadable image': (['--image', str(not_an_image)], 'cannot read image'),
        'missing image': (['--image', str(tmp_path / 'none.png')], 'cannot read image'),
        'rejected spec': (['--token-reduction', '{"method": "evit", "keep_rate": 2}'], "'keep_rate' must be"),
        'spec for another model': (['--token-reduction', '{"method": "hourglass", "location": 9, "num_clusters": 4}'],
                                   'outside the model'),
        'invalid JSON': (['--token-reduction', '{method'], 'not valid JSON'),
        'block outside': (['--block', '6'], '--block 6 is outside'),
        'missing checkpoint': (['--checkpoint', str(tmp_path / 'none.pth')], 'not found'),
        'corrupt checkpoint': (['--checkpoint', str(junk)], 'cannot read'),
    }


def test_bad_inputs_are_one_line_and_exit_2(tmp_path, capsys):
    out = tmp_path / 'never.png'
    for name, (flags, message) in bad_inputs(tmp_path).items():
        flags = flags + ([] if '--checkpoint' in flags else ['--random-weights'])
        code = visualize.main(flags + ['--output', str(out)])
        err = capsys.readouterr().err
        assert code == 2, name
        assert err.startswith('error: ') and err.count('\n') == 1 and message in err, (name, err)
        assert not out.exists()
    # the exit code of the script itself
    result = run_script(['--block', '-1', '--random-weights', '--output', out], script='visualize.py')
    assert result.returncode == 2 and result.stderr.startswith('error: --block -1') and not out.exists()


def test_out_of_memory_is_one_line(monkeypatch, capsys):
    def run(argv):
        raise RuntimeError('DefaultCPUAllocator: not enough memory: you tried to allocate 5368709120 bytes.')
    monkeypatch.setattr(visualize, 'run', run)
    code = visualize.main([])
    err = capsys.readouterr().err
    assert code == 2 and err.count('\n') == 1 and err.startswith('error: out of memory') and 'Traceback' not in err
