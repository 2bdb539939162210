"""The static search step against an independent dygraph computation of the DARTS formulas."""

import numpy as np
import paddle
import pytest

from darts.search import budget
from darts import kernels

from architect import (MOMENTUM, WEIGHTS, SearchConfig, build_search_programs, count_ops, get_tensors,
                       initial_state, run_search_step, schedule_values, scratch_state, set_tensors)
from conftest import synthetic_penalty
from model_search import SearchSpace, cross_entropy, search_network
from operations import ParamSet

CFG = SearchConfig(init_channels=4, layers=3, image_size=8, second_order=True)
# PC-DARTS: a quarter of the channels through the mixed ops, betas learned with the alphas
PC_CFG = SearchConfig(init_channels=8, layers=3, image_size=8, second_order=True,
                      space=SearchSpace(partial_channels=4, edge_normalization=True, nodes=3))


def over_budget(space):
    """A budget penalty over made-up op costs, both budgets exceeded (the fixed part alone is over),
    so its gradient is live."""
    return synthetic_penalty(space, dict(params=900.0, madds=950.0), dict(params=1000, madds=1000), weight=0.05, seed=5)


# DARTS-, beta-DARTS and a budget on: the auxiliary skip in the network, the beta-decay and the
# budget penalty's gradients in g_alpha
GUARD_SPACE = SearchSpace(nodes=2, auxiliary_skip=True)
GUARD_CFG = SearchConfig(init_channels=4, layers=2, image_size=8, second_order=True, beta_decay=True,
                         space=GUARD_SPACE, budget=over_budget(GUARD_SPACE))
AUX_SKIP, BETA_DECAY = 0.7, 3.0
LR = 0.05
ARCH_LR = 0.02   # fed to an annealed config's alphas, far from its constant 3e-4
BATCH = 6


_STEPS = {}


def _step(name):
    """One second-order step of the static programs from a non-trivial state, paper's R
    (cached: the step-equality test reuses the fixture's runs)."""
    if name not in _STEPS:
        cfg, custom_kernels = dict(darts=(CFG, True), pc_darts=(PC_CFG, True), paddle_kernels=(CFG, False),
                                   guards=(GUARD_CFG, True))[name]
        _STEPS[name] = _run_step(cfg, custom_kernels)
    return _STEPS[name]


@pytest.fixture(scope='module', params=['darts', pytest.param('pc_darts', marks=pytest.mark.slow),
                                        pytest.param('paddle_kernels', marks=pytest.mark.slow),
                                        pytest.param('guards', marks=pytest.mark.slow)])
def step(request):
    return _step(request.param)


@pytest.mark.slow
def test_the_step_with_the_compiled_depthwise_op_equals_the_step_with_paddles_kernel():
    if kernels.module() is None:
        pytest.skip(kernels.status())
    (_, _, _, compiled), (_, _, _, plain) = _step('darts'), _step('paddle_kernels')
    assert sorted(compiled) == sorted(plain)
    for name in compiled:
        close(compiled[name], plain[name], 1e-4)


def step_inputs(progs, cfg):
    """A non-trivial state (momentum, alphas far from uniform) and a batch, from fixed seeds."""
    rng = np.random.default_rng(1)
    state = initial_state(progs.layout, seed=3, arch_shapes=cfg.arch_shapes)
    state[MOMENTUM] = (0.01 * rng.standard_normal(state[MOMENTUM].shape)).astype('float32')
    for n in cfg.arch_shapes:  # far from uniform, so the softmax weights differ
        state[n] = rng.standard_normal(state[n].shape).astype('float32')
    s = cfg.image_size
    batch = dict(train_x=rng.standard_normal((BATCH, 3, s, s)).astype('float32'),
                 train_y=rng.integers(0, 10, BATCH), val_x=rng.standard_normal((BATCH, 3, s, s)).astype('float32'),
                 val_y=rng.integers(0, 10, BATCH))
    return state, batch


STEP_RESULTS = ('dalpha', 'hessian', 'grad')


