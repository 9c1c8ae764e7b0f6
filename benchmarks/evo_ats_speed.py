"""Evo-ViT and ATS vs plain on a plain ViT (default: SWAG ViT-L/16, random weights), interleaved, inference mode.

    python benchmarks/evo_ats_speed.py [--model swag_vit_l16] [--img-size 512] [--batch 1] [--rounds 5] [--threads N]
                                       [--cpu-time] [--spec JSON ...]

Default specs (for the 24 blocks of ViT-L/16; give ``--spec`` for other depths): Evo-ViT (8, 0.4), the seed's
fastest row; ATS at block 8 with a budget of 1/4 of the tokens (the multi-stage original's regime: random weights
keep almost every token at a budget >= N); ATS at block 20 with the SWAG tables' budget >= N (random weights:
measures the sampler's overhead). Prints the median seconds per forward of each, the speed-up, and the MAC ratio of
the tokens actually run (attention: 4·n·D² + 2·n²·D, MLP 8·m·D², per block; ATS blocks: q·kᵀ and A·V on kept queries
only) and the speed-up as a fraction of it. fp32, on the CPU. ``--cpu-time`` times with the process CPU clock (use
with ``--threads 1`` on a machine shared with other jobs).
"""
import argparse
import json
import statistics
import time

import torch

import models
from models import apply_token_reduction
from models.token_reduction import record_states


def token_counts(model, x, tokens):
    """Mean real tokens (attention in, MLP) per block of one forward: the state's record for data-dependent methods
    (ATS: its ``kept_tokens``), the closed-form schedule otherwise."""
    with record_states() as states:
        model(x)
    kept = getattr(states[-1], 'kept_tokens', None)
    if kept:
        return [tuple(record.float().mean(dim=0).tolist()) for record in kept]
    return model.token_reduction.schedule(tokens, model.patch_embed.grid_size, len(model.blocks))


def macs(pairs, width: int, ats_blocks=()) -> float:
    """Matmul MACs per image of blocks of ``width`` channels that see (n tokens in, m tokens out); in ATS blocks only
    the m kept queries are attended and projected."""
    total = 0.
    for index, (n, m) in enumerate(pairs):
        queries = m if index in ats_blocks else n
        total += 3 * n * width ** 2 + 2 * queries * n * width + queries * width ** 2 + 8 * m * width ** 2
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='swag_vit_l16', help='a plain ViT of models (deit_*, swag_vit_*)')
    parser.add_argument('--img-size', type=int, default=512)
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--threads', type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument('--cpu-time', action='store_true', help='process CPU time instead of wall time')
    parser.add_argument('--spec', action='append', default=None, help='a token-reduction spec (JSON); repeatable')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    torch.manual_seed(0)
    model = models.create_model(args.model, img_size=args.img_size).eval()
    grid = model.patch_embed.grid_size
    tokens = model.num_prefix_tokens + grid[0] * grid[1]
    depth, width = len(model.blocks), model.embed_dim
    specs = [json.loads(s) for s in args.spec] if args.spec else [
        {'method': 'evo_vit', 'location': 8, 'keep_ratio': 0.4},
        {'method': 'ats', 'locations': [8], 'num_tokens': tokens // 4},
        {'method': 'ats', 'locations': [20], 'num_tokens': tokens}]
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    names = ['plain'] + [json.dumps(spec) for spec in specs]
    times = {name: [] for name in names}
    plain_macs = macs([(tokens, tokens)] * depth, width)
    ratios = {}
    with torch.inference_mode():
        for round_index in range(args.rounds + 1):  # round 0 warms up and records the token counts
            for name, spec in zip(names, [None] + specs):
                apply_token_reduction(model, spec)
                if not round_index:
                    if spec is None:
                        model(x)
                    else:
                        ratios[name] = plain_macs / macs(token_counts(model, x, tokens), width,
                                                         spec.get('locations', ()))
                    continue
                start = clock()
                model(x)
                times[name].append(clock() - start)
    print(f'{args.model} arch @{args.img_size} ({tokens} tokens), batch {args.batch}, fp32, {torch.get_num_threads()} '
          f'threads, {"CPU" if args.cpu_time else "wall"} time, {args.rounds} interleaved rounds, '
          f'torch {torch.__version__}')
    plain = statistics.median(times['plain'])
    print(f'  plain  median {plain:.3f} s  (min {min(times["plain"]):.3f}, max {max(times["plain"]):.3f})')
    for name in names[1:]:
        median = statistics.median(times[name])
        print(f'  {name}\n         median {median:.3f} s  (min {min(times[name]):.3f}, max {max(times[name]):.3f})  '
              f'speed-up {plain / median:.2f}x, MAC ratio {ratios[name]:.2f}x, '
              f'{plain / median / ratios[name]:.0%} of it')


if __name__ == '__main__':
    main()
