"""Worker of ``test_train_token_reduction``: one rank of a DDP training run (gloo, CPU) with a token reduction.

    torchrun --nproc_per_node=2 tests/ddp_token_reduction_worker.py OUT_DIR SPEC_JSON

Builds the model, optimizer and DDP wrapper the way ``main.py`` does (``framework.builders``), trains a few steps of
``engine.train_one_epoch`` on data that differs between ranks (so a data-dependent method keeps different tokens on
each rank), then writes ``rank{R}.pt``: the weights and the tokens each block kept, per step.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import LoopOptions, train_one_epoch  # noqa: E402
from framework import builders, options  # noqa: E402
from models.token_reduction import record_states  # noqa: E402
import utils  # noqa: E402

TINY_VIT = ['--model', 'deit_tiny', '--input-size', '32', '--patch-size', '8', '--embed-dim', '32', '--depth', '4',
            '--num-heads', '2', '--data-set', 'DIGITS', '--batch-size', '8', '--lr', '1e-2', '--unscale-lr',
            '--warmup-epochs', '0', '--clip-grad', '1.0', '--model-ema', '--model-ema-decay', '0.9']


def main(out_dir: str, spec: str) -> None:
    args = options.parse_args([*TINY_VIT, '--token-reduction', spec, '--device', 'cpu'])
    dist = utils.init_distributed_mode('cpu')
    torch.manual_seed(0)                      # the same initial weights on every rank (DDP also broadcasts them)
    model = builders.build_model(args, 10)
    with torch.no_grad():                     # weights large enough that attention differs between tokens
        for name, param in model.named_parameters():
            if not name.endswith('bias') and 'norm' not in name:
                param.normal_(0, 0.3)
    generator = torch.Generator().manual_seed(100 + dist.rank)    # different images on each rank
    batches = [(torch.randn(8, 3, 32, 32, generator=generator), torch.randint(0, 10, (8,), generator=generator))
               for _ in range(4)]
    opt = builders.build_optimization(args, model, len(batches), dist.world_size, torch.device('cpu'), None)
    train_model = builders.wrap_for_training(model, args, dist)
    torch.manual_seed(dist.rank)              # per-rank randomness (ACT/SMYRF hashing without a seed)
    with record_states() as states:
        train_one_epoch(train_model, builders.build_criterion(args, None, None), batches, opt,
                        LoopOptions(torch.device('cpu'), print_freq=1000), epoch=0)
    kept = [[round(float(c), 3) for c in (s.counts() or {}).get('per_block', []) if c is not None] for s in states]
    torch.save({'model': model.state_dict(), 'ema': opt.model_ema.module.state_dict(), 'kept': kept},
               os.path.join(out_dir, f'rank{dist.rank}.pt'))
    utils.cleanup_distributed()


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2])