def step_results(scope, cfg):
    """The tensors a step leaves that the checks compare."""
    names = [f'arch/{w}_{n}' for w in STEP_RESULTS for n in cfg.arch_shapes]
    adam = [n + moment for n in cfg.arch_shapes for moment in ('.adam_m', '.adam_v')]
    return get_tensors(scope, names + adam + [WEIGHTS, MOMENTUM, 'arch/r', 'arch/w_prime', *cfg.arch_shapes])


def _run_step(cfg, custom_kernels=True):
    paddle.enable_static()
    if custom_kernels:
        progs = build_search_programs(cfg)
    else:
        with kernels.paddle_kernels():
            progs = build_search_programs(cfg)
    state, batch = step_inputs(progs, cfg)
    scope, place = paddle.static.Scope(), paddle.CPUPlace()
    exe = paddle.static.Executor(place)
    ops_before = {k: count_ops(p) for k, p in progs.programs.items()}
    with paddle.static.scope_guard(scope):
        set_tensors(scope, place, {**state, **scratch_state(progs.layout, cfg.arch_shapes),
                                   **schedule_values(cfg, AUX_SKIP, BETA_DECAY, arch_lr=ARCH_LR)})
        run_search_step(exe, progs, batch, LR)
        after = step_results(scope, cfg)
    assert ops_before == {k: count_ops(p) for k, p in progs.programs.items()}
    return progs, state, batch, after


def _reference(progs, state, batch, dtype='float32', shards=1):
    """The paper's formulas evaluated eagerly, step by step, with paddle.grad.

    shards > 1: a data-parallel step's, each batch cut into `shards` contiguous parts
    (distributed.shard_bounds) and every gradient the mean of the parts' gradients."""
    from darts.distributed import shard_bounds
    paddle.disable_static()
    try:
        t = lambda a, grad=False: paddle.to_tensor(np.asarray(a, dtype), stop_gradient=not grad)  # noqa: E731
        layout, cfg = progs.layout, progs.config
        x_tr, y_tr = t(batch['train_x']), paddle.to_tensor(batch['train_y'])
        x_val, y_val = t(batch['val_x']), paddle.to_tensor(batch['val_y'])

        def loss(w, alphas, x, y):
            arch = dict(zip(names, alphas))
            if cfg.space.auxiliary_skip:
                arch['aux_skip'] = t([AUX_SKIP])
            return cross_entropy(search_network(ParamSet(layout, w, 'update'), x, arch,
                                                cfg.init_channels, cfg.num_classes, cfg.layers, cfg.space), y)

        def grad(w, alphas, x, y, wrt):
            """The mean over the shards of the gradient of the shard's loss."""
            parts = []
            for k in range(shards):
                lo, hi = shard_bounds(len(y), k, shards)
                parts.append(paddle.grad(loss(w, alphas, x[lo:hi], y[lo:hi]), wrt))
            return [sum(p[i] for p in parts) / shards for i in range(len(wrt))]

        w, v = t(state[WEIGHTS], True), t(state[MOMENTUM])
        names = list(cfg.arch_shapes)
        alphas = [t(state[n], True) for n in names]
        (g,) = grad(w, alphas, x_tr, y_tr, [w])
        w_prime = t((w - LR * (cfg.momentum * v + g + cfg.weight_decay * w)).numpy(), True)
        *dalpha, dw = grad(w_prime, alphas, x_val, y_val, alphas + [w_prime])
        r = cfg.r_scale / float(paddle.linalg.norm(dw))
        g_plus = grad(t((w + r * dw).numpy()), alphas, x_tr, y_tr, alphas)
        g_minus = grad(t((w - r * dw).numpy()), alphas, x_tr, y_tr, alphas)
        hessian = [((p - m) / (2 * r)).numpy() for p, m in zip(g_plus, g_minus)]
        first_order = [a.numpy() for a in grad(w, alphas, x_val, y_val, alphas)]
        g_alpha = [d.numpy() - LR * h for d, h in zip(dalpha, hessian)] if cfg.second_order else first_order
        if cfg.beta_decay:  # + lambda * grad of beta-DARTS' mean_e logsumexp_o(alpha_e), per cell type
            g_alpha = [ga + BETA_DECAY * paddle.grad(paddle.logsumexp(a, axis=-1).mean(), a)[0].numpy()
                       if n.startswith('alpha_') else ga for ga, a, n in zip(g_alpha, alphas, names)]
        if cfg.budget is not None:  # + the penalty's gradient, by central differences of its numpy form
            g_alpha = [ga + d for ga, d in zip(g_alpha, penalty_gradient(cfg.budget, state, names))]

        # Adam, first step (t = 1), L2 weight decay
        b1, b2 = cfg.arch_betas
        arch_lr = ARCH_LR if cfg.arch_lr_annealed else cfg.arch_learning_rate
        new_alphas, moments = [], []
        for a, ga in zip(alphas, g_alpha):
            ga = ga + cfg.arch_weight_decay * a.numpy()
            m, vv = (1 - b1) * ga, (1 - b2) * ga * ga
            moments.append((m, vv))
            new_alphas.append(a.numpy() - arch_lr * (m / (1 - b1)) / (np.sqrt(vv / (1 - b2)) + 1e-8))

        # weight step at the new alphas: clip, then SGD momentum with L2
        (gw,) = grad(w, [t(a) for a in new_alphas], x_tr, y_tr, [w])
        gw = gw.numpy()
        gw = gw * min(1.0, cfg.grad_clip / (np.linalg.norm(gw) + 1e-6))
        v_new = cfg.momentum * state[MOMENTUM] + gw + cfg.weight_decay * state[WEIGHTS]
        return dict(w_prime=w_prime.numpy(), r=r, dalpha=[d.numpy() for d in dalpha], hessian=hessian,
                    g_alpha=g_alpha, first_order=first_order, alphas=new_alphas, adam=moments,
                    weights=state[WEIGHTS] - LR * v_new, momentum=v_new, dw=dw.numpy())
    finally:
        paddle.enable_static()


