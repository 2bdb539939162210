"""Collapse diagnostics and guards (guards.py): skip limit, early stop, auxiliary skip, beta decay,
the Hessian eigenvalue, and a search that uses them all."""
import json
import os

import numpy as np
import paddle
import pytest

import genotypes
from darts.search import guards
from conftest import run_script

OPS = list(genotypes.PRIMITIVES)   # none, max, avg, skip, sep3, sep5, dil3, dil5


def hand_made_normal_weights():
    """W [14, 8] whose plain derivation keeps four skips: edges 0 (.5), 1 (.4), 2 (.45), 5 (.4)."""
    w = np.full((14, 8), 0.01)
    w[:, 0] = 0.9                                   # none is never chosen
    col = {op: OPS.index(op) for op in OPS}
    w[0, col['skip_connect']], w[0, col['sep_conv_3x3']] = 0.5, 0.3
    w[1, col['skip_connect']], w[1, col['dil_conv_3x3']] = 0.4, 0.35
    w[2, col['skip_connect']], w[2, col['sep_conv_5x5']] = 0.45, 0.2
    w[3, col['sep_conv_3x3']] = 0.6
    w[4, col['max_pool_3x3']] = 0.3
    w[5, col['skip_connect']], w[5, col['avg_pool_3x3']] = 0.4, 0.38   # ties with edge 1's skip
    w[6, col['sep_conv_3x3']] = 0.5
    w[9, col['sep_conv_5x5']], w[10, col['dil_conv_5x5']] = 0.7, 0.6
    return w


def test_limit_skips_replaces_the_weakest_skips_by_the_next_best_choice():
    w = hand_made_normal_weights()
    raw, zeroed = guards.limit_skips(w, 4, 4, OPS)
    assert zeroed == [] and raw == genotypes.derive_cell(w, 4, OPS)
    assert sum(op == 'skip_connect' for op, _ in raw) == 4
    # max 2: edges 1 and 5 tie at .4, the later (5) goes first and avg_pool takes its place;
    # then edge 1 (.4 < .45 < .5) and dil_conv_3x3 takes its place
    gene, zeroed = guards.limit_skips(w, 2, 4, OPS)
    assert zeroed == [5, 1]
    assert gene == [('skip_connect', 0), ('dil_conv_3x3', 1),
                    ('sep_conv_3x3', 1), ('skip_connect', 0),
                    ('sep_conv_3x3', 1), ('avg_pool_3x3', 0),
                    ('sep_conv_5x5', 0), ('dil_conv_5x5', 1)]
    # max 1: edge 2 goes too; its sep_conv_5x5 (.2) now loses to edge 4's max_pool (.3)
    gene, zeroed = guards.limit_skips(w, 1, 4, OPS)
    assert zeroed == [5, 1, 2]
    assert gene[2:4] == [('sep_conv_3x3', 1), ('max_pool_3x3', 2)]
    gene, zeroed = guards.limit_skips(w, 0, 4, OPS)
    assert zeroed == [5, 1, 2, 0] and gene[:2] == [('dil_conv_3x3', 1), ('sep_conv_3x3', 0)]


def test_cell_counts_and_entropy():
    c = guards.cell_counts(genotypes.DARTS_V2)
    assert c == dict(normal_skips=2, normal_param_free=2, reduce_skips=3, reduce_param_free=8)
    assert guards.mean_entropy(np.zeros((14, 8))) == pytest.approx(np.log(8))
    a = np.array([[0.0, np.log(3.0)], [5.0, 5.0]])      # p = (1/4, 3/4) and (1/2, 1/2)
    expected = (-(0.25 * np.log(0.25) + 0.75 * np.log(0.75)) + np.log(2)) / 2
    assert guards.mean_entropy(a) == pytest.approx(expected)


def _record(epoch, skips, alpha, arch_updates=True):
    return dict(epoch=epoch, normal_skips=skips, alpha_normal=alpha, alpha_reduce=alpha, arch_updates=arch_updates)


