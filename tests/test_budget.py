"""Search under a budget: the cost table against real counts, the expected cost and its penalty's
gradient against numpy, the fitting of a derived cell, and a budgeted search end to end."""
import json
import os

import numpy as np
import paddle
import pytest

from darts.search import budget
import genotypes
from conftest import assert_one_line_error, run_script, synthetic_penalty
from model_search import SearchSpace, edge_weights_numpy
from operations import declare

SMALL_CIFAR = budget.Target('cifar', 8, 5, 16, in_channels=1, num_classes=7)
SMALL_IMAGENET = budget.Target('imagenet', 8, 4, 64, in_channels=3, num_classes=5)
# the paper's ops and one without a wide builder (as a user-registered op would be)
SPACE = SearchSpace(ops=tuple(genotypes.PRIMITIVES) + ('mb_conv_3x3',))


@pytest.fixture(scope='module')
def tables():
    paddle.enable_static()
    return {t: budget.cost_table(t, SPACE) for t in (SMALL_CIFAR, SMALL_IMAGENET)}


def test_the_cost_table_gives_the_real_counts_of_random_genotypes(tables):
    rng = np.random.default_rng(0)
    for target, table in tables.items():
        for _ in range(4):
            g = genotypes.random_genotype(rng, SPACE.ops, SPACE.nodes)
            assert table.genotype_cost(g) == budget.network_cost(target, g), (target, g)
    # and at the paper's size, the published count of DARTS_V2
    paper = budget.cost_table(budget.Target.default(32, 3, 10), SearchSpace())
    assert paper.genotype_cost(genotypes.DARTS_V2)['params'] == 3349342


def test_cheapest_is_a_lower_bound_that_some_cell_reaches(tables):
    rng = np.random.default_rng(1)
    for table in tables.values():
        low = table.cheapest()
        for _ in range(20):
            cost = table.genotype_cost(genotypes.random_genotype(rng, SPACE.ops, SPACE.nodes))
            assert all(cost[k] >= low[k] for k in budget.KINDS)
        # fitting to the cheapest cost itself must reach it exactly
        g = genotypes.random_genotype(rng, SPACE.ops, SPACE.nodes)
        weights = {t: rng.random(table.cost['params'][t].shape) for t in ('normal', 'reduce')}
        fitted, fits = budget.fit(g, weights, table, {'params': low['params']})
        assert fits and table.genotype_cost(fitted)['params'] == low['params']


