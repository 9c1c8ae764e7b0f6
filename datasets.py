"""Datasets: IMNET (ImageFolder), CIFAR (CIFAR-100 pickles), CIFAR10, DIGITS (embedded), FAKE (synthetic).

``build_dataset(is_train, args) -> (dataset, nb_classes)``. Nothing is downloaded: ImageNet and CIFAR are read from
``args.data_path``; DIGITS is scikit-learn's 8x8 digits (ships with the package), split once into a fixed, stratified,
seeded train / held-out pair and upscaled to ``args.input_size``.
"""
import codecs
import io
import os
import pickle
from typing import Tuple

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torchvision import datasets as tv_datasets
from torchvision import transforms

from utils import UserError

DATASETS = ('IMNET', 'CIFAR', 'CIFAR10', 'DIGITS', 'FAKE')
# class counts when the data is not at hand (FLOPs/params reporting, benchmarks); IMNET is read from the folder
NUM_CLASSES = {'IMNET': 1000, 'CIFAR': 100, 'CIFAR10': 10, 'DIGITS': 10}
DIGITS_HELD_OUT_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0


class CorruptImageError(UserError):
    """An image file that cannot be read, named in one line.

    Raised in a DataLoader worker, it reaches the main process rebuilt from a text that holds the worker's traceback;
    the constructor keeps only the last line, our own message."""

    def __init__(self, message: str):
        last = message.strip().splitlines()[-1] if message.strip() else message
        super().__init__(last.split(f'{type(self).__name__}: ', 1)[-1])


# what PIL raises for a file that is not a readable image (empty, truncated, another format, a decompression bomb)
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def load_rgb(path: str) -> Image.Image:
    """torchvision's PIL loader, with an unreadable file reported as :class:`CorruptImageError` naming it."""
    try:
        with open(path, 'rb') as f:
            return Image.open(f).convert('RGB')
    except IMAGE_ERRORS as e:
        raise CorruptImageError(f"cannot read image '{path}' ({_image_problem(path, e)}); remove or replace it, or "
                                f"pass --skip-corrupt to leave unreadable images out") from None


def _image_problem(path: str, e: Exception) -> str:
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        return 'empty file'
    if isinstance(e, Image.UnidentifiedImageError):
        return 'not an image PIL can identify'
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def is_readable_image(path: str) -> bool:
    """A cheap check of one file: PIL identifies it and its structure verifies (no full decode)."""
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except IMAGE_ERRORS:
        return False


def leave_out_unreadable(dataset: tv_datasets.ImageFolder) -> None:
    """``--skip-corrupt``: drop the samples whose file fails :func:`is_readable_image`, and say how many."""
    bad = {path for path, _ in dataset.samples if not is_readable_image(path)}
    total = len(dataset.samples)
    dataset.samples = [s for s in dataset.samples if s[0] not in bad]
    dataset.imgs = dataset.samples
    dataset.targets = [target for _, target in dataset.samples]
    if bad:
        print(f"--skip-corrupt: left out {len(bad)} unreadable image{'s' if len(bad) > 1 else ''} of {total} in "
              f"{dataset.root} (first: {sorted(bad)[0]})")
    if not dataset.samples:
        raise UserError(f"no readable image in '{dataset.root}'")


class ArrayImageDataset(torch.utils.data.Dataset):
    """uint8 HxWx3 images in memory (CIFAR, DIGITS) served as PIL images through a transform."""

    def __init__(self, images: np.ndarray, targets, transform=None):
        self.images = images
        self.targets = [int(t) for t in targets]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


class FakeDataset(torch.utils.data.Dataset):
    """Synthetic normalised images, a fixed tensor per index (seeded by the index) and label ``index % classes``.

    No decoding or augmentation, so it measures model speed apart from the loader."""

    def __init__(self, size: int, num_classes: int, input_size: int, seed: int = 0):
        self.size, self.num_classes, self.input_size, self.seed = size, num_classes, input_size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return torch.randn(3, self.input_size, self.input_size, generator=gen), index % self.num_classes


def num_classes_of(args) -> int:
    """The class count of ``args.data_set`` without reading the data (ImageNet: 1000)."""
    return args.fake_num_classes if args.data_set == 'FAKE' else NUM_CLASSES[args.data_set]


def build_dataset(is_train: bool, args) -> Tuple[torch.utils.data.Dataset, int]:
    transform = build_transform(is_train, args)
    name = args.data_set
    if name == 'IMNET':
        root = os.path.join(_data_path(args), 'train' if is_train else 'val')
        if not os.path.isdir(root):
            raise UserError(f"ImageNet folder '{root}' does not exist; --data-path must hold train/ and val/ "
                            f"class folders")
        try:
            dataset = tv_datasets.ImageFolder(root, transform=transform, loader=load_rgb)
        except (FileNotFoundError, RuntimeError) as e:
            raise UserError(f"ImageNet folder '{root}' has no images: {str(e).splitlines()[0]}") from None
        if getattr(args, 'skip_corrupt', False):
            leave_out_unreadable(dataset)
        return dataset, len(dataset.classes)
    if name in ('CIFAR', 'CIFAR10'):
        images, targets, num_classes = _read_cifar(_data_path(args), is_train, cifar100=name == 'CIFAR')
        return ArrayImageDataset(images, targets, transform), num_classes
    if name == 'DIGITS':
        images, targets = digits_split(is_train, args.input_size)
        return ArrayImageDataset(images, targets, transform), 10
    if name == 'FAKE':
        size = args.fake_train_size if is_train else args.fake_val_size
        return FakeDataset(size, args.fake_num_classes, args.input_size, seed=0 if is_train else 1), \
            args.fake_num_classes
    raise UserError(f"unknown data set '{name}'; choose one of {', '.join(DATASETS)}")


