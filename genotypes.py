"""The DARTS search space's vocabulary, named genotypes, and genotype derivation.

A Genotype lists, for the normal and the reduction cell, two (op, input) pairs per
intermediate node.  Inputs 0 and 1 are the cell inputs c_{k-2} and c_{k-1}; input
2 + i is intermediate node i.
"""
import json
from collections import namedtuple

import numpy as np

from darts.errors import GenotypeError
from darts.files import atomic_write

Genotype = namedtuple('Genotype', 'normal normal_concat reduce reduce_concat')

PRIMITIVES = [
    'none',
    'max_pool_3x3',
    'avg_pool_3x3',
    'skip_connect',
    'sep_conv_3x3',
    'sep_conv_5x5',
    'dil_conv_3x3',
    'dil_conv_5x5',
]

STEPS = 4  # intermediate nodes per cell


def num_edges(steps=STEPS):
    """2 + 3 + ... + (steps + 1): node i has an edge from each of its i + 2 predecessors."""
    return sum(2 + i for i in range(steps))


# DARTS paper, first order (Liu et al. 2018, appendix / official genotypes.py).
DARTS_V1 = Genotype(
    normal=[('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 0), ('sep_conv_3x3', 1),
            ('skip_connect', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 2)],
    normal_concat=[2, 3, 4, 5],
    reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 0),
            ('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), ('avg_pool_3x3', 0)],
    reduce_concat=[2, 3, 4, 5])

# DARTS paper, second order: the cell behind the 2.76 % CIFAR-10 test error.
DARTS_V2 = Genotype(
    normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1),
            ('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)],
    normal_concat=[2, 3, 4, 5],
    reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1),
            ('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)],
    reduce_concat=[2, 3, 4, 5])

# Published from a second-order search run with PaddlePaddle (PaddleSlim's DARTS demo),
# reported there at 97.26 % CIFAR-10 and 74.12 % ImageNet top-1.  Not yet produced by
# this project's own search: replace once a full search here has been run and evaluated.
DARTS_PADDLE = Genotype(
    normal=[('dil_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1),
            ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 0), ('sep_conv_3x3', 1)],
    normal_concat=[2, 3, 4, 5],
    reduce=[('skip_connect', 1), ('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2),
            ('skip_connect', 2), ('dil_conv_5x5', 3), ('skip_connect', 2), ('max_pool_3x3', 1)],
    reduce_concat=[2, 3, 4, 5])

DARTS = DARTS_V2

NAMED = {'DARTS_V1': DARTS_V1, 'DARTS_V2': DARTS_V2, 'DARTS_PADDLE': DARTS_PADDLE, 'DARTS': DARTS}


def by_name(name):
    """The genotype called `name`; the error lists the names there are."""
    if name not in NAMED:
        raise GenotypeError(f'unknown genotype {name!r}; available: {", ".join(NAMED)}')
    return NAMED[name]


def _check_cell(kind, pairs, concat, ops):
    if not isinstance(pairs, (list, tuple)) or len(pairs) % 2 or not pairs:
        raise GenotypeError(f'{kind}: expected two (op, input) pairs per node, got {pairs!r}')
    steps = len(pairs) // 2
    for k, pair in enumerate(pairs):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise GenotypeError(f'{kind}[{k}]: expected an (op, input) pair, got {pair!r}')
        op, j = pair
        node = k // 2
        if not isinstance(op, str) or op == 'none' or op not in ops:
            raise GenotypeError(f'{kind}[{k}]: unknown op {op!r}; ops are {", ".join(o for o in ops if o != "none")}')
        if not isinstance(j, int) or isinstance(j, bool) or not 0 <= j < node + 2:
            raise GenotypeError(f'{kind}[{k}]: node {node} can take inputs 0..{node + 1}, got {j!r}')
    if (not isinstance(concat, (list, tuple)) or not concat
            or any(not isinstance(c, int) or not 0 <= c < steps + 2 for c in concat)):
        raise GenotypeError(f'{kind}_concat: expected node indices in 0..{steps + 1}, got {concat!r}')


class _AnyName:
    """Stands for the op registry where only a genotype's shape is checked (drawing it)."""

    def __contains__(self, op):
        return isinstance(op, str) and bool(op)

    def __iter__(self):
        return iter(['any op name'])


def validate(genotype, check_ops=True):
    """Raise GenotypeError unless every node has 2 ops on earlier nodes, each registered in
    operations.OPS (check_ops=False: any name, so drawing needs no Paddle import)."""
    if check_ops:
        from operations import OPS  # the registry (imports paddle)
    ops = OPS if check_ops else _AnyName()
    _check_cell('normal', genotype.normal, genotype.normal_concat, ops)
    _check_cell('reduce', genotype.reduce, genotype.reduce_concat, ops)
    if len(genotype.normal) != len(genotype.reduce):
        raise GenotypeError('normal and reduce cells must have the same number of nodes')
    return genotype


def random_genotype(rng, ops=PRIMITIVES, steps=STEPS):
    """A genotype drawn uniformly from the search space: per node of each cell, two distinct
    inputs among the nodes before it and an op for each from ops less the zero op `none`
    (which derivation never picks).  rng: a numpy Generator (seeded by the caller)."""
    choosable = [op for op in ops if op != 'none']
    if not choosable:
        raise GenotypeError('the op list has no op other than none to draw from')
    cells = []
    for _ in ('normal', 'reduce'):
        pairs = []
        for i in range(steps):
            for j in sorted(rng.choice(i + 2, 2, replace=False).tolist()):
                pairs.append((choosable[int(rng.integers(len(choosable)))], int(j)))
        cells.append(pairs)
    concat = list(range(2, 2 + steps))
    return Genotype(cells[0], concat, cells[1], list(concat))


def derive_cell(weights, steps=STEPS, ops=PRIMITIVES):
    """Discretise one cell from its edge weights W (num_edges x len(ops), column o = ops[o]).

    Node i keeps the 2 incoming edges whose strongest non-`none` op weighs most; each
    kept edge keeps that op.  Ties go to the lower edge index and the earlier op in
    ops (stable sort, first maximum).  Pairs are listed strongest edge first.  Without
    `none` in ops there is simply nothing to exclude.
    """
    weights = np.asarray(weights)
    ops = list(ops)
    assert weights.shape == (num_edges(steps), len(ops)), weights.shape
    masked = weights.astype(np.float64, copy=True)
    if 'none' in ops:
        masked[:, ops.index('none')] = -np.inf
    gene, start = [], 0
    for i in range(steps):
        rows = masked[start:start + i + 2]
        strength = rows.max(axis=1)
        edges = sorted(range(i + 2), key=lambda j: -strength[j])[:2]
        for j in edges:
            gene.append((ops[int(np.argmax(rows[j]))], j))
        start += i + 2
    return gene


def derive(normal_weights, reduce_weights, steps=STEPS, multiplier=4, ops=PRIMITIVES):
    concat = list(range(2 + steps - multiplier, steps + 2))
    return Genotype(derive_cell(normal_weights, steps, ops), concat, derive_cell(reduce_weights, steps, ops), concat)


def to_dict(genotype, space=None):
    """The genotype as JSON-ready lists; space (a dict: primitives, nodes, ...) is stored beside it."""
    d = {'normal': [list(p) for p in genotype.normal], 'normal_concat': list(genotype.normal_concat),
         'reduce': [list(p) for p in genotype.reduce], 'reduce_concat': list(genotype.reduce_concat)}
    if space:
        d['search_space'] = dict(space)
    return d


def to_json(genotype, space=None):
    return json.dumps(to_dict(genotype, space))


def from_dict(d, check_ops=True):
    if not isinstance(d, dict):
        raise GenotypeError(f'a genotype is a JSON object, got {type(d).__name__}')
    missing = [k for k in Genotype._fields if k not in d]
    if missing:
        raise GenotypeError(f'genotype is missing {", ".join(missing)}')

    def pairs(v):
        if not isinstance(v, list):
            raise GenotypeError(f'expected a list of (op, input) pairs, got {v!r}')
        return [tuple(p) if isinstance(p, list) else p for p in v]

    g = Genotype(pairs(d['normal']), d['normal_concat'], pairs(d['reduce']), d['reduce_concat'])
    return validate(g, check_ops)


def load(path, check_ops=True):
    """A genotype from a JSON file written by train_search.py (or `to_json`)."""
    try:
        with open(path) as f:
            d = json.load(f)
    except OSError as e:
        raise GenotypeError(f'cannot read genotype file {path}: {e.strerror}') from None
    except json.JSONDecodeError as e:
        raise GenotypeError(f'{path} is not JSON: {e}') from None
    try:
        return from_dict(d, check_ops)
    except GenotypeError as e:
        raise GenotypeError(f'{path}: {e}') from None


def save(genotype, path, space=None, costs=None):
    """Write the genotype JSON atomically (files.atomic_write); costs (a dict: the target
    network's params / madds, train_search.py --budget) is stored beside it."""
    d = to_dict(genotype, space)
    if costs:
        d['costs'] = costs
    atomic_write(path, lambda f: f.write(json.dumps(d) + '\n'))
