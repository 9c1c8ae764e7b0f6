"""Config + command-line resolution: precedence, both spellings, unknown keys, official HVT configs, the per-model
data config and the token-reduction option."""
import json

import pytest

from framework import options
import models
import utils
from utils import UserError

OFFICIAL_HVT_S_2 = {  # config/hvt-s-2.json of MonashAI/HVT, all 13 keys
    'model': 'hvt_model', 'batch_size': 128, 'exp_name': 'hvt-s-2', 'input_size': 224, 'patch_size': 16,
    'num_heads': 6, 'head_dim': 64, 'num_blocks': 12, 'num_workers': 10, 'pool_kernel_size': 3, 'pool_stride': 2,
    'pool_block_width': 6, 'weight_decay': 0.025}


def write(tmp_path, obj, name='c.json'):
    path = tmp_path / name
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return str(path)


def test_defaults_are_deits():
    args = options.parse_args([])
    assert (args.batch_size, args.lr, args.weight_decay, args.warmup_epochs, args.drop_path) == (64, 5e-4, 0.05, 5, 0.1)
    assert (args.mixup, args.cutmix, args.smoothing, args.reprob, args.aa) == (0.8, 1.0, 0.1, 0.25,
                                                                              'rand-m9-mstd0.5-inc1')
    assert args.repeated_aug and args.train_mode and not args.model_ema


@pytest.mark.parametrize('flag', ['--batch-size', '--batch_size'])
def test_cli_beats_json_beats_default(tmp_path, flag):
    cfg = write(tmp_path, {'batch_size': 32, 'weight_decay': 0.025, 'model': 'hvt_s_1'})
    args = options.parse_args(['--config', cfg, flag, '8'])
    assert args.batch_size == 8            # command line wins, whatever the spelling
    assert args.weight_decay == 0.025      # JSON beats the default
    assert args.lr == 5e-4                 # default where nobody says otherwise
    args = options.parse_args([f'{flag}=8', '--config', cfg])
    assert args.batch_size == 8


def test_boolean_flags_both_ways(tmp_path):
    cfg = write(tmp_path, {'repeated_aug': False})
    assert options.parse_args(['--config', cfg]).repeated_aug is False
    assert options.parse_args(['--config', cfg, '--repeated-aug']).repeated_aug is True
    assert options.parse_args(['--no-repeated_aug']).repeated_aug is False


def test_official_hvt_config_runs_unchanged(tmp_path):
    args = options.parse_args(['--config', write(tmp_path, OFFICIAL_HVT_S_2)])
    assert args.model == 'hvt_model' and args.batch_size == 128 and args.weight_decay == 0.025
    assert args.model_kwargs == {'patch_size': 16, 'num_heads': 6, 'head_dim': 64, 'num_blocks': 12,
                                 'pool_kernel_size': 3, 'pool_stride': 2, 'pool_block_width': 6}
    assert args.output_dir == 'outputs/hvt-s-2'   # upstream's outputs/<exp_name>
    args = options.parse_args(['--config', write(tmp_path, OFFICIAL_HVT_S_2), '--output-dir', 'elsewhere',
                               '--pool_block_width', '4', '--num-heads=3'])
    assert args.output_dir == 'elsewhere'
    assert args.model_kwargs['pool_block_width'] == 4 and args.model_kwargs['num_heads'] == 3


def test_official_hvt_config_builds_the_published_model(tmp_path):
    import torch
    from framework import builders
    args = options.parse_args(['--config', write(tmp_path, OFFICIAL_HVT_S_2)])
    with torch.device('meta'):
        model = builders.build_model(args, 1000)
    assert sum(p.numel() for p in model.parameters()) == 22_105_576   # HVT-S-2


