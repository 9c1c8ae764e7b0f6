"""Samplers: repeated augmentation for training, exact (unpadded) sharding for distributed evaluation.

``RASampler`` is timm's ``RepeatAugSampler``: DeiT's repeated augmentation (each image 3x per epoch, the copies on
different ranks, an epoch capped at ``floor(len / 256) * 256`` images) with a fallback for sets smaller than 256
images, where DeiT's cap would be 0.
"""
import math

import torch
from timm.data.distributed_sampler import RepeatAugSampler as RASampler

__all__ = ['RASampler', 'ExactDistributedSampler']


class ExactDistributedSampler(torch.utils.data.Sampler):
    """Rank ``r`` gets indices ``r, r + W, r + 2W, ...``: every sample exactly once over all ranks, no padding.

    Ranks may get one sample more or less than others, so evaluation must not run collectives inside the loop."""

    def __init__(self, dataset, num_replicas: int, rank: int):
        self.dataset_len, self.num_replicas, self.rank = len(dataset), num_replicas, rank

    def __iter__(self):
        return iter(range(self.rank, self.dataset_len, self.num_replicas))

    def __len__(self) -> int:
        return max(0, math.ceil((self.dataset_len - self.rank) / self.num_replicas))