def _data_path(args) -> str:
    if not args.data_path:
        raise UserError(f'--data-path is required for --data-set {args.data_set}')
    if not os.path.isdir(args.data_path):
        raise UserError(f"data path '{args.data_path}' does not exist")
    if not os.listdir(args.data_path):
        raise UserError(f"data path '{args.data_path}' is empty")
    return args.data_path


def _read_cifar(root: str, is_train: bool, cifar100: bool):
    """Read the python-pickle CIFAR files (``cifar-100-python/{train,test}`` or ``cifar-10-batches-py/*``)."""
    folder, label_key = ('cifar-100-python', b'fine_labels') if cifar100 else ('cifar-10-batches-py', b'labels')
    base = root if os.path.basename(os.path.normpath(root)) == folder else os.path.join(root, folder)
    if cifar100:
        files = ['train' if is_train else 'test']
    else:
        files = [f'data_batch_{i}' for i in range(1, 6)] if is_train else ['test_batch']
    images, targets = [], []
    for file in files:
        path = os.path.join(base, file)
        if not os.path.isfile(path):
            raise UserError(f"CIFAR file '{path}' not found; --data-path must hold '{folder}/' "
                            f"(the extracted python version)")
        try:
            with open(path, 'rb') as f:
                entry = CifarUnpickler(f).load()
            images.append(np.asarray(entry[b'data'], dtype=np.uint8).reshape(-1, 3, 32, 32))
            targets.extend(int(t) for t in entry[label_key])
        except (pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError) as e:
            reason = str(e) if isinstance(e, pickle.UnpicklingError) else type(e).__name__
            raise UserError(f"CIFAR file '{path}' is not a CIFAR python pickle ({reason})") from None
    images = np.concatenate(images).transpose(0, 2, 3, 1)  # N, 32, 32, 3
    return np.ascontiguousarray(images), targets, 100 if cifar100 else 10


class CifarUnpickler(pickle.Unpickler):
    """Reads CIFAR's python pickles without running code: a pickle may call any importable function while it loads
    (``os.system`` included), so only what CIFAR batches hold is allowed: dicts, lists, bytes, str, ints and numpy
    arrays. Python 2 strings are read as bytes, as ``pickle.load(f, encoding='bytes')`` does."""

    _RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]   # numpy's array rebuilder, wherever this numpy keeps it
    ALLOWED = {
        ('numpy.core.multiarray', '_reconstruct'): _RECONSTRUCT,   # files written by numpy 1 (the released ones)
        ('numpy._core.multiarray', '_reconstruct'): _RECONSTRUCT,  # files written by numpy 2
        ('numpy', 'ndarray'): np.ndarray,
        ('numpy', 'dtype'): np.dtype,
        ('_codecs', 'encode'): codecs.encode,                      # bytes in protocol-2 pickles written by Python 3
    }

    def __init__(self, file: io.BufferedIOBase):
        super().__init__(file, encoding='bytes')

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it asks for '{module}.{name}', which a CIFAR file never holds") from None


def digits_split(is_train: bool, size: int):
    """scikit-learn digits: a fixed stratified split (75% train, 25% held out, seed 0), upscaled to ``size`` px RGB."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    train_idx, test_idx = train_test_split(np.arange(len(digits.target)), test_size=DIGITS_HELD_OUT_FRACTION,
                                           stratify=digits.target, random_state=DIGITS_SPLIT_SEED)
    idx = train_idx if is_train else test_idx
    raw = (digits.images[idx] * (255.0 / 16.0)).round().astype(np.uint8)  # values 0..16 -> 0..255
    images = np.stack([np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC)) for img in raw])
    return np.repeat(images[..., None], 3, axis=-1), digits.target[idx]


def build_transform(is_train: bool, args):
    """DeiT's transforms through timm's ``create_transform``, with the resolved data config (``args.input_size``,
    ``interpolation``, ``crop_pct``, ``mean``, ``std``: the model's unless overridden). Images already at
    ``input_size`` (CIFAR at 32 px, DIGITS) are not resized: training then uses a 4-px padded random crop, evaluation
    only normalises. Otherwise training uses RandomResizedCrop + flip + RandAugment + random erasing, and evaluation
    resizes the short side to ``input_size / crop_pct`` and centre-crops (CIFAR at 224 takes the 32 -> 256 -> 224
    path of HVT's CIFAR-100 recipe)."""
    if args.data_set == 'FAKE':
        return None
    native_size = {'CIFAR': 32, 'CIFAR10': 32, 'DIGITS': args.input_size}.get(args.data_set)
    resize_im = native_size != args.input_size
    normalise = dict(mean=tuple(args.mean), std=tuple(args.std))
    if is_train:
        transform = create_transform(
            input_size=args.input_size, is_training=True, color_jitter=args.color_jitter,
            auto_augment=args.aa or None, interpolation=args.train_interpolation, re_prob=args.reprob,
            re_mode=args.remode, re_count=args.recount, **normalise)
        if not resize_im:
            transform.transforms[0] = transforms.RandomCrop(args.input_size, padding=4)
        return transform
    # crop_pct 1.0 on an image already at input_size: the resize and the crop leave it as it is
    return create_transform(input_size=args.input_size, is_training=False, interpolation=args.interpolation,
                            crop_pct=args.crop_pct if resize_im else 1.0, **normalise)