def test_unknown_key_names_closest(tmp_path):
    with pytest.raises(UserError, match=r"unknown config key 'batch_sise'.*did you mean batch_size"):
        options.parse_args(['--config', write(tmp_path, {'batch_sise': 3})])
    with pytest.raises(UserError, match=r"unknown config key 'pool_blok_width'.*pool_block_width"):
        options.parse_args(['--config', write(tmp_path, {'model': 'hvt_s_1', 'pool_blok_width': 3})])
    with pytest.raises(UserError, match=r"unknown flag '--batch-sise'.*batch_size"):
        options.parse_args(['--batch-sise'])
    # a constructor argument of another model is unknown for this one
    with pytest.raises(UserError, match="unknown flag '--pool-block-width'"):
        options.parse_args(['--model', 'deit_tiny', '--pool-block-width', '3'])


def test_bad_values(tmp_path):
    with pytest.raises(UserError, match="'batch_size' in .* must be an integer"):
        options.parse_args(['--config', write(tmp_path, {'batch_size': 'big'})])
    with pytest.raises(UserError, match='not valid JSON'):
        options.parse_args(['--config', write(tmp_path, '{"batch_size": 3,')])
    with pytest.raises(UserError, match='must hold one JSON object'):
        options.parse_args(['--config', write(tmp_path, '[1, 2]')])
    with pytest.raises(UserError, match="unknown model 'hvt_s_9'"):
        options.parse_args(['--model', 'hvt_s_9'])
    with pytest.raises(UserError, match='set from --input-size'):
        options.parse_args(['--config', write(tmp_path, {'model': 'hvt_s_1', 'img_size': 64})])
    with pytest.raises(UserError, match='smoothing 0'):
        options.parse_args(['--bce-loss'])


def test_resolved_config_is_json_and_complete():
    args = options.parse_args(['--model', 'hvt_s_2', '--pool-kernel-size', '3'])
    cfg = options.resolved_config(args)
    json.dumps(cfg)
    assert cfg['model'] == 'hvt_s_2' and cfg['pool_kernel_size'] == 3 and cfg['batch_size'] == 64


@pytest.mark.parametrize('path', sorted(str(p) for p in (options.__file__ and __import__('pathlib').Path(
    options.__file__).parent.glob('config/*.json'))))
def test_every_shipped_config_resolves_and_builds(path):
    import torch
    from framework import builders
    args = options.parse_args(['--config', path])
    with torch.device('meta'):
        model = builders.build_model(args)
    assert sum(p.numel() for p in model.parameters()) > 0


# ------------------------------------------------------------------------------------------- per-model data config

def test_data_config_comes_from_the_model_unless_overridden(tmp_path, monkeypatch):
    args = options.parse_args(['--model', 'deit_tiny'])
    assert (args.input_size, args.interpolation, args.crop_pct) == (224, 'bicubic', 0.875)
    assert args.mean == pytest.approx([0.485, 0.456, 0.406]) and args.std == pytest.approx([0.229, 0.224, 0.225])
    # a model registering another data config (as the SWAG ViTs do: 512 px, crop 1.0)
    monkeypatch.setitem(models.registry._DATA_CONFIGS, 'deit_tiny', {
        **models.data_config('deit_tiny'), 'input_size': 512, 'crop_pct': 1.0, 'mean': (0.5, 0.5, 0.5)})
    args = options.parse_args(['--model', 'deit_tiny'])
    assert (args.input_size, args.crop_pct, args.mean) == (512, 1.0, [0.5, 0.5, 0.5])
    args = options.parse_args(['--model', 'deit_tiny', '--input-size', '384', '--crop-pct', '0.9', '--interpolation',
                               'bilinear', '--mean', '0.1', '--std', '0.2', '0.3', '0.4'])
    assert (args.input_size, args.crop_pct, args.interpolation) == (384, 0.9, 'bilinear')
    assert args.mean == [0.1] * 3 and args.std == [0.2, 0.3, 0.4]
    # DeiT's spelling, as a flag and as a config key (config.json files of earlier versions)
    assert options.parse_args(['--model', 'deit_tiny', '--eval-crop-ratio', '0.95']).crop_pct == 0.95
    cfg = write(tmp_path, {'model': 'deit_tiny', 'eval_crop_ratio': 0.8, 'input_size': 256})
    args = options.parse_args(['--config', cfg])
    assert (args.crop_pct, args.input_size) == (0.8, 256)
    assert options.parse_args(['--config', cfg, '--crop-pct', '0.7']).crop_pct == 0.7


