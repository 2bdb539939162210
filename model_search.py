"""The DARTS search network as a graph-building function of (weights, alphas).

Node i of a cell:  x_i = sum_{j < i + 2} sum_o softmax(alpha_{e(i, j)})_o * o_{ij}(x_j),
with e(i, j) = 2i + i(i - 1)/2 + j the edge's row in alpha.

Exact rewrites that make the graph small and the kernels large:
- `none` outputs zeros, so its term is dropped (its alpha still enters the softmax
  denominator, so its gradient is unchanged);
- ReLU(x_j), and maxpool/avgpool of x_j with their non-affine BN, do not depend on
  the target node i: computed once per source node j;
- all edges leaving node j are computed together ("wide"): the n_j copies of each
  parametric op run as one grouped convolution over n_j stacked copies of ReLU(x_j),
  giving a [N, n_j, C, H, W] block whose slice t feeds target node i = max(j - 1, 0) + t;
- a parametric op's mixture weight is its final (non-affine) BN's gamma, and the
  shared terms (max, avg, identity) are mixed for all targets by one matmul.
Per-channel BN over the stacked copies equals separate BNs per edge.
"""
import paddle
import paddle.nn.functional as F

from genotypes import PRIMITIVES, STEPS, num_edges
from operations import (Layout, avg_pool, batch_norm, conv, dil_conv, factorized_reduce, linear,
                        max_pool, relu_conv_bn, sep_conv)

MULTIPLIER = 4
STEM_MULTIPLIER = 3
ALPHA_SHAPE = [num_edges(), len(PRIMITIVES)]
ALPHA_NAMES = ('alpha_normal', 'alpha_reduce')


