"""Hourglass ViT (Liang et al., "Expediting Large-Scale Vision Transformer for Dense Prediction without Fine-tuning",
NeurIPS 2022), as Expedit-SWAG runs it: the paper's own method in Expedit-SWAG's tables.

Before block ``location`` the patch tokens are clustered into h*w centres by a few iterations of local soft k-means
(the token clustering layer): centres start as the adaptive average pool of the token map, each token may only join
centres within ``window_size // 2`` grid cells of its initial cell, assignment = softmax over centres of
-squared_distance * temperature, centre = assignment-weighted mean of its tokens. The class token is kept apart and
put back first; position embeddings are not added again. The later blocks run on 1 + h*w tokens. With
``reconstruct_location`` the full grid is rebuilt before that block (the token reconstruction layer): every original
token becomes an L2-normalised combination of its k nearest centres, with weights exp(-t * d) from the distances
between the tokens and the centres at clustering time. Expedit-SWAG itself never reconstructs (classification only
needs the class token); the dense-prediction siblings do.

Kept from upstream on purpose: the dense masked (centres x tokens) distance ||x||^2 + ||c||^2 - 2 c.x (one batched
matmul per iteration) and the bmm centre update are the products the published GFLOPs count. Fixed: the
reconstruction runs on any device (upstream moved a tensor to ``.cuda()``), and its weights are computed stably
(upstream's exp(-t * d) underflows to all zeros on large-norm features, and the output is then zero). The clustering
runs in float32 under autocast: the expanded distance cancels badly in half precision.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..layers import square_grid_side
from .core import (REQUIRED, Param, TokenReduction, TokenState, _fail, check_block_index, int_param, is_int,
                   positive_float_param, register_method)

OUTSIDE_WINDOW = 1e16  # added to the distance of a (centre, token) pair outside the local window, as upstream
MAX_ITERS = 100      # clustering iterations (upstream: 5)


# --------------------------------------------------------------------------------------------- the algorithm

def pairwise_squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_i||^2 + ||b_j||^2 - 2 a_i.b_j for a (B, P, C), b (B, Q, C) -> (B, P, Q); the product is one matmul."""
    return ((a * a).sum(dim=-1).unsqueeze(2) + (b * b).sum(dim=-1).unsqueeze(1)
            - 2 * (a @ b.transpose(1, 2)))


def initial_labels(grid_size: Tuple[int, int], cluster_grid: Tuple[int, int], device=None) -> torch.Tensor:
    """Initial cell (raster index into the h*w centres) of each of the H*W tokens: (H*W,) long.

    Nearest-neighbour upsampling of the h x w index grid to H x W (``F.interpolate(mode='nearest')`` as upstream);
    when H is not a multiple of h these cells differ slightly from the adaptive-pool bins of the initial centres."""
    h, w = cluster_grid
    cells = torch.arange(h * w, dtype=torch.float32, device=device).reshape(1, 1, h, w)
    return F.interpolate(cells, size=tuple(grid_size), mode='nearest').flatten().long()


