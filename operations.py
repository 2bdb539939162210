"""DARTS primitives as graph-building functions over an explicit parameter set.

Every function takes a ParamSet `ps` and a name, and reads its weights with
`ps.weight(name, shape, init)`.  The same builder called with ParamSets over other
tensors gives the same network at w, w', w+ or w-, without copying a model or
swapping weights in place.

Weights live in one flat vector per ParamSet (`Layout` says where each tensor sits), so
the optimiser and the architect's w' / w+- arithmetic are a few ops on whole vectors.
The flat vector is ordered by *trailing shape* (shape[1:]): tensors that differ only in
their first dimension sit side by side, and each such group becomes its tensors by one
reshape and one split along axis 0, so the whole weight set costs a few dozen ops, not
a reshape per tensor.  (Paddle 3.3's PIR interpreter spends time and memory quadratic
in a program's op count when it prepares the program, so every op saved matters.)

Functions whose first conv is preceded by a ReLU take the *already rectified* input
(`x_relu`), so a cell can compute ReLU(h_j) once per node.

The candidate operations are registered once, by name, in OPS (`register`, see Op): a
per-edge builder that the evaluation network (model.py) and the search network's
generic path use, and optionally a wide builder for the search network's fast path.
"""
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import paddle
import paddle.nn.functional as F

from darts import kernels

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9  # running = 0.9 * running + 0.1 * batch, as torch's momentum=0.1


def in_static_mode():
    return not paddle.in_dynamic_mode()


def declare(name, shape, trainable=False):
    """This program's handle on the persistable tensor `name` (it lives in the scope).

    Values are set on the host (see Layout.initial_values), so the initialiser written
    to the throw-away startup program is never run.
    """
    return paddle.static.create_parameter(
        list(shape), 'float32', attr=paddle.ParamAttr(name=name, trainable=trainable),
        default_initializer=paddle.nn.initializer.Constant(0.0))


class Layout:
    """Names, shapes and initialisers of a network's weights and BN buffers, in build order.

    Recorded once by running the builder on placeholders (`Layout.record`).
    init specs: ('uniform', bound) or ('constant', value).
    """

    def __init__(self):
        self.names, self.shapes, self.inits = [], [], []
        self.buffers = {}  # name -> (shape, value)

    @property
    def sizes(self):
        return [int(np.prod(s)) for s in self.shapes]

    @property
    def size(self):
        return sum(self.sizes)

    @classmethod
    def record(cls, build, program=None):
        """Run build(ps) in a throw-away program (or `program`, to read the built ops after) with a
        recording ParamSet, then order the tensors by group (first appearance), build order within a group."""
        layout = cls()
        with paddle.static.program_guard(program or paddle.static.Program(), paddle.static.Program()):
            build(_Recorder(layout))
        keys = list(dict.fromkeys(group_key(s) for s in layout.shapes))
        order = sorted(range(len(layout.names)), key=lambda i: keys.index(group_key(layout.shapes[i])))
        layout.names, layout.shapes, layout.inits = ([lst[i] for i in order]
                                                     for lst in (layout.names, layout.shapes, layout.inits))
        return layout

    def groups(self):
        """[(trailing shape, [tensor indices])] in flat order; each group is contiguous."""
        out = []
        for i, shape in enumerate(self.shapes):
            if out and out[-1][0] == group_key(shape):
                out[-1][1].append(i)
            else:
                out.append((group_key(shape), [i]))
        return out

    def initial_weights(self, rng):
        """The flat initial weight vector: U(-b, b) or a constant per tensor."""
        parts = []
        for shape, (kind, arg) in zip(self.shapes, self.inits):
            n = int(np.prod(shape))
            parts.append(rng.uniform(-arg, arg, n) if kind == 'uniform' else np.full(n, arg))
        return np.concatenate(parts).astype('float32')

    def initial_buffers(self, prefix=''):
        """BN running statistics at their starting values (mean 0, var 1), named prefix + name."""
        return {prefix + name: np.full(shape, value, 'float32') for name, (shape, value) in self.buffers.items()}

    def unflatten(self, flat):
        """{name: array} from a flat vector."""
        out, off = {}, 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes):
            out[name] = flat[off:off + size].reshape(shape)
            off += size
        return out


