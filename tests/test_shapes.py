"""The search and evaluation networks at every input size, channel count and class count."""
import numpy as np
import paddle
import pytest

import genotypes
import model
from model_search import network_layout, search_network
from operations import Layout, ParamSet, stem, stem_reductions

SIZES = [16, 28, 32, 56, 64, 112, 224]
KINDS = [(1, 2), (3, 10)]  # (channels, classes)


@pytest.fixture
def dygraph():
    paddle.disable_static()
    yield
    paddle.enable_static()


def test_stem_reductions_bring_large_inputs_to_at_most_32_px():
    expected = {16: 0, 28: 0, 32: 0, 56: 0, 63: 0, 64: 1, 65: 2, 96: 2, 112: 2, 128: 2, 129: 3, 224: 3, 1024: 5}
    assert {s: stem_reductions(s) for s in expected} == expected
    for s, k in expected.items():
        cells = s
        for _ in range(k):
            cells = -(-cells // 2)
        assert cells <= 32 or k == 0
        assert k == 0 or -(-s // 2 ** (k - 1)) > 32      # no more reductions than needed


@pytest.mark.parametrize('size', [16, 28, 56, 64, 112, 224])
def test_stem_output_size(dygraph, size):
    paddle.enable_static()
    layout = Layout.record(lambda ps: stem(ps, paddle.zeros([1, 3, size, size]), 12, True))
    paddle.disable_static()
    ps = ParamSet(layout, paddle.to_tensor(layout.initial_weights(np.random.default_rng(0))))
    y = stem(ps, paddle.zeros([2, 3, size, size]), 12, True)
    expect = size
    for _ in range(stem_reductions(size)):
        expect = -(-expect // 2)
    assert list(y.shape) == [2, 12, expect, expect]


def _layout(build):
    paddle.enable_static()
    try:
        return build()
    finally:
        paddle.disable_static()


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('channels,classes', KINDS)
def test_search_network_runs_at_every_size(dygraph, size, channels, classes):
    layout = _layout(lambda: network_layout(4, classes, 3, size, channels))
    rng = np.random.default_rng(0)
    ps = ParamSet(layout, paddle.to_tensor(layout.initial_weights(rng)))
    x = paddle.to_tensor(rng.standard_normal((2, channels, size, size)).astype('float32'))
    arch = {name: paddle.to_tensor(1e-3 * rng.standard_normal((14, len(genotypes.PRIMITIVES))).astype('float32'))
            for name in ('alpha_normal', 'alpha_reduce')}
    logits = search_network(ps, x, arch, 4, classes, 3)
    assert list(logits.shape) == [2, classes]
    assert np.all(np.isfinite(logits.numpy()))
    stem_weight = [s for n, s in zip(layout.names, layout.shapes) if n.startswith('stem.conv')][0]
    assert stem_weight[1] == channels


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('channels,classes', KINDS)
def test_evaluation_network_runs_at_every_size_with_its_auxiliary_head(dygraph, size, channels, classes):
    kw = dict(genotype=genotypes.DARTS_V2, c=4, num_classes=classes, layers=3)
    layout = _layout(lambda: model.layout_of(model.network_cifar, size, channels, auxiliary=True, **kw))
    rng = np.random.default_rng(0)
    ps = ParamSet(layout, paddle.to_tensor(layout.initial_weights(rng)))
    x = paddle.to_tensor(rng.standard_normal((2, channels, size, size)).astype('float32'))
    drop = model.DropPath(paddle.to_tensor([0.1]), paddle.to_tensor(rng.random((24, 2)).astype('float32')))
    logits, aux = model.network_cifar(ps, x, auxiliary=True, drop_prob=drop, **kw)
    assert list(logits.shape) == [2, classes] and list(aux.shape) == [2, classes]
    assert np.all(np.isfinite(logits.numpy())) and np.all(np.isfinite(aux.numpy()))


def test_parameter_counts_do_not_depend_on_size_below_the_downsampling_stem():
    paddle.enable_static()
    kw = dict(genotype=genotypes.DARTS_V2, c=8, num_classes=10, layers=5, auxiliary=True)
    n32 = model.count_parameters(model.layout_of(model.network_cifar, 32, **kw))
    assert model.count_parameters(model.layout_of(model.network_cifar, 28, **kw)) == n32
    # one channel: the stem conv has 3 * 8 * 3 * 3 * (3 - 1) fewer weights than with three
    assert n32 - model.count_parameters(model.layout_of(model.network_cifar, 32, 1, **kw)) == 24 * 9 * 2
    # 64 px: one stride-2 conv of the same shape as the CIFAR stem conv; 112 px: two convs
    assert model.count_parameters(model.layout_of(model.network_cifar, 64, **kw)) == n32
    extra = 12 * 3 * 9 + 2 * 12 + 24 * 12 * 9 - 24 * 3 * 9   # conv to 12 (+BN), then 12 -> 24 instead of 3 -> 24
    assert model.count_parameters(model.layout_of(model.network_cifar, 112, **kw)) == n32 + extra
