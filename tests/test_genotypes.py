import json

import numpy as np
import pytest

import genotypes
from genotypes import PRIMITIVES, derive, derive_cell, num_edges


def test_named_genotypes_are_valid_and_listed():
    for name in ('DARTS_V1', 'DARTS_V2', 'DARTS_PADDLE'):
        g = genotypes.by_name(name)
        genotypes.validate(g)
        assert len(g.normal) == len(g.reduce) == 8
    with pytest.raises(genotypes.GenotypeError, match='DARTS_V1.*DARTS_V2.*DARTS_PADDLE'):
        genotypes.by_name('NOPE')


def _weights(entries):
    """Softmax-like rows: small noise, with given (edge, op) -> weight."""
    w = np.full((num_edges(), len(PRIMITIVES)), 0.01)
    for (e, op), v in entries.items():
        w[e, PRIMITIVES.index(op)] = v
    return w


def test_derive_keeps_two_strongest_edges_and_their_best_op():
    # node 0: edges 0, 1; node 1: edges 2, 3, 4; node 2: 5..8; node 3: 9..13
    w = _weights({(0, 'sep_conv_3x3'): 0.5, (1, 'max_pool_3x3'): 0.3,
                  (2, 'skip_connect'): 0.2, (3, 'dil_conv_5x5'): 0.6, (4, 'sep_conv_5x5'): 0.4,
                  (5, 'avg_pool_3x3'): 0.1, (7, 'sep_conv_3x3'): 0.7, (8, 'dil_conv_3x3'): 0.3,
                  (13, 'sep_conv_3x3'): 0.9, (11, 'skip_connect'): 0.8})
    gene = derive_cell(w)
    assert gene == [('sep_conv_3x3', 0), ('max_pool_3x3', 1),
                    ('dil_conv_5x5', 1), ('sep_conv_5x5', 2),
                    ('sep_conv_3x3', 2), ('dil_conv_3x3', 3),
                    ('sep_conv_3x3', 4), ('skip_connect', 2)]


def test_derive_ignores_none_even_when_it_dominates():
    # `none` has the largest weight everywhere; it must neither pick edges nor be kept.
    w = _weights({(e, 'none'): 0.9 for e in range(num_edges())})
    w[1, PRIMITIVES.index('sep_conv_5x5')] = 0.05   # node 0: edge 1 beats edge 0 on non-none ops
    w[0, PRIMITIVES.index('avg_pool_3x3')] = 0.04
    gene = derive_cell(w)
    assert all(op != 'none' for op, _ in gene)
    assert gene[:2] == [('sep_conv_5x5', 1), ('avg_pool_3x3', 0)]


def test_derive_ties_go_to_lower_edge_and_earlier_op():
    w = np.full((num_edges(), len(PRIMITIVES)), 0.125)  # all equal
    gene = derive_cell(w)
    # every node: edges 0 and 1, op = first non-none primitive
    assert gene == [('max_pool_3x3', 0), ('max_pool_3x3', 1)] * 4


def test_json_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    g = derive(rng.random((14, 8)), rng.random((14, 8)))
    path = str(tmp_path / 'g.json')
    genotypes.save(g, path)
    assert genotypes.load(path) == g
    assert genotypes.load(path).normal_concat == [2, 3, 4, 5]
    assert isinstance(genotypes.load(path).normal[0], tuple)


@pytest.mark.parametrize('mutate, message', [
    (lambda d: d['normal'].__setitem__(0, ['conv_7x7', 0]), 'unknown op'),
    (lambda d: d['reduce'].__setitem__(2, ['skip_connect', 3]), 'node 1 can take inputs 0..2'),
    (lambda d: d.pop('reduce_concat'), 'missing reduce_concat'),
    (lambda d: d['normal'].pop(), 'two .op, input. pairs'),
])
def test_invalid_genotype_files_say_what_is_wrong(tmp_path, mutate, message):
    d = json.loads(genotypes.to_json(genotypes.DARTS_V2))
    mutate(d)
    path = tmp_path / 'bad.json'
    path.write_text(json.dumps(d))
    with pytest.raises(genotypes.GenotypeError, match=message):
        genotypes.load(str(path))


def test_not_json(tmp_path):
    path = tmp_path / 'x.json'
    path.write_text('{not json')
    with pytest.raises(genotypes.GenotypeError, match='not JSON'):
        genotypes.load(str(path))


def test_random_genotypes_are_valid_cells_of_the_space_and_reproducible():
    import numpy as np
    for nodes in (3, 4, 5):
        for ops in (genotypes.PRIMITIVES, ['sep_conv_3x3', 'max_pool_3x3', 'skip_connect']):
            seen = set()
            for k in range(30):
                g = genotypes.random_genotype(np.random.default_rng([1, k]), ops, nodes)
                genotypes.validate(g)
                assert g == genotypes.random_genotype(np.random.default_rng([1, k]), ops, nodes)
                for cell in (g.normal, g.reduce):
                    assert len(cell) == 2 * nodes
                    for i in range(nodes):
                        (_, j1), (_, j2) = cell[2 * i], cell[2 * i + 1]
                        assert j1 != j2 and 0 <= j1 < i + 2 and 0 <= j2 < i + 2
                    seen.update(op for op, _ in cell)
                assert list(g.normal_concat) == list(g.reduce_concat) == list(range(2, 2 + nodes))
            assert seen == set(ops) - {'none'}   # every op but none is drawn, none never
    draws = [genotypes.random_genotype(np.random.default_rng([2, k])) for k in range(3)]
    assert draws[0] != draws[1] != draws[2]


