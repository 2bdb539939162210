"""The wide search network against the paper's definition, edge by edge.

model_search builds every edge leaving a node at once (grouped convolutions, mixture
weights as BN gamma, shared terms mixed by one matmul).  Here the same network is
written the plain way: each of the 14 edges of a cell is a MixedOp,
sum_o softmax(alpha_e)_o * o(x_j), over the 8 primitives, `none` included as zeros,
with plain paddle.nn.functional calls.  Edge (i, j)'s weights are copy t = i - max(j - 1, 0)
of the wide tensors (rows [t * C, (t + 1) * C)).  Logits and alpha gradients must agree.
"""
import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from genotypes import PRIMITIVES, STEPS
from model_search import edge_index, network_layout, reduction_layers, search_network, targets
from operations import ParamSet

C, LAYERS, CLASSES, SIZE, BATCH = 4, 3, 10, 16, 5
EPS = 1e-5


def _bn(x, gamma=None, beta=None):
    """Batch-statistics BN (training mode), fresh buffers each call."""
    c = x.shape[1]
    return F.batch_norm(x, paddle.zeros([c], x.dtype), paddle.ones([c], x.dtype), gamma, beta,
                        training=True, epsilon=EPS)


def _rows(w, t, n):
    return w[t * n:(t + 1) * n]


def _edge_op(W, prefix, op, x, t, c, stride):
    """Primitive `op` on edge copy t of the wide block `prefix` (x: the source node)."""
    if op == 'none':
        return paddle.zeros_like(x[:, :, ::stride, ::stride])
    if op == 'max_pool_3x3':
        return _bn(F.max_pool2d(x, 3, stride, 1))
    if op == 'avg_pool_3x3':
        return _bn(F.avg_pool2d(x, 3, stride, 1, exclusive=True))
    r = F.relu(x)
    if op == 'skip_connect':
        if stride == 1:
            return x
        half = c // 2
        a = F.conv2d(r, _rows(W[prefix + '.skip.conv1'], t, half), stride=2)
        b = F.conv2d(r[:, :, 1:, 1:], _rows(W[prefix + '.skip.conv2'], t, c - half), stride=2)
        return _bn(paddle.concat([a, b], axis=1))
    k = int(op[-1])
    if op.startswith('sep_conv'):
        name = f'{prefix}.sep{k}'
        y = F.conv2d(r, _rows(W[name + '.dw1'], t, c), stride=stride, padding=k // 2, groups=c)
        y = F.relu(_bn(F.conv2d(y, _rows(W[name + '.pw1'], t, c))))
        y = F.conv2d(y, _rows(W[name + '.dw2'], t, c), padding=k // 2, groups=c)
        return _bn(F.conv2d(y, _rows(W[name + '.pw2'], t, c)))
    name = f'{prefix}.dil{k}'
    y = F.conv2d(r, _rows(W[name + '.dw'], t, c), stride=stride, padding=k - 1, dilation=2, groups=c)
    return _bn(F.conv2d(y, _rows(W[name + '.pw'], t, c)))


def _plain_network(W, x, alpha_normal, alpha_reduce):
    s = _bn(F.conv2d(x, W['stem.conv'], padding=1), W['stem.bn.gamma'], W['stem.bn.beta'])
    s0 = s1 = s
    c, reduction_prev = C, False
    for k in range(LAYERS):
        reduction = k in reduction_layers(LAYERS)
        c = 2 * c if reduction else c
        weights = F.softmax(alpha_reduce if reduction else alpha_normal, axis=-1)
        cell = f'cell{k}'
        if reduction_prev:
            r, half = F.relu(s0), c // 2
            s0 = _bn(paddle.concat([F.conv2d(r, W[cell + '.pre0.conv1'], stride=2),
                                    F.conv2d(r[:, :, 1:, 1:], W[cell + '.pre0.conv2'], stride=2)], axis=1))
        else:
            s0 = _bn(F.conv2d(F.relu(s0), W[cell + '.pre0.conv']))
        states = [s0, _bn(F.conv2d(F.relu(s1), W[cell + '.pre1.conv']))]
        for i in range(STEPS):
            node = 0
            for j in range(i + 2):
                stride = 2 if reduction and j < 2 else 1
                t = i - max(j - 1, 0)
                assert targets(j)[t] == i
                w = weights[edge_index(i, j)]
                node = node + sum(w[o] * _edge_op(W, f'{cell}.n{j}', op, states[j], t, c, stride)
                                  for o, op in enumerate(PRIMITIVES))
            states.append(node)
        s0, s1, reduction_prev = s1, paddle.concat(states[2:], axis=1), reduction
    pooled = paddle.flatten(F.adaptive_avg_pool2d(s1, 1), 1)
    return paddle.matmul(pooled, W['classifier.weight']) + W['classifier.bias']


@pytest.fixture
def dygraph():
    paddle.disable_static()
    yield
    paddle.enable_static()


def test_wide_network_is_the_mixed_op_network(dygraph):
    layout = network_layout(C, CLASSES, LAYERS, SIZE)
    rng = np.random.default_rng(0)
    flat = layout.initial_weights(rng)
    x = paddle.to_tensor(rng.standard_normal((BATCH, 3, SIZE, SIZE)).astype('float32'))
    alphas_np = [rng.standard_normal((14, len(PRIMITIVES))).astype('float32') for _ in range(2)]
    probe = paddle.to_tensor(rng.standard_normal((BATCH, CLASSES)).astype('float32'))

    def run(build):
        alphas = [paddle.to_tensor(a, stop_gradient=False) for a in alphas_np]
        logits = build(alphas)
        grads = paddle.grad(paddle.sum(logits * probe), alphas)
        return logits.numpy(), [g.numpy() for g in grads]

    wide_logits, wide_grads = run(lambda a: search_network(
        ParamSet(layout, paddle.to_tensor(flat)), x, *a, C, CLASSES, LAYERS))
    W = {k: paddle.to_tensor(v) for k, v in layout.unflatten(flat).items()}
    plain_logits, plain_grads = run(lambda a: _plain_network(W, x, *a))

    scale = np.abs(plain_logits).max()
    assert scale > 1e-3
    np.testing.assert_allclose(wide_logits, plain_logits, rtol=0, atol=2e-4 * scale)
    for wide, plain in zip(wide_grads, plain_grads):
        assert np.abs(plain).max() > 1e-4
        assert np.abs(plain[:, 0]).max() > 0        # `none` has a gradient through the softmax
        np.testing.assert_allclose(wide, plain, rtol=0, atol=2e-3 * np.abs(plain).max())
