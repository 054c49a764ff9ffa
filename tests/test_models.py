"""The five models of the paper: exact parameter counts (Table 1), input and output shapes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rethink.errors import UserError
from rethink.models import build_model, count_params
from rethink.paper import MODELS, PAPER_PARAMS
from tests.test_paper import PARAMS as TABLE_1  # typed in once, from the paper


def test_the_five_models_and_the_papers_counts():
    assert set(MODELS) == set(TABLE_1)
    assert PAPER_PARAMS == TABLE_1


@pytest.mark.parametrize("name", list(TABLE_1))
def test_parameter_count_is_the_papers(name):
    model = build_model(name)
    assert count_params(model) == TABLE_1[name]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == TABLE_1[name]


@pytest.mark.parametrize("name", list(TABLE_1))
def test_dropout_adds_no_parameters(name):
    assert count_params(build_model(name, dropout=0.5)) == TABLE_1[name]


@pytest.mark.parametrize("name", list(TABLE_1))
def test_forward_maps_28x28_images_to_10_logits(name):
    torch.manual_seed(0)
    model = build_model(name)
    x = torch.randn(3, 3, 28, 28)
    model.train()
    out = model(x)
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())  # every parameter takes part
    model.eval()
    with torch.no_grad():
        out = model(x[:1])
    assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_mlps_have_512_unit_hidden_layers_on_2352_inputs():
    for name, depth in (("mlp-1x512", 1), ("mlp-3x512", 3)):
        linears = [m for m in build_model(name).modules() if isinstance(m, nn.Linear)]
        assert [(m.in_features, m.out_features) for m in linears] == (
            [(2352, 512)] + [(512, 512)] * (depth - 1) + [(512, 10)]
        )


def test_inception_batchnorm_learns_no_scale():
    bn = [m for m in build_model("inception").modules() if isinstance(m, nn.BatchNorm2d)]
    assert bn and all(not m.affine for m in bn)
    assert not [m for m in build_model("inception-nobn").modules() if isinstance(m, nn.BatchNorm2d)]


def test_alexnet_modules_pool_then_normalize():
    """Two (5x5 conv 64 -> ReLU -> 3x3/2 max-pool -> LRN as in the TF CIFAR-10 tutorial) modules: 28 -> 14 -> 7."""
    model = build_model("alexnet")
    kinds = [
        type(m) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.LocalResponseNorm))
    ]
    assert kinds == [nn.Conv2d, nn.MaxPool2d, nn.LocalResponseNorm] * 2
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(m.kernel_size, m.out_channels) for m in convs] == [((5, 5), 64)] * 2
    for lrn in (m for m in model.modules() if isinstance(m, nn.LocalResponseNorm)):
        assert (lrn.size, lrn.alpha, lrn.beta, lrn.k) == (9, 1e-3, 0.75, 1.0)
    features = model.features(torch.zeros(1, 3, 28, 28))
    assert features.shape == (1, 64, 7, 7)


def test_same_seed_same_initial_weights():
    torch.manual_seed(5)
    a = build_model("alexnet").state_dict()
    torch.manual_seed(5)
    b = build_model("alexnet").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_model_is_a_user_error():
    with pytest.raises(UserError, match=r"unknown model 'resnet'.*inception.*mlp-1x512"):
        build_model("resnet")
