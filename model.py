"""Evaluation networks for a discrete genotype, as graph-building functions.

NetworkCIFAR: stem conv 3x3 -> 3C + BN (below 64 px; from 64 px up the downsampling stem
of operations.stem); `layers` cells, reductions at 1/3 and 2/3 depth; auxiliary head
after the second reduction; global average pool; linear.  Any input size >= 16, 1 or 3
channels.
NetworkImageNet: stem0 = two stride-2 3x3 convs (C/2 then C), stem1 = one more
stride-2 conv, so cells start at 28x28 from 224x224; auxiliary head; 7x7 average pool.

Every BN is affine; pools carry no BN.  Each cell applies its genotype's two ops per
node and concatenates the genotype's concat nodes.  Drop path (on every op but the
identity skip) takes the probability and its uniform draws as fed tensors (`DropPath`):
    x * [u >= p] / (1 - p),  u ~ U[0, 1) one per sample,
with u made on the host from (seed, epoch, step), so a run and its resumed copy drop the
same paths.
"""
import numpy as np
import paddle
import paddle.nn.functional as F

from darts import kernels
from operations import (Layout, ParamSet, Source, batch_norm, conv, declare, factorized_reduce, linear, lookup,
                        reduction_layers, relu_conv_bn, stem)

STEM_MULTIPLIER = 3


class DropPath:
    """Drop path for a training network: prob [1] and noise [sites, N] are fed each step;
    the k-th op the network drops reads row k and is multiplied by its per-sample factor

        f[k, n] = [u[k, n] >= p] / (1 - p)   (so exactly 1 at p = 0).

    The factors of every site are formed at once and unbound into one [N, 1, 1, 1] value
    per site: 4 ops for the network, not 4 per site, since a program's preparation time
    grows with the square of its op count.  noise needs a static row count (count the
    sites first with CountDropSites); `sites` counts the rows read once the network is built."""

    def __init__(self, prob, noise):
        factors = paddle.cast(noise >= prob, noise.dtype) / (1.0 - prob)
        self.factors = paddle.unbind(paddle.reshape(factors, [noise.shape[0], -1, 1, 1, 1]), axis=0)
        self.sites = 0

    def __call__(self, x):
        factor = self.factors[self.sites]
        self.sites += 1
        return x * factor


class CountDropSites:
    """Stands in for DropPath while a network's layout is recorded: counts the ops it drops."""

    def __init__(self):
        self.sites = 0

    def __call__(self, x):
        self.sites += 1
        return x


def drop_noise(seed, epoch, step, sites, batch):
    """The uniform draws DropPath reads at (seed, epoch, step): [max(sites, 1), batch] float32."""
    return np.random.default_rng([seed, epoch, step, 0xD709]).random((max(sites, 1), batch), dtype=np.float32)