def penalty_gradient(penalty, state, names, h=1e-5):
    """d penalty / d (each architecture parameter), central differences in float64."""
    arch = {n: state[n].astype('float64') for n in names}
    out = []
    for n in names:
        g = np.zeros_like(arch[n])
        for idx in np.ndindex(g.shape):
            plus, minus = dict(arch), dict(arch)
            plus[n], minus[n] = arch[n].copy(), arch[n].copy()
            plus[n][idx] += h
            minus[n][idx] -= h
            g[idx] = (budget.penalty_numpy(penalty, plus) - budget.penalty_numpy(penalty, minus)) / (2 * h)
        out.append(g)
    return out


@pytest.mark.slow
def test_the_budget_penalty_gradient_is_a_real_part_of_the_guarded_step():
    progs, state, batch, after = _step('guards')
    names = list(progs.config.arch_shapes)
    for n, g in zip(names, penalty_gradient(progs.config.budget, state, names)):
        assert np.linalg.norm(g) > 0.1 * np.linalg.norm(after[f'arch/dalpha_{n}'])
        assert np.abs(g[:, GUARD_SPACE.ops.index('none')]).max() == 0   # none's weight costs nothing


def test_the_first_order_step_with_guards_a_budget_and_a_fed_arch_lr_matches_eager_formula():
    cfg = SearchConfig(init_channels=4, layers=2, image_size=8, second_order=False, beta_decay=True,
                       space=GUARD_SPACE, budget=over_budget(GUARD_SPACE), arch_lr_annealed=True)
    progs, state, batch, after = _run_step(cfg)
    ref = _reference(progs, state, batch)
    for i, n in enumerate(cfg.arch_shapes):
        close(after[f'arch/grad_{n}'], ref['g_alpha'][i])
        step = after[n] - state[n]   # Adam's first step moves each alpha by about the lr: the fed one, not 3e-4
        close(step, ref['alphas'][i] - state[n], 1e-3)
        assert np.abs(step).max() > 0.5 * ARCH_LR
    close(after[WEIGHTS], ref['weights'], 1e-4)


def close(actual, expected, rel=2e-3):
    expected = np.asarray(expected)
    np.testing.assert_allclose(actual, expected, rtol=rel, atol=rel * np.abs(expected).max())