def window_mask(labels: torch.Tensor, cluster_grid: Tuple[int, int], window_size: int) -> torch.Tensor:
    """Additive (h*w, H*W) float32 mask: 0 where centre j lies within window_size // 2 grid rows and columns of token
    i's initial cell, ``OUTSIDE_WINDOW`` elsewhere."""
    radius = window_size // 2
    width = cluster_grid[1]
    centres = torch.arange(cluster_grid[0] * width, device=labels.device).unsqueeze(1)
    tokens = labels.unsqueeze(0)
    near_rows = (tokens // width - centres // width).abs() <= radius
    near_cols = (tokens % width - centres % width).abs() <= radius
    return (~(near_rows & near_cols)).float() * OUTSIDE_WINDOW


def cluster_tokens(tokens: torch.Tensor, grid_size: Tuple[int, int], cluster_grid: Tuple[int, int], iters: int,
                   temperature: float, window_size: int) -> torch.Tensor:
    """Local soft k-means of the patch tokens (B, H*W, C) (raster order of an H x W grid) into h*w centres.

    Returns the centres (B, h*w, C) in raster order of the h x w grid. Each iteration: squared distances of every
    (centre, token) pair, +1e16 outside the window, softmax over centres of (-distance * temperature), centre =
    assignment-weighted mean of the tokens (sum of weights clamped at 1e-16); the assignment is detached."""
    B, L, C = tokens.shape
    H, W = grid_size
    centres = F.adaptive_avg_pool2d(tokens.transpose(1, 2).reshape(B, C, H, W), cluster_grid)
    centres = centres.flatten(2).transpose(1, 2)                                     # (B, M, C)
    mask = window_mask(initial_labels(grid_size, cluster_grid, tokens.device), cluster_grid, window_size)
    for _ in range(iters):
        distance = pairwise_squared_distances(centres, tokens)                      # (B, M, L)
        assignment = (-(distance + mask) * temperature).softmax(dim=1).detach()     # over centres, per token
        centres = torch.bmm(assignment, tokens) / assignment.sum(dim=2, keepdim=True).clamp(min=1e-16)
    return centres


def nearest_centres(tokens: torch.Tensor, centres: torch.Tensor, grid_size: Tuple[int, int],
                    cluster_grid: Tuple[int, int], window_size: int) -> torch.Tensor:
    """Each token's nearest centre inside its window, (B, H*W) indices into the h*w centres: the strongest weight of
    one more soft assignment to the final centres."""
    mask = window_mask(initial_labels(grid_size, cluster_grid, tokens.device), cluster_grid, window_size)
    return (pairwise_squared_distances(centres, tokens) + mask).argmin(dim=1)


def reconstruction_weights(tokens: torch.Tensor, centres: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """(B, L, M) weights that rebuild each of the L tokens from its k nearest of the M centres, both at clustering.

    Upstream: w = exp(-t * d), zero below each row's k-th largest, rows L2-normalised (``F.normalize``, p=2). Here each
    row's distances are first shifted by their minimum, which the normalisation cancels; it keeps the nearest centre's
    weight at 1 where upstream's exp underflows to an all-zero row on large-norm features."""
    distance = pairwise_squared_distances(tokens, centres)
    distance = distance - distance.min(dim=-1, keepdim=True).values
    weights = torch.exp(-temperature * distance)
    kth_largest = weights.topk(k, dim=-1).values[..., -1:]
    weights = weights.masked_fill(weights < kth_largest, 0.)
    return F.normalize(weights, p=2, dim=-1)


def reconstruct_tokens(weights: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Tokens (B, L, C) = weights (B, L, M) @ refined centres (B, M, C)."""
    return weights.to(centres.dtype) @ centres


# ------------------------------------------------------------------------------------------------ the method

def _num_clusters_param() -> Param:
    def check(method, name, value):
        if not (is_int(value) and value >= 1 and square_grid_side(value) is not None):
            _fail(method, name, 'a perfect square h*w >= 1 (e.g. 256 = 16x16)', value)
    return Param(REQUIRED, check)


def _window_size_param(default: int) -> Param:
    def check(method, name, value):
        if not (is_int(value) and value >= 1 and value % 2 == 1):
            _fail(method, name, 'an odd integer >= 1', value)
    return Param(default, check)


class HourglassState(TokenState):
    def __init__(self, method, grid_size, depth):
        super().__init__(method, grid_size, depth)
        # (B, H*W, h*w): reconstruction weights from the tokens and centres at clustering; None until then, and
        # never set without a reconstruction
        self.reconstruct_weights: Optional[torch.Tensor] = None


@register_method
class Hourglass(TokenReduction):
    name = 'hourglass'
    params = {
        'location': int_param(0),
        'num_clusters': _num_clusters_param(),
        'iters': int_param(1, default=5, high=MAX_ITERS, why='each iteration is a pass over the token x centre '
                                                             'distances; the soft k-means has settled long before '
                                                             '(upstream uses 5)'),
        'temperature': positive_float_param(1.0),
        'window_size': _window_size_param(5),
        'reconstruct_location': int_param(0, default=None, allow_none=True),
        'reconstruct_k': int_param(1, default=3),
        'reconstruct_temperature': positive_float_param(0.05),
    }
    main_param = 'num_clusters'

    @property
    def cluster_grid(self) -> Tuple[int, int]:
        side = square_grid_side(self.num_clusters)
        return side, side

    def check(self, depth, grid_size):
        check_block_index(self.name, 'location', self.location, depth)
        side = self.cluster_grid[0]
        if side >= min(grid_size):
            raise ValueError(f"token_reduction hourglass: 'num_clusters' {self.num_clusters} ({side}x{side}) is not "
                             f"smaller than the {grid_size[0]}x{grid_size[1]} patch grid; use at most "
                             f"{(min(grid_size) - 1) ** 2}")
        if self.reconstruct_location is not None:
            if not self.location < self.reconstruct_location <= depth:
                raise ValueError(f"token_reduction hourglass: 'reconstruct_location' {self.reconstruct_location} must "
                                 f"come after 'location' {self.location}; use {self.location + 1} to {depth} "
                                 f"({depth} = after the last block), or null for no reconstruction")
        if self.reconstruct_k > self.num_clusters:
            raise ValueError(f"token_reduction hourglass: 'reconstruct_k' {self.reconstruct_k} exceeds 'num_clusters' "
                             f"{self.num_clusters}; use 1 to {self.num_clusters}")

    def _clustered_blocks(self, depth: int) -> range:
        end = depth if self.reconstruct_location is None else self.reconstruct_location
        return range(self.location, end)

    def schedule(self, num_tokens, grid_size, depth):
        clustered = num_tokens - grid_size[0] * grid_size[1] + self.num_clusters
        blocks = self._clustered_blocks(depth)
        return [(clustered, clustered) if i in blocks else (num_tokens, num_tokens) for i in range(depth)]

    def output_tokens(self, num_tokens, grid_size, depth):
        if self.reconstruct_location is not None:  # the full grid again, after the last block at the latest
            return num_tokens
        return num_tokens - grid_size[0] * grid_size[1] + self.num_clusters

    def new_state(self, x, grid_size, depth):
        return HourglassState(self, grid_size, depth)

    def before_block(self, block, x, state):
        if state.index == self.location:
            x = self.cluster(x, state)
        elif state.index == self.reconstruct_location:
            x = self.reconstruct(x, state)
            if state.recording:  # every patch has its own token again
                state.record(tokens=torch.arange(1, x.shape[1], device=x.device).expand(x.shape[0], -1))
        return x

    def finish(self, x, state):
        if self.reconstruct_location == state.depth:
            x = self.reconstruct(x, state)
        return x

    def cluster(self, x: torch.Tensor, state: HourglassState) -> torch.Tensor:
        """(B, 1 + H*W, C) -> (B, 1 + h*w, C); keeps what the reconstruction needs in ``state``."""
        cls_token, patches = x[:, :1], x[:, 1:]
        with torch.autocast(device_type=x.device.type, enabled=False):
            patches = patches.to(torch.promote_types(patches.dtype, torch.float32))  # half -> float32
            centres = cluster_tokens(patches, state.grid_size, self.cluster_grid, self.iters, self.temperature,
                                     self.window_size)
            if state.recording:
                nearest = nearest_centres(patches, centres, state.grid_size, self.cluster_grid, self.window_size)
                state.record(tokens=nearest + 1, clusters=nearest)
            if self.reconstruct_location is not None:
                state.reconstruct_weights = reconstruction_weights(patches, centres, self.reconstruct_k,
                                                                   self.reconstruct_temperature)
        return torch.cat([cls_token, centres.to(x.dtype)], dim=1)

    def reconstruct(self, x: torch.Tensor, state: HourglassState) -> torch.Tensor:
        """(B, 1 + h*w, C) -> (B, 1 + H*W, C); the class token passes through."""
        patches = reconstruct_tokens(state.reconstruct_weights, x[:, 1:])
        return torch.cat([x[:, :1], patches.to(x.dtype)], dim=1)
