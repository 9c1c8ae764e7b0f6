"""Training and fine-tuning with a token reduction on: every registered method back-propagates finite gradients to
every parameter the plain model trains (fp32, bf16 and fp16 autocast), one step lowers the loss, a 2-process DDP run
(gloo) keeps the ranks' weights equal while each rank keeps other tokens, and a resumed run equals an uninterrupted
one. ``main.py`` records the spec in checkpoints, ``log.txt``, ``config.json`` and ``eval.json``, evaluates a
checkpoint with its own spec, refuses to resume it with another, and stops on a non-finite evaluation loss.
"""
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import FAST, run_script
import main
from engine import LoopOptions, NonFiniteLossError, Optimization, evaluate, train_one_epoch
from models.token_reduction import METHODS, apply_token_reduction, record_states, training_progress
from models.token_reduction.evit import shrinking_keep_rate
from vit_reference import tiny_vit

# one training setting per registered method on the tiny ViT below (32 px, 8 px patches: 1 + 16 tokens, 4 blocks)
SPECS = {
    'hourglass': {'method': 'hourglass', 'location': 1, 'num_clusters': 4},
    'tome': {'method': 'tome', 'r': 3},
    'evit': {'method': 'evit', 'keep_rate': 0.5, 'locations': [1, 2], 'fuse': True, 'shrink_start_epoch': 1,
             'shrink_epochs': 2},
    'evo_vit': {'method': 'evo_vit', 'location': 1, 'keep_ratio': 0.5},
    'ats': {'method': 'ats', 'locations': [1, 2], 'num_tokens': 8},
    'act': {'method': 'act', 'q_hashes': 2, 'start': 1},
    'smyrf': {'method': 'smyrf', 'location': 1, 'n_hashes': 2, 'q_cluster_size': 4, 'k_cluster_size': 4},
}
# the same settings with the hashing seeded, so that two forwards of the same batch hash alike
SEEDED = {name: {**spec, 'seed': 0} if name in ('act', 'smyrf') else spec for name, spec in SPECS.items()}
TINY_VIT = ['--model', 'deit_tiny', '--input-size', '32', '--patch-size', '8', '--embed-dim', '32', '--depth', '4',
            '--num-heads', '2', '--data-set', 'DIGITS']
AMP = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']


def test_every_method_has_a_training_setting():
    assert set(SPECS) == set(METHODS)


def model_with(spec):
    """The tiny reference ViT (weights large enough that tokens score differently), in train mode."""
    model = tiny_vit(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)
    return apply_token_reduction(model, spec).train()


def batch(seed=0, size=8):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, 32, 32, generator=generator), torch.randint(0, 10, (size,), generator=generator)


def loss_of(model, images, targets, amp=None):
    with torch.autocast('cpu', dtype=amp, enabled=amp is not None):
        return F.cross_entropy(model(images).float(), targets)


def gradients(model, images, targets, amp=None):
    model.zero_grad(set_to_none=True)
    loss_of(model, images, targets, amp).backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('amp', list(AMP))
@pytest.mark.parametrize('name', list(SPECS))
def test_every_trained_parameter_gets_a_finite_gradient(name, amp):
    images, targets = batch()
    plain = gradients(model_with(None), images, targets, AMP[amp])
    reduced = gradients(model_with(SPECS[name]), images, targets, AMP[amp])
    assert set(plain) == {n for n, _ in model_with(None).named_parameters()}
    assert set(reduced) == set(plain)
    for key, grad in reduced.items():
        assert torch.isfinite(grad).all(), key
    assert any(grad.abs().sum() > 0 for key, grad in reduced.items() if key.startswith('blocks.3.'))


@pytest.mark.parametrize('name', list(SPECS))
def test_one_step_lowers_the_loss(name):
    model = model_with(SEEDED[name])
    images, targets = batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    before = loss_of(model, images, targets)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss_of(model, images, targets)
    assert after < before - 1e-3, (float(before), float(after))


def evit_adjust_keep_rate(iters, epoch, warmup_epochs, total_epochs, iters_per_epoch, base_keep_rate):
    """The EViT code's ``adjust_keep_rate`` (its ``helpers.py``), max_keep_rate 1."""
    if epoch < warmup_epochs:
        return 1
    if epoch >= total_epochs:
        return base_keep_rate
    total_iters = iters_per_epoch * (total_epochs - warmup_epochs)
    iters = iters - iters_per_epoch * warmup_epochs
    return base_keep_rate + (1 - base_keep_rate) * (math.cos(iters / total_iters * math.pi) + 1) * 0.5