def test_fit_meets_the_budgets_with_valid_cells_and_leaves_a_fitting_cell_alone(tables):
    rng = np.random.default_rng(2)
    table = tables[SMALL_CIFAR]
    arch = {k: rng.standard_normal((14, len(SPACE.ops))) for k in ('alpha_normal', 'alpha_reduce')}
    weights = {t: edge_weights_numpy(arch, SPACE, t) for t in ('normal', 'reduce')}
    g = genotypes.derive(weights['normal'], weights['reduce'], ops=SPACE.ops)
    cost, low = table.genotype_cost(g), table.cheapest()
    budgets = {k: (cost[k] + low[k]) / 2 for k in budget.KINDS}
    fitted, fits = budget.fit(g, weights, table, budgets)
    assert fits and all(table.genotype_cost(fitted)[k] <= budgets[k] for k in budget.KINDS)
    genotypes.validate(fitted)
    for cell in (fitted.normal, fitted.reduce):
        assert 'none' not in [op for op, _ in cell]
        assert all(cell[2 * i][1] != cell[2 * i + 1][1] for i in range(len(cell) // 2))
    assert budget.fit(g, weights, table, {k: cost[k] for k in budget.KINDS}) == (g, True)


def test_fit_keeps_max_skip(tables):
    """Skips cost nothing: fitting a tight budget buys its savings with them unless --max_skip caps them."""
    rng = np.random.default_rng(4)
    table, skip = tables[SMALL_CIFAR], SPACE.ops.index('skip_connect')
    weights = {t: rng.random(table.cost['params'][t].shape) for t in ('normal', 'reduce')}
    weights['normal'][:, skip] += 0.5                         # the alphas favour skips ...
    g = genotypes.derive(weights['normal'] * (np.arange(len(SPACE.ops)) != skip), weights['reduce'], ops=SPACE.ops)
    skips = lambda genotype: sum(op == 'skip_connect' for op, _ in genotype.normal)  # noqa: E731
    assert skips(g) == 0                                      # ... but the derived cell has none
    low = table.cheapest()['params']
    free, fits = budget.fit(g, weights, table, {'params': low})
    assert fits and skips(free) > 2
    for cap in (0, 2):
        capped, fits = budget.fit(g, weights, table, {'params': low}, max_skip=cap)
        assert fits and skips(capped) == cap and table.genotype_cost(capped)['params'] == low


def penalty(space, budgets):
    return synthetic_penalty(space, budgets, dict(params=1000, madds=200), weight=0.7, seed=3)


def test_the_penalty_and_its_gradient_equal_numpy_and_finite_differences():
    """PC-DARTS' betas in the edge shares; the params budget exceeded, the madds one not (its
    hinge contributes nothing)."""
    space = SearchSpace(nodes=3, partial_channels=2, edge_normalization=True)
    pen = penalty(space, dict(params=1200.0, madds=1e6))
    rng = np.random.default_rng(4)
    arch = {n: rng.standard_normal(s) for n, s in space.arch_shapes().items()}
    paddle.enable_static()
    program = paddle.static.Program()
    with paddle.static.program_guard(program, paddle.static.Program()):
        values = {n: declare(n, s, trainable=True) for n, s in space.arch_shapes().items()}
        value = budget.penalty_value(pen, values)
        expected = budget.expected_cost_value(pen.table, values, 'params')
        grads = paddle.static.gradients(value, list(values.values()))
    scope, place = paddle.static.Scope(), paddle.CPUPlace()
    with paddle.static.scope_guard(scope):
        from darts import tensors
        tensors.set_tensors(scope, place, {n: a.astype('float32') for n, a in arch.items()})
        out = paddle.static.Executor(place).run(program, fetch_list=[value, expected] + grads)
    e = pen.table.expected(arch)
    assert e['params'] > 1200 and e['madds'] < 1e6
    np.testing.assert_allclose(float(out[1]), e['params'], rtol=1e-5)
    np.testing.assert_allclose(float(out[0]), budget.penalty_numpy(pen, arch), rtol=1e-5)
    h = 1e-5
    for (name, a), g in zip(arch.items(), out[2:]):
        fd = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            plus, minus = dict(arch), dict(arch)
            plus[name], minus[name] = a.copy(), a.copy()
            plus[name][idx] += h
            minus[name][idx] -= h
            fd[idx] = (budget.penalty_numpy(pen, plus) - budget.penalty_numpy(pen, minus)) / (2 * h)
        assert np.abs(fd).max() > 1e-3
        np.testing.assert_allclose(g, fd, rtol=1e-3, atol=1e-6)


def test_the_penalty_is_on_only_for_the_budgets_the_derived_cell_exceeds():
    pen = penalty(SearchSpace(), dict(params=1200.0, madds=1e6))
    assert budget.epoch_weights(pen, dict(params=1201, madds=10)) == [0.7, 0.0]
    assert budget.epoch_weights(pen, dict(params=1200, madds=2e6)) == [0.0, 0.7]
    arch = {n: np.random.default_rng(0).standard_normal(s) for n, s in SearchSpace().arch_shapes().items()}
    assert budget.penalty_numpy(pen, arch, [0.0, 0.0]) == 0 < budget.penalty_numpy(pen, arch, [0.7, 0.0])


def test_budgets_parse_and_bad_ones_are_errors():
    assert budget.parse(['params=3.3M', 'madds=600m']) == {'params': 3.3e6, 'madds': 6e8}
    assert budget.parse(['params=1.5e4']) == {'params': 1.5e4}
    for bad, phrase in (['flops=3M', 'KIND one of'], ['params=3X', 'not a number'], ['params', 'KIND=NUMBER'],
                        ['params=0', 'positive'], ['params=1M,madds', 'KIND=NUMBER']):   # params=1M,madds=2M is both
        with pytest.raises(budget.BudgetError, match=phrase):
            budget.parse([bad])
    with pytest.raises(budget.BudgetError, match='twice'):
        budget.parse(['params=1M', 'params=2M'])


TINY = ['--init_channels', '4', '--layers', '2', '--batch_size', '20', '--epochs', '1', '--num_workers', '0',
        '--seed', '5', '--no_download', '--report_freq', '5', '--image_size', '16',
        '--target_channels', '8', '--target_layers', '4']
# no parameter-free op, so every cell has a cost to cut
COSTLY = ['--primitives', 'none,sep_conv_3x3,sep_conv_5x5,dil_conv_5x5']


@pytest.mark.slow
def test_a_budgeted_search_derives_a_cell_whose_trained_network_fits(cifar_dir, tmp_path):
    plain = str(tmp_path / 'plain')
    r = run_script('train_search.py', '--data', cifar_dir, '--save', plain, *TINY, *COSTLY)
    assert r.returncode == 0, r.stderr
    paddle.enable_static()
    with open(os.path.join(plain, 'data.json')) as f:
        target = budget.Target('cifar', 8, 4, 16, 3, len(json.load(f)['classes']))
    plain_cost = budget.network_cost(target, genotypes.load(os.path.join(plain, 'genotype.json')))
    table = budget.cost_table(target, SearchSpace(ops=('none', 'sep_conv_3x3', 'sep_conv_5x5', 'dil_conv_5x5')))
    limit = (plain_cost['params'] + table.cheapest()['params']) // 2

    run = str(tmp_path / 'budgeted')
    r = run_script('train_search.py', '--data', cifar_dir, '--save', run, *TINY, *COSTLY,
                   '--budget', f'params={limit}')
    assert r.returncode == 0, r.stderr
    with open(os.path.join(run, 'genotype.json')) as f:
        saved = json.load(f)
    with open(os.path.join(run, 'genotype_unbudgeted.json')) as f:
        unbudgeted = json.load(f)
    assert plain_cost['params'] > limit
    # the argmax cell of the budgeted search (the penalty moved its alphas: not the plain one's), costed right
    assert unbudgeted['costs']['params'] == budget.network_cost(target, genotypes.from_dict(unbudgeted))['params']
    assert saved['costs']['params'] <= limit and saved['costs']['fits']
    with open(os.path.join(run, 'history.jsonl')) as f:
        record = json.loads(f.readline())
    assert record['budget']['cost'] == {k: saved['costs'][k] for k in budget.KINDS}
    assert record['budget']['expected']['params'] > 0 and record['budget']['penalty'] >= 0
    log = open(os.path.join(run, 'log.txt')).read()
    assert 'budget (params <= ' in log and 'fitted cell' in log

    # train.py at the target size: the network it builds has the parameters the search promised
    ev = str(tmp_path / 'eval')
    r = run_script('train.py', '--data', cifar_dir, '--save', ev, '--genotype_file', os.path.join(run, 'genotype.json'),
                   '--init_channels', '8', '--layers', '4', '--image_size', '16', '--epochs', '1',
                   '--batch_size', '20', '--num_workers', '0', '--no_download', '--cutout_length', '4')
    assert r.returncode == 0, r.stderr
    with open(os.path.join(ev, 'result.json')) as f:
        assert json.load(f)['parameters'] == saved['costs']['params']
    assert 'the search costed this genotype at' in open(os.path.join(ev, 'log.txt')).read()


@pytest.mark.slow
def test_bad_budget_input_is_one_line_and_makes_no_run_folder(cifar_dir, tmp_path):
    cases = [(['--budget', 'flops=1M'], ['KIND one of']),
             (['--budget', 'params=1.2.3'], ['not a number']),
             (['--budget', 'params=100'], ['cannot be met', 'cheapest cell']),
             (['--budget', 'params=1M', '--target_image_size', '8'], ['--target_image_size 8']),
             (['--budget', 'params=1M', '--target_channels', '0'], ['--target_channels must be at least 1'])]
    for k, (flags, phrases) in enumerate(cases):
        run = str(tmp_path / f'run{k}')
        r = run_script('train_search.py', '--data', cifar_dir, '--save', run, *TINY, *flags)
        assert_one_line_error(r, *phrases)   # the parser's errors and ours start alike
        assert not os.path.exists(run)


def test_one_budget_of_both_kinds_reads_alike_joined_or_repeated_and_a_negative_limit_is_named():
    from darts.search import budget
    assert budget.parse(['params=3.3M,madds=600M']) == budget.parse(['params=3.3M', 'madds=600M']) == \
        {'params': 3.3e6, 'madds': 6e8}
    with pytest.raises(budget.BudgetError, match='must be a positive number'):
        budget.parse(['params=-5K'])
