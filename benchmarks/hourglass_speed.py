"""Hourglass vs plain on the SWAG ViT-L/16 architecture (random weights), interleaved, inference mode.

    python benchmarks/hourglass_speed.py [--img-size 512] [--batch 1] [--rounds 5] [--location 8] [--clusters 256]
                                         [--threads N]

Prints the median seconds per forward of each, the speed-up, the GFLOPs ratio of seed 003's table (364.8 / 179.0 for
the default (8, 16x16) setting) and the speed-up as a fraction of it. fp32, on the CPU. On a machine shared with other jobs, --threads 1 avoids
measuring thread-pool contention (every small op then waits for a descheduled worker).
"""
import argparse
import statistics
import time

import torch

from models import apply_token_reduction
from models.token_reduction.hourglass import cluster_tokens
from models.vit import VisionTransformer

PUBLISHED_GFLOPS = {None: 364.8, (12, 529): 275.8, (6, 529): 228.5, (8, 256): 179.0}  # ViT-L/16 @512, seed 003


def seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    model = VisionTransformer(img_size=args.img_size, patch_size=16, embed_dim=1024, depth=24, num_heads=16).eval()
    spec = {'method': 'hourglass', 'location': args.location, 'num_clusters': args.clusters}
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    side = args.img_size // 16
    tokens = torch.randn(args.batch, side * side, 1024)
    times = {'plain': [], 'hourglass': [], 'clustering alone': []}
    with torch.inference_mode():
        for round_index in range(args.rounds + 1):  # round 0 warms up
            apply_token_reduction(model, None)
            plain = seconds(model, x)
            apply_token_reduction(model, spec)
            reduced = seconds(model, x)
            alone = seconds(cluster_tokens, tokens, (side, side), (round(args.clusters ** .5),) * 2, 5, 1.0, 5)
            if round_index:
                times['plain'].append(plain)
                times['hourglass'].append(reduced)
                times['clustering alone'].append(alone)
    print(f'ViT-L/16 arch @{args.img_size}, batch {args.batch}, fp32, {torch.get_num_threads()} threads, '
          f'{args.rounds} interleaved rounds, torch {torch.__version__}; spec {spec}')
    for name, values in times.items():
        print(f'  {name:17s} median {statistics.median(values):.3f} s  (min {min(values):.3f}, max {max(values):.3f})')
    speedup = statistics.median(times['plain']) / statistics.median(times['hourglass'])
    print(f'  speed-up {speedup:.2f}x', end='')
    key = (args.location, args.clusters)
    if args.img_size == 512 and key in PUBLISHED_GFLOPS:
        flops_ratio = PUBLISHED_GFLOPS[None] / PUBLISHED_GFLOPS[key]
        print(f'; GFLOPs ratio {flops_ratio:.2f}x (seed 003); speed-up / GFLOPs ratio {speedup / flops_ratio:.0%}')
    else:
        print()


if __name__ == '__main__':
    main()
