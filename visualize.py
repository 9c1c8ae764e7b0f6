"""What each token reduction keeps, merges or clusters, drawn over the input images: one PNG, a row per method and
setting, a column per image, the state at one block.

    python visualize.py                       # the DIGITS demo ViT (trained if needed), every method's middle setting
    python visualize.py --token-reduction '{"method": "tome", "r": 8}' --block 3 --output tome.png
    python visualize.py --config config/swag-vit-l16.json --checkpoint vit_l16_in1k.torch \\
        --sweep my_sweep.json --image photo.jpg --output outputs/visualize/l16.png

EViT, ATS: patches without a token of their own at that block are greyed out; Evo-ViT: patches the block did not
update; ToMe: each merged token's source patches as one flat patch in their mean colour, with borders; Hourglass:
each patch's nearest cluster centre; ACT: each patch's query cluster (first head); SMYRF: each patch's chunk in the
first hash round (first head). Each cell's title gives the tokens kept or the clusters. Any other flag
(``--input-size``, ``--device`` ...) is a ``main.py`` option applied to the config.
"""
import json
import os
import sys
from typing import List, Optional

import torch
from PIL import Image
from timm.data import create_transform

import datasets
from framework import builders, options, token_maps
from framework import study_results as rs
from framework.demo import DEMO_CONFIG, DEMO_SWEEP, backbone_path, ensure_backbone
import models
from models.token_reduction import resolve_method
from utils import ArgumentParser, UserError

DEFAULT_OUTPUT = os.path.join('outputs', 'visualize', 'tokens.png')
NUM_DEMO_IMAGES = 8


def get_parser() -> ArgumentParser:
    p = ArgumentParser(description='Draw what token reductions keep, merge or cluster (see the module docstring).')
    p.add_argument('--config', default=None, help='backbone config (default: the DIGITS demo, trained if needed)')
    p.add_argument('--checkpoint', '--resume', default=None,
                   help='weights of the backbone (ours, SWAG, torchvision, timm); default: the demo\'s own')
    p.add_argument('--random-weights', action='store_true', help='no weights: the model\'s random initialisation')
    p.add_argument('--token-reduction', action='append', default=None, metavar='JSON',
                   help='a token-reduction spec (JSON); repeat for several rows')
    p.add_argument('--sweep', default=None, help='JSON list of specs, a row each (null entries are skipped)')
    p.add_argument('--image', nargs='+', default=None, metavar='FILE',
                   help=f'images (default: {NUM_DEMO_IMAGES} held-out DIGITS images)')
    p.add_argument('--block', type=int, default=None, help='0-based block to show (default: the last)')
    p.add_argument('--output', default=DEFAULT_OUTPUT, help=f'PNG to write (default {DEFAULT_OUTPUT})')
    return p


# ------------------------------------------------------------------------------------------------------------ inputs

def default_specs() -> List[dict]:
    """The DIGITS study's middle setting of each method (the 2nd of its settings in the demo sweep)."""
    by_method = {}
    for entry in rs.load_sweep_file(DEMO_SWEEP):
        if entry['spec'] is not None:
            by_method.setdefault(entry['spec']['method'], []).append(entry)
    return [entries[len(entries) // 2] for entries in by_method.values()]


def load_specs(given: Optional[List[str]], sweep: Optional[str]) -> List[dict]:
    entries = []
    for text in given or []:
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f'--token-reduction {text!r} is not valid JSON: {e}') from None
        entries.extend(rs.normalize_sweep([spec], f'--token-reduction {text!r}'))
    if sweep:
        entries.extend(rs.load_sweep_file(sweep))
    entries = [e for e in entries if e['spec'] is not None] if (given or sweep) else default_specs()
    if not entries:
        raise UserError('no token-reduction spec to draw (the sweep holds only null entries)')
    return entries


def load_image(path: str, transform) -> torch.Tensor:
    try:
        with open(path, 'rb') as f:
            image = Image.open(f).convert('RGB')
    except datasets.IMAGE_ERRORS as e:
        problem = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0] or type(e).__name__
        raise UserError(f"cannot read image '{path}' ({problem})") from None
    return transform(image)


