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
  giving a [N, n_j * C, H, W] block whose channels [t * C, (t + 1) * C) feed target
  node i = max(j - 1, 0) + t;
- a parametric op's mixture weight is its final (non-affine) BN's gamma, and the
  shared terms (max, avg, identity) are mixed for all targets by one matmul;
- the per-channel mixture weights are laid out once per (alpha, cell width), not per
  cell (mixture_weights).
Per-channel BN over the stacked copies equals separate BNs per edge.
"""
import paddle
import paddle.nn.functional as F

from genotypes import PRIMITIVES, STEPS, num_edges
from operations import (Layout, avg_pool, batch_norm, dil_conv, factorized_reduce, linear, max_pool,
                        relu_conv_bn, sep_conv, stem, sum_all)

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


PARAMETRIC = ('skip_connect', 'sep_conv_3x3', 'sep_conv_5x5', 'dil_conv_3x3', 'dil_conv_5x5')
SHARED = ('max_pool_3x3', 'avg_pool_3x3', 'skip_connect')


def mixture_weights(alpha, c):
    """softmax(alpha) laid out for the wide blocks of a cell of width c, per source node j:

      gamma[op]  [n_j * c]  the weight of op on each of the n_j edges leaving j, repeated
                            per channel (the final BN's gamma of op's wide block);
      beta[op]   [n_j * c]  zeros derived from gamma (see operations.batch_norm);
      shared     [n_j, 3]   the weights of max, avg and skip on those edges.

    Built once per (alpha, c) and shared by every cell with that alpha and width.
    (skip_connect is parametric, FactorizedReduce, only on the strided edges.)
    """
    order = [edge_index(i, j) for j in range(STEPS + 1) for i in targets(j)]
    rows = paddle.gather(F.softmax(alpha, axis=-1), paddle.to_tensor(order))      # [14, |ops|]
    sizes = [len(targets(j)) for j in range(STEPS + 1)]
    columns = paddle.to_tensor([PRIMITIVES.index(op) for op in PARAMETRIC])
    per_channel = paddle.repeat_interleave(paddle.transpose(paddle.gather(rows, columns, axis=1), [1, 0]), c, axis=1)
    gammas = paddle.split(per_channel, [n * c for n in sizes], axis=1)
    betas = paddle.split(per_channel * 0.0, [n * c for n in sizes], axis=1)
    first = PRIMITIVES.index(SHARED[0])
    shared = paddle.split(rows[:, first:first + len(SHARED)], sizes, axis=0)
    return [dict(gamma=dict(zip(PARAMETRIC, paddle.unbind(g, axis=0))),
                 beta=dict(zip(PARAMETRIC, paddle.unbind(b, axis=0))), shared=sh)
            for g, b, sh in zip(gammas, betas, shared)]


def _wide_block(ps, name, h, mix, c, stride):
    """sum_o w_o * o(h) for every edge leaving h: [N, n * C, H', W'], edge t in channels
    [t * C, (t + 1) * C), n = the number of edges leaving h.

    Parametric ops (and the strided skip) get their weight as BN gamma; the shared
    terms (max, avg, and identity skip) are mixed for all n targets by one matmul.
    """
    n = mix['shared'].shape[0]

    def weights(op):
        return mix['gamma'][op], mix['beta'][op]
    h_relu = F.relu(h)
    stacked = paddle.tile(h_relu, [1, n, 1, 1]) if n > 1 else h_relu
    shared = [batch_norm(ps, name + '.max_bn', max_pool(h, stride), affine=False),
              batch_norm(ps, name + '.avg_bn', avg_pool(h, stride), affine=False)]
    wide = []
    if stride == 1:
        shared.append(h)
        shared_w = mix['shared']
    else:
        shared_w = mix['shared'][:, :2]
        wide.append(factorized_reduce(ps, name + '.skip', h_relu, c, False, copies=n, mix=weights('skip_connect')))
    wide += [sep_conv(ps, name + '.sep3', stacked, c, 3, stride, False, copies=n, mix=weights('sep_conv_3x3')),
             sep_conv(ps, name + '.sep5', stacked, c, 5, stride, False, copies=n, mix=weights('sep_conv_5x5')),
             dil_conv(ps, name + '.dil3', stacked, c, 3, stride, False, copies=n, mix=weights('dil_conv_3x3')),
             dil_conv(ps, name + '.dil5', stacked, c, 5, stride, False, copies=n, mix=weights('dil_conv_5x5'))]
    hh, ww = shared[0].shape[2], shared[0].shape[3]
    # [n, k] @ [N, k, C*H*W] -> [N, n, C*H*W]: every target's mix of the shared terms at once
    mixed = paddle.matmul(shared_w, paddle.reshape(paddle.stack(shared, axis=1), [-1, len(shared), c * hh * ww]))
    return sum_all(wide + [paddle.reshape(mixed, [-1, n * c, hh, ww])])


def search_cell(ps, name, s0, s1, mixes, c, reduction, reduction_prev):
    if reduction_prev:
        s0 = factorized_reduce(ps, name + '.pre0', F.relu(s0), c, affine=False)
    else:
        s0 = relu_conv_bn(ps, name + '.pre0', s0, c, 1, 1, 0, affine=False)
    s1 = relu_conv_bn(ps, name + '.pre1', s1, c, 1, 1, 0, affine=False)
    states, contributions = [s0, s1], [[] for _ in range(STEPS)]
    for j in range(STEPS + 1):
        if j >= 2:  # node j - 2 has all its inputs now
            states.append(sum_all(contributions[j - 2]))
        stride = 2 if reduction and j < 2 else 1
        block = _wide_block(ps, f'{name}.n{j}', states[j], mixes[j], c, stride)
        n = len(targets(j))
        parts = paddle.split(block, n, axis=1) if n > 1 else [block]
        for i, part in zip(targets(j), parts):
            contributions[i].append(part)
    states.append(sum_all(contributions[STEPS - 1]))
    return paddle.concat(states[-MULTIPLIER:], axis=1)


def search_network(ps, x, alpha_normal, alpha_reduce, c=16, num_classes=10, layers=8):
    """logits = classifier(GAP(cells(stem(x)))), every mixed edge weighted by softmax(alpha).

    x: [N, 1 or 3, S, S], any S >= 16 (operations.stem downsamples from 64 px up)."""
    mixes = {}  # (reduction, width) -> mixture_weights, built once per network

    def mix(reduction, width):
        if (reduction, width) not in mixes:
            mixes[reduction, width] = mixture_weights(alpha_reduce if reduction else alpha_normal, width)
        return mixes[reduction, width]
    # The official search stem's BN is affine (torch default); the cells' BNs are not.
    s = stem(ps, x, STEM_MULTIPLIER * c, affine=True)
    s0 = s1 = s
    c_curr, reduction_prev = c, False
    for k in range(layers):
        reduction = k in reduction_layers(layers)
        if reduction:
            c_curr *= 2
        out = search_cell(ps, f'cell{k}', s0, s1, mix(reduction, c_curr), c_curr, reduction, reduction_prev)
        s0, s1, reduction_prev = s1, out, reduction
    pooled = paddle.flatten(F.adaptive_avg_pool2d(s1, 1), 1)
    return linear(ps, 'classifier', pooled, num_classes)


def cross_entropy(logits, labels):
    """mean_n -log softmax(logits_n)[y_n]."""
    return F.cross_entropy(logits, labels)


def network_layout(c, num_classes, layers, image_size, in_channels=3):
    """The search network's weights and buffers (names, shapes, inits), in build order."""

    def build(ps):
        x = paddle.zeros([1, in_channels, image_size, image_size])
        alphas = [paddle.zeros(ALPHA_SHAPE) for _ in ALPHA_NAMES]
        search_network(ps, x, *alphas, c, num_classes, layers)
    return Layout.record(build)