class ParamSet:
    """The tensors a graph builder reads: pieces of one flat weight vector, and BN buffers.

    bn_stats says what batch norm does with its statistics:
      'update'  - normalise with batch statistics, update running mean/var in place
      'running' - normalise with running statistics (evaluation)
    Running statistics are persistable tensors named buffer_prefix + name.  A pass
    whose statistics must not touch the model's gets its own prefix.
    In dygraph (tests) `buffers` is a dict that receives fresh tensors.
    """

    def __init__(self, layout, flat, bn_stats='update', buffer_prefix=''):
        assert bn_stats in ('update', 'running')
        self.layout, self.bn_stats, self.buffer_prefix = layout, bn_stats, buffer_prefix
        self.pieces = {}
        groups = layout.groups()
        tensor_sizes = layout.sizes  # computed once: it is a list comprehension over every tensor
        sizes = [sum(tensor_sizes[i] for i in members) for _, members in groups]
        chunks = paddle.split(flat, sizes) if len(groups) > 1 else [flat]
        for (trailing, members), chunk in zip(groups, chunks):
            # [sum of first dims, *trailing] -> one tensor per member along axis 0
            leading = [layout.shapes[i][0] for i in members]
            stacked = paddle.reshape(chunk, [sum(leading)] + list(trailing)) if trailing else chunk
            parts = paddle.split(stacked, leading, axis=0) if len(members) > 1 else [stacked]
            self.pieces.update((layout.names[i], p) for i, p in zip(members, parts))
        self.buffers, self.constants = {}, {}
        self.dtype = flat.dtype

    def constant(self, n, value):
        """A length-n vector filled with value, built once per ParamSet."""
        if (n, value) not in self.constants:
            self.constants[n, value] = paddle.full([n], value, self.dtype)
        return self.constants[n, value]

    def weight(self, name, shape, init):
        w = self.pieces[name]
        assert list(w.shape) == list(shape), f'{name}: {w.shape} != {shape}'
        return w

    def buffer(self, name, shape, value):
        if name not in self.buffers:
            if in_static_mode():
                self.buffers[name] = declare(self.buffer_prefix + name, shape)
            else:
                self.buffers[name] = paddle.full(shape, value, self.dtype)
        return self.buffers[name]


class _Recorder:
    """A ParamSet that records each weight's name, shape and init, and returns placeholders."""

    bn_stats = 'running'

    def __init__(self, layout):
        self.layout = layout

    def weight(self, name, shape, init):
        assert name not in self.layout.names, f'weight {name} built twice'
        self.layout.names.append(name)
        self.layout.shapes.append(list(shape))
        self.layout.inits.append(init)
        return paddle.zeros(shape)

    def buffer(self, name, shape, value):
        self.layout.buffers.setdefault(name, (list(shape), value))
        return paddle.full(shape, value)

    def constant(self, n, value):
        return paddle.full([n], value, 'float32')


def group_key(shape):
    """Tensors with the same trailing shape share one reshape + split in a ParamSet."""
    return tuple(shape[1:])


def uniform_fan_in(fan_in):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): torch's default conv/linear init."""
    return ('uniform', 1.0 / math.sqrt(fan_in))


def batch_norm(ps, name, x, affine, mix=None):
    """y = (x - mean) / sqrt(var + eps) [* gamma + beta when affine].

    mix (non-affine only): (scale, zeros), a per-channel factor applied as the BN's gamma,
    y * scale, so a mixture weight costs no separate multiply.  The zero beta must be
    derived from scale (scale * 0): Paddle 3.3's batch_norm_grad fails when gamma needs
    a gradient and beta does not.
    """
    c = x.shape[1]
    if mix is not None:
        assert not affine
        gamma, beta = mix
    elif affine:
        gamma = ps.weight(name + '.gamma', [c], ('constant', 1.0))
        beta = ps.weight(name + '.beta', [c], ('constant', 0.0))
    else:  # constant 1 and 0 rather than None: oneDNN's batch norm crashes without them
        gamma, beta = ps.constant(c, 1.0), ps.constant(c, 0.0)
    mean = ps.buffer(name + '.running_mean', [c], 0.0)
    var = ps.buffer(name + '.running_var', [c], 1.0)
    return F.batch_norm(x, mean, var, gamma, beta, training=ps.bn_stats != 'running',
                        momentum=BN_MOMENTUM, epsilon=BN_EPSILON)


def sum_all(tensors):
    """sum_i t_i as a chain of adds.

    Not add_n: its backward copies the gradient once per input (a full + scale pair
    each).  Not stack + sum: the stack, its gradient and the sum's broadcast gradient
    each copy all k inputs (a 6-term sum of 16x32x32x32 tensors, forward + backward: 16-18
    ms with chained adds against 45-51 ms).  Same op count either way.  On a whole search
    step the difference is within this machine's noise (three back-to-back pairs, second
    order at batch 16, C=8, 5 cells: -15 %, -15 %, +1 %).
    """
    out = tensors[0]
    for t in tensors[1:]:
        out = out + t
    return out