def load_images(paths: Optional[List[str]], args):
    """(images (B, 3, H, W) as the model gets them, a caption per image)."""
    if paths:
        transform = create_transform(**builders.data_config(args), is_training=False)
        return torch.stack([load_image(path, transform) for path in paths]), [os.path.basename(p) for p in paths]
    if args.data_set != 'DIGITS':
        raise UserError(f'give --image FILE ...: the default images are DIGITS\', and this config is for '
                        f'{args.data_set}')
    _, dataset_val, _ = builders.build_datasets(args, with_train=False)
    first_of_class = {}
    for index, target in enumerate(dataset_val.targets):
        first_of_class.setdefault(target, index)
    picked = [first_of_class[c] for c in sorted(first_of_class)[:NUM_DEMO_IMAGES]]
    return torch.stack([dataset_val[i][0] for i in picked]), [f'digit {dataset_val.targets[i]}' for i in picked]


def load_weights(model, path: str) -> None:
    try:
        models.load_pretrained(model, path, drop_mismatched_head=False, strict=True, log=None)
    except models.CheckpointError as e:
        raise UserError(f'--checkpoint {path}: {str(e).splitlines()[0]}') from None
    except KeyError:  # what torch's weights-only unpickler raises on some non-PyTorch files
        raise UserError(f'--checkpoint {path}: cannot read it (corrupt, truncated or not a PyTorch file)') from None


# --------------------------------------------------------------------------------------------------------------- run

def row_label(spec: dict) -> str:
    """The method, then one parameter a line."""
    settings = [f'{k}={json.dumps(v, separators=(",", ":"))}' for k, v in spec.items() if k != 'method']
    return '\n'.join([spec['method']] + settings)


def run(argv: Optional[List[str]]) -> int:
    vis, rest = get_parser().parse_known_args(argv)
    demo = vis.config is None
    args = builders.load_args(DEMO_CONFIG if demo else vis.config, rest)
    for note in options.adapt_to_machine(args):
        print(f'note: {note}')
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f'--device {args.device} given but CUDA is not available; use --device cpu')
    if vis.checkpoint and not os.path.isfile(vis.checkpoint):
        raise UserError(f'--checkpoint {vis.checkpoint} not found')
    if vis.checkpoint and vis.random_weights:
        raise UserError('--checkpoint and --random-weights exclude each other')

    model = builders.build_model(args, plain=True)
    depth = len(model.blocks)
    block = depth - 1 if vis.block is None else vis.block
    if not 0 <= block < depth:
        raise UserError(f'--block {block} is outside the model\'s {depth} blocks; use 0 to {depth - 1}')
    entries = load_specs(vis.token_reduction, vis.sweep)
    for entry in entries:
        try:
            resolve_method(model, entry['spec'])
        except ValueError as e:
            raise UserError(f"{entry['name']}: {e}") from None
    images, captions = load_images(vis.image, args)

    checkpoint = vis.checkpoint
    if checkpoint is None and demo and not vis.random_weights:
        os.makedirs(os.path.dirname(backbone_path(args)) or '.', exist_ok=True)
        checkpoint = ensure_backbone(args, device)
    if checkpoint:
        load_weights(model, checkpoint)
    else:
        print('note: no --checkpoint: the backbone has random weights')
    model.to(device).eval()

    rows = []
    for entry in entries:
        models.apply_token_reduction(model, entry['spec'])
        torch.manual_seed(args.seed)  # ACT and SMYRF without a 'seed' draw their hashes from the global RNG
        maps = token_maps.record_maps(model, images.to(device), block)
        rows.append((row_label(entry['spec']), maps))
    pictures = token_maps.display_images(images, args.mean, args.std)
    out_dir = os.path.dirname(vis.output)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    token_maps.save_figure(pictures, rows, vis.output, captions,
                           title=f'{args.model}, {args.input_size} px, block {block} (0-based) of {depth}')
    print(f'wrote {vis.output}')
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    try:
        return run(argv)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        return 2
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not options.is_out_of_memory(e):
            raise
        print(f"error: {options.out_of_memory_message(e, 'the number of --image files')}", file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
