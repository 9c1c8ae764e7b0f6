"""Config + command-line resolution: precedence, both spellings, unknown keys, official HVT configs."""
import json

import pytest

import options
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
    import main
    args = options.parse_args(['--config', write(tmp_path, OFFICIAL_HVT_S_2)])
    with torch.device('meta'):
        model = main.build_model(args, 1000)
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
    import main
    from datasets import num_classes_of
    args = options.parse_args(['--config', path])
    with torch.device('meta'):
        model = main.build_model(args, num_classes_of(args))
    assert sum(p.numel() for p in model.parameters()) > 0
