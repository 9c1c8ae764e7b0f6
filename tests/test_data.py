"""Data sets and samplers; unreadable images and crafted data files are one-line errors."""
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from conftest import FAST, TINY_HVT, one_error_line, read_log, run_script
from datasets import build_dataset, digits_split
from framework import options
from samplers import ExactDistributedSampler, RASampler
from utils import UserError


def data_args(**kw):
    args = options.parse_args([])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_digits_split_is_fixed_stratified_and_disjoint():
    train_x, train_y = digits_split(True, 16)
    test_x, test_y = digits_split(False, 16)
    assert train_x.shape == (1347, 16, 16, 3) and test_x.shape == (450, 16, 16, 3)
    assert train_x.dtype == np.uint8
    assert np.array_equal(np.bincount(test_y), np.bincount(digits_split(False, 16)[1]))
    # stratified: every class is ~25% held out
    frac = np.bincount(test_y) / (np.bincount(test_y) + np.bincount(train_y))
    assert np.all(np.abs(frac - 0.25) < 0.02)
    assert np.array_equal(test_x, digits_split(False, 16)[0])  # same split every time


def test_digits_dataset_gives_normalised_tensors():
    ds, n = build_dataset(False, data_args(data_set='DIGITS', input_size=32))
    img, target = ds[0]
    assert n == 10 and len(ds) == 450 and img.shape == (3, 32, 32) and 0 <= target < 10


def test_imagenet_folder(fake_imagenet):
    train, n = build_dataset(True, data_args(data_set='IMNET', data_path=str(fake_imagenet), input_size=32))
    val, _ = build_dataset(False, data_args(data_set='IMNET', data_path=str(fake_imagenet), input_size=32))
    assert n == 3 and len(train) == 24 and len(val) == 12
    assert train[0][0].shape == (3, 32, 32)


@pytest.mark.parametrize('name,classes,n_train,n_test', [('CIFAR', 100, 64, 20), ('CIFAR10', 10, 80, 20)])
def test_cifar_pickles(fake_cifar, name, classes, n_train, n_test):
    train, n = build_dataset(True, data_args(data_set=name, data_path=str(fake_cifar), input_size=32))
    test, _ = build_dataset(False, data_args(data_set=name, data_path=str(fake_cifar), input_size=32))
    assert n == classes and len(train) == n_train and len(test) == n_test
    img, _ = test[0]
    assert img.shape == (3, 32, 32)
    # upsampled to 224 as HVT's CIFAR-100 recipe does
    test224, _ = build_dataset(False, data_args(data_set=name, data_path=str(fake_cifar), input_size=64))
    assert test224[0][0].shape == (3, 64, 64)


def test_fake_dataset_is_deterministic():
    args = data_args(data_set='FAKE', fake_val_size=10, fake_num_classes=7, input_size=24)
    ds, n = build_dataset(False, args)
    assert n == 7 and len(ds) == 10 and ds[3][1] == 3
    assert torch.equal(ds[3][0], build_dataset(False, args)[0][3][0])


def test_missing_and_empty_data_paths(tmp_path):
    with pytest.raises(UserError, match='does not exist'):
        build_dataset(False, data_args(data_set='IMNET', data_path=str(tmp_path / 'nope')))
    with pytest.raises(UserError, match='is empty'):
        build_dataset(False, data_args(data_set='IMNET', data_path=str(tmp_path)))
    with pytest.raises(UserError, match='required'):
        build_dataset(False, data_args(data_set='CIFAR', data_path=''))


