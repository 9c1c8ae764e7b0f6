"""engine.py loops on a linear model: gradient accumulation equals a big batch; evaluation counts exactly."""
import pytest
import torch

from engine import NonFiniteLossError, evaluate, train_one_epoch
from losses import DistillationLoss


def loader(x, y, batch):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=False)


def train(batch, accum, x, y):
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    criterion = DistillationLoss(torch.nn.CrossEntropyLoss())
    stats, updates = train_one_epoch(model, criterion, loader(x, y, batch), opt, torch.device('cpu'), 0,
                                     accum_steps=accum, print_freq=100)
    return model, stats, updates


def test_gradient_accumulation_equals_one_big_batch():
    torch.manual_seed(1)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    big, _, big_updates = train(16, 1, x, y)
    acc, stats, acc_updates = train(4, 4, x, y)
    assert big_updates == acc_updates == 2
    for p, q in zip(big.parameters(), acc.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    assert stats['loss'] > 0 and stats['images_per_sec'] > 0


def test_accumulation_flushes_a_short_last_window():
    torch.manual_seed(1)
    x, y = torch.randn(24, 6), torch.randint(0, 3, (24,))
    _, _, updates = train(4, 4, x, y)   # 6 batches: one window of 4, then a window of 2
    assert updates == 2


def test_non_finite_loss_raises_before_the_update():
    model = torch.nn.Linear(6, 3)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.full((8, 6), float('nan')), torch.zeros(8, dtype=torch.long)
    with pytest.raises(NonFiniteLossError, match='loss is nan at epoch 0, step 0'):
        train_one_epoch(model, DistillationLoss(torch.nn.CrossEntropyLoss()), loader(x, y, 4),
                        torch.optim.SGD(model.parameters(), lr=1.0), torch.device('cpu'), 0)
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))


def test_evaluate_counts_every_sample():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 7)
    x, y = torch.randn(23, 6), torch.randint(0, 7, (23,))
    stats = evaluate(loader(x, y, 5), model, torch.device('cpu'), print_freq=100)
    with torch.no_grad():
        logits = model(x)
    top5 = logits.topk(5, dim=1).indices
    assert stats['n_samples'] == 23
    assert stats['acc1'] == pytest.approx(100 * (logits.argmax(1) == y).float().mean().item())
    assert stats['acc5'] == pytest.approx(100 * (top5 == y[:, None]).any(1).float().mean().item())
    assert stats['loss'] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-6)