def conv(ps, name, x, c_out, kernel, stride=1, padding=0, dilation=1, groups=1):
    """Conv2d without bias; weight [c_out, c_in / groups, k, k].  Depthwise convolutions
    (groups = c_in = c_out, k > 1) go to kernels.depthwise_conv, unpadded 1x1 ones to
    kernels.pointwise_conv."""
    c_in = x.shape[1]
    fan_in = c_in // groups * kernel * kernel
    w = ps.weight(name, [c_out, c_in // groups, kernel, kernel], uniform_fan_in(fan_in))
    if groups == c_in == c_out and kernel > 1 and isinstance(padding, int):
        return kernels.depthwise_conv(x, w, stride, padding, dilation)
    if kernel == 1 and padding == 0:
        return kernels.pointwise_conv(x, w, stride, groups)
    return F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation, groups=groups)


def linear(ps, name, x, c_out):
    """x @ W + b."""
    c_in = x.shape[1]
    w = ps.weight(name + '.weight', [c_in, c_out], uniform_fan_in(c_in))
    b = ps.weight(name + '.bias', [c_out], uniform_fan_in(c_in))
    return paddle.matmul(x, w) + b


def reduction_layers(layers):
    """The reduction cells' indices: at 1/3 and 2/3 depth (paper); 2 cells: normal, then reduction."""
    return (1,) if layers == 2 else (layers // 3, 2 * layers // 3)


CELL_INPUT_MAX = 32  # the largest feature map the cells get from a downsampling stem


def stem_reductions(image_size):
    """How many stride-2 convolutions the stem has: none below 64 px (the CIFAR stem, cells
    at the input size), otherwise the fewest that bring the cells' input to at most
    CELL_INPUT_MAX px (64 -> 32, 112 -> 28, 224 -> 28, as the ImageNet stems do)."""
    k = 0
    if image_size >= 64:
        while -(-image_size // 2 ** k) > CELL_INPUT_MAX:
            k += 1
    return k


def stem(ps, x, c_out, affine):
    """The network's stem for an input of any size and channel count.

    No reduction: BN(conv3x3(x)) to c_out (the CIFAR stem).  k >= 1 reductions:
    k stride-2 3x3 convs, each but the last to c_out / 2 and followed by BN + ReLU,
    the last to c_out + BN.  Each conv halves the size, rounding up.
    """
    k = stem_reductions(x.shape[2])
    if k == 0:
        return batch_norm(ps, 'stem.bn', conv(ps, 'stem.conv', x, c_out, 3, padding=1), affine)
    for i in range(k - 1):
        x = F.relu(batch_norm(ps, f'stem.bn{i}', conv(ps, f'stem.conv{i}', x, c_out // 2, 3, 2, 1), affine))
    return batch_norm(ps, f'stem.bn{k - 1}', conv(ps, f'stem.conv{k - 1}', x, c_out, 3, 2, 1), affine)


def relu_conv_bn(ps, name, x, c_out, kernel, stride, padding, affine):
    """BN(conv(ReLU(x))): the cell preprocess for s0/s1."""
    return batch_norm(ps, name + '.bn', conv(ps, name + '.conv', F.relu(x), c_out, kernel, stride, padding), affine)


def factorized_reduce(ps, name, x_relu, c_out, affine, copies=1, mix=None):
    """Halve H and W: BN(concat(conv1x1_s2(x), conv1x1_s2(x[:, :, 1:, 1:]))), x = ReLU(h).

    copies=n builds n independent reductions of the same input at once; the result
    is [N, n * c_out, H/2, W/2] with copy t in channels [t * c_out, (t + 1) * c_out).
    """
    half = c_out // 2
    a = conv(ps, name + '.conv1', x_relu, copies * half, 1, stride=2)
    shifted = x_relu[:, :, 1:, 1:]
    h, w = x_relu.shape[2], x_relu.shape[3]
    if h % 2 or w % 2:  # odd size: pad the shifted copy back to h x w so both halves give ceil(h / 2)
        shifted = F.pad(shifted, [0, w % 2, 0, h % 2])
    b = conv(ps, name + '.conv2', shifted, copies * (c_out - half), 1, stride=2)
    if copies > 1:  # interleave so each copy's two halves sit side by side
        h, w = a.shape[2], a.shape[3]
        a = paddle.reshape(a, [-1, copies, half, h, w])
        b = paddle.reshape(b, [-1, copies, c_out - half, h, w])
        y = paddle.reshape(paddle.concat([a, b], axis=2), [-1, copies * c_out, h, w])
    else:
        y = paddle.concat([a, b], axis=1)
    return batch_norm(ps, name + '.bn', y, affine, mix)


def sep_conv(ps, name, x_relu, c_out, kernel, stride, affine, copies=1, mix=None):
    """Separable conv twice: BN(pw(dw_k(ReLU(.)))), stride on the first depthwise only.

    With copies=n, x_relu holds n stacked inputs ([N, n * C, H, W]) and n independent
    sep convs run as grouped convolutions (depthwise per channel, pointwise per copy).
    """
    c_in = x_relu.shape[1]
    pad = kernel // 2
    y = conv(ps, name + '.dw1', x_relu, c_in, kernel, stride, pad, groups=c_in)
    y = batch_norm(ps, name + '.bn1', conv(ps, name + '.pw1', y, c_in, 1, groups=copies), affine)
    y = conv(ps, name + '.dw2', F.relu(y), c_in, kernel, 1, pad, groups=c_in)
    return batch_norm(ps, name + '.bn2', conv(ps, name + '.pw2', y, copies * c_out, 1, groups=copies), affine, mix)


def dil_conv(ps, name, x_relu, c_out, kernel, stride, affine, dilation=2, copies=1, mix=None):
    """BN(pw(dilated dw_k(ReLU(x)))), dilation 2; copies as in sep_conv."""
    c_in = x_relu.shape[1]
    pad = dilation * (kernel - 1) // 2
    y = conv(ps, name + '.dw', x_relu, c_in, kernel, stride, pad, dilation, groups=c_in)
    return batch_norm(ps, name + '.bn', conv(ps, name + '.pw', y, copies * c_out, 1, groups=copies), affine, mix)


def max_pool(x, stride):
    return F.max_pool2d(x, 3, stride, 1)


def avg_pool(x, stride):
    """3x3 average that does not count the zero padding (count_include_pad=False)."""
    return F.avg_pool2d(x, 3, stride, 1, exclusive=True)


class Source:
    """A node's output as the ops on its edges read it: h itself, ReLU(h) (computed once,
    on first use), and ReLU(h) tiled `copies` times along channels for the wide builders."""

    def __init__(self, h, copies=1):
        self.h, self.copies = h, copies
        self._relu = self._stacked = None

    @property
    def relu(self):
        if self._relu is None:
            self._relu = F.relu(self.h)
        return self._relu

    @property
    def stacked(self):
        if self._stacked is None:
            self._stacked = paddle.tile(self.relu, [1, self.copies, 1, 1]) if self.copies > 1 else self.relu
        return self._stacked


@dataclass(frozen=True)
class Op:
    """A candidate operation, registered once (`register`) and used by the search network,
    the evaluation network, genotype checks and derivation.

    edge(ps, name, src, c, stride, affine) -> [N, c, ceil(H / stride), ceil(W / stride)]
        the op on one edge from src (a Source with c channels).  model.py calls it with
        affine=True; the search network's generic path with affine=False.
    wide(ps, name, src, c, stride, copies, mix) -> [N, copies * c, H', W']   (optional)
        the fast path: the op on all `copies` edges leaving a node at once, edge t in
        channels [t * c, (t + 1) * c), each weight the per-edge weights (same names as
        edge() gives them) stacked along axis 0, every BN non-affine; its final BN takes
        mix = (gamma, beta), gamma = the edges' mixture weights per channel, so the result
        is already weighted.
    shared_strides: strides at which the op has no weights and gives the same output on
        every edge leaving a node: the search network computes it once per node and mixes
        it into all targets at once.
    search_bn: the search network follows the op with a non-affine BN (DARTS does this
        for the pools, which have none of their own).
    zero: the op is 0 (`none`): never computed, but its alpha stays in the softmax.
    parametric: has weights (False for pools, identity and none: the parameter-free ops).
    """
    name: str
    edge: Callable
    wide: Optional[Callable] = None
    shared_strides: tuple = ()
    search_bn: bool = False
    zero: bool = False
    parametric: bool = True


OPS = {}  # name -> Op: every operation a search space can list


def register(name, edge, **kw):
    """Add operation `name` to OPS (see Op for the builders and flags); returns the Op."""
    if name in OPS:
        raise ValueError(f'operation {name!r} is registered twice')
    OPS[name] = Op(name, edge, **kw)
    return OPS[name]


def lookup(name):
    """OPS[name]; the error lists the registered operations."""
    if name not in OPS:
        raise KeyError(f'unknown operation {name!r}; registered: {", ".join(OPS)}')
    return OPS[name]


def _zeros(ps, name, src, c, stride, affine):
    h = src.h
    return paddle.zeros_like(h[:, :, ::stride, ::stride] if stride > 1 else h)


def _skip(ps, name, src, c, stride, affine):
    return src.h if stride == 1 else factorized_reduce(ps, name, src.relu, c, affine)


def _skip_wide(ps, name, src, c, stride, copies, mix):
    return factorized_reduce(ps, name, src.relu, c, False, copies=copies, mix=mix)


def _sep(kernel):
    def edge(ps, name, src, c, stride, affine):
        return sep_conv(ps, name, src.relu, c, kernel, stride, affine)

    def wide(ps, name, src, c, stride, copies, mix):
        return sep_conv(ps, name, src.stacked, c, kernel, stride, False, copies, mix)
    return dict(edge=edge, wide=wide)


def _dil(kernel):
    def edge(ps, name, src, c, stride, affine):
        return dil_conv(ps, name, src.relu, c, kernel, stride, affine)

    def wide(ps, name, src, c, stride, copies, mix):
        return dil_conv(ps, name, src.stacked, c, kernel, stride, False, copies=copies, mix=mix)
    return dict(edge=edge, wide=wide)


def conv_bn_relu6(ps, name, x, c_out, kernel, stride, groups, affine):
    """ReLU6(BN(conv(x))), 'same' padding."""
    y = conv(ps, name + '.conv', x, c_out, kernel, stride, kernel // 2, groups=groups)
    return F.relu6(batch_norm(ps, name + '.bn', y, affine))


def mb_conv(ps, name, x, c_out, kernel, stride, affine, expansion=3):
    """MBConv (MobileNetV2 / EfficientNet block, as the pt.darts fork adds it):
    BN(pw(ReLU6(BN(dw_k(ReLU6(BN(pw_expand(x)))))))) + x when stride 1 and channels match."""
    c_in = x.shape[1]
    wide = expansion * c_in
    y = conv_bn_relu6(ps, name + '.expand', x, wide, 1, 1, 1, affine)
    y = conv_bn_relu6(ps, name + '.dw', y, wide, kernel, stride, wide, affine)
    y = batch_norm(ps, name + '.project.bn', conv(ps, name + '.project.conv', y, c_out, 1), affine)
    return y + x if stride == 1 and c_in == c_out else y


def fused_mb_conv(ps, name, x, c_out, kernel, stride, affine, expansion=3):
    """FusedMBConv (EfficientNetV2, as the pt.darts fork defines it): a kxk expansion conv to
    3C with groups = C_in and the edge's stride, BN, ReLU6; 1x1 projection, BN; + x when
    stride 1 and channels match."""
    c_in = x.shape[1]
    y = conv_bn_relu6(ps, name + '.expand', x, expansion * c_in, kernel, stride, c_in, affine)
    y = batch_norm(ps, name + '.project.bn', conv(ps, name + '.project.conv', y, c_out, 1), affine)
    return y + x if stride == 1 and c_in == c_out else y


def _mb(builder, kernel):
    def edge(ps, name, src, c, stride, affine):
        return builder(ps, name, src.h, c, kernel, stride, affine)
    return edge


# The paper's eight (genotypes.PRIMITIVES), each with its wide fast path where it has weights.
register('none', _zeros, zero=True, parametric=False)
register('max_pool_3x3', lambda ps, name, src, c, stride, affine: max_pool(src.h, stride),
         shared_strides=(1, 2), search_bn=True, parametric=False)
register('avg_pool_3x3', lambda ps, name, src, c, stride, affine: avg_pool(src.h, stride),
         shared_strides=(1, 2), search_bn=True, parametric=False)
register('skip_connect', _skip, wide=_skip_wide, shared_strides=(1,), parametric=False)
register('sep_conv_3x3', **_sep(3))
register('sep_conv_5x5', **_sep(5))
register('dil_conv_3x3', **_dil(3))
register('dil_conv_5x5', **_dil(5))
# Opt-in extras (--primitives): no wide builder, so the search runs them on the generic path.
register('mb_conv_3x3', _mb(mb_conv, 3))
register('mb_conv_5x5', _mb(mb_conv, 5))
register('fused_mb_conv_3x3', _mb(fused_mb_conv, 3))