def test_early_stop_rules():
    a, b = [[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]], [[0.1, 0.2, 0.3, 0.4, 0.8, 0.6, 0.7, 0.5]]
    rule = guards.EarlyStop('skip:2')
    assert rule.check([_record(1, 1, a)], OPS) is None
    stop = rule.check([_record(1, 1, a), _record(2, 2, a)], OPS)
    assert (stop['stopped_at'], stop['chosen_epoch']) == (2, 1)
    assert rule.check([_record(1, 3, a)], OPS)['chosen_epoch'] == 1       # nothing before the first epoch
    rule = guards.EarlyStop('stable:2')
    # ranks: epoch 1 a; 2 b; 3 b; 4 (warm-up rows do not count) ; 5 b -> stable for 2 epochs at 5
    h = [_record(1, 0, a), _record(2, 0, b), _record(3, 0, b)]
    assert rule.check(h, OPS) is None
    h.append(_record(4, 0, a, arch_updates=False))
    assert rule.check(h, OPS) is None
    h.append(_record(5, 0, b))
    assert rule.check(h, OPS)['chosen_epoch'] == 5
    # only the parametric ops' order counts: swapping two pools changes nothing
    assert guards.ranking([[0, 9, 8, 7, 1, 2, 3, 4]], OPS) == guards.ranking([[0, 8, 9, 7, 1, 2, 3, 4]], OPS)
    for bad in ('skip', 'skip:0', 'plateau:3', 'stable:x'):
        with pytest.raises(ValueError):
            guards.EarlyStop(bad)


