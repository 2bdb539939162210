"""The open search space: the op registry, MBConv / FusedMBConv, nodes per cell, PC-DARTS
layout and derivation, and the command-line checks of train_search.py."""
import json
import os
import re

import numpy as np
import paddle
import pytest

import genotypes
import model
import operations
from conftest import run_script
from model_search import (SearchSpace, SearchSpaceError, derive_genotype, network_layout, search_network,
                          targets)
from operations import Layout, ParamSet, Source, conv, lookup, register


@pytest.fixture
def dygraph():
    paddle.disable_static()
    yield
    paddle.enable_static()


@pytest.fixture
def custom_op():
    """A user's op, registered the documented way: ReLU, 1x1 conv, non-affine/affine BN."""
    def edge(ps, name, src, c, stride, affine):
        y = conv(ps, name + '.conv', src.relu, c, 1, stride)
        return operations.batch_norm(ps, name + '.bn', y, affine)
    register('conv_1x1_test', edge)
    yield 'conv_1x1_test'
    del operations.OPS['conv_1x1_test']


def _arch(space, rng, scale=1.0):
    return {n: paddle.to_tensor((scale * rng.standard_normal(s)).astype('float32'), stop_gradient=False)
            for n, s in space.arch_shapes().items()}


def test_a_registered_op_is_computed_and_trained(dygraph, custom_op):
    space = SearchSpace(ops=('none', 'skip_connect', custom_op), nodes=2)
    layout = network_layout(4, 10, 3, 16, space=space)
    mine = [i for i, n in enumerate(layout.names) if custom_op in n]
    assert mine, 'the op has no weights in the network'
    rng = np.random.default_rng(0)
    flat = layout.initial_weights(rng)
    x = paddle.to_tensor(rng.standard_normal((3, 3, 16, 16)).astype('float32'))
    arch = _arch(space, rng)

    def logits(weights):
        return search_network(ParamSet(layout, paddle.to_tensor(weights)), x, arch, 4, 10, 3, space)
    base = logits(flat)
    # its weights matter: changing them changes the output (not a scale: BN would undo it)
    offsets = np.cumsum([0] + layout.sizes)
    changed = flat.copy()
    for i in mine:
        changed[offsets[i]:offsets[i + 1]] += rng.normal(0, 0.5, offsets[i + 1] - offsets[i])
    assert np.abs(logits(changed).numpy() - base.numpy()).max() > 1e-4
    # and its alpha column gets a gradient of its own (the op's output, not only the softmax)
    grad = paddle.grad(paddle.sum(base * base), [arch['alpha_normal']])[0].numpy()
    assert np.abs(grad[:, space.ops.index(custom_op)]).max() > 1e-6


def test_genotype_with_a_registered_op_builds_the_evaluation_network(dygraph, custom_op):
    g = genotypes.Genotype([(custom_op, 0), ('skip_connect', 1)], [2], [('max_pool_3x3', 0), (custom_op, 1)], [2])
    genotypes.validate(g)
    kw = dict(genotype=g, c=4, num_classes=5, layers=3, auxiliary=False)
    paddle.enable_static()
    layout = model.layout_of(model.network_cifar, 16, **kw)
    paddle.disable_static()
    assert {'cell0.op0.conv', 'cell1.op1.conv', 'cell2.op1.conv'} <= set(layout.names)   # where the op sits
    ps = ParamSet(layout, paddle.to_tensor(layout.initial_weights(np.random.default_rng(0))))
    logits, _ = model.network_cifar(ps, paddle.ones([2, 3, 16, 16]), **kw)
    assert list(logits.shape) == [2, 5]


def test_unknown_and_unusable_search_spaces_are_refused():
    with pytest.raises(SearchSpaceError,
                       match=r"unknown operation 'conv_9x9'; registered: none, max_pool_3x3.*mb_conv"):
        SearchSpace(ops=('none', 'conv_9x9')).check()
    with pytest.raises(SearchSpaceError, match='other than none'):
        SearchSpace(ops=('none',)).check()
    with pytest.raises(SearchSpaceError, match='multiple of --partial_channels 4'):
        SearchSpace(partial_channels=4).check(init_channels=6)
    with pytest.raises(genotypes.GenotypeError, match="unknown op 'conv_9x9'"):
        genotypes.validate(genotypes.Genotype([('conv_9x9', 0), ('skip_connect', 1)], [2],
                                              [('skip_connect', 0), ('skip_connect', 1)], [2]))