def test_name_file_and_printed_text_resolve_to_the_same_genotype(tmp_path):
    printed = str(genotypes.DARTS_V2)
    path = str(tmp_path / 'g.json')
    genotypes.save(genotypes.DARTS_V2, path)
    specs = ['DARTS_V2', path, printed, 'genotype = ' + printed,
             # the original DARTS prints range(2, 6); a copied log line may wrap and carry spaces
             '  ' + printed.replace('[2, 3, 4, 5]', 'range(2, 6)').replace(', (', ',\n    (') + '\n',
             printed.replace('Genotype(normal=', 'Genotype(\n  normal =  ')]
    for spec in specs:
        g = genotypes.resolve(spec)
        assert g == genotypes.DARTS_V2, spec
        assert isinstance(g.normal_concat, list) and isinstance(g.normal[0], tuple)
        assert genotypes.from_dict(genotypes.to_dict(g)) == g   # what a run records reads back the same
    assert genotypes.describe_source('DARTS_V2') == 'named genotype DARTS_V2'
    assert genotypes.describe_source(path).startswith('genotype file ')
    assert genotypes.describe_source(printed) == 'genotype text'
    positional = genotypes.resolve(f'Genotype({genotypes.DARTS_V1.normal}, [2, 3, 4, 5], '
                                   f'{tuple(genotypes.DARTS_V1.reduce)}, (2, 3, 4, 5))')
    assert positional == genotypes.DARTS_V1


REST = "normal_concat=[2, 3, 4, 5], reduce=[('skip_connect', 0)] , reduce_concat=[2])"


@pytest.mark.parametrize('text, refused', [
    ("Genotype(normal=__import__('os').system('touch {marker}'), " + REST, 'refused a call'),
    ("genotype = Genotype(normal=[(str(open('{marker}', 'w')), 0)], " + REST, 'refused a call'),
    ("Genotype(normal=os.system, " + REST, 'refused an attribute access'),
    ("Genotype(normal=DARTS_V2.normal, " + REST, 'refused an attribute access'),
    ("Genotype(normal=normal, " + REST, 'refused a name'),
    ("Genotype(normal=[(op, 0) for op in ['sep_conv_3x3'] * 8], " + REST, 'refused a comprehension'),
    ("Genotype(normal=(lambda: [])(), " + REST, 'refused a call'),
    ("Genotype(normal=[('sep_conv_3x3', 0)][0:8], " + REST, 'refused a subscript'),
    ("Genotype(normal=[('sep_conv_3x3', 0)] * 8, " + REST, 'refused an operator'),
    ("Genotype(normal=[], normal_concat=range(0, 10000000000), reduce=[], reduce_concat=[])", 'longer than'),
    ("__import__('os').system('touch {marker}')", 'unknown genotype'),   # not one of the forms at all
    ("Genotype(normal=[], **{{'reduce': []}})", r'refused a \*\* argument'),
    ("Genotype(normal=[], cells=[])", 'refused the argument cells='),
])
def test_genotype_text_is_parsed_never_evaluated(tmp_path, text, refused):
    marker = tmp_path / 'MARKER'
    spec = text.format(marker=marker)
    with pytest.raises(genotypes.GenotypeError, match=refused) as err:
        genotypes.resolve(spec)
    assert len(str(err.value).splitlines()) == 1, str(err.value)
    assert not marker.exists()
    if not spec.startswith('__'):
        return
    with pytest.raises(genotypes.GenotypeError, match='refused a call.*where the Genotype') as err:
        genotypes.parse_text(spec)      # given as text anyway: refused, not run
    assert len(str(err.value).splitlines()) == 1 and not marker.exists()


def test_genotype_text_that_is_malformed_or_outside_the_space_is_one_line():
    printed = str(genotypes.DARTS_V2)
    for text, message in [(printed[:-1], r'not a Genotype\(\.\.\.\) expression: .*never closed'),
                          (printed.replace("'skip_connect', 0", "'skip_connect', 4", 1),
                           r'normal\[5\]: node 2 can take inputs 0..3, got 4'),
                          (printed.replace("'skip_connect'", "'conv_9x9'", 1), 'unknown op'),
                          (printed.split(', reduce=')[0] + ')', 'missing reduce, reduce_concat')]:
        with pytest.raises(genotypes.GenotypeError, match=message) as err:
            genotypes.parse_text(text)
        assert len(str(err.value).splitlines()) == 1 and str(err.value).startswith('genotype text')


def test_an_unknown_spec_names_the_three_forms(tmp_path):
    for spec in ('RESNET', str(tmp_path / 'missing.json'), ''):
        with pytest.raises(genotypes.GenotypeError) as err:
            genotypes.resolve(spec)
        message = str(err.value)
        assert len(message.splitlines()) == 1
        assert 'DARTS_V1, DARTS_V2, DARTS_PADDLE' in message and 'JSON file' in message and 'Genotype(' in message
    with pytest.raises(genotypes.GenotypeError, match='not JSON'):     # an existing file is read as one
        (tmp_path / 'g.txt').write_text('Genotype')
        genotypes.resolve(str(tmp_path / 'g.txt'))


def test_the_pytorch_codes_printed_genotypes_are_read_as_they_are_printed():
    """quark0/darts prints flat pairs after 'genotype = '; pt.darts one list per node, after
    'Best Genotype = ' on a timestamped log line: both read as the same cell."""
    g = genotypes.DARTS_V2
    nested = lambda pairs: '[' + ', '.join(f'[{pairs[i]!r}, {pairs[i + 1]!r}]' for i in range(0, len(pairs), 2)) + ']'  # noqa: E731
    pt_darts = (f"12/06 09:41:02 PM Best Genotype = Genotype(normal={nested(g.normal)}, normal_concat=range(2, 6), "
                f"reduce={nested(g.reduce)}, reduce_concat=range(2, 6))")
    assert genotypes.resolve(pt_darts) == genotypes.resolve('genotype = ' + str(g)) == g