def eval_cell(ps, name, genotype, s0, s1, c, reduction, reduction_prev, drop_prob=None):
    """One discrete cell; drop_prob: a DropPath, or None for evaluation (no drop path)."""
    pairs = genotype.reduce if reduction else genotype.normal
    concat = genotype.reduce_concat if reduction else genotype.normal_concat
    if reduction_prev:
        s0 = factorized_reduce(ps, name + '.pre0', F.relu(s0), c, affine=True)
    else:
        s0 = relu_conv_bn(ps, name + '.pre0', s0, c, 1, 1, 0, affine=True)
    s1 = relu_conv_bn(ps, name + '.pre1', s1, c, 1, 1, 0, affine=True)
    states = [Source(s0), Source(s1)]  # each computes ReLU(h_j) once, for the ops that read node j
    shared = {}  # (op, j, stride) -> h: a parameter-free op on one input is computed once
    for i in range(len(pairs) // 2):
        node = []
        for k in (2 * i, 2 * i + 1):
            op, j = pairs[k]
            stride = 2 if reduction and j < 2 else 1
            spec = lookup(op)
            h = shared.get((op, j, stride))
            if h is None:
                h = spec.edge(ps, f'{name}.op{k}', states[j], c, stride, affine=True)
                if stride in spec.shared_strides:
                    shared[op, j, stride] = h
            is_identity = h is states[j].h  # the official code's drop path skips only Identity
            if drop_prob is not None and not is_identity:
                h = drop_prob(h)
            node.append(h)
        states.append(Source(node[0] + node[1]))
    states = [s.h for s in states]
    return paddle.concat([states[j] for j in concat], axis=1)


def auxiliary_head(ps, name, x, num_classes, pool_stride):
    """ReLU, 5x5 avg pool, 1x1 conv 128 + BN + ReLU, 2x2 conv 768 + BN + ReLU, linear.

    The pool turns the 8x8 (CIFAR, stride 3) or 7x7 (ImageNet at 224, stride 2) map of
    the paper's inputs into 2x2; a map of any other size is pooled adaptively to 2x2.
    """
    if (x.shape[2] - 5) // pool_stride + 1 == 2:
        y = F.avg_pool2d(F.relu(x), 5, pool_stride, 0, exclusive=True)
    else:  # any other size: the same 2 x 2 output, pooled adaptively
        y = F.adaptive_avg_pool2d(F.relu(x), 2)
    y = F.relu(batch_norm(ps, name + '.bn1', conv(ps, name + '.conv1', y, 128, 1), affine=True))
    y = F.relu(batch_norm(ps, name + '.bn2', conv(ps, name + '.conv2', y, 768, 2), affine=True))
    return linear(ps, name + '.classifier', paddle.flatten(y, 1), num_classes)


def _cells(ps, genotype, s0, s1, c, layers, c_curr, reduction_prev, drop_prob, aux_fn):
    aux_logits = None
    for k in range(layers):
        reduction = k in reduction_layers(layers)
        if reduction:
            c_curr *= 2
        out = eval_cell(ps, f'cell{k}', genotype, s0, s1, c_curr, reduction, reduction_prev, drop_prob)
        s0, s1, reduction_prev = s1, out, reduction
        if k == 2 * layers // 3 and aux_fn is not None:
            aux_logits = aux_fn(s1)
    return s1, aux_logits


def network_cifar(ps, x, genotype, c=36, num_classes=10, layers=20, auxiliary=True, drop_prob=None):
    """(logits, auxiliary logits or None).  The auxiliary head is built only when asked for.

    x: [N, 1 or 3, S, S], any S >= 16; the CIFAR stem below 64 px, a downsampling stem
    from 64 px up (operations.stem)."""
    s = stem(ps, x, STEM_MULTIPLIER * c, affine=True)
    aux = (lambda h: auxiliary_head(ps, 'auxiliary', h, num_classes, 3)) if auxiliary else None
    out, aux_logits = _cells(ps, genotype, s, s, c, layers, c, False, drop_prob, aux)
    logits = linear(ps, 'classifier', paddle.flatten(F.adaptive_avg_pool2d(out, 1), 1), num_classes)
    return logits, aux_logits


def network_imagenet(ps, x, genotype, c=48, num_classes=1000, layers=14, auxiliary=True, drop_prob=None):
    """(logits, auxiliary logits or None) for 224x224 input."""
    y = F.relu(batch_norm(ps, 'stem0.bn1', conv(ps, 'stem0.conv1', x, c // 2, 3, 2, 1), affine=True))
    s0 = batch_norm(ps, 'stem0.bn2', conv(ps, 'stem0.conv2', y, c, 3, 2, 1), affine=True)
    s1 = batch_norm(ps, 'stem1.bn', conv(ps, 'stem1.conv', F.relu(s0), c, 3, 2, 1), affine=True)
    aux = (lambda h: auxiliary_head(ps, 'auxiliary', h, num_classes, 2)) if auxiliary else None
    out, aux_logits = _cells(ps, genotype, s0, s1, c, layers, c, True, drop_prob, aux)
    # global average: the paper's 7x7 pool at 224 input, and any input size otherwise
    logits = linear(ps, 'classifier', paddle.flatten(F.adaptive_avg_pool2d(out, 1), 1), num_classes)
    return logits, aux_logits


def layout_of(build, image_size, in_channels=3, **kw):
    """The Layout (weights, shapes) of network_cifar / network_imagenet at these settings."""
    def record(ps):
        build(ps, paddle.zeros([1, in_channels, image_size, image_size]), **kw)
    return Layout.record(record)


def count_parameters(layout, exclude_prefix='auxiliary'):
    """Trainable parameters, those whose name starts with exclude_prefix left out (as the paper counts)."""
    return sum(size for name, size in zip(layout.names, layout.sizes) if not name.startswith(exclude_prefix))


def count_multiply_adds(build, image_size, in_channels=3, **kw):
    """Multiply-adds of one image through the built network (no auxiliary head), as
    program_multiply_adds counts them."""
    layout = layout_of(build, image_size, in_channels, auxiliary=False, **kw)
    program = paddle.static.Program()
    # Paddle's conv ops, whose shapes are read below (not the compiled ones)
    with paddle.static.program_guard(program, paddle.static.Program()), kernels.paddle_kernels():
        x = paddle.static.data('x', [1, in_channels, image_size, image_size], 'float32')
        build(ParamSet(layout, declare('weights', [layout.size]), 'running'), x, auxiliary=False, **kw)
    return program_multiply_adds(program)


def program_multiply_adds(program):
    """Multiply-adds of a program built at batch 1 with Paddle's conv ops: a conv output element
    costs C_in/groups * k * k, a matmul column `in`.  BN, pooling, ReLU and additions are not
    counted (as in the official code's figure)."""
    total = 0
    for op in program.global_block().ops:
        name = op.name()
        if name in ('pd_op.conv2d', 'pd_op.depthwise_conv2d'):
            out, w = op.result(0).shape, op.operand_source(1).shape
            total += int(np.prod(out[1:])) * w[1] * w[2] * w[3]
        elif name == 'pd_op.matmul':
            a, b = op.operand_source(0).shape, op.operand_source(1).shape
            total += a[-1] * b[-1]
    return total
