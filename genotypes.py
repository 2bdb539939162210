"""The DARTS search space's vocabulary, named genotypes, and genotype derivation.

A Genotype lists, for the normal and the reduction cell, two (op, input) pairs per
intermediate node.  Inputs 0 and 1 are the cell inputs c_{k-2} and c_{k-1}; input
2 + i is intermediate node i.
"""
import ast
import json
import os
import re
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


# ---------------------------------------------------------------- a genotype given on the command line

_TEXT_START = re.compile(r'Genotype\s*\(')
_LONGEST_RANGE = 64          # range(a, b) in a concat: a few node indices, never a huge list
_WHAT = {ast.Call: 'a call', ast.Attribute: 'an attribute access', ast.Name: 'a name', ast.Lambda: 'a lambda',
         ast.Subscript: 'a subscript', ast.Starred: 'a starred expression', ast.Dict: 'a dict', ast.Set: 'a set',
         ast.ListComp: 'a comprehension', ast.SetComp: 'a comprehension', ast.DictComp: 'a comprehension',
         ast.GeneratorExp: 'a comprehension', ast.BinOp: 'an operator', ast.UnaryOp: 'an operator',
         ast.BoolOp: 'an operator', ast.Compare: 'a comparison', ast.IfExp: 'a conditional expression',
         ast.JoinedStr: 'an f-string', ast.NamedExpr: 'an assignment expression', ast.Await: 'an await',
         ast.Yield: 'a yield', ast.YieldFrom: 'a yield'}
_ONLY = ('only Genotype(normal=[...], normal_concat=..., reduce=[...], reduce_concat=...) made of lists, tuples, '
         'strings, integers and range(a, b) is read')


def _kind(spec):
    """Which of the accepted forms spec is: 'name', 'text', 'file', or None."""
    if not isinstance(spec, str):
        return None
    if spec in NAMED:
        return 'name'
    s = spec.strip()
    if _TEXT_START.search(s) and not os.path.isfile(spec):
        return 'text'
    if os.path.isfile(spec):
        return 'file'
    return None


def _forms():
    return (f'give a genotype name ({", ".join(NAMED)}), a genotype JSON file, or the Genotype(...) text '
            f'the search log prints')


def _short(text, limit=60):
    """text on one line (whitespace runs as one space), cut to limit characters."""
    one = ' '.join(str(text).split())
    return one if len(one) <= limit else one[:limit - 3] + '...'


class _Refused(Exception):
    def __init__(self, what, node):
        super().__init__(what)
        self.what, self.node = what, node


def _value(node):
    """The literal a node of the genotype text stands for, built without evaluating anything:
    lists and tuples (both as lists), str and int constants, range(int, int) (as a list)."""
    if isinstance(node, ast.Constant):
        v = node.value
        if isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)):
            return v
        raise _Refused(f'the constant {v!r} (only strings and integers)', node)
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_value(e) for e in node.elts]
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == 'range'
            and not node.keywords and len(node.args) == 2
            and all(isinstance(a, ast.Constant) and type(a.value) is int for a in node.args)):
        lo, hi = node.args[0].value, node.args[1].value
        if hi - lo > _LONGEST_RANGE:
            raise _Refused(f'range({lo}, {hi}), longer than {_LONGEST_RANGE}', node)
        return list(range(lo, hi))
    what = _WHAT.get(type(node), f'a {type(node).__name__} expression')
    if isinstance(node, ast.Call):
        what = 'a call other than range(int, int)'
    raise _Refused(what, node)


def _genotype_fields(tree):
    """The four fields of the single Genotype(...) call that tree (an ast.Expression) must be."""
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == 'Genotype'):
        raise _Refused(f'{_WHAT.get(type(call), "an expression")} where the Genotype(...) call should be', call)
    if len(call.args) > len(Genotype._fields):
        raise _Refused(f'{len(call.args)} positional arguments (Genotype has {len(Genotype._fields)} fields)', call)
    fields = {}
    for name, arg in zip(Genotype._fields, call.args):
        fields[name] = _value(arg)
    for kw in call.keywords:
        if kw.arg is None:
            raise _Refused('a ** argument', kw.value)
        if kw.arg not in Genotype._fields:
            raise _Refused(f'the argument {kw.arg}= (Genotype has {", ".join(Genotype._fields)})', kw.value)
        if kw.arg in fields:
            raise _Refused(f'{kw.arg} given twice', kw.value)
        fields[kw.arg] = _value(kw.value)
    return fields