def test_schedules():
    assert [guards.auxiliary_skip_coefficient(e, 4) for e in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert [guards.beta_decay_weight(50, e, 100) for e in (0, 1, 99)] == [0.0, 0.5, 49.5]


@pytest.fixture
def dygraph():
    paddle.disable_static()
    yield
    paddle.enable_static()


def test_auxiliary_skip_is_an_extra_identity_weight_outside_the_softmax(dygraph):
    """With ops (none, skip), an edge is p_skip * skip(h) + a * aux(h); with aux's weights those
    of the skip op (a factorized reduce on stride-2 edges), that is the network without the
    auxiliary skip whose skip weight is p_skip + a."""
    from model_search import SearchSpace, network_layout, search_network
    from operations import ParamSet
    a = 0.3
    plain = SearchSpace(ops=('none', 'skip_connect'), nodes=2)
    aux = SearchSpace(ops=('none', 'skip_connect'), nodes=2, auxiliary_skip=True)
    args = dict(c=4, num_classes=3, layers=2)
    plain_layout, aux_layout = (network_layout(4, 3, 2, 8, 3, s) for s in (plain, aux))
    assert len(aux_layout.names) > len(plain_layout.names)          # the reduction cell's factorized reduces
    rng = np.random.default_rng(0)
    plain_w = plain_layout.unflatten(plain_layout.initial_weights(rng))
    aux_w = {n: plain_w[n.replace('.aux_skip', '.skip_connect')] for n in aux_layout.names}
    flat = lambda layout, w: paddle.to_tensor(np.concatenate([w[n].reshape(-1) for n in layout.names]))  # noqa: E731
    alphas = {k: rng.uniform(-0.5, 0.5, (5, 2)).astype('float32') for k in ('alpha_normal', 'alpha_reduce')}
    p_skip = {k: 1 / (1 + np.exp(v[:, 0] - v[:, 1])) for k, v in alphas.items()}      # softmax(alpha)_skip
    shifted = {k: np.stack([np.zeros(5), np.log((p + a) / (1 - p - a))], 1).astype('float32')
               for k, p in p_skip.items()}                                             # softmax -> p + a
    x = paddle.to_tensor(rng.standard_normal((2, 3, 8, 8)).astype('float32'))
    with_aux = search_network(ParamSet(aux_layout, flat(aux_layout, aux_w), 'update'), x,
                              dict({k: paddle.to_tensor(v) for k, v in alphas.items()},
                                   aux_skip=paddle.to_tensor([a], 'float32')), space=aux, **args)
    expected = search_network(ParamSet(plain_layout, flat(plain_layout, plain_w), 'update'), x,
                              {k: paddle.to_tensor(v) for k, v in shifted.items()}, space=plain, **args)
    np.testing.assert_allclose(with_aux.numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)
    # coefficient 0: the network without it
    off = search_network(ParamSet(aux_layout, flat(aux_layout, aux_w), 'update'), x,
                         dict({k: paddle.to_tensor(v) for k, v in alphas.items()},
                              aux_skip=paddle.to_tensor([0.0], 'float32')), space=aux, **args)
    today = search_network(ParamSet(plain_layout, flat(plain_layout, plain_w), 'update'), x,
                           {k: paddle.to_tensor(v) for k, v in alphas.items()}, space=plain, **args)
    np.testing.assert_allclose(off.numpy(), today.numpy(), rtol=1e-5, atol=1e-6)


def test_hessian_eigenvalue_is_the_largest_of_the_explicit_hessian():
    """The estimate against the Hessian from every direction's finite difference, on a small network."""
    from architect import (SearchConfig, build_search_programs, hessian_eigenvalue, initial_state, scratch_state,
                           set_tensors)
    step = 1e-4   # this network is small enough for a step that crosses no ReLU kink (see architect.EIG_STEP)
    from model_search import SearchSpace
    paddle.enable_static()
    cfg = SearchConfig(init_channels=4, layers=2, image_size=8, hessian_eigen=True, second_order=False,
                       space=SearchSpace(ops=('none', 'skip_connect', 'sep_conv_3x3', 'max_pool_3x3'), nodes=2))
    progs = build_search_programs(cfg)
    rng = np.random.default_rng(0)
    state = initial_state(progs.layout, 1, cfg.arch_shapes)
    for n in cfg.arch_shapes:
        state[n] = rng.standard_normal(state[n].shape).astype('float32')
    x, y = rng.standard_normal((8, 3, 8, 8)).astype('float32'), rng.integers(0, 10, 8)
    scope, place = paddle.static.Scope(), paddle.CPUPlace()
    exe = paddle.static.Executor(place)
    with paddle.static.scope_guard(scope):
        set_tensors(scope, place, {**state, **scratch_state(progs.layout, cfg.arch_shapes)})
        value, vector = hessian_eigenvalue(exe, scope, place, progs, x, y, step=step)
        names = list(cfg.arch_shapes)
        dim = sum(state[n].size for n in names)
        sizes = [state[n].size for n in names]

        def grad_at(vec):
            parts = np.split(vec, np.cumsum(sizes)[:-1])
            set_tensors(scope, place, {'eig/' + n: state[n] + p.reshape(state[n].shape) for n, p in zip(names, parts)})
            out = exe.run(progs.hessian_program, feed={'x': x, 'y': y}, fetch_list=progs.fetch['hessian', 'grads'])
            return np.concatenate([np.asarray(g, np.float64).reshape(-1) for g in out])
        eye = np.eye(dim)
        h = np.stack([(grad_at(step * e) - grad_at(-step * e)) / (2 * step) for e in eye], 1)
    eig = np.linalg.eigvalsh((h + h.T) / 2)
    assert abs(value - eig[-1]) <= 0.03 * abs(eig[-1]), (value, eig[-3:])
    v = np.concatenate([vector[n].reshape(-1) for n in names])
    assert abs(v @ ((h + h.T) / 2) @ v - eig[-1]) <= 0.05 * abs(eig[-1])       # and its eigenvector


@pytest.mark.slow
def test_a_guarded_search_records_diagnostics_and_stops_early(tmp_path):
    """Every guard on in one tiny search; with a single parametric op the ranking never changes, so
    stable:1 stops at the second epoch with architecture steps (the first is warm-up)."""
    run = str(tmp_path / 'run')
    flags = ['--dataset', 'digits', '--image_size', '16', '--init_channels', '4', '--layers', '2', '--nodes', '2',
             '--batch_size', '16', '--epochs', '5', '--num_workers', '0', '--primitives',
             'none,skip_connect,sep_conv_3x3,max_pool_3x3', '--first_order', '--auxiliary_skip',
             '--beta_decay', '10', '--max_skip', '0', '--early_stop', 'stable:1', '--arch_warmup_epochs', '1',
             '--hessian_eigen_every', '2', '--train_portion', '0.1', '--arch_learning_rate_schedule', 'cosine']
    r = run_script('train_search.py', *flags, '--save', run)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(run, 'history.jsonl'))]
    assert [row['epoch'] for row in rows] == [1, 2, 3]
    stop = json.load(open(os.path.join(run, 'early_stop.json')))
    assert (stop['stopped_at'], stop['chosen_epoch']) == (3, 3)
    for row in rows:
        assert row['normal_skips'] == sum(op == 'skip_connect' for op, _ in row['genotype']['normal'])
        assert 0 < row['entropy_normal'] <= np.log(4) + 1e-6
        assert not any(op == 'skip_connect' for op, _ in row['genotype_limited']['normal'])
    assert ('hessian_eigenvalue' in rows[1]) and ('hessian_eigenvalue' not in rows[0])
    assert [row['aux_skip'] for row in rows] == pytest.approx([1.0, 0.8, 0.6])
    assert [row['beta_decay_weight'] for row in rows] == pytest.approx([0.0, 2.0, 4.0])
    limited, raw = (genotypes.load(os.path.join(run, f)) for f in ('genotype.json', 'genotype_raw.json'))
    assert genotypes.to_dict(raw) == rows[-1]['genotype'] and genotypes.to_dict(limited) == rows[-1]['genotype_limited']
    saved = json.load(open(os.path.join(run, 'genotype.json')))
    assert saved['search_space']['guards'] == dict(max_skip=0, auxiliary_skip=True, beta_decay=10.0,
                                                   early_stop='stable:1')
    assert 'collapse watch: normal cell' in r.stdout and 'early stop' in r.stdout
    r = run_script('visualize.py', '--run', run)
    assert r.returncode == 0, r.stderr
    import visualize
    from PIL import Image
    history = visualize.read_history(run)
    assert [p[0] for p in visualize.collapse_panels(history)][-1] == 'Hessian eigenvalue'   # measured: drawn
    picture = Image.open(os.path.join(run, 'collapse.png'))
    assert picture.width <= 1000 and picture.height > 2 * 300     # four panels, two to a row
    # a stopped search is not continued by --resume ...
    r = run_script('train_search.py', '--resume', run)
    assert r.returncode == 0 and 'stopped early at epoch 3' in r.stdout, r.stdout + r.stderr
    assert len(open(os.path.join(run, 'history.jsonl')).readlines()) == 3
    # ... unless asked
    r = run_script('train_search.py', '--resume', run, '--continue_stopped')
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(run, 'history.jsonl'))]
    assert [row['epoch'] for row in rows] == [1, 2, 3, 4, 5]
    assert [row['aux_skip'] for row in rows] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])   # the schedule resumes
    cosine = [3e-4 * (1 + np.cos(np.pi * k / 4)) / 2 for k in (0, 0, 1, 2, 3)]   # 4 epochs after the warm-up
    assert [row['arch_lr'] for row in rows] == pytest.approx(cosine)
    assert not os.path.exists(os.path.join(run, 'early_stop.json'))


