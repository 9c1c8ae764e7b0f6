"""What a token reduction keeps, merges or clusters, per input patch, and the figure of it (``visualize.py``).

A forward run inside ``models.token_reduction.record_states()`` leaves, per block, what the method did to the input
patches (``TokenState.record``). :func:`patch_map` turns one block of it into a per-patch map of one of three kinds:

- ``kept`` (EViT, ATS, Evo-ViT): True where the patch still has a token of its own (EViT, ATS) or where its token
  was updated by the block (Evo-ViT); the figure greys out the others;
- ``groups`` (ToMe): the token each patch was merged into, as ToMe's source tracking gives it; the figure paints
  each group flat in its mean colour, with borders;
- ``clusters`` (Hourglass, ACT, SMYRF): each patch's cluster (Hourglass: nearest centre; ACT: query cluster of the
  first head; SMYRF: chunk of the first head in the first hash round); the figure tints each cluster in its own
  colour, with borders.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch

KIND_OF_METHOD = {'evit': 'kept', 'ats': 'kept', 'evo_vit': 'kept', 'tome': 'groups',
                  'hourglass': 'clusters', 'act': 'clusters', 'smyrf': 'clusters'}
GREY = 0.5            # the grey a dropped patch fades to
GREY_MIX = 0.75       # how much of it
TINT_MIX = 0.55       # how much cluster colour over the image


@dataclass
class PatchMap:
    """One image's map at one block: ``labels`` (H, W) int (kind ``kept``: 1 kept, 0 not; else group/cluster id),
    ``title`` the cell's caption (tokens kept or clusters)."""
    kind: str
    labels: np.ndarray
    title: str


def patch_maps(state, block: int) -> List[PatchMap]:
    """The per-patch maps of every image of a recorded forward (``state``, a ``TokenState`` whose ``records`` were
    kept by ``record_states``) at block ``block`` (0-based): one :class:`PatchMap` per image."""
    method = state.method.name
    kind = KIND_OF_METHOD[method]
    rows, cols = state.grid_size
    record = state.records[block]
    if method == 'hourglass':  # the clusters last as long as the clustered tokens (until a reconstruction)
        tokens = state.patch_tokens(block)
        if tokens is None or 'clusters' not in next(r for r in reversed(state.records[:block + 1]) if 'tokens' in r):
            return None
        record = {'clusters': tokens - 1}
    if kind == 'clusters':
        clusters = record.get('clusters')
        if clusters is None:
            return None
        if clusters.dim() == 3:
            clusters = clusters[:, 0]  # ACT and SMYRF cluster per head: the first head's
        labels = clusters.cpu().numpy()
        return [PatchMap(kind, one.reshape(rows, cols), f'{len(np.unique(one))} clusters') for one in labels]
    if method == 'evo_vit':
        updated = record.get('updated')
        if updated is None:
            return None
        kept = updated.cpu().numpy()
        return [PatchMap(kind, one.reshape(rows, cols).astype(np.int64), f'{1 + int(one.sum())} tokens updated')
                for one in kept]
    tokens = state.patch_tokens(block)
    if tokens is None:
        return None
    tokens = tokens.cpu().numpy()
    if kind == 'groups':
        return [PatchMap(kind, one.reshape(rows, cols), f'{1 + len(np.unique(one))} tokens') for one in tokens]
    return [PatchMap(kind, (one >= 0).reshape(rows, cols).astype(np.int64), f'{1 + int((one >= 0).sum())} tokens')
            for one in tokens]


def unchanged_maps(state, batch: int, block: int) -> List[PatchMap]:
    """The maps of a block where the method had not acted (yet): every patch its own token."""
    rows, cols = state.grid_size
    kind = KIND_OF_METHOD[state.method.name]
    what = f'no clustering at block {block}' if kind == 'clusters' else f'all {1 + rows * cols} tokens'
    return [PatchMap('kept', np.ones((rows, cols), dtype=np.int64), what) for _ in range(batch)]


