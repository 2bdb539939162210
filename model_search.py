"""The DARTS search network as a graph-building function of (weights, architecture parameters).

Node i of a cell:  x_i = sum_{j < i + 2} sum_o softmax(alpha_{e(i, j)})_o * o_{ij}(x_j),
with e(i, j) = 2i + i(i - 1)/2 + j the edge's row in alpha, o over the space's op list.

The ops come from operations.OPS by name; nothing depends on the order of the list.
Two paths compute the same sum:
- generic (every op without a wide builder, or every op with SearchSpace(fast=False)):
  op(x_j) per edge, times its weight;
- wide (the fast path for the paper's ops), exact rewrites that make the graph small and
  the kernels large:
  - `none` outputs zeros, so its term is dropped (its alpha still enters the softmax
    denominator, so its gradient is unchanged);
  - ops with the same output on every edge leaving x_j (max/avg pool with their BN,
    identity skip) are computed once per source node and mixed into all targets by one
    matmul;
  - the n_j copies of each parametric op on the edges leaving x_j run as one grouped
    convolution over n_j stacked copies of ReLU(x_j), giving a [N, n_j * C, H, W] block
    whose channels [t * C, (t + 1) * C) feed target node i = max(j - 1, 0) + t, and the
    op's mixture weight is its final (non-affine) BN's gamma;
  - the per-channel mixture weights are laid out once per (alpha, cell width).
  Per-channel BN over the stacked copies equals separate BNs per edge.

PC-DARTS (Xu et al. 2020), partial_channels K > 1: each edge's mixed op sees only the
first C/K channels of x_j; the rest bypass it (2x2 max pool on stride-2 edges) and the
edge's output is shuffle(concat(mixed, bypass)), a channel shuffle with K groups.  With
edge normalisation, node i = sum_j softmax(beta_i)_j * edge_ij(x_j), softmax over node
i's incoming edges.  The shuffle is linear and the same on every edge, so it is applied
once per node to the weighted sums, and the betas multiply into the mixture weights.
"""
from dataclasses import dataclass

import numpy as np
import paddle
import paddle.nn.functional as F

import genotypes
from darts.errors import SearchSpaceError
from genotypes import PRIMITIVES, num_edges
from operations import (Layout, Source, batch_norm, factorized_reduce, linear, lookup, reduction_layers,
                        relu_conv_bn, stem, sum_all)
from darts.numeric import softmax

STEM_MULTIPLIER = 3