def test_evit_keep_rate_shrinks_as_the_evit_code():
    """EViT trains DeiT with --shrink_start_epoch 10 --shrink_epochs 100: keep rate 1, then a half cosine down to
    the target, per iteration (here 7 per epoch), then the target."""
    per_epoch = 7
    for iters in range(0, 130 * per_epoch, 3):
        epoch = iters // per_epoch
        expected = evit_adjust_keep_rate(iters, epoch, 10, 110, per_epoch, 0.7)
        assert shrinking_keep_rate(iters / per_epoch, 0.7, 10, 100) == pytest.approx(expected, abs=1e-12)
    assert shrinking_keep_rate(None, 0.7, 10, 100) == 0.7          # evaluation: the target
    assert shrinking_keep_rate(0.0, 0.7, 0, 0) == 0.7               # no shrinking asked


def test_training_progress_sets_the_keep_rate_of_a_forward():
    model = model_with(SPECS['evit']).eval()
    images, _ = batch()
    with torch.no_grad():
        # keep rate 0.5: 16 patches -> 8 (+1 fused) at block 1 -> ceil(0.5 * 9) = 5 (+1 fused) at block 2
        assert model.forward_features(images).shape[1] == 1 + 5 + 1
        with training_progress(0.5):                                        # before shrink_start_epoch: all kept
            assert model.forward_features(images).shape[1] == 17
        with training_progress(2.0):                                        # half way: keep rate 0.75
            assert model.forward_features(images).shape[1] == 1 + math.ceil(0.75 * 13) + 1
        assert model.forward_features(images).shape[1] == 1 + 5 + 1         # the context is gone again
    assert not hasattr(model.token_reduction, 'progress')


def test_engine_tells_each_training_forward_its_progress():
    model = model_with(SPECS['evit'])
    batches = [batch(seed) for seed in range(4)]
    opt = Optimization(torch.optim.SGD(model.parameters(), lr=0.01))
    with record_states() as states:
        train_one_epoch(model, lambda inputs, outputs, targets: F.cross_entropy(outputs, targets), batches, opt,
                        LoopOptions(torch.device('cpu'), print_freq=1000), epoch=2)
        evaluate(batches[:1], model, LoopOptions(torch.device('cpu'), print_freq=1000))
    assert [s.progress for s in states] == [2.0, 2.25, 2.5, 2.75, None]
    assert [s.keep_rate for s in states][-1] == 0.5


@pytest.mark.parametrize('name', ['ats', 'act'])
def test_ddp_ranks_keep_equal_weights(name, tmp_path):
    """Two gloo processes train with data that differs per rank, so each rank keeps (ATS) or clusters (ACT) other
    tokens; gradient clipping and EMA on. DDP raises if a parameter got no gradient on some rank."""
    spec = {k: v for k, v in SPECS[name].items()}
    res = run_script([tmp_path, json.dumps(spec)], script=[*TORCHRUN, 'tests/ddp_token_reduction_worker.py'])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in (0, 1)]
    assert ranks[0]['kept'] != ranks[1]['kept']
    for part in ('model', 'ema'):
        for key, value in ranks[0][part].items():
            assert torch.equal(value, ranks[1][part][key]), (part, key)
    initial = torch.load(tmp_path / 'rank0.pt', weights_only=True)['model']['blocks.0.attn.qkv.weight']
    assert torch.isfinite(initial).all()


# ------------------------------------------------------------------------------------------------- main.py runs

def train_args(spec, out, epochs, *extra):
    """A few steps per epoch at a constant lr (step schedule, no decay within the run), EMA and clipping on."""
    return [*TINY_VIT, *FAST, '--sched', 'step', '--decay-epochs', '100', '--max-steps-per-epoch', '3',
            '--drop-path', '0.1', '--model-ema', '--model-ema-decay', '0.9', '--clip-grad', '1.0',
            '--epochs', str(epochs), '--token-reduction', json.dumps(spec), '--output_dir', str(out), *extra]


def load(path):
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize('name', list(SPECS))
def test_resume_is_exact(name, tmp_path):
    """2 epochs straight == 1 epoch, then a resume for the second (RNG, optimizer, EMA and the EViT shrink
    schedule restored)."""
    spec = SPECS[name]
    assert main.main(train_args(spec, tmp_path / 'straight', 2)) == 0
    assert main.main(train_args(spec, tmp_path / 'resumed', 1)) == 0
    assert main.main(train_args(spec, tmp_path / 'resumed', 2)) == 0
    a, b = load(tmp_path / 'straight' / 'checkpoint.pth'), load(tmp_path / 'resumed' / 'checkpoint.pth')
    assert b['epoch'] == 1 and a['token_reduction'] == b['token_reduction']
    for part in ('model', 'model_ema'):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), (part, key)


@pytest.mark.parametrize('name,amp', [*[(name, 'fp16') for name in SPECS], ('ats', 'bf16'), ('hourglass', 'bf16')])
def test_mixed_precision_training(name, amp, tmp_path):
    """main.py under CPU autocast (fp16 with timm's NativeScaler, or bf16): finite losses, finite weights."""
    assert main.main(train_args(SPECS[name], tmp_path, 1, '--amp', amp)) == 0
    record = json.loads((tmp_path / 'log.txt').read_text())
    assert math.isfinite(record['train_loss']) and math.isfinite(record['test_loss'])
    assert all(torch.isfinite(v).all() for v in load(tmp_path / 'checkpoint.pth')['model'].values())