def reduction_layers(layers):
    return (layers // 3, 2 * layers // 3)


def edge_index(i, j):
    """Row of alpha for the edge into intermediate node i from node j."""
    return 2 * i + i * (i - 1) // 2 + j


def targets(j, steps=STEPS):
    """Intermediate nodes fed by node j (0, 1: cell inputs; 2 + k: intermediate k)."""
    return list(range(max(0, j - 1), steps))


def _source_weights(alpha):
    """softmax(alpha) regrouped by source node: {j: [n_j, |PRIMITIVES|]}, row t for target j - 1 + t."""
    order = [(j, i) for j in range(STEPS + 1) for i in targets(j)]
    rows = paddle.gather(F.softmax(alpha, axis=-1), paddle.to_tensor([edge_index(i, j) for j, i in order]))
    sizes = [len(targets(j)) for j in range(STEPS + 1)]
    return dict(enumerate(paddle.split(rows, sizes, axis=0)))


def _mixture_terms(w, c, strided):
    """What a wide block needs from its [n, ops] weights at width c:
    per-channel BN scales [n * c] for the parametric ops (skip too when strided),
    and the [n, k] matrix that mixes the k shared terms (max, avg[, identity])."""
    def per_channel(o):
        return paddle.repeat_interleave(w[:, o], c)
    parametric = ['skip_connect'] * strided + ['sep_conv_3x3', 'sep_conv_5x5', 'dil_conv_3x3', 'dil_conv_5x5']
    scales = {op: per_channel(PRIMITIVES.index(op)) for op in parametric}
    shared = w[:, 1:3] if strided else w[:, 1:4]
    return scales, shared


def _wide_block(ps, name, h, w, c, stride):
    """sum_o w_o * o(h) for every edge leaving h: [N, n, C, H', W'] with n = rows of w.

    Parametric ops (and the strided skip) get their weight as BN gamma; the shared
    terms (max, avg, and identity skip) are mixed for all n targets by one matmul.
    """
    n = w.shape[0]
    scales, shared_w = _mixture_terms(w, c, stride == 2)
    h_relu = F.relu(h)
    stacked = paddle.tile(h_relu, [1, n, 1, 1]) if n > 1 else h_relu
    shared = [batch_norm(ps, name + '.max_bn', max_pool(h, stride), affine=False),
              batch_norm(ps, name + '.avg_bn', avg_pool(h, stride), affine=False)]
    wide = []
    if stride == 1:
        shared.append(h)
    else:
        wide.append(factorized_reduce(ps, name + '.skip', h_relu, c, False, copies=n, scale=scales['skip_connect']))
    wide += [sep_conv(ps, name + '.sep3', stacked, c, 3, stride, False, copies=n, scale=scales['sep_conv_3x3']),
             sep_conv(ps, name + '.sep5', stacked, c, 5, stride, False, copies=n, scale=scales['sep_conv_5x5']),
             dil_conv(ps, name + '.dil3', stacked, c, 3, stride, False, copies=n, scale=scales['dil_conv_3x3']),
             dil_conv(ps, name + '.dil5', stacked, c, 5, stride, False, copies=n, scale=scales['dil_conv_5x5'])]
    hh, ww = shared[0].shape[2], shared[0].shape[3]
    # [N, k, C*H*W] -> [n, k] @ . -> [N, n, C*H*W]: every target's mix of the shared terms at once
    mixed = paddle.matmul(shared_w, paddle.reshape(paddle.stack(shared, axis=1), [-1, len(shared), c * hh * ww]))
    block = paddle.add_n([paddle.reshape(y, [-1, n * c * hh * ww]) for y in wide]
                         + [paddle.reshape(mixed, [-1, n * c * hh * ww])])
    return paddle.reshape(block, [-1, n, c, hh, ww])


def search_cell(ps, name, s0, s1, source_weights, c, reduction, reduction_prev):
    if reduction_prev:
        s0 = factorized_reduce(ps, name + '.pre0', F.relu(s0), c, affine=False)
    else:
        s0 = relu_conv_bn(ps, name + '.pre0', s0, c, 1, 1, 0, affine=False)
    s1 = relu_conv_bn(ps, name + '.pre1', s1, c, 1, 1, 0, affine=False)
    states, contributions = [s0, s1], [[] for _ in range(STEPS)]
    for j in range(STEPS + 1):
        if j >= 2:  # node j - 2 has all its inputs now
            states.append(paddle.add_n(contributions[j - 2]))
        stride = 2 if reduction and j < 2 else 1
        block = _wide_block(ps, f'{name}.n{j}', states[j], source_weights[j], c, stride)
        for i, part in zip(targets(j), paddle.unbind(block, axis=1)):
            contributions[i].append(part)
    states.append(paddle.add_n(contributions[STEPS - 1]))
    return paddle.concat(states[-MULTIPLIER:], axis=1)


def search_network(ps, x, alpha_normal, alpha_reduce, c=16, num_classes=10, layers=8):
    """logits = classifier(GAP(cells(stem(x)))), every mixed edge weighted by softmax(alpha)."""
    normal_w, reduce_w = _source_weights(alpha_normal), _source_weights(alpha_reduce)
    c_curr = STEM_MULTIPLIER * c
    # The official search stem's BN is affine (torch default); the cells' BNs are not.
    s = batch_norm(ps, 'stem.bn', conv(ps, 'stem.conv', x, c_curr, 3, padding=1), affine=True)
    s0 = s1 = s
    c_curr, reduction_prev = c, False
    for k in range(layers):
        reduction = k in reduction_layers(layers)
        if reduction:
            c_curr *= 2
        out = search_cell(ps, f'cell{k}', s0, s1, reduce_w if reduction else normal_w,
                          c_curr, reduction, reduction_prev)
        s0, s1, reduction_prev = s1, out, reduction
    pooled = paddle.flatten(F.adaptive_avg_pool2d(s1, 1), 1)
    return linear(ps, 'classifier', pooled, num_classes)


def cross_entropy(logits, labels):
    """mean_n -log softmax(logits_n)[y_n]."""
    return F.cross_entropy(logits, labels)


def network_layout(c, num_classes, layers, image_size):
    """The search network's weights and buffers (names, shapes, inits), in build order."""

    def build(ps):
        x = paddle.zeros([1, 3, image_size, image_size])
        alphas = [paddle.zeros(ALPHA_SHAPE) for _ in ALPHA_NAMES]
        search_network(ps, x, *alphas, c, num_classes, layers)
    return Layout.record(build)