def test_second_order_step_matches_eager_formula(step):
    progs, state, batch, after = step
    ref = _reference(progs, state, batch)
    close(after['arch/w_prime'], ref['w_prime'], 1e-5)
    close(float(after['arch/r'].reshape(-1)[0]), ref['r'], 1e-3)
    for i, n in enumerate(progs.config.arch_shapes):
        close(after[f'arch/dalpha_{n}'], ref['dalpha'][i])
        close(after[f'arch/hessian_{n}'], ref['hessian'][i], 2e-2)   # a difference quotient of float32 gradients
        close(after[f'arch/grad_{n}'], ref['g_alpha'][i])
        close(after[n], ref['alphas'][i], 1e-4)
    close(after[WEIGHTS], ref['weights'], 1e-4)
    close(after[MOMENTUM], ref['momentum'], 1e-3)


def test_second_order_term_is_real_and_changes_the_gradient(step):
    progs, state, batch, after = step
    ref = _reference(progs, state, batch)
    for i, n in enumerate(progs.config.arch_shapes):
        hess, g2 = after[f'arch/hessian_{n}'], after[f'arch/grad_{n}']
        g1 = ref['first_order'][i]
        # the old fluid implementation's term was exactly zero; ours must move the gradient
        assert np.linalg.norm(LR * hess) > 1e-3 * np.linalg.norm(after[f'arch/dalpha_{n}'])
        assert np.linalg.norm(g2 - g1) > 1e-2 * np.linalg.norm(g1)
    # and the step really moved alpha in the direction of -g (Adam's first step is -lr * sign(g))
    a0, a1 = state['alpha_normal'], after['alpha_normal']
    g = after['arch/grad_alpha_normal'] + progs.config.arch_weight_decay * a0
    moved = np.abs(g) > 1e-6
    assert np.all(np.sign(a1 - a0)[moved] == -np.sign(g)[moved])


def test_finite_difference_is_the_directional_derivative_of_the_alpha_gradient(step):
    """hessian_term = (g+ - g-) / 2R is the derivative of grad_alpha L_train(w + e dw', alpha)
    in e, taken numerically over [-R, R]: recomputed here independently in float64.

    Why not compare with the limit e -> 0: ReLU and max-pool make grad_alpha L_train
    piecewise smooth.  In this tiny network the float64 central difference at steps
    1e-2 .. 1e-6 (times dw'/||dw'||) measured 23, 105, 511, 177, 4.6: a kink lies
    within 1e-5 of w, so there is no local Hessian to converge to.  The paper's R is
    a fixed step of 0.01 / ||dw'||, and that is the quantity checked.
    """
    progs, state, batch, after = step
    ref = _reference(progs, state, batch)
    dw = ref['dw'].astype('float64')
    r = progs.config.r_scale / np.linalg.norm(dw)
    paddle.disable_static()
    paddle.set_default_dtype('float64')
    try:
        layout, cfg = progs.layout, progs.config
        t = lambda a, grad=False: paddle.to_tensor(np.asarray(a, 'float64'), stop_gradient=not grad)  # noqa: E731
        names = list(cfg.arch_shapes)
        alphas = [t(state[n], True) for n in names]

        def grad_alpha(w):
            arch = dict(zip(names, alphas), **({'aux_skip': t([AUX_SKIP])} if cfg.space.auxiliary_skip else {}))
            logits = search_network(ParamSet(layout, t(w), 'update'), t(batch['train_x']), arch,
                                    cfg.init_channels, cfg.num_classes, cfg.layers, cfg.space)
            return [g.numpy() for g in paddle.grad(cross_entropy(logits, paddle.to_tensor(batch['train_y'])), alphas)]

        w = state[WEIGHTS].astype('float64')
        derivative = [(p - m) / (2 * r) for p, m in zip(grad_alpha(w + r * dw), grad_alpha(w - r * dw))]
    finally:
        paddle.set_default_dtype('float32')
        paddle.enable_static()
    for i, n in enumerate(progs.config.arch_shapes):
        assert np.linalg.norm(derivative[i]) > 1e-3
        close(after[f'arch/hessian_{n}'], derivative[i], 1e-2)