@dataclass(frozen=True)
class SearchSpace:
    """What the search chooses from: an op list (names in operations.OPS), intermediate
    nodes per cell (the cell output concatenates all of them), and PC-DARTS' settings."""
    ops: tuple = tuple(PRIMITIVES)
    nodes: int = 4
    partial_channels: int = 1            # K: the mixed ops see C / K channels (1: plain DARTS)
    edge_normalization: bool = False     # PC-DARTS' betas: node i weights its edges by softmax(beta_i)
    fast: bool = True                    # wide builders where ops have them; False: the generic path only
    auxiliary_skip: bool = False         # DARTS-: + coefficient * skip(h) on every edge, outside the softmax

    def __post_init__(self):
        object.__setattr__(self, 'ops', tuple(self.ops))

    @property
    def num_edges(self):
        return num_edges(self.nodes)

    def arch_shapes(self):
        """{name: shape} of the architecture parameters, in a fixed order."""
        shapes = {'alpha_normal': [self.num_edges, len(self.ops)], 'alpha_reduce': [self.num_edges, len(self.ops)]}
        if self.edge_normalization:
            shapes.update(beta_normal=[self.num_edges], beta_reduce=[self.num_edges])
        return shapes

    def check(self, init_channels=None):
        """Raise SearchSpaceError (one line, naming the flag that sets what is wrong) unless every op
        is registered and the settings fit."""
        if not self.ops:
            raise SearchSpaceError('--primitives: the op list is empty')
        if len(set(self.ops)) != len(self.ops):
            raise SearchSpaceError(f'--primitives: an op is listed twice: {",".join(self.ops)}')
        for op in self.ops:
            try:
                lookup(op)
            except KeyError as e:
                raise SearchSpaceError(f'--primitives: {e.args[0]}') from None
        if all(lookup(op).zero for op in self.ops):
            raise SearchSpaceError('--primitives: the op list needs an op other than none')
        if self.nodes < 1:
            raise SearchSpaceError('--nodes: a cell needs at least 1 intermediate node')
        k = self.partial_channels
        if k < 1:
            raise SearchSpaceError('--partial_channels must be at least 1')
        if init_channels is not None and k > 1 and (init_channels % k or init_channels // k < 2):
            raise SearchSpaceError(f'--init_channels {init_channels} must be a multiple of --partial_channels {k} '
                                   f'with at least 2 channels per part')
        return self

    def describe(self):
        text = f'ops {",".join(self.ops)}; {self.nodes} nodes per cell'
        if self.partial_channels > 1:
            text += f'; PC-DARTS K={self.partial_channels}'
        if self.edge_normalization:
            text += ', edge normalisation'
        if self.auxiliary_skip:
            text += '; auxiliary skip on every edge (DARTS-)'
        return text

    def to_dict(self):
        return dict(primitives=list(self.ops), nodes=self.nodes, partial_channels=self.partial_channels,
                    edge_normalization=self.edge_normalization, auxiliary_skip=self.auxiliary_skip)


DEFAULT_SPACE = SearchSpace()


def edge_index(i, j):
    """Row of alpha for the edge into intermediate node i from node j."""
    return 2 * i + i * (i - 1) // 2 + j


def targets(j, nodes):
    """Intermediate nodes fed by node j (0, 1: cell inputs; 2 + k: intermediate k)."""
    return list(range(max(0, j - 1), nodes))


def normalized_betas(beta, nodes):
    """softmax(beta) per node over its incoming edges (rows 0:2, 2:5, 5:9, ...)."""
    parts = paddle.split(beta, [i + 2 for i in range(nodes)])
    return paddle.concat([F.softmax(p) for p in parts])


def _strides(reduction):
    return (2, 1) if reduction else (1,)


def cell_weights(arch, space, reduction):
    """The edge weights W[e, o] = softmax(alpha_e)_o [* softmax(beta_i)_e] of one cell type,
    laid out per source node j (edges in target order), built once per network:

      per_edge   the ops with a weight per edge and channel (wide or generic builders)
      columns    [|per_edge|, E]  their weights, edges grouped by source node
      shared[s]  [n_j, k]         per node: the weights of the ops shared at stride s
      bypass     [1, i + 2]       per target node i, PC-DARTS with edge normalisation:
                                  softmax(beta_i), the weights of its edges' bypassed channels
      aux        [1]              DARTS-' auxiliary skip coefficient (arch['aux_skip'], else 1)
    """
    nodes, ops = space.nodes, space.ops
    kind = 'reduce' if reduction else 'normal'
    order = [edge_index(i, j) for j in range(nodes + 1) for i in targets(j, nodes)]
    sizes = [len(targets(j, nodes)) for j in range(nodes + 1)]  # the last node feeds no edge
    index = paddle.to_tensor(order)
    w = F.softmax(arch['alpha_' + kind], axis=-1)
    if space.edge_normalization:
        beta = normalized_betas(arch['beta_' + kind], nodes)
        w = w * paddle.unsqueeze(beta, 1)
    rows = paddle.gather(w, index)      # [E, |ops|], grouped by source node
    strides = _strides(reduction)
    per_edge = [op for op in ops if not lookup(op).zero and any(not _shared(op, s, space) for s in strides)]
    shared = {s: [op for op in ops if _shared(op, s, space)] for s in strides}
    shared = {s: names for s, names in shared.items() if names}
    # one gather of every column needed, split into per-edge and shared parts
    groups = [per_edge] * bool(per_edge) + list(shared.values())
    picked = paddle.gather(rows, paddle.to_tensor([ops.index(op) for names in groups for op in names]), axis=1)
    picked = paddle.split(picked, [len(names) for names in groups], axis=1) if len(groups) > 1 else [picked]
    out = dict(sizes=sizes, per_edge=per_edge, shared=[{} for _ in sizes], bypass=None,
               columns=paddle.transpose(picked[0], [1, 0]) if per_edge else None, aux=None)
    if space.auxiliary_skip:
        out['aux'] = arch['aux_skip'] if 'aux_skip' in arch else paddle.ones([1])
    for s, ws in zip(shared, picked[bool(per_edge):]):
        for node, w_node in zip(out['shared'], paddle.split(ws, sizes)):
            node[s] = w_node
    if space.partial_channels > 1 and space.edge_normalization:
        out['bypass'] = [paddle.unsqueeze(b, 0) for b in paddle.split(beta, [i + 2 for i in range(nodes)])]
    return out


def mixture_weights(weights, c):
    """cell_weights laid out for the blocks of a cell of width c, per source node j:

      gamma[op]     [n_j * c]  op's weight on each of the n_j edges leaving j, repeated per
                               channel (the final BN's gamma of op's wide block, or the
                               factor of its generic per-edge outputs);
      beta[op]      [n_j * c]  zeros derived from gamma (see operations.batch_norm);
      shared[s]                as in cell_weights;
    and bypass (per target node) as in cell_weights.

    Built once per (cell type, c) and shared by every cell with that type and width.
    """
    sizes, per_edge = weights['sizes'], weights['per_edge']
    out = [dict(n=n, gamma={}, beta={}, shared=sh, aux=weights['aux']) for n, sh in zip(sizes, weights['shared'])]
    if per_edge:
        per_channel = paddle.repeat_interleave(weights['columns'], c, axis=1)
        gammas = paddle.split(per_channel, [n * c for n in sizes], axis=1)
        betas = paddle.split(per_channel * 0.0, [n * c for n in sizes], axis=1)
        for node, g, b in zip(out, gammas, betas):
            node['gamma'] = dict(zip(per_edge, paddle.unbind(g, axis=0)))
            node['beta'] = dict(zip(per_edge, paddle.unbind(b, axis=0)))
    return dict(sources=out, bypass=weights['bypass'])


def _shared(op, stride, space):
    return space.fast and stride in lookup(op).shared_strides


def _checked(y, op, c, stride, h, where):
    """y, after checking it has the shape an op on this edge must give."""
    want = [c, -(-h.shape[2] // stride), -(-h.shape[3] // stride)]
    if list(y.shape[1:]) != want:
        raise SearchSpaceError(f'operation {op!r} ({where}) gave a [C, H, W] = {list(y.shape[1:])} output on a '
                               f'stride-{stride} edge with {c} channels of {list(h.shape[2:])}; expected {want}')
    return y


def _build(op, where, builder, *args):
    """builder(*args); a failure becomes one SearchSpaceError naming the op."""
    try:
        return builder(*args)
    except SearchSpaceError:
        raise
    except Exception as e:
        raise SearchSpaceError(f'operation {op!r} ({where}) failed to build: {type(e).__name__}: {e}') from e


def _search_edge(ps, name, op, src, c, stride):
    """One edge's op on the search network's generic path (non-affine BNs)."""
    spec = lookup(op)
    y = _checked(_build(op, 'edge builder', spec.edge, ps, name, src, c, stride, False), op, c, stride, src.h,
                 'edge builder')
    return batch_norm(ps, name + '.bn', y, affine=False) if spec.search_bn else y


def _node_block(ps, name, h, mix, c, stride, space):
    """sum_o w_o * o(h) [+ a * skip(h), DARTS-] for every edge leaving h: [N, n * C, H', W'],
    edge t in channels [t * C, (t + 1) * C), n = the number of edges leaving h."""
    n = mix['n']
    src = Source(h, n)
    shared, terms = [], []
    for op in space.ops:
        spec = lookup(op)
        if spec.zero:
            continue
        if _shared(op, stride, space):
            shared.append(_search_edge(ps, f'{name}.{op}', op, src, c, stride))
        elif space.fast and spec.wide is not None:
            y = _build(op, 'wide builder', spec.wide, ps, f'{name}.{op}', src, c, stride, n,
                       (mix['gamma'][op], mix['beta'][op]))
            terms.append(_checked(y, op, n * c, stride, h, 'wide builder'))
        else:  # generic: each edge's op, the n outputs side by side, times the edges' weights
            outs = [_search_edge(ps, f'{name}.e{t}.{op}', op, src, c, stride) for t in range(n)]
            y = paddle.concat(outs, axis=1) if n > 1 else outs[0]
            terms.append(y * paddle.reshape(mix['gamma'][op], [1, n * c, 1, 1]))
    if shared:
        hh, ww = shared[0].shape[2], shared[0].shape[3]
        # [n, k] @ [N, k, C*H*W] -> [N, n, C*H*W]: every target's mix of the shared terms at once
        mixed = paddle.matmul(mix['shared'][stride], paddle.reshape(paddle.stack(shared, axis=1),
                                                                    [-1, len(shared), c * hh * ww]))
        terms.append(paddle.reshape(mixed, [-1, n * c, hh, ww]))
    if mix['aux'] is not None:  # DARTS-: identity (a non-affine factorized reduce at stride 2) per edge
        aux = paddle.tile(h, [1, n, 1, 1]) if stride == 1 else factorized_reduce(
            ps, f'{name}.aux_skip', src.relu, c, False, copies=n)
        terms.append(aux * mix['aux'])
    return sum_all(terms)


def search_cell(ps, name, s0, s1, mix, c, reduction, reduction_prev, space=DEFAULT_SPACE):
    if reduction_prev:
        s0 = factorized_reduce(ps, name + '.pre0', F.relu(s0), c, affine=False)
    else:
        s0 = relu_conv_bn(ps, name + '.pre0', s0, c, 1, 1, 0, affine=False)
    s1 = relu_conv_bn(ps, name + '.pre1', s1, c, 1, 1, 0, affine=False)
    nodes, k = space.nodes, space.partial_channels
    c_op = c // k
    states, mixed, rests = [s0, s1], [[] for _ in range(nodes)], []

    def node(i):
        m = sum_all(mixed[i])
        if k == 1:
            return m
        # the bypassed channels of node i's edges, [N, 1, (K-1) C/K H W] each: weighted by softmax(beta_i)
        if mix['bypass'] is None:
            b = sum_all(rests[:i + 2])
        else:
            b = paddle.matmul(mix['bypass'][i], paddle.concat(rests[:i + 2], axis=1))
        # shuffle(concat(m, b)) with K groups: m is group 0, b groups 1..K-1
        hh, ww = m.shape[2], m.shape[3]
        groups = paddle.concat([paddle.reshape(m, [-1, 1, c_op, hh, ww]),
                                paddle.reshape(b, [-1, k - 1, c_op, hh, ww])], axis=1)
        return paddle.reshape(paddle.transpose(groups, [0, 2, 1, 3, 4]), [-1, c, hh, ww])
    for j in range(nodes + 1):
        if j >= 2:  # node j - 2 has all its inputs now
            states.append(node(j - 2))
        stride = 2 if reduction and j < 2 else 1
        h, out = states[j], targets(j, nodes)
        if k > 1:  # the first C/K channels go through the mixed ops, the rest bypass them
            h, rest = paddle.split(h, [c_op, c - c_op], axis=1)
            if stride == 2:
                rest = F.max_pool2d(rest, 2, 2, ceil_mode=True)
            rests.append(paddle.reshape(rest, [-1, 1, (c - c_op) * rest.shape[2] * rest.shape[3]]))
        block = _node_block(ps, f'{name}.n{j}', h, mix['sources'][j], c_op, stride, space)
        for i, part in zip(out, paddle.split(block, len(out), axis=1) if len(out) > 1 else [block]):
            mixed[i].append(part)
    states.append(node(nodes - 1))
    return paddle.concat(states[2:], axis=1)


def search_network(ps, x, arch, c=16, num_classes=10, layers=8, space=DEFAULT_SPACE):
    """logits = classifier(GAP(cells(stem(x)))), every mixed edge weighted by softmax(alpha).

    arch: {name: tensor} with the names of space.arch_shapes().
    x: [N, 1 or 3, S, S], any S >= 16 (operations.stem downsamples from 64 px up)."""
    weights, mixes = {}, {}  # per cell type, and per (cell type, width): built once per network

    def mix(reduction, width):
        if reduction not in weights:
            weights[reduction] = cell_weights(arch, space, reduction)
        if (reduction, width) not in mixes:
            mixes[reduction, width] = mixture_weights(weights[reduction], width // space.partial_channels)
        return mixes[reduction, width]
    # The official search stem's BN is affine (torch default); the cells' BNs are not.
    s = stem(ps, x, STEM_MULTIPLIER * c, affine=True)
    s0 = s1 = s
    c_curr, reduction_prev = c, False
    for k in range(layers):
        reduction = k in reduction_layers(layers)
        if reduction:
            c_curr *= 2
        out = search_cell(ps, f'cell{k}', s0, s1, mix(reduction, c_curr), c_curr, reduction, reduction_prev, space)
        s0, s1, reduction_prev = s1, out, reduction
    pooled = paddle.flatten(F.adaptive_avg_pool2d(s1, 1), 1)
    return linear(ps, 'classifier', pooled, num_classes)


def cross_entropy(logits, labels):
    """mean_n -log softmax(logits_n)[y_n]."""
    return F.cross_entropy(logits, labels)


def network_layout(c, num_classes, layers, image_size, in_channels=3, space=DEFAULT_SPACE):
    """The search network's weights and buffers (names, shapes, inits), in build order."""

    def build(ps):
        x = paddle.zeros([1, in_channels, image_size, image_size])
        arch = {name: paddle.zeros(shape) for name, shape in space.arch_shapes().items()}
        search_network(ps, x, arch, c, num_classes, layers, space)
    return Layout.record(build)


def normalized_betas_numpy(beta, nodes):
    """normalized_betas for a numpy array."""
    beta = np.asarray(beta, np.float64)
    bounds = np.cumsum([0] + [i + 2 for i in range(nodes)])
    return np.concatenate([softmax(beta[a:b]) for a, b in zip(bounds[:-1], bounds[1:])])


def edge_weights_numpy(arch, space, kind):
    """W[e, o] of edge_weights, from numpy arrays: what derivation ranks."""
    w = softmax(arch['alpha_' + kind])
    if space.edge_normalization:
        w = w * normalized_betas_numpy(arch['beta_' + kind], space.nodes)[:, None]
    return w


def derive_genotype(arch, space=DEFAULT_SPACE):
    """The discrete cells of architecture parameters arch ({name: array}): per node the 2
    edges with the largest non-`none` W[e, o] (W with PC-DARTS' betas multiplied in), on
    each the op with the largest W."""
    w = [edge_weights_numpy(arch, space, kind) for kind in ('normal', 'reduce')]
    return genotypes.derive(*w, steps=space.nodes, multiplier=space.nodes, ops=space.ops)
