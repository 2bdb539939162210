"""The search network against the paper's definition, edge by edge.

Here the network is written the plain way, independently of model_search: every edge of
a cell is a MixedOp, sum_o softmax(alpha_e)_o * o(x_j), over the space's ops (`none`
as zeros), with plain paddle.nn.functional calls; PC-DARTS edges slice, mix, bypass,
concatenate and shuffle one by one, and nodes weight their edges by softmax(beta).
Its weights carry the generic path's names (`cellK.nJ.eT.OP...`); the wide path's
stacked tensors are split along axis 0 to get them (copy t = edge t).  Logits and the
architecture gradients must agree for the generic path and for the wide path.
"""
import re

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from genotypes import PRIMITIVES
from model_search import (SearchSpace, edge_index, network_layout, reduction_layers, search_network,
                          targets)
from operations import ParamSet

LAYERS, CLASSES, SIZE, BATCH = 3, 10, 16, 5
EPS = 1e-5


def _bn(x, gamma=None, beta=None):
    """Batch-statistics BN (training mode), fresh buffers each call."""
    c = x.shape[1]
    return F.batch_norm(x, paddle.zeros([c], x.dtype), paddle.ones([c], x.dtype), gamma, beta,
                        training=True, epsilon=EPS)


def _mb(W, p, x, stride, kernel, fused):
    c = x.shape[1]
    if fused:
        y = F.relu6(_bn(F.conv2d(x, W[p + '.expand.conv'], stride=stride, padding=kernel // 2, groups=c)))
    else:
        y = F.relu6(_bn(F.conv2d(x, W[p + '.expand.conv'])))
        y = F.relu6(_bn(F.conv2d(y, W[p + '.dw.conv'], stride=stride, padding=kernel // 2, groups=3 * c)))
    y = _bn(F.conv2d(y, W[p + '.project.conv']))
    return y + x if stride == 1 else y


def _edge_op(W, p, op, x, stride):
    """Primitive `op` with weights W[p + ...] on input x (the source node, c channels)."""
    c = x.shape[1]
    if op == 'none':
        return paddle.zeros_like(x[:, :, ::stride, ::stride])
    if op == 'max_pool_3x3':
        return _bn(F.max_pool2d(x, 3, stride, 1))
    if op == 'avg_pool_3x3':
        return _bn(F.avg_pool2d(x, 3, stride, 1, exclusive=True))
    if op.startswith('mb_conv') or op.startswith('fused'):
        return _mb(W, p, x, stride, int(op[-1]), op.startswith('fused'))
    r = F.relu(x)
    if op == 'skip_connect':
        if stride == 1:
            return x
        return _bn(paddle.concat([F.conv2d(r, W[p + '.conv1'], stride=2),
                                  F.conv2d(r[:, :, 1:, 1:], W[p + '.conv2'], stride=2)], axis=1))
    k = int(op[-1])
    if op.startswith('sep_conv'):
        y = F.conv2d(r, W[p + '.dw1'], stride=stride, padding=k // 2, groups=c)
        y = F.relu(_bn(F.conv2d(y, W[p + '.pw1'])))
        y = F.conv2d(y, W[p + '.dw2'], padding=k // 2, groups=c)
        return _bn(F.conv2d(y, W[p + '.pw2']))
    y = F.conv2d(r, W[p + '.dw'], stride=stride, padding=k - 1, dilation=2, groups=c)
    return _bn(F.conv2d(y, W[p + '.pw']))


def _shuffle(x, k):
    n, c, h, w = x.shape
    return x.reshape([n, k, c // k, h, w]).transpose([0, 2, 1, 3, 4]).reshape([n, c, h, w])


def _plain_network(W, x, arch, space, c):
    nodes, k = space.nodes, space.partial_channels
    s = _bn(F.conv2d(x, W['stem.conv'], padding=1), W['stem.bn.gamma'], W['stem.bn.beta'])
    s0 = s1 = s
    reduction_prev = False
    for layer in range(LAYERS):
        reduction = layer in reduction_layers(LAYERS)
        c = 2 * c if reduction else c
        kind = 'reduce' if reduction else 'normal'
        weights = F.softmax(arch['alpha_' + kind], axis=-1)
        cell = f'cell{layer}'
        if reduction_prev:
            r = F.relu(s0)
            s0 = _bn(paddle.concat([F.conv2d(r, W[cell + '.pre0.conv1'], stride=2),
                                    F.conv2d(r[:, :, 1:, 1:], W[cell + '.pre0.conv2'], stride=2)], axis=1))
        else:
            s0 = _bn(F.conv2d(F.relu(s0), W[cell + '.pre0.conv']))
        states = [s0, _bn(F.conv2d(F.relu(s1), W[cell + '.pre1.conv']))]
        for i in range(nodes):
            node = 0
            beta = F.softmax(arch['beta_' + kind][edge_index(i, 0):edge_index(i, 0) + i + 2]) \
                if space.edge_normalization else None
            for j in range(i + 2):
                stride = 2 if reduction and j < 2 else 1
                t = i - max(j - 1, 0)
                assert targets(j, nodes)[t] == i
                w = weights[edge_index(i, j)]
                h = states[j][:, :c // k]
                edge = sum(w[o] * _edge_op(W, f'{cell}.n{j}.e{t}.{op}', op, h, stride)
                           for o, op in enumerate(space.ops))
                if k > 1:
                    rest = states[j][:, c // k:]
                    rest = F.max_pool2d(rest, 2, 2) if stride == 2 else rest
                    edge = _shuffle(paddle.concat([edge, rest], axis=1), k)
                node = node + (beta[j] * edge if beta is not None else edge)
            states.append(node)
        s0, s1, reduction_prev = s1, paddle.concat(states[2:], axis=1), reduction
    pooled = paddle.flatten(F.adaptive_avg_pool2d(s1, 1), 1)
    return paddle.matmul(pooled, W['classifier.weight']) + W['classifier.bias']


def generic_weights(wide_layout, wide_flat, space):
    """{generic name: array}: each wide tensor of node j split into its n_j per-edge tensors."""
    W = wide_layout.unflatten(wide_flat)
    out = {}
    for name, value in W.items():
        m = re.match(r'(cell\d+\.n(\d+))\.([a-z_0-9]+)\.(.+)', name)
        if not m or re.fullmatch(r'e\d+', m.group(3)):   # not stacked, or already per edge
            out[name] = value
            continue
        n = len(targets(int(m.group(2)), space.nodes))
        for t, part in enumerate(np.split(value, n, axis=0)):
            out[f'{m.group(1)}.e{t}.{m.group(3)}.{m.group(4)}'] = part
    return out


@pytest.fixture
def dygraph():
    paddle.disable_static()
    yield
    paddle.enable_static()


def _compare(space, c=4, seed=0, with_plain=True):
    """(logits, arch grads) of the wide network, the generic network and the plain reference."""
    generic = SearchSpace(**{**space.__dict__, 'fast': False})
    rng = np.random.default_rng(seed)
    wide_layout = network_layout(c, CLASSES, LAYERS, SIZE, space=space)
    generic_layout = network_layout(c, CLASSES, LAYERS, SIZE, space=generic)
    flat = wide_layout.initial_weights(rng)
    W = generic_weights(wide_layout, flat, space)
    assert sorted(W) == sorted(generic_layout.names)
    generic_flat = np.concatenate([W[n].reshape(-1) for n in generic_layout.names])
    x = paddle.to_tensor(rng.standard_normal((BATCH, 3, SIZE, SIZE)).astype('float32'))
    arch_np = {n: rng.standard_normal(s).astype('float32') for n, s in space.arch_shapes().items()}
    probe = paddle.to_tensor(rng.standard_normal((BATCH, CLASSES)).astype('float32'))

    def run(build):
        arch = {n: paddle.to_tensor(a, stop_gradient=False) for n, a in arch_np.items()}
        logits = build(arch)
        grads = paddle.grad(paddle.sum(logits * probe), list(arch.values()))
        return logits.numpy(), [g.numpy() for g in grads]
    wide = run(lambda a: search_network(ParamSet(wide_layout, paddle.to_tensor(flat)), x, a, c, CLASSES, LAYERS,
                                        space))
    gen = run(lambda a: search_network(ParamSet(generic_layout, paddle.to_tensor(generic_flat)), x, a, c,
                                       CLASSES, LAYERS, generic))
    tensors = {k: paddle.to_tensor(v) for k, v in W.items()}
    plain = run(lambda a: _plain_network(tensors, x, a, space, c)) if with_plain else None
    return wide, gen, plain


def _compare_paths(space, c=4):
    return _compare(space, c, with_plain=False)


def _agree(result, reference):
    (logits, grads), (ref_logits, ref_grads) = result, reference
    scale = np.abs(ref_logits).max()
    assert scale > 1e-3
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=2e-4 * scale)
    for g, ref in zip(grads, ref_grads):
        assert np.abs(ref).max() > 1e-5
        np.testing.assert_allclose(g, ref, rtol=0, atol=2e-3 * np.abs(ref).max())


PERMUTED = tuple(PRIMITIVES[i] for i in (5, 3, 0, 7, 1, 4, 6, 2))   # skip before the pools, none in the middle


@pytest.mark.parametrize('space', [
    SearchSpace(),
    pytest.param(SearchSpace(ops=PERMUTED), marks=pytest.mark.slow),
    pytest.param(SearchSpace(ops=tuple(op for op in PERMUTED if op != 'none'), nodes=3), marks=pytest.mark.slow),
    pytest.param(SearchSpace(ops=('skip_connect', 'sep_conv_3x3', 'max_pool_3x3', 'mb_conv_3x3', 'fused_mb_conv_3x3'),
                             nodes=2), marks=pytest.mark.slow),
], ids=['paper', 'permuted', 'no-none-3-nodes', 'mbconv'])
def test_wide_and_generic_paths_are_the_mixed_op_network(dygraph, space):
    wide, generic, plain = _compare(space)
    _agree(generic, plain)
    _agree(wide, plain)
    if 'none' in space.ops:   # `none` has a gradient through the softmax
        col = space.ops.index('none')
        assert all(np.abs(g[:, col]).max() > 0 for g in wide[1])


@pytest.mark.slow
@pytest.mark.parametrize('k,edge_norm', [(4, True), (2, False), (1, True)])
def test_pc_darts_network_is_partial_channel_edges_with_edge_normalisation(dygraph, k, edge_norm):
    space = SearchSpace(partial_channels=k, edge_normalization=edge_norm, nodes=3)
    wide, generic, plain = _compare(space, c=8)
    _agree(generic, plain)
    _agree(wide, plain)
    if edge_norm:   # betas (the last two arch tensors) get gradients
        assert all(np.abs(g).max() > 1e-5 for g in wide[1][2:])


def test_a_users_wide_builder_matches_its_edge_builder(dygraph):
    """The README's example op: ReLU, 3x3 conv, BN, with both builders."""
    from operations import OPS, batch_norm, conv, register

    def edge(ps, name, src, c, stride, affine):
        return batch_norm(ps, name + '.bn', conv(ps, name + '.conv', src.relu, c, 3, stride, 1), affine)

    def wide(ps, name, src, c, stride, copies, mix):
        # one conv to copies * c channels = the copies' convs stacked along the weight's axis 0
        return batch_norm(ps, name + '.bn', conv(ps, name + '.conv', src.relu, copies * c, 3, stride, 1), False, mix)
    register('conv_3x3_test', edge, wide=wide)
    try:
        space = SearchSpace(ops=('none', 'skip_connect', 'conv_3x3_test'), nodes=2)
        wide_result, generic_result, _ = _compare_paths(space)
        _agree(wide_result, generic_result)
    finally:
        del OPS['conv_3x3_test']
