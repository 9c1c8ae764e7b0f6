"""DeiT-style distillation end to end on DIGITS: a tiny teacher trained here, a distilled PiT student."""
import json

import pytest
import torch

from conftest import DIGITS, FAST, TINY_HVT, run_script
from framework import builders, options
from utils import UserError
TINY_PIT = ['--model', 'pit_ti_distilled', '--input-size', '32', '--patch-size', '4', '--stride', '4',
            '--base-dims', '[8, 8, 8]', '--heads', '[1, 2, 4]', '--depth', '[1, 1, 1]']


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp('teacher')
    res = run_script([*TINY_HVT, *FAST, *DIGITS, '--epochs', '1', '--max-steps-per-epoch', '40', '--output_dir', out])
    assert res.returncode == 0, res.stderr[-3000:]
    return out / 'checkpoint.pth'


def test_teacher_is_rebuilt_from_its_checkpoint_frozen_in_eval_mode(teacher):
    args = options.parse_args([*TINY_PIT, *DIGITS, '--distillation-type', 'hard', '--teacher-path', str(teacher)])
    model = builders.build_teacher(args, torch.device('cpu'), 10)
    saved = torch.load(teacher, weights_only=True)['model']
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize('kind', ['hard', 'soft'])
def test_distilled_student_trains_with_teacher(teacher, tmp_path, kind):
    res = run_script([*TINY_PIT, *FAST, *DIGITS, '--epochs', '1', '--max-steps-per-epoch', '10',
                      '--distillation-type', kind, '--distillation-alpha', '0.5', '--distillation-tau', '2.0',
                      '--teacher-path', teacher, '--output_dir', tmp_path])
    assert res.returncode == 0, res.stderr[-3000:]
    assert f'teacher: hvt_model from {teacher}' in res.stdout
    log = json.loads((tmp_path / 'log.txt').read_text().splitlines()[0])
    assert log['test_n_samples'] == 450 and log['train_loss'] > 0
    ckpt = torch.load(tmp_path / 'checkpoint.pth', weights_only=True)
    assert 'head_dist.weight' in ckpt['model'] and ckpt['args']['distillation_type'] == kind


def test_distillation_loss_uses_the_teacher(teacher):
    """alpha = 1, hard: the loss is exactly CE(dist head, teacher arg-max); the class head gets no gradient."""
    args = options.parse_args([*TINY_PIT, *DIGITS, '--distillation-type', 'hard', '--distillation-alpha', '1.0',
                               '--teacher-path', str(teacher), '--smoothing', '0', '--mixup', '0', '--cutmix', '0'])
    student = builders.build_model(args, 10).train()
    criterion = builders.build_criterion(args, None, builders.build_teacher(args, torch.device('cpu'), 10))
    assert (criterion.distillation_type, criterion.alpha, criterion.tau) == ('hard', 1.0, 1.0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    cls, dist = student(x)
    loss = criterion(x, (cls, dist), y)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(dist, criterion.teacher_model(x).argmax(1))
    assert torch.allclose(loss, expected)
    loss.backward()
    assert student.head.weight.grad is None or torch.count_nonzero(student.head.weight.grad) == 0


def test_distillation_needs_a_distilled_student(teacher, tmp_path):
    res = run_script([*TINY_HVT, *FAST, *DIGITS, '--distillation-type', 'hard', '--teacher-path', teacher,
                      '--output_dir', tmp_path])
    assert res.returncode == 2 and 'needs a model with a distillation token' in res.stderr


def test_teacher_that_does_not_load_completely_is_refused(trained, tmp_path):
    saved = torch.load(trained[0] / 'checkpoint.pth', weights_only=True)
    partial = {**saved, 'model': {k: v for i, (k, v) in enumerate(saved['model'].items()) if i % 2}}
    torch.save(partial, tmp_path / 'partial.pth')
    torch.save(saved['model'], tmp_path / 'bare.pth')     # no args: loaded into --teacher-model as it is
    student = ['--model', 'pit_ti_distilled', '--input-size', '32', '--patch-size', '4', '--stride', '4',
               '--base-dims', '[8, 8, 8]', '--heads', '[1, 2, 4]', '--depth', '[1, 1, 1]', *DIGITS,
               '--distillation-type', 'hard']
    cases = {'partial.pth': [], 'bare.pth': ['--teacher-model', 'resnet10t']}
    for name, extra in cases.items():
        args = options.parse_args([*student, *extra, '--teacher-path', str(tmp_path / name)])
        with pytest.raises(UserError, match=r'of \d+ keys missing'):
            builders.build_teacher(args, torch.device('cpu'), 10)