@pytest.mark.parametrize('n,world', [(10, 1), (10, 3), (7, 4), (3, 4)])
def test_exact_sampler_counts_every_sample_once(n, world):
    shards = [list(ExactDistributedSampler(range(n), world, r)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert [len(ExactDistributedSampler(range(n), world, r)) for r in range(world)] == [len(s) for s in shards]


def test_ra_sampler_repeats_across_ranks_and_small_sets():
    samplers = [RASampler(range(600), num_replicas=3, rank=r) for r in range(3)]
    for s in samplers:
        s.set_epoch(0)
    first = [list(s)[:4] for s in samplers]
    assert first[0][0] == first[1][0] == first[2][0]   # the 3 copies of an image go to 3 ranks
    assert len(samplers[0]) == 512 // 3                 # DeiT's cap: floor(600 / 256) * 256 / world
    small = RASampler(range(50), num_replicas=2, rank=0)
    assert len(small) == 25 and len(list(small)) == 25  # DeiT's cap would give 0 images


def test_eval_transform_follows_the_data_config(fake_imagenet):
    """Resize the short side to input_size / crop_pct with the configured interpolation, centre crop, normalise
    with the configured mean/std: compared with torchvision steps written out here."""
    from PIL import Image
    from torchvision import transforms as T
    from datasets import build_transform
    args = options.parse_args(['--model', 'deit_tiny', '--data-set', 'IMNET', '--input-size', '32', '--crop-pct',
                               '0.8', '--interpolation', 'bilinear', '--mean', '0.5', '--std', '0.25', '0.5', '1'])
    img = Image.open(next((fake_imagenet / 'val').glob('*/*.JPEG'))).convert('RGB').resize((50, 40))
    expected = T.Compose([T.Resize(40, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(32), T.ToTensor(),
                          T.Normalize([0.5] * 3, [0.25, 0.5, 1.0])])(img)
    assert torch.allclose(build_transform(False, args)(img), expected, atol=1e-6)
    # the model's defaults: bicubic, 0.875, ImageNet statistics
    args = options.parse_args(['--model', 'deit_tiny', '--data-set', 'IMNET', '--input-size', '32'])
    expected = T.Compose([T.Resize(36, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                          T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])(img)
    assert torch.allclose(build_transform(False, args)(img), expected, atol=1e-6)


def test_native_size_images_are_only_normalised():
    from PIL import Image
    from torchvision import transforms as T
    from datasets import build_transform
    args = data_args(data_set='DIGITS', input_size=16)
    img = Image.fromarray(digits_split(False, 16)[0][0])
    expected = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])(T.ToTensor()(img))
    assert torch.equal(build_transform(False, args)(img), expected)


@pytest.fixture
def corrupt_imagenet(fake_imagenet, tmp_path):
    root = tmp_path / 'imnet'
    shutil.copytree(fake_imagenet, root)
    (root / 'train' / 'n00001' / 'text.jpg').write_text('this is not an image\n')
    (root / 'val' / 'n00002' / 'empty.JPEG').write_bytes(b'')
    return root


IMNET_RUN = [*TINY_HVT, *FAST, '--data-set', 'IMNET', '--batch-size', '8', '--epochs', '1']


def test_corrupt_image_is_one_line_naming_it(corrupt_imagenet, tmp_path):
    # the train set has a text file named .jpg; with a worker process the error crosses the DataLoader boundary
    res = run_script([*IMNET_RUN, '--data-path', corrupt_imagenet, '--num-workers', '1', '--output_dir', tmp_path])
    assert res.returncode == 2, res.stderr[-3000:]
    line = one_error_line(res.stderr)
    assert str(corrupt_imagenet / 'train' / 'n00001' / 'text.jpg') in line and '--skip-corrupt' in line
    # the validation set has a 0-byte JPEG: found at the first evaluation, reported the same way
    os.remove(corrupt_imagenet / 'train' / 'n00001' / 'text.jpg')
    res = run_script([*IMNET_RUN, '--data-path', corrupt_imagenet, '--output_dir', tmp_path / 'b'])
    assert res.returncode == 2 and 'empty.JPEG' in one_error_line(res.stderr) and 'empty file' in res.stderr


def test_skip_corrupt_leaves_unreadable_images_out(corrupt_imagenet, tmp_path):
    res = run_script([*IMNET_RUN, '--data-path', corrupt_imagenet, '--skip-corrupt', '--output_dir', tmp_path])
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'left out 1 unreadable image of 25' in res.stdout and 'left out 1 unreadable image of 13' in res.stdout
    assert read_log(tmp_path)[0]['test_n_samples'] == 12


class RunsCode:
    """Unpickling this calls os.system: what a crafted CIFAR file under --data-path does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_cifar_reader_does_not_run_code_from_data_files(tmp_path):
    folder = tmp_path / 'cifar-10-batches-py'
    folder.mkdir()
    marker = tmp_path / 'pwned'
    with open(folder / 'test_batch', 'wb') as f:
        pickle.dump({b'data': RunsCode(marker), b'labels': [0]}, f)
    args = options.parse_args(['--data-set', 'CIFAR10', '--data-path', str(tmp_path), '--input-size', '32'])
    with pytest.raises(UserError, match="test_batch' is not a CIFAR python pickle.*system"):
        build_dataset(is_train=False, args=args)
    assert not marker.exists()


def test_cifar_reader_reads_the_original_numpy_1_layout(tmp_path):
    """The released files were written by numpy 1 (``numpy.core.multiarray``) with protocol 2."""
    folder = tmp_path / 'cifar-10-batches-py'
    folder.mkdir()
    data = np.random.default_rng(0).integers(0, 256, size=(5, 3072), dtype=np.uint8)
    raw = pickle.dumps({b'batch_label': b'testing batch 1 of 1', b'labels': [1, 2, 3, 4, 5], b'data': data,
                        b'filenames': [b'a.png'] * 5}, protocol=2)
    (folder / 'test_batch').write_bytes(raw.replace(b'numpy._core.multiarray', b'numpy.core.multiarray'))
    args = options.parse_args(['--data-set', 'CIFAR10', '--data-path', str(tmp_path), '--input-size', '32'])
    dataset, classes = build_dataset(is_train=False, args=args)
    assert classes == 10 and dataset.targets == [1, 2, 3, 4, 5]
    assert np.array_equal(dataset.images[2], data[2].reshape(3, 32, 32).transpose(1, 2, 0))
