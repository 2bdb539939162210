"""Evaluation networks: parameter counts against the paper, drop path, auxiliary head."""
import numpy as np
import paddle
import pytest

import genotypes
import model
from operations import Layout, ParamSet


@pytest.fixture
def static_mode():
    paddle.enable_static()
    yield


def test_cifar_parameter_count_matches_paper(static_mode):
    layout = model.layout_of(model.network_cifar, 32, genotype=genotypes.DARTS_V2, c=36, layers=20, auxiliary=True)
    n = model.count_parameters(layout)                  # auxiliary head excluded, as the paper counts
    assert round(n / 1e6, 1) == 3.3
    assert n == 3349342                                 # the official code's count for this network
    assert model.count_parameters(layout, exclude_prefix='-') > n   # the head has parameters of its own


def test_imagenet_parameter_count_matches_paper(static_mode):
    layout = model.layout_of(model.network_imagenet, 224, genotype=genotypes.DARTS_V2, c=48, layers=14,
                             auxiliary=True, num_classes=1000)
    n = model.count_parameters(layout)
    assert round(n / 1e6, 1) == 4.7
    assert n == 4718752


def _eager_cell_outputs(drop_prob, seed=0):
    """A small DARTS_PADDLE cell (reduction, with a strided skip) run eagerly at drop_prob."""
    paddle.enable_static()
    g = genotypes.DARTS_PADDLE
    layout = Layout.record(lambda ps: model.eval_cell(ps, 'c', g, paddle.zeros([1, 8, 8, 8]),
                                                      paddle.zeros([1, 8, 8, 8]), 8, True, False))
    paddle.disable_static()
    try:
        ps = ParamSet(layout, paddle.to_tensor(layout.initial_weights(np.random.default_rng(seed))))
        rng = np.random.default_rng(1)
        s0 = paddle.to_tensor(rng.standard_normal((16, 8, 8, 8)).astype('float32'))
        s1 = paddle.to_tensor(rng.standard_normal((16, 8, 8, 8)).astype('float32'))
        noise = paddle.to_tensor(rng.random((8, 16)).astype('float32'))   # a row per op of the cell
        p = None if drop_prob is None else model.DropPath(paddle.to_tensor([drop_prob], dtype='float32'), noise)
        return model.eval_cell(ps, 'c', g, s0, s1, 8, True, False, p).numpy()
    finally:
        paddle.enable_static()


def test_drop_path_is_identity_at_zero_and_drops_samples_otherwise():
    no_drop = _eager_cell_outputs(None)
    assert no_drop.shape == (16, 32, 4, 4)
    np.testing.assert_array_equal(_eager_cell_outputs(0.0), no_drop)
    dropped = _eager_cell_outputs(0.6)
    assert not np.allclose(dropped, no_drop)


def test_drop_path_zeroes_whole_samples_and_rescales():
    paddle.disable_static()
    try:
        x = paddle.ones([2000, 2, 3, 3])
        u = np.random.default_rng(0).random((2, 2000)).astype('float32')
        drop = model.DropPath(paddle.to_tensor([0.25]), paddle.to_tensor(u))
        y0, y1 = drop(x).numpy(), drop(2 * x).numpy()
    finally:
        paddle.enable_static()
    assert drop.sites == 2
    for y, row, value in ((y0, u[0], 1), (y1, u[1], 2)):   # site k reads row k of the noise
        per_sample = y.reshape(2000, -1)
        assert np.all(per_sample == per_sample[:, :1])
        kept = per_sample[:, 0] != 0
        np.testing.assert_array_equal(kept, row >= 0.25)
        np.testing.assert_allclose(per_sample[kept, 0], value / 0.75, rtol=1e-6)
    assert np.all(per_sample.min(1) == per_sample.max(1))        # a whole sample or nothing
    assert abs((per_sample[:, 0] == 0).mean() - 0.25) < 0.04


def test_imagenet_multiply_adds_are_counted_from_the_program(static_mode):
    n = model.count_multiply_adds(model.network_imagenet, 224, genotype=genotypes.DARTS_V2, c=48, layers=14,
                                  num_classes=1000)
    # the official code's network counts about 530M (convs + classifier); the paper quotes 574M
    assert 525e6 < n < 535e6, n
    # a count, not a constant: a narrower network costs less, roughly quadratically in C
    narrow = model.count_multiply_adds(model.network_imagenet, 224, genotype=genotypes.DARTS_V2, c=24, layers=14,
                                       num_classes=1000)
    assert 0.2 < narrow / n < 0.35


def test_a_parameter_free_op_on_one_input_is_built_once_per_cell_and_still_dropped_per_edge():
    """DARTS_V2's reduction cell max-pools input 0 on two edges and input 1 on three: two
    pools, five drop-path sites (each edge keeps its own draw)."""
    g = genotypes.DARTS_V2
    pools = [j for op, j in g.reduce if op == 'max_pool_3x3']
    assert sorted(pools) == [0, 0, 1, 1, 1]
    paddle.enable_static()
    program = paddle.static.Program()
    with paddle.static.program_guard(program, paddle.static.Program()):
        s = paddle.static.data('s', [2, 8, 8, 8], 'float32')
        layout = Layout.record(lambda ps: model.eval_cell(ps, 'c', g, s, s, 8, True, False))
        ps = ParamSet(layout, paddle.static.data('w', [layout.size], 'float32'))
        drop = model.DropPath(paddle.static.data('p', [1], 'float32'), paddle.static.data('u', [8, 2], 'float32'))
        model.eval_cell(ps, 'c', g, s, s, 8, True, False, drop)
    names = [op.name() for op in program.global_block().ops]
    assert names.count('pd_op.pool2d') == 2
    assert drop.sites == 5   # the three identity skips of node 2 are never dropped