def test_an_op_that_cannot_be_built_fails_at_build_time_naming_it(dygraph):
    def broken(ps, name, src, c, stride, affine):
        return conv(ps, name, src.h, c, 3, stride, padding='nonsense')
    register('bad_shape_test', lambda ps, name, src, c, stride, affine: src.h[:, :, ::2, ::2])
    register('broken_test', broken)
    try:
        with pytest.raises(SearchSpaceError, match="operation 'bad_shape_test'.*expected"):
            network_layout(4, 10, 3, 16, space=SearchSpace(ops=('skip_connect', 'bad_shape_test'), nodes=2))
        with pytest.raises(SearchSpaceError, match="operation 'broken_test' .edge builder. failed to build"):
            network_layout(4, 10, 3, 16, space=SearchSpace(ops=('skip_connect', 'broken_test'), nodes=2))
    finally:
        del operations.OPS['bad_shape_test'], operations.OPS['broken_test']


def _edge_params(op, c, stride, affine=True, size=8):
    """(output shape, parameter count) of one edge of op at c channels."""
    def build(ps):
        lookup(op).edge(ps, 'e', Source(paddle.zeros([2, c, size, size])), c, stride, affine)
    paddle.enable_static()
    try:
        layout = Layout.record(build)
    finally:
        paddle.disable_static()
    ps = ParamSet(layout, paddle.to_tensor(layout.initial_weights(np.random.default_rng(0))))
    y = lookup(op).edge(ps, 'e', Source(paddle.ones([2, c, size, size])), c, stride, affine)
    return list(y.shape), layout.size, layout


@pytest.mark.parametrize('c', [4, 6])
def test_mbconv_and_fused_mbconv_shapes_and_parameter_counts(dygraph, c):
    e = 3 * c   # expansion 3
    bn = 2      # gamma, beta per channel (affine, as in the evaluation network)
    expected = {'mb_conv_3x3': c * e + bn * e + e * 9 + bn * e + e * c + bn * c,
                'mb_conv_5x5': c * e + bn * e + e * 25 + bn * e + e * c + bn * c,
                'fused_mb_conv_3x3': e * 1 * 9 + bn * e + e * c + bn * c}   # 3x3 conv with groups = C_in
    for op, params in expected.items():
        for stride in (1, 2):
            shape, count, _ = _edge_params(op, c, stride)
            assert shape == [2, c, 8 // stride, 8 // stride], (op, stride)
            assert count == params, (op, stride, count, params)
        # non-affine (search): no BN parameters
        assert _edge_params(op, c, 1, affine=False)[1] == params - bn * (2 * e + c if 'fused' not in op else e + c)


def test_mbconv_has_the_identity_residual_only_at_stride_1(dygraph):
    """With every weight zero the block's branch is BN(0) = 0, so the output is x at stride 1, 0 at stride 2."""
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype('float32'))
    for op in ('mb_conv_3x3', 'fused_mb_conv_3x3'):
        for stride in (1, 2):
            _, _, layout = _edge_params(op, 4, stride)
            flat = np.zeros(layout.size, 'float32')
            y = lookup(op).edge(ParamSet(layout, paddle.to_tensor(flat)), 'e', Source(x), 4, stride, True).numpy()
            np.testing.assert_allclose(y, x.numpy() if stride == 1 else 0 * y, atol=1e-6)