def test_how_far_the_alphas_moved_and_the_warning_when_they_barely_did():
    import genotypes
    k = 8
    uniform = np.zeros((14, k))
    assert guards.distance_from_uniform(uniform) == 0
    one_hot = np.full((14, k), -1e9)
    one_hot[:, 3] = 0
    assert np.isclose(guards.distance_from_uniform(one_hot), 1 - 1 / k)
    a = np.random.default_rng(0).standard_normal((14, k))
    p = np.exp(a) / np.exp(a).sum(1, keepdims=True)
    assert np.isclose(guards.distance_from_uniform(a), np.mean([0.5 * sum(abs(x - 1 / k) for x in row) for row in p]))

    start = genotypes.DARTS_V2
    changed = start._replace(normal=[('max_pool_3x3', 0)] + list(start.normal[1:]))
    g_start, g_changed = genotypes.to_dict(start), genotypes.to_dict(changed)
    history = [dict(genotype=g_start, moved_normal=0.001, moved_reduce=0.003),
               dict(genotype=g_changed, moved_normal=0.002, moved_reduce=0.004),
               dict(genotype=g_changed, moved_normal=0.003, moved_reduce=0.005)]
    text = guards.how_far(history)
    assert 'moved 0.004 from uniform' in text and 'for its last 2 epochs' in text
    assert 'warning: the architecture weights have barely moved' in text
    swapped = genotypes.to_dict(changed._replace(normal=[changed.normal[1], changed.normal[0]] + changed.normal[2:]))
    # a node's pair order is not the cell
    assert guards.stable_epochs(history + [dict(history[-1], genotype=swapped)]) == 3
    history[-1].update(moved_normal=0.05, moved_reduce=0.07, genotype=g_start)
    text = guards.how_far(history)
    assert 'warning' not in text and 'changed in the last epoch' in text