def test_bad_data_config_values():
    with pytest.raises(UserError, match='--mean takes 1 or 3 numbers'):
        options.parse_args(['--mean', '0.5', '0.5'])
    with pytest.raises(UserError, match='--crop-pct must be > 0'):
        options.parse_args(['--crop-pct', '0'])
    with pytest.raises(UserError, match='argument --interpolation'):
        options.parse_args(['--interpolation', 'cubic'])


# ---------------------------------------------------------------------------------------------------- token reduction

def test_token_reduction_from_config_and_flag(tmp_path):
    spec = {'method': 'tome', 'r': 8}
    assert options.parse_args([]).token_reduction is None
    cfg = write(tmp_path, {'model': 'deit_tiny', 'token_reduction': spec})
    assert options.parse_args(['--config', cfg]).token_reduction == spec
    other = {'method': 'evit', 'keep_rate': 0.7}
    assert options.parse_args(['--config', cfg, '--token-reduction', json.dumps(other)]).token_reduction == other
    assert options.parse_args(['--config', cfg, '--token_reduction', 'null']).token_reduction is None
    assert options.resolved_config(options.parse_args(['--config', cfg]))['token_reduction'] == spec
    assert options.parse_args(['--config', write(tmp_path, {'token_reduction': None}, 'n.json')]).token_reduction \
        is None


@pytest.mark.parametrize('argv, needle', [
    (['--token-reduction', '{"method": "tome", "r": 8'], 'not valid JSON'),
    (['--token-reduction', '8'], 'must be a JSON object'),
])
def test_bad_token_reduction_flag(argv, needle):
    with pytest.raises(UserError, match=needle) as e:
        options.parse_args(argv)
    assert '\n' not in str(e.value)


def test_token_reduction_config_value_must_be_an_object(tmp_path):
    with pytest.raises(UserError, match="'token_reduction' in .* must be a JSON object or null"):
        options.parse_args(['--config', write(tmp_path, {'token_reduction': 'tome'})])


def test_builders_pass_the_token_reduction_to_create_model(monkeypatch):
    from framework import builders
    calls = []

    def create_model(name, token_reduction=None, **kwargs):
        calls.append((name, kwargs['img_size'], kwargs['num_classes'], token_reduction))
        if token_reduction and token_reduction.get('r', 0) > 100:
            raise ValueError("tome: r must be < 197 tokens, got 500")
        return 'model'

    monkeypatch.setattr(models, 'create_model', create_model)
    spec = {'method': 'tome', 'r': 8}
    args = options.parse_args(['--model', 'deit_tiny', '--token-reduction', json.dumps(spec), '--data-set', 'CIFAR'])
    assert builders.build_model(args) == 'model'
    builders.build_model(args, num_classes=7, plain=True)
    assert calls == [('deit_tiny', 224, 100, spec), ('deit_tiny', 224, 7, None)]   # plain: no spec
    args.token_reduction = {'method': 'tome', 'r': 500}
    with pytest.raises(UserError, match=r"cannot build model 'deit_tiny': tome: r must be < 197"):
        builders.build_model(args)


def test_cpu_run_caps_workers_and_says_pin_memory_is_off(monkeypatch):
    monkeypatch.setattr(utils, 'cpu_count', lambda: 2)
    args = options.parse_args(['--device', 'cpu'])
    assert options.adapt_to_machine(args) == []         # defaults: capped quietly, no DataLoader warning
    assert args.num_workers == 2 and args.pin_mem is False
    args = options.parse_args(['--device', 'cpu', '--num-workers', '8', '--pin-mem'])
    notes = options.adapt_to_machine(args)
    assert args.num_workers == 2 and args.pin_mem is False
    assert any('--num-workers 8' in n and '2 CPUs' in n for n in notes)
    assert any('--pin-mem has no effect without a CUDA device' in n for n in notes) and len(notes) == 2