def record_maps(model, images: torch.Tensor, block: int) -> List[PatchMap]:
    """Run ``model`` (with its token reduction) on ``images`` (B, 3, H, W) while recording; the maps at ``block``."""
    from models.token_reduction import record_states
    with torch.no_grad(), record_states() as states:
        model(images)
    state = states[-1]
    return patch_maps(state, block) or unchanged_maps(state, images.shape[0], block)


# ------------------------------------------------------------------------------------------------------ drawing

def cluster_colours(count: int, seed: int = 0) -> np.ndarray:
    """``count`` distinct RGB colours in [0, 1] (evenly spaced hues, shuffled so that neighbours differ)."""
    import matplotlib.colors as mcolors
    hues = np.random.default_rng(seed).permutation(count) / max(count, 1)
    saturation = np.where(np.arange(count) % 2, 0.65, 0.95)
    return mcolors.hsv_to_rgb(np.stack([hues, saturation, np.full(count, 0.95)], axis=1))


def upsample(labels: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Patch labels (h, w) -> pixel labels (H, W) (each patch a block of H/h x W/w pixels)."""
    return labels.repeat(size[0] // labels.shape[0], axis=0).repeat(size[1] // labels.shape[1], axis=1)


def borders(pixels: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose right or lower neighbour has another label."""
    edge = np.zeros(pixels.shape, dtype=bool)
    edge[:, :-1] |= pixels[:, :-1] != pixels[:, 1:]
    edge[:-1, :] |= pixels[:-1, :] != pixels[1:, :]
    return edge


def paint(image: np.ndarray, patch_map: PatchMap) -> np.ndarray:
    """The cell picture: ``image`` (H, W, 3) float in [0, 1] with the map drawn over it."""
    pixels = upsample(patch_map.labels, image.shape[:2])
    out = image.copy()
    if patch_map.kind == 'kept':
        dropped = pixels == 0
        out[dropped] = (1 - GREY_MIX) * image[dropped] + GREY_MIX * GREY
        out[borders(pixels)] = (1.0, 0.2, 0.2)
        return out
    if patch_map.kind == 'groups':
        for label in np.unique(pixels):
            inside = pixels == label
            out[inside] = image[inside].mean(axis=0)
    else:
        ids = np.unique(pixels, return_inverse=True)[1].reshape(pixels.shape)
        colours = cluster_colours(int(ids.max()) + 1)
        out = (1 - TINT_MIX) * image + TINT_MIX * colours[ids]
    out[borders(pixels)] = (0.0, 0.0, 0.0) if patch_map.kind == 'clusters' else (1.0, 0.2, 0.2)
    return out


def display_images(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], min_side: int = 128):
    """Normalised model inputs (B, 3, H, W) -> (B, H', W', 3) float in [0, 1], what the model saw, enlarged by a
    whole factor (nearest) to at least ``min_side`` pixels so that borders stay thin."""
    pictures = images.cpu() * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    factor = max(1, -(-min_side // images.shape[-1]))
    pictures = pictures.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
    return pictures.clamp(0, 1).permute(0, 2, 3, 1).numpy()


def save_figure(pictures: np.ndarray, rows: List[tuple], path: str, column_titles: Optional[List[str]] = None,
                title: str = '') -> None:
    """Write the grid: ``rows`` = [(row label, [PatchMap per image])], a column per picture of ``pictures``."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    num_rows, num_cols = len(rows), len(pictures)
    cell = min(5.0, max(1.9, pictures.shape[1] / 100))  # inches: 512 px inputs get larger cells
    fig, axes = plt.subplots(num_rows, num_cols, figsize=(cell * num_cols + 1.6, (cell + 0.15) * num_rows + 0.5),
                             squeeze=False)
    for r, (label, maps) in enumerate(rows):
        for c, (picture, patch_map) in enumerate(zip(pictures, maps)):
            ax = axes[r][c]
            ax.imshow(paint(picture, patch_map), interpolation='nearest')
            ax.set_xticks([])
            ax.set_yticks([])
            heading = f'{column_titles[c]}\n' if r == 0 and column_titles else ''
            ax.set_title(heading + patch_map.title, fontsize=8)
            if c == 0:
                ax.set_ylabel(label, fontsize=8, rotation=0, ha='right', va='center', labelpad=6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
