"""Hourglass vs plain on a plain ViT (default: SWAG ViT-L/16, random weights), interleaved, inference mode.

    python benchmarks/hourglass_speed.py [--config swag-vit-l16] [--img-size 512] [--batch 1] [--rounds 5]
                                         [--location 8] [--clusters 256] [--threads N]

Prints the median seconds per forward of each, the speed-up, and, when ``data/published.json`` holds the plain and
the Hourglass GFLOPs of this config, setting and resolution (``framework.published``; e.g. 364.8 / 179.0 for
swag-vit-l16 (8, 16x16) at 512), that GFLOPs ratio and the speed-up as a fraction of it. fp32, on the CPU. On a
machine shared with other jobs, --threads 1 avoids measuring thread-pool contention (every small op then waits for a
descheduled worker).
"""
import argparse
import os
import statistics
import time

from typing import Optional

import torch

from framework import builders, published
from models import apply_token_reduction
from models.token_reduction.hourglass import cluster_tokens


def seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def published_ratio(config: str, model_name: str, spec: dict, img_size: int) -> Optional[float]:
    """Published GFLOPs of the plain model / of ``spec``, at ``img_size``, in one convention; None when either is
    not published."""
    rows = [row for row in published.load() if row.resolution == img_size]
    plain, reduced = (published.find(rows, config, model_name, s) for s in (None, spec))
    if plain is None or reduced is None or plain.convention != reduced.convention:
        return None
    return float(plain.gmacs) / float(reduced.gmacs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--config', default='swag-vit-l16', help='a plain-ViT config of config/ (its model)')
    parser.add_argument('--img-size', type=int, default=512)
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--location', type=int, default=8)
    parser.add_argument('--clusters', type=int, default=256)
    parser.add_argument('--threads', type=int, default=None, help="torch threads (default: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config_path = os.path.join(builders.CONFIG_DIR, f'{args.config}.json')
    cfg = builders.load_args(config_path, ['--input-size', str(args.img_size)])
    model = builders.build_model(cfg, plain=True).eval()
    spec = {'method': 'hourglass', 'location': args.location, 'num_clusters': args.clusters}
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    grid = tuple(model.patch_embed.grid_size)
    tokens = torch.randn(args.batch, grid[0] * grid[1], model.embed_dim)
    times = {'plain': [], 'hourglass': [], 'clustering alone': []}
    with torch.inference_mode():
        for round_index in range(args.rounds + 1):  # round 0 warms up
            apply_token_reduction(model, None)
            plain = seconds(model, x)
            apply_token_reduction(model, spec)
            reduced = seconds(model, x)
            alone = seconds(cluster_tokens, tokens, grid, (round(args.clusters ** .5),) * 2, 5, 1.0, 5)
            if round_index:
                times['plain'].append(plain)
                times['hourglass'].append(reduced)
                times['clustering alone'].append(alone)
    print(f'{cfg.model} arch @{args.img_size}, batch {args.batch}, fp32, {torch.get_num_threads()} threads, '
          f'{args.rounds} interleaved rounds, torch {torch.__version__}; spec {spec}')
    for name, values in times.items():
        print(f'  {name:17s} median {statistics.median(values):.3f} s  (min {min(values):.3f}, max {max(values):.3f})')
    speedup = statistics.median(times['plain']) / statistics.median(times['hourglass'])
    print(f'  speed-up {speedup:.2f}x', end='')
    flops_ratio = published_ratio(args.config, cfg.model, spec, args.img_size)
    if flops_ratio is not None:
        print(f'; published GFLOPs ratio {flops_ratio:.2f}x; speed-up / GFLOPs ratio {speedup / flops_ratio:.0%}')
    else:
        print()


if __name__ == '__main__':
    main()
