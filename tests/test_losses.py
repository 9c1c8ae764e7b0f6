"""DistillationLoss against DeiT's formulas computed by hand."""
import pytest
import torch
import torch.nn.functional as F

from losses import DistillationLoss


class Teacher(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits


def test_none_scores_the_class_head_only():
    cls, dist = torch.randn(4, 5), torch.randn(4, 5)
    y = torch.tensor([0, 1, 2, 3])
    loss = DistillationLoss(torch.nn.CrossEntropyLoss())(None, (cls, dist), y)
    assert torch.allclose(loss, F.cross_entropy(cls, y))


def test_soft_and_hard():
    torch.manual_seed(0)
    cls, dist, teacher = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)
    y = torch.tensor([0, 1, 2, 3])
    base = F.cross_entropy(cls, y)
    tau, alpha = 2.0, 0.3
    soft = DistillationLoss(torch.nn.CrossEntropyLoss(), Teacher(teacher), 'soft', alpha, tau)(None, (cls, dist), y)
    kl = (F.softmax(teacher / tau, 1) * (F.log_softmax(teacher / tau, 1) - F.log_softmax(dist / tau, 1))).sum()
    assert torch.allclose(soft, (1 - alpha) * base + alpha * kl * tau * tau / dist.numel(), atol=1e-6)
    hard = DistillationLoss(torch.nn.CrossEntropyLoss(), Teacher(teacher), 'hard', alpha)(None, (cls, dist), y)
    assert torch.allclose(hard, (1 - alpha) * base + alpha * F.cross_entropy(dist, teacher.argmax(1)), atol=1e-6)


def test_distillation_needs_a_distilled_model_and_teacher():
    with pytest.raises(ValueError, match='needs a teacher'):
        DistillationLoss(torch.nn.CrossEntropyLoss(), None, 'hard')
    with pytest.raises(ValueError, match='distillation head'):
        DistillationLoss(torch.nn.CrossEntropyLoss(), Teacher(torch.randn(2, 3)), 'hard')(
            None, torch.randn(2, 3), torch.tensor([0, 1]))
