"""Data parallelism on Paddle's launcher, two CPU processes through gloo: the steps against a
one-process computation from the averaged per-shard quantities, the ranks' state bit for bit."""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

import test_architect as ta
from architect import SearchConfig
from model_search import SearchSpace

# every test here runs Paddle's distributed launcher (two processes through gloo)
pytestmark = pytest.mark.slow

# small enough that two processes build and prepare all their programs in well under a minute:
# both cell types, 2 nodes each
SEARCH = dict(darts=SearchConfig(init_channels=4, layers=2, image_size=8, space=SearchSpace(nodes=2)),
              first_order=SearchConfig(init_channels=4, layers=2, image_size=8, second_order=False,
                                       space=SearchSpace(nodes=2)),
              pc_darts=SearchConfig(init_channels=8, layers=2, image_size=8,
                                    space=SearchSpace(partial_channels=4, edge_normalization=True, nodes=2)))
TRAIN_ARGS = ['--init_channels', '4', '--layers', '2', '--auxiliary_weight', '0.4', '--drop_path_prob', '0.3']
TRAIN_BATCH, TRAIN_LR, TRAIN_DROP = 8, 0.05, 0.3


def launch(script, *args, nproc=2, log_dir, timeout=600, env=None):
    """`python -m paddle.distributed.launch --nproc_per_node N script args` as a user runs it."""
    cmd = [sys.executable, '-m', 'paddle.distributed.launch', '--nproc_per_node', str(nproc),
           '--log_dir', str(log_dir), os.path.join(ROOT, script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=dict(os.environ, **(env or {})))


def worker_logs(log_dir):
    return '\n'.join(f'--- {name}\n' + open(os.path.join(log_dir, name)).read()
                     for name in sorted(os.listdir(log_dir)) if name.startswith('workerlog'))


def train_step_inputs():
    """train.py's programs on a tiny network (auxiliary head, drop path), a state with momentum,
    and a global batch's feed (shared by the ranks in dp_step.py and the reference here)."""
    import paddle
    import genotypes
    import train
    from darts import training
    import model
    paddle.enable_static()
    args = train.parse_args(TRAIN_ARGS)
    progs = training.build_programs(genotypes.DARTS_V2, args, image_size=16)
    state = training.initial_state(progs['layout'], 0)
    rng = np.random.default_rng(4)
    state['weights.momentum'] = (0.01 * rng.standard_normal(state['weights.momentum'].shape)).astype('float32')
    feed = dict(x=rng.standard_normal((TRAIN_BATCH, 3, 16, 16)).astype('float32'), y=rng.integers(0, 10, TRAIN_BATCH),
                lr=np.array([TRAIN_LR], 'float32'), drop_prob=np.array([TRAIN_DROP], 'float32'),
                drop_noise=model.drop_noise(0, 0, 0, progs['drop_sites'], TRAIN_BATCH))
    return progs, state, feed


@pytest.fixture(scope='module')
def ranks(tmp_path_factory):
    """What each of two ranks held after the steps of dp_step.py."""
    out = tmp_path_factory.mktemp('dp')
    r = launch('tests/dp_step.py', out, log_dir=out / 'log')
    assert r.returncode == 0, r.stdout[-3000:] + worker_logs(out / 'log')
    return [dict(np.load(out / f'rank{k}.npz')) for k in range(2)]


def _search_reference(cfg):
    """(what _reference needs of the programs: layout and config; the 2-shard reference step)."""
    import types
    import paddle
    from model_search import network_layout
    paddle.enable_static()
    progs = types.SimpleNamespace(config=cfg, layout=network_layout(cfg.init_channels, cfg.num_classes, cfg.layers,
                                                                    cfg.image_size, cfg.in_channels, cfg.space))
    state, batch = ta.step_inputs(progs, cfg)
    return progs, ta._reference(progs, state, batch, shards=2)


@pytest.mark.parametrize('kind', ['darts', 'first_order', 'pc_darts'])
def test_a_data_parallel_search_step_is_the_step_of_the_averaged_shard_quantities(ranks, kind):
    """w', R, dalpha, the Hessian term, g_alpha, the alphas, Adam's moments, w and v of a 2-rank step
    against the paper's formulas evaluated eagerly in this process, every gradient the mean of the
    two half-batches' gradients."""
    cfg = SEARCH[kind]
    progs, ref = _search_reference(cfg)
    got = {k.split('/', 1)[1]: v for k, v in ranks[0].items() if k.startswith(kind + '/')}
    if cfg.second_order:
        ta.close(got['arch/w_prime'], ref['w_prime'], 1e-5)
        ta.close(float(got['arch/r'].reshape(-1)[0]), ref['r'], 1e-3)
    for i, n in enumerate(cfg.arch_shapes):
        if cfg.second_order:
            ta.close(got[f'arch/dalpha_{n}'], ref['dalpha'][i])
            ta.close(got[f'arch/hessian_{n}'], ref['hessian'][i], 2e-2)
        ta.close(got[f'arch/grad_{n}'], ref['g_alpha'][i])
        ta.close(got[n], ref['alphas'][i], 1e-4)
        ta.close(got[n + '.adam_m'], ref['adam'][i][0])
        ta.close(got[n + '.adam_v'], ref['adam'][i][1], 4e-3)   # squares of the gradient
    ta.close(got['weights'], ref['weights'], 1e-4)
    ta.close(got['weights.momentum'], ref['momentum'], 1e-3)
    # the half-batch average is not the whole batch's gradient: the check can tell them apart
    whole = ta._reference(progs, *ta.step_inputs(progs, cfg))
    assert np.abs(whole['momentum'] - ref['momentum']).max() > 10 * np.abs(got['weights.momentum'] -
                                                                          ref['momentum']).max()


def test_a_data_parallel_train_step_is_the_step_of_the_averaged_gradient(ranks):
    """train.py's step (auxiliary head 0.4, drop path 0.3 from the global batch's uniforms) on two
    half-batches against an eager computation here: mean of the halves' gradients, clip, SGD."""
    import paddle
    import genotypes
    import model
    import train
    from operations import ParamSet
    progs, state, feed = train_step_inputs()
    args = train.parse_args(TRAIN_ARGS)
    layout = progs['layout']
    paddle.disable_static()
    try:
        w = paddle.to_tensor(state['weights'], stop_gradient=False)
        grads = []
        for lo, hi in ((0, TRAIN_BATCH // 2), (TRAIN_BATCH // 2, TRAIN_BATCH)):
            drop = model.DropPath(paddle.to_tensor([TRAIN_DROP]), paddle.to_tensor(feed['drop_noise'][:, lo:hi]))
            logits, aux = model.network_cifar(ParamSet(layout, w, 'update'), paddle.to_tensor(feed['x'][lo:hi]),
                                              genotypes.DARTS_V2, c=4, num_classes=10, layers=2, auxiliary=True,
                                              drop_prob=drop)
            y = paddle.to_tensor(feed['y'][lo:hi])
            ce = paddle.nn.functional.cross_entropy
            grads.append(paddle.grad(ce(logits, y) + 0.4 * ce(aux, y), [w])[0].numpy())
    finally:
        paddle.enable_static()
    g = (grads[0] + grads[1]) / 2
    g = g * min(1.0, args.grad_clip / (np.linalg.norm(g) + 1e-6))
    v = args.momentum * state['weights.momentum'] + g + args.weight_decay * state['weights']
    ta.close(ranks[0]['train/weights.momentum'], v, 1e-3)
    ta.close(ranks[0]['train/weights'], state['weights'] - TRAIN_LR * v, 1e-4)
    one_batch = np.abs(grads[0] - g).max()
    assert one_batch > 10 * np.abs(ranks[0]['train/weights.momentum'] - v).max()


def test_every_rank_holds_the_same_state_bit_for_bit(ranks):
    """After three second-order steps and the BN statistics' averaging: weights, momentum, alphas,
    Adam moments and running statistics equal on both ranks, to the bit (the updates are computed
    from the same averaged quantities), and the steps did move them."""
    a, b = ranks
    names = [k for k in a if k.startswith('three_steps/')]
    assert {k for k in b if k.startswith('three_steps/')} == set(names)
    for k in names:
        assert a[k].tobytes() == b[k].tobytes(), k
    for k in ('train/weights', 'darts/weights', 'pc_darts/alpha_normal', 'first_order/alpha_reduce'):
        assert a[k].tobytes() == b[k].tobytes(), k
    moved = a['three_steps/alpha_normal'] - a['darts/alpha_normal']
    assert np.abs(moved).max() > 1e-5