def test_pc_darts_mixed_ops_see_a_kth_of_the_channels():
    paddle.enable_static()
    c = 8
    for k in (1, 4):
        layout = network_layout(c, 10, 3, 16, space=SearchSpace(partial_channels=k, edge_normalization=k > 1))
        shapes = dict(zip(layout.names, layout.shapes))
        n0 = len(targets(0, 4))
        assert shapes['cell0.n0.sep_conv_3x3.dw1'] == [n0 * c // k, 1, 3, 3]
        assert shapes['cell0.n0.sep_conv_3x3.pw1'] == [n0 * c // k, c // k, 1, 1]
        assert shapes['cell1.n0.skip_connect.conv1'][1] == 2 * c // k   # the reduction cell's strided skip
        assert shapes['cell0.pre0.conv'] == [c, 3 * c, 1, 1]            # preprocessing keeps all channels


def test_pc_darts_derivation_ranks_edges_by_beta_times_alpha():
    space = SearchSpace(nodes=2, partial_channels=4, edge_normalization=True)
    ops = space.ops
    alpha = np.zeros((5, len(ops)))
    alpha[0, ops.index('sep_conv_3x3')] = 3.0     # node 0: edge 0 has the strongest op ...
    alpha[1, ops.index('max_pool_3x3')] = 1.0
    beta = np.zeros(5)
    beta[1] = 4.0                                 # ... but the betas favour edge 1 of node 0 (and edge 0 of node 1)
    beta[2] = 4.0
    arch = dict(alpha_normal=alpha, alpha_reduce=alpha, beta_normal=beta, beta_reduce=beta)
    g = derive_genotype(arch, space)
    # W = softmax(alpha) * softmax(beta): node 0 edge 1: 2.7/(2.7+7) * 0.98 > edge 0: 20/(20+7) * 0.018
    assert g.normal[0] == ('max_pool_3x3', 1) and g.normal[1] == ('sep_conv_3x3', 0)
    plain = derive_genotype(dict(alpha_normal=alpha, alpha_reduce=alpha), SearchSpace(nodes=2))
    assert plain.normal[0] == ('sep_conv_3x3', 0)
    assert g.normal_concat == [2, 3]


@pytest.mark.parametrize('nodes', [3, 5])
def test_derivation_and_evaluation_network_with_other_node_counts(dygraph, nodes):
    space = SearchSpace(ops=('max_pool_3x3', 'skip_connect', 'sep_conv_3x3', 'dil_conv_3x3'), nodes=nodes)
    rng = np.random.default_rng(nodes)
    arch = {n: rng.standard_normal(s) for n, s in space.arch_shapes().items()}
    g = derive_genotype(arch, space)
    assert len(g.normal) == 2 * nodes and g.normal_concat == list(range(2, nodes + 2))
    for k, (op, j) in enumerate(g.normal):
        assert op in space.ops and 0 <= j < k // 2 + 2
    genotypes.validate(g)
    kw = dict(genotype=g, c=4, num_classes=3, layers=3, auxiliary=True)
    paddle.enable_static()
    layout = model.layout_of(model.network_cifar, 16, **kw)
    paddle.disable_static()
    ps = ParamSet(layout, paddle.to_tensor(layout.initial_weights(rng)))
    logits, aux = model.network_cifar(ps, paddle.ones([2, 3, 16, 16]), **kw)
    assert list(logits.shape) == [2, 3] and list(aux.shape) == [2, 3]


@pytest.mark.parametrize('flags, message', [
    (['--primitives', 'none,conv_9x9'], "error: --primitives: unknown operation 'conv_9x9'; registered: none, "
                                        "max_pool_3x3"),   # the one flag to blame
    (['--layers', '1'], '--layers must be at least 2'),
    (['--partial_channels', '3', '--init_channels', '8'], 'multiple of --partial_channels 3'),
    (['--primitives', 'none'], 'error: --primitives: the op list needs an op other than none'),
    (['--nodes', '0'], '--nodes must be at least 1'),
])
def test_train_search_refuses_bad_search_spaces_in_one_line(tmp_path, flags, message):
    run = tmp_path / 'run'
    r = run_script('train_search.py', '--dataset', 'digits', '--save', run, *flags)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert 'Traceback' not in r.stderr and not run.exists()


def test_preset_pc_darts_sets_the_papers_settings_and_flags_still_win():
    import train_search
    a = train_search.parse_args(['--preset', 'pc_darts'])
    assert (a.partial_channels, a.batch_size, a.learning_rate, a.arch_learning_rate, a.arch_warmup_epochs,
            a.first_order) == (4, 256, 0.1, 6e-4, 15, True)
    b = train_search.parse_args(['--preset', 'pc_darts', '--batch_size', '32', '--second_order'])
    assert b.batch_size == 32 and not b.first_order and b.partial_channels == 4
    assert not train_search.parse_args([]).first_order and train_search.parse_args([]).partial_channels == 1


@pytest.mark.slow
@pytest.mark.parametrize('flags', [
    # PC-DARTS, first order, MBConv ops, 3 nodes, one warm-up epoch
    ['--primitives', 'none,max_pool_3x3,skip_connect,sep_conv_3x3,mb_conv_3x3,fused_mb_conv_3x3', '--nodes', '3',
     '--partial_channels', '2', '--first_order', '--arch_warmup_epochs', '1', '--layers', '2'],
    # 5 nodes, no `none`
    ['--primitives', 'skip_connect,sep_conv_3x3,max_pool_3x3', '--nodes', '5', '--layers', '2', '--first_order'],
], ids=['pc-mbconv-3-nodes', '5-nodes-no-none'])
def test_search_in_a_changed_space_gives_a_genotype_train_py_trains(tmp_path, flags):
    search, train = tmp_path / 'search', tmp_path / 'train'
    # the 5-node run also runs where no C++ compiler is found: on Paddle's kernels, said in one line
    no_compiler = '--nodes' in flags and flags[flags.index('--nodes') + 1] == '5'
    env = dict(CXX=str(tmp_path / 'no-compiler'), PADDLE_DARTS_CACHE=str(tmp_path / 'cache')) if no_compiler else None
    r = run_script('train_search.py', '--dataset', 'digits', '--image_size', '16', '--epochs', '2',
                   '--init_channels', '4', '--batch_size', '32', '--num_workers', '0', '--save', search, *flags,
                   env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'Traceback' not in r.stderr
    kernel_lines = [line for line in r.stdout.splitlines() if line.startswith('convolution kernels: ')]
    assert len(kernel_lines) == 1
    if no_compiler:
        assert "Paddle's convolutions (no C++ compiler" in kernel_lines[0]
    saved = json.loads((search / 'genotype.json').read_text())
    space = saved['search_space']
    assert space['primitives'] == flags[1].split(',') and space['nodes'] == int(flags[3])
    g = genotypes.load(str(search / 'genotype.json'))
    assert len(g.normal) == 2 * space['nodes'] and all(op in space['primitives'] for op, _ in g.normal + g.reduce)
    history = [json.loads(line) for line in (search / 'history.jsonl').read_text().splitlines()]
    ckpt = np.load(search / 'checkpoint.npz')
    assert ckpt['alpha_normal'].shape == (genotypes.num_edges(space['nodes']), len(space['primitives']))
    if '--arch_warmup_epochs' in flags:
        assert [h['arch_updates'] for h in history] == [False, True]
        # Adam counted the second epoch's steps only, and moved alphas and betas then
        steps = int(re.search(r'epoch 1/2 step (\d+)/\1', (search / 'log.txt').read_text()).group(1))
        assert float(ckpt['alpha.adam_t'][0]) == steps
        assert history[0]['alpha_normal'] != history[1]['alpha_normal']
        assert history[0]['beta_normal'] != history[1]['beta_normal']
        assert ckpt['beta_normal'].shape == (genotypes.num_edges(3),)
    r = run_script('train.py', '--genotype_file', search / 'genotype.json', '--dataset', 'digits', '--image_size',
                   '16', '--epochs', '1', '--layers', '2', '--init_channels', '4', '--batch_size', '32',
                   '--num_workers', '0', '--save', train)
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.isfile(train / 'best.npz')
    r = run_script('visualize.py', '--genotype_file', search / 'genotype.json', '--out', tmp_path / 'cell')
    assert r.returncode == 0 and (tmp_path / 'cell' / 'genotype_normal.png').is_file(), r.stderr
