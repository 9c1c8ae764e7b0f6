"""What every registered token-reduction method promises, on one small ViT (64 px, patch 8: an 8x8 grid, 4 blocks).

Applying a spec leaves the state-dict keys alone (a plain checkpoint loads strictly) and removing it gives the plain
model back bit for bit; a reduced model deep-copies and pickles with its method; bf16 autocast runs and stays close to
fp32; an image gives the same logits alone as in a batch of two. A new method gets these tests by adding one spec to
``EXAMPLE_SPECS`` (the first test fails until it has one)."""
import copy
import pickle

import pytest
import torch

import models
from models import apply_token_reduction
from models.token_reduction import METHODS
from vit_reference import tiny_vit

# one small valid setting per method on tiny_vit(): 64 patch tokens + class token, 4 blocks; the random ones seeded
EXAMPLE_SPECS = {
    'hourglass': {'method': 'hourglass', 'location': 1, 'num_clusters': 16, 'window_size': 3,
                  'reconstruct_location': 3},
    'tome': {'method': 'tome', 'r': 7},
    'evit': {'method': 'evit', 'keep_rate': 0.6, 'fuse': True},
    'evo_vit': {'method': 'evo_vit', 'location': 2, 'keep_ratio': 0.4},
    'ats': {'method': 'ats', 'locations': [1, 3], 'num_tokens': 30},
    'act': {'method': 'act', 'q_hashes': 8, 'group_k': True, 'seed': 0},
    'smyrf': {'method': 'smyrf', 'location': 1, 'n_hashes': 4, 'q_cluster_size': 13, 'k_cluster_size': 13,
              'seed': 0},
}


def images(batch=2, seed=1):
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def reduced_vit(method):
    return apply_token_reduction(tiny_vit(), EXAMPLE_SPECS[method])


def test_every_registered_method_has_an_example_spec():
    assert sorted(EXAMPLE_SPECS) == sorted(METHODS), 'give every registered method an example spec here'


@pytest.mark.parametrize('method', sorted(METHODS))
def test_create_model_takes_the_spec(method):
    """``create_model(name, token_reduction=spec)`` is the registered model with the spec applied: the same method,
    the same logits as applying it afterwards to the same weights."""
    kwargs = dict(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10)
    built = models.create_model('deit_tiny', token_reduction=EXAMPLE_SPECS[method], **kwargs).eval()
    applied = apply_token_reduction(models.create_model('deit_tiny', **kwargs), EXAMPLE_SPECS[method]).eval()
    applied.load_state_dict(built.state_dict())
    assert built.token_reduction.spec() == applied.token_reduction.spec()
    with torch.no_grad():
        torch.testing.assert_close(built(images()), applied(images()))


def test_create_model_rejects_a_bad_spec_or_a_model_without_token_reduction():
    with pytest.raises(ValueError, match="unknown parameter"):
        models.create_model('deit_tiny', token_reduction={'method': 'tome', 'r': 8, 'rr': 1})
    with pytest.raises(ValueError, match="needs a ViT with the token-reduction hooks"):
        models.create_model('hvt_ti_1', token_reduction={'method': 'tome', 'r': 8})


@pytest.mark.parametrize('method', sorted(METHODS))
def test_apply_and_remove_round_trip(method):
    model = tiny_vit()
    keys = list(model.state_dict())
    x = images()
    with torch.no_grad():
        plain = model(x)
        apply_token_reduction(model, EXAMPLE_SPECS[method])
        assert list(model.state_dict()) == keys
        reduced = model(x)
        apply_token_reduction(model, None)
        again = model(x)
    assert (reduced - plain).abs().max() > 1e-4          # the method did change the computation
    assert torch.equal(again, plain) and model.token_reduction is None
    fresh = reduced_vit(method)
    fresh.load_state_dict(model.state_dict())             # a reduced model loads a plain checkpoint, strictly


@pytest.mark.parametrize('method', sorted(METHODS))
def test_spec_round_trips_through_the_method(method):
    """``spec()`` gives the spec with every default filled in; applying it again gives the same method."""
    model = reduced_vit(method)
    spec = model.token_reduction.spec()
    assert spec == {**spec, **EXAMPLE_SPECS[method]} and set(spec) == {'method', *METHODS[method].params}
    assert apply_token_reduction(tiny_vit(), spec).token_reduction.spec() == spec


@pytest.mark.parametrize('method', sorted(METHODS))
def test_deepcopy_and_pickle_keep_the_method(method):
    model = reduced_vit(method)
    x = images()
    with torch.no_grad():
        reduced = model(x)
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert clone.token_reduction.spec() == model.token_reduction.spec()
            assert torch.equal(clone(x), reduced)


@pytest.mark.parametrize('method', sorted(METHODS))
def test_bf16_autocast_runs_and_is_close_to_fp32(method):
    model = reduced_vit(method)
    x = images()
    with torch.no_grad():
        fp32 = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            half = model(x)
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
    assert (half.float() - fp32).abs().max() < 0.1 * fp32.abs().max()


@pytest.mark.parametrize('method', sorted(METHODS))
def test_batch_of_one_equals_batch_of_two(method):
    model = reduced_vit(method)
    x = images()
    with torch.no_grad():
        both = model(x)
        singles = torch.cat([model(x[:1]), model(x[1:])])
    torch.testing.assert_close(singles, both, rtol=1e-5, atol=1e-5 * both.abs().max().item())