def parse_text(text, check_ops=True):
    """The genotype in text as the search log prints it, `Genotype(normal=[('sep_conv_3x3', 0), ...],
    normal_concat=range(2, 6), reduce=[...], reduce_concat=[2, 3, 4, 5])`, optionally after
    'genotype = ', 'Best Genotype = ' or a log line's time (from the first 'Genotype(' on; pt.darts' one
    list per node is flattened).  The text is parsed, never evaluated: only that one call, lists, tuples, strings,
    integers and range(a, b) are admitted; anything else is a one-line GenotypeError saying what was
    refused.  Then checked as `load` checks a file (concat lists are lists; check_ops as there)."""
    if not isinstance(text, str):
        raise GenotypeError(f'genotype text must be a string, got {type(text).__name__}')
    start = _TEXT_START.search(text)   # what a log line has before it ('genotype = ', 'Best Genotype = ', a time)
    source = text[start.start():].strip() if start else text.strip()
    try:
        tree = ast.parse(source, mode='eval')
    except (SyntaxError, ValueError) as e:     # ValueError: a null byte
        where = f' (line {e.lineno}, column {e.offset})' if isinstance(e, SyntaxError) and e.lineno else ''
        reason = _short(e.msg if isinstance(e, SyntaxError) else e, 80)
        raise GenotypeError(f'genotype text is not a Genotype(...) expression: {reason}{where}') from None
    try:
        fields = _genotype_fields(tree)
    except _Refused as r:
        segment = ast.get_source_segment(source, r.node) or ''
        at = f'`{_short(segment)}` at line {r.node.lineno}, column {r.node.col_offset + 1}'
        raise GenotypeError(f'genotype text: refused {r.what}, {at}; {_ONLY}') from None
    for cell in ('normal', 'reduce'):   # pt.darts prints a cell as one list of (op, input) pairs per node
        pairs = fields.get(cell)
        if isinstance(pairs, list) and pairs and all(isinstance(node, list) and node and
                                                     all(isinstance(p, list) for p in node) for node in pairs):
            fields[cell] = [p for node in pairs for p in node]
    try:
        return from_dict(fields, check_ops)
    except GenotypeError as e:
        raise GenotypeError(f'genotype text: {e}') from None


def resolve(spec, check_ops=True):
    """The genotype spec names: a name in NAMED, the Genotype(...) text the search log prints
    (parse_text; also after 'genotype = '), or a genotype JSON file (load).  Anything else is a
    one-line GenotypeError naming the three forms.  to_dict(resolve(spec)) records what it was."""
    kind = _kind(spec)
    if kind == 'name':
        return NAMED[spec]
    if kind == 'text':
        return parse_text(spec, check_ops)
    if kind == 'file':
        return load(spec, check_ops)
    shown = repr(_short(spec)) if isinstance(spec, str) else type(spec).__name__
    if isinstance(spec, str) and spec.strip().endswith('.json'):
        shown += ' (no such file)'
    raise GenotypeError(f'unknown genotype {shown}: {_forms()}')


def describe_source(spec):
    """Where resolve(spec) takes its genotype from, in a few words for a log or a record:
    'named genotype DARTS_V2', 'genotype file /abs/g.json', 'genotype text'."""
    kind = _kind(spec)
    if kind == 'name':
        return f'named genotype {spec}'
    if kind == 'file':
        return f'genotype file {os.path.abspath(spec)}'
    if kind == 'text':
        return 'genotype text'
    raise GenotypeError(f'unknown genotype {_short(spec)!r}: {_forms()}')
