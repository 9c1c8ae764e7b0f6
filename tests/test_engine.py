"""engine.py loops on a linear model: gradient accumulation equals a big batch; evaluation counts exactly."""
import pytest
import torch

from engine import LoopOptions, NonFiniteLossError, Optimization, evaluate, train_one_epoch
from losses import DistillationLoss


def loader(x, y, batch):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=False)


def train(batch, accum, x, y):
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    criterion = DistillationLoss(torch.nn.CrossEntropyLoss())
    stats, updates = train_one_epoch(model, criterion, loader(x, y, batch), Optimization(opt, accum_steps=accum),
                                     LoopOptions(torch.device('cpu'), print_freq=100), 0)
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
                        Optimization(torch.optim.SGD(model.parameters(), lr=1.0)), LoopOptions(torch.device('cpu')), 0)
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))


def test_evaluate_counts_every_sample():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 7)
    x, y = torch.randn(23, 6), torch.randint(0, 7, (23,))
    stats = evaluate(loader(x, y, 5), model, LoopOptions(torch.device('cpu'), print_freq=100))
    with torch.no_grad():
        logits = model(x)
    top5 = logits.topk(5, dim=1).indices
    assert stats['n_samples'] == 23
    assert stats['acc1'] == pytest.approx(100 * (logits.argmax(1) == y).float().mean().item())
    assert stats['acc5'] == pytest.approx(100 * (top5 == y[:, None]).any(1).float().mean().item())
    assert stats['loss'] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-6)


def _parts(seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(6, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    from timm.scheduler import CosineLRScheduler
    from timm.utils import ModelEmaV3
    scheduler = CosineLRScheduler(optimizer, t_initial=10, warmup_t=2, warmup_lr_init=1e-3, t_in_epochs=False)
    return model, Optimization(optimizer, scheduler, step_lr_per_update=True, accum_steps=2,
                               model_ema=ModelEmaV3(model, decay=0.5))


def test_lr_is_stepped_per_update_and_ema_follows():
    torch.manual_seed(1)
    x, y = torch.randn(24, 6), torch.randint(0, 3, (24,))
    model, opt = _parts(0)
    _, updates = train_one_epoch(model, DistillationLoss(torch.nn.CrossEntropyLoss()), loader(x, y, 4), opt,
                                 LoopOptions(torch.device('cpu'), print_freq=100), 0)
    assert updates == 3   # 6 batches, 2 per update
    assert opt.optimizer.param_groups[0]['lr'] == pytest.approx(opt.lr_scheduler._get_lr(3)[0])
    assert not torch.equal(opt.model_ema.module.weight, model.weight)


def test_checkpoint_contents_restore_the_training_state(tmp_path):
    """main.checkpoint_contents and main.restore_checkpoint are each other's inverse, through a weights-only file."""
    import main
    from utils import DistInfo
    torch.manual_seed(1)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    model, opt = _parts(0)
    train_one_epoch(model, DistillationLoss(torch.nn.CrossEntropyLoss()), loader(x, y, 4), opt,
                    LoopOptions(torch.device('cpu'), print_freq=100), 0, num_updates=0)
    state = main.TrainState(epoch=4, max_accuracy=55.5, best_epoch=3, max_accuracy_ema=56.0)
    torch.save(main.checkpoint_contents(model, opt, state, ['rng'], {'model': 'linear'}), tmp_path / 'c.pth')
    ckpt = torch.load(tmp_path / 'c.pth', weights_only=True)
    assert ckpt['args'] == {'model': 'linear'} and ckpt['epoch'] == 4
    fresh_model, fresh = _parts(1)
    lrs = [group['lr'] for group in fresh.optimizer.param_groups]
    restored = main.restore_checkpoint(ckpt, fresh, seed=0, dist=DistInfo(world_size=2))   # 1 rng state: re-seed
    assert restored == state
    assert fresh.optimizer.state_dict()['state'][0]['exp_avg'].equal(opt.optimizer.state_dict()['state'][0]['exp_avg'])
    # the schedule is this run's (rebuilt by main.run at the resumed epoch), so the optimizer keeps this run's lr
    assert [group['lr'] for group in fresh.optimizer.param_groups] == lrs
    assert fresh.model_ema.module.weight.equal(opt.model_ema.module.weight)
    assert main.restore_checkpoint({'model': {}}, fresh, 0, DistInfo()) == main.TrainState()   # weights only