@pytest.fixture(scope='module')
def ats_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('ats_run')
    assert main.main(train_args(SPECS['ats'], out, 1)) == 0
    return out


def full_ats_spec():
    return {**SPECS['ats'], 'drop_tokens': True, 'variant': 'original'}


def test_checkpoint_log_and_config_record_the_spec(ats_run):
    ckpt = load(ats_run / 'checkpoint.pth')
    assert ckpt['token_reduction'] == full_ats_spec() and ckpt['args']['token_reduction'] == full_ats_spec()
    assert json.loads((ats_run / 'config.json').read_text())['token_reduction'] == full_ats_spec()
    log = [json.loads(line) for line in (ats_run / 'log.txt').read_text().splitlines()]
    assert [record['token_reduction'] for record in log] == [full_ats_spec()]


def test_eval_runs_the_spec_of_the_checkpoint(ats_run, tmp_path, capsys):
    """No spec named: the checkpoint's (same top-1 as the epoch's own evaluation); another one named: that one,
    and both are printed."""
    common = [*TINY_VIT, *FAST, '--eval', '--resume', str(ats_run / 'checkpoint.pth')]
    assert main.main([*common, '--output_dir', str(tmp_path / 'own')]) == 0
    result = json.loads((tmp_path / 'own' / 'eval.json').read_text())
    assert result['token_reduction'] == full_ats_spec() and result['token_reduction_trained'] == full_ats_spec()
    log = json.loads((ats_run / 'log.txt').read_text().splitlines()[-1])
    assert result['acc1'] == pytest.approx(log['test_acc1'], abs=1e-9)
    assert result['loss'] == pytest.approx(log['test_loss'], rel=1e-6)

    capsys.readouterr()
    assert main.main([*common, '--token-reduction', 'null', '--output_dir', str(tmp_path / 'plain')]) == 0
    out = capsys.readouterr().out
    assert 'was trained with token_reduction {"method": "ats"' in out and 'evaluating with null' in out
    result = json.loads((tmp_path / 'plain' / 'eval.json').read_text())
    assert result['token_reduction'] is None and result['token_reduction_trained'] == full_ats_spec()


def test_resume_with_another_spec_is_refused_unless_finetuning(ats_run, tmp_path, capsys):
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'checkpoint.pth').write_bytes((ats_run / 'checkpoint.pth').read_bytes())
    before = (run / 'checkpoint.pth').read_bytes()
    capsys.readouterr()
    assert main.main(train_args(SPECS['tome'], run, 2)) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error: cannot resume') and '--finetune' in err
    assert (run / 'checkpoint.pth').read_bytes() == before

    assert main.main(train_args(SPECS['tome'], run, 2, '--finetune', str(run / 'checkpoint.pth'))) == 0
    out = capsys.readouterr().out
    assert 'fine-tuning with {"method": "tome"' in out
    assert load(run / 'checkpoint.pth')['token_reduction'] == {**SPECS['tome'], 'prop_attn': True}

    capsys.readouterr()   # the same spec, named again: resumes
    assert main.main(train_args(SPECS['tome'], run, 3)) == 0
    assert 'resumed from epoch 1' in capsys.readouterr().out


def test_resume_without_a_spec_keeps_the_checkpoints(ats_run, tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'checkpoint.pth').write_bytes((ats_run / 'checkpoint.pth').read_bytes())
    argv = train_args(None, run, 2)
    argv = argv[:argv.index('--token-reduction')] + argv[argv.index('--token-reduction') + 2:]
    assert main.main(argv) == 0
    assert load(run / 'checkpoint.pth')['token_reduction'] == full_ats_spec()


def test_non_finite_evaluation_is_an_error(tmp_path, capsys):
    """Hourglass with temperature 1e300 gives NaN logits on the tiny ViT: one error line naming the setting, exit
    2, no eval.json (it used to exit 0 with chance accuracy)."""
    spec = {'method': 'hourglass', 'location': 1, 'num_clusters': 4, 'temperature': 1e300}
    capsys.readouterr()
    code = main.main([*TINY_VIT, *FAST, '--eval', '--random-weights', '--token-reduction', json.dumps(spec),
                      '--output_dir', str(tmp_path / 'ev')])
    err = capsys.readouterr().err
    assert code == 2 and err.count('\n') == 1 and err.startswith('error: evaluation loss is nan')
    assert '"method": "hourglass"' in err and '"temperature": 1e+300' in err
    assert not (tmp_path / 'ev' / 'eval.json').exists()


def test_evaluate_raises_on_a_non_finite_loss():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    with torch.no_grad():
        model[1].bias[3] = float('inf')
    with pytest.raises(NonFiniteLossError, match='evaluation loss is'):
        evaluate([batch()], model, LoopOptions(torch.device('cpu'), print_freq=1000))
