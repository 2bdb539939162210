"""The compiled depthwise and pointwise convolutions against Paddle's kernels, and their fallback."""
import os
import shutil
import subprocess
import sys

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from darts import kernels
from conftest import ROOT


@pytest.fixture
def dygraph():
    paddle.disable_static()
    yield
    paddle.enable_static()


@pytest.fixture(scope='module')
def compiled():
    m = kernels.module()
    if m is None:
        pytest.skip(kernels.status())
    return m


# (batch, channels, size, kernel, stride, dilation, padding): every kernel / stride / dilation the
# networks use with their 'same' padding (None), batch 1, channel counts that are not a multiple of
# the vector width, odd and even sizes, row counts that are not a multiple of the 4-row block;
# and at stride 1, no padding and more padding than the filter reach (the grad input then crops)
# the last row: the networks' shapes (the paper's C=36 network: 36 channels at 32 px, 144 at 8 px; the
# search's edges stacked along the channels) and sizes off the 16-float vector (17, 33 columns: a
# masked tail with 8- and 16-float vectors), rows off an 8-row block
CASES = [(n, c, s, k, st, d, None) for k in (3, 5) for st in (1, 2) for d in (1, 2)
         for n, c, s in ((1, 3, 7), (2, 17, 8))] + [
    (3, 1, 9, 3, 1, 1, None), (2, 40, 16, 5, 2, 1, None), (2, 5, 13, 5, 1, 2, None), (1, 2, 32, 3, 1, 1, None),
    (2, 3, 10, 3, 1, 1, 0), (2, 3, 10, 5, 1, 2, 0), (2, 3, 9, 3, 1, 1, 3), (1, 2, 6, 5, 1, 1, 5),
    (2, 36, 32, 3, 1, 1, None), (1, 144, 8, 5, 1, 2, None), (1, 19, 33, 3, 1, 1, None), (1, 7, 17, 5, 2, 2, None),
    (2, 9, 17, 5, 1, 1, None), (1, 3, 33, 3, 1, 2, None)]


def assert_same_output_and_gradients(out, ref, x, w, rng):
    """out and ref (Paddle's kernel) agree, and so do their gradients for x and w under one random output gradient."""
    assert out.shape == ref.shape
    g = paddle.to_tensor(rng.standard_normal(ref.shape).astype('float32'))
    expected = [ref] + list(paddle.grad(ref, [x, w], g))
    actual = [out] + list(paddle.grad(out, [x, w], g))
    for a, e, what in zip(actual, expected, ('forward', 'grad input', 'grad weight')):
        e = e.numpy()
        np.testing.assert_allclose(a.numpy(), e, rtol=1e-5, atol=1e-5 * np.abs(e).max(), err_msg=what)


@pytest.mark.parametrize('n,c,size,k,stride,dilation,padding', CASES)
def test_forward_and_both_gradients_equal_paddles_kernel(dygraph, compiled, n, c, size, k, stride, dilation,
                                                          padding):
    check_depthwise(compiled, n, c, size, k, stride, dilation, padding)


def check_depthwise(compiled, n, c, size, k, stride, dilation, padding):
    if padding is None:
        padding = dilation * (k - 1) // 2     # 'same' padding, as sep_conv and dil_conv use
    rng = np.random.default_rng(n * 1000 + c + k)
    x = paddle.to_tensor(rng.standard_normal((n, c, size, size)).astype('float32'), stop_gradient=False)
    w = paddle.to_tensor(rng.standard_normal((c, 1, k, k)).astype('float32'), stop_gradient=False)
    ref = F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation, groups=c)
    out = compiled.darts_depthwise_conv2d(x, w, stride, padding, dilation)
    assert_same_output_and_gradients(out, ref, x, w, rng)


# (batch, c_in, c_out, size, stride, groups): the cells' 1x1 convolutions (preprocess, sep / dil conv
# pointwise, factorized reduce at stride 2 on even and odd sizes), grouped as the search's stacked
# copies are; channel and column counts that are not a multiple of any ISA's block (6 x 16 with AVX2,
# 12 x 32 with AVX-512, 4 x 4 scalar), batch 1, a 1x1 plane; the last row: the paper's network at 32 and
# 8 px (36 and 144 channels), and 17 x 17 / 31 x 31 planes (tails of 8- and 16-float vectors)
POINTWISE_CASES = [(2, 5, 7, 5, 1, 1), (1, 36, 36, 8, 1, 1), (3, 17, 40, 7, 1, 1), (2, 64, 13, 4, 1, 1),
                   (2, 12, 8, 6, 2, 1), (2, 9, 6, 7, 2, 1), (2, 12, 18, 5, 1, 3), (2, 8, 12, 9, 2, 4),
                   (4, 3, 2, 1, 1, 1), (1, 200, 3, 3, 1, 1),
                   (2, 36, 36, 32, 1, 1), (1, 144, 144, 8, 1, 1), (2, 33, 29, 17, 1, 1), (1, 26, 14, 31, 2, 2)]


@pytest.mark.parametrize('n,c_in,c_out,size,stride,groups', POINTWISE_CASES)
def test_pointwise_forward_and_both_gradients_equal_paddles_kernel(dygraph, compiled, n, c_in, c_out, size, stride,
                                                                    groups):
    check_pointwise(compiled, n, c_in, c_out, size, stride, groups)


def check_pointwise(compiled, n, c_in, c_out, size, stride, groups):
    rng = np.random.default_rng(n * 1000 + c_in + c_out + size)
    x = paddle.to_tensor(rng.standard_normal((n, c_in, size, size)).astype('float32'), stop_gradient=False)
    w = paddle.to_tensor(rng.standard_normal((c_out, c_in // groups, 1, 1)).astype('float32'), stop_gradient=False)
    ref = F.conv2d(x, w, stride=stride, groups=groups)
    out = compiled.darts_pointwise_conv2d(x, w, stride, groups)
    assert_same_output_and_gradients(out, ref, x, w, rng)


# Every case above on one ISA's build, in a fresh process (one build is loaded per process): prints the
# status line, then one line per failed case
EVERY_CASE = """
import sys
import numpy as np, paddle
import test_fast_kernels as t
from darts import kernels
print(kernels.status())
m = kernels.module()
paddle.disable_static()
for case in t.CASES:
    try:
        t.check_depthwise(m, *case)
    except AssertionError as e:
        print('depthwise', case, str(e).strip().splitlines()[0])
for case in t.POINTWISE_CASES:
    try:
        t.check_pointwise(m, *case)
    except AssertionError as e:
        print('pointwise', case, str(e).strip().splitlines()[0])
"""


@pytest.mark.parametrize('isa', kernels.ISAS)
def test_every_isa_this_cpu_runs_equals_paddles_kernel_on_every_case(tmp_path, isa):
    """DARTS_KERNEL_ISA=avx512 / avx2 / scalar: each build this CPU runs (16, 8 and 1 floats; avx512 is
    skipped without avx512f) gives Paddle's forward and both gradients on every depthwise and pointwise case."""
    if isa not in kernels.host_isas():
        pytest.skip(f'this CPU has no {isa}')
    r = subprocess.run([sys.executable, '-c', EVERY_CASE], capture_output=True, text=True,
                       cwd=os.path.join(ROOT, 'tests'), env=dict(os.environ, DARTS_KERNEL_ISA=isa,
                                                                 PYTHONPATH=ROOT), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    width = kernels.WIDTH[isa]
    assert lines[0].startswith(f'compiled, {isa}, {width} float'), lines[0]
    assert lines[1:] == []


def test_the_isa_is_the_widest_the_cpu_has_unless_asked_and_keys_the_cache(monkeypatch):
    monkeypatch.setattr(kernels, 'host_isas', lambda: ['avx2', 'scalar'])
    monkeypatch.delenv('DARTS_KERNEL_ISA', raising=False)
    monkeypatch.delenv('DARTS_KERNEL_DEFINES', raising=False)
    isa, flags, note = kernels.build_flags()
    assert (isa, note) == ('avx2', '') and '-mno-avx512f' in flags and '-march=native' in flags
    default_dir = kernels.cache_dir()
    monkeypatch.setenv('DARTS_KERNEL_ISA', 'scalar')
    isa, flags, note = kernels.build_flags()
    assert (isa, note) == ('scalar', '') and '-DDARTS_SCALAR' in flags
    assert kernels.cache_dir() != default_dir
    monkeypatch.setenv('DARTS_KERNEL_ISA', 'AVX512')   # more than this CPU has: the widest it has, and why
    assert kernels.build_flags()[0::2] == ('avx2', 'DARTS_KERNEL_ISA=avx512: this CPU has no avx512')
    monkeypatch.setenv('DARTS_KERNEL_ISA', 'sse')
    assert kernels.build_flags()[0::2] == ('avx2', "DARTS_KERNEL_ISA='sse' is not one of avx512, avx2, scalar")
    monkeypatch.setenv('DARTS_KERNEL_ISA', 'avx2')
    assert kernels.cache_dir() == default_dir
    monkeypatch.setenv('DARTS_KERNEL_DEFINES', '-DDARTS_PW_MR=4 -O0')   # -D flags only
    assert kernels.build_flags()[1][-2:] == ['-DDARTS_PW_MR=4', '-DDARTS_EXPECT_WIDTH=8']
    assert kernels.cache_dir() != default_dir


def _compiler_accepts(flags):
    compiler = os.environ.get('CXX', 'c++')
    if shutil.which(compiler) is None:
        return False
    r = subprocess.run([compiler, *flags, '-x', 'c++', '-E', '-o', os.devnull, os.devnull], capture_output=True)
    return r.returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize('isa,flags', [('avx512', ['-O3', '-march=skylake-avx512']),
                                       ('avx2', ['-O3', '-march=haswell']), ('scalar', ['-O3', '-march=x86-64'])])
def test_every_isa_compiles_whatever_this_cpu_runs(tmp_path, isa, flags):
    """The AVX-512 path (and the others) compiles for a CPU that has it, on any host: common.h's static
    assertion fails the compile unless the flags give the ISA's vector width."""
    if not _compiler_accepts(flags):
        pytest.skip(f'the compiler does not take {flags}')
    ok, message = kernels.compile_only(isa, flags, str(tmp_path))
    assert ok, message
    ok, message = kernels.compile_only('avx2' if isa == 'avx512' else 'avx512', flags, str(tmp_path))
    assert not ok and 'vector width' in message


THREAD_SPLIT = """
import numpy as np, paddle
from darts import kernels
rng = np.random.default_rng(0)
x = paddle.to_tensor(rng.standard_normal((21, 8, 6, 6)).astype('float32'), stop_gradient=False)
w = paddle.to_tensor(rng.standard_normal((4, 8, 1, 1)).astype('float32'), stop_gradient=False)
y = kernels.module().darts_pointwise_conv2d(x, w, 1, 1)
g = rng.standard_normal(y.shape).astype('float32')
(dw,) = paddle.grad(y, [w], paddle.to_tensor(g))
expected = np.einsum('nohw,nihw->oi', g.astype('float64'), x.numpy().astype('float64'))
print(float(np.abs(dw.numpy()[:, :, 0, 0] - expected).max()), dw.numpy().tobytes().hex())
"""


@pytest.mark.slow
def test_pointwise_grad_weight_is_the_same_bits_whatever_the_thread_count(compiled):
    """The grad weight is summed over fixed slices of the batch (21 samples: 16 slices of 1 or
    2), the slices in order, so 1 and 2 threads give the same bits, and every sample counts."""
    outputs = []
    for threads in ('1', '2'):
        r = subprocess.run([sys.executable, '-c', THREAD_SPLIT], capture_output=True, text=True, cwd=ROOT,
                           env=dict(os.environ, OMP_NUM_THREADS=threads), timeout=600)
        assert r.returncode == 0, r.stderr
        error, bits = r.stdout.strip().splitlines()[-1].split()
        assert float(error) < 1e-4, (threads, error)
        outputs.append(bits)
    assert outputs[0] == outputs[1]


def test_operations_use_the_compiled_ops_on_cpu_and_paddles_within_paddle_kernels(compiled):
    from operations import ParamSet, Layout, conv
    paddle.enable_static()   # as the scripts run; not left to an earlier test

    def build(ps, x):
        conv(ps, 'dw', x, 4, 3, 1, 1, groups=4)
        conv(ps, 'pw', x, 6, 1, 2)
    layout = Layout.record(lambda ps: build(ps, paddle.zeros([1, 4, 8, 8])))
    for forced_off, expected in ((False, {'darts_depthwise_conv2d', 'darts_pointwise_conv2d'}),
                                 (True, {'depthwise_conv2d', 'conv2d'})):
        program = paddle.static.Program()
        with paddle.static.program_guard(program, paddle.static.Program()):
            x = paddle.static.data('x', [-1, 4, 8, 8], 'float32')
            ps = ParamSet(layout, paddle.static.data('w', [layout.size], 'float32'))
            if forced_off:
                with kernels.paddle_kernels():
                    build(ps, x)
            else:
                build(ps, x)
        names = {op.name().split('.')[-1] for op in program.global_block().ops}
        assert expected <= names, names


def _status_in_subprocess(env):
    code = "from darts import kernels; print(kernels.status())"
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, **env), timeout=600)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()


@pytest.mark.slow   # a subprocess each; the quick tier keeps one-line errors of its own (test_cli, test_search_space)
def test_a_later_process_loads_the_cached_build(compiled):
    lines = _status_in_subprocess({})
    assert len(lines) == 1 and 'loaded from the cache' in lines[0], lines


def test_without_a_compiler_paddles_kernel_is_used_and_said_so_in_one_line(tmp_path):
    lines = _status_in_subprocess({'CXX': str(tmp_path / 'no-such-compiler'), 'PADDLE_DARTS_CACHE': str(tmp_path)})
    assert lines == [f"Paddle's convolutions (no C++ compiler: '{tmp_path / 'no-such-compiler'}' "
                     f"not found; Debian: apt-get install g++)"]
    assert not (tmp_path / 'kernels').exists()
    lines = _status_in_subprocess({'PADDLE_DARTS_CUSTOM_KERNELS': '0'})
    assert lines == ["Paddle's convolutions (PADDLE_DARTS_CUSTOM_KERNELS=0)"]


@pytest.mark.parametrize('network', ['cifar', 'imagenet'])
def test_training_networks_on_the_compiled_kernels_equal_them_on_paddles(dygraph, compiled, network):
    """train.py's / train_imagenet.py's network (batch statistics, auxiliary head): the logits
    and the weight gradient with the compiled kernels against Paddle's (what the exported model uses)."""
    import genotypes
    import model
    from operations import ParamSet
    build, size = (model.network_cifar, 32) if network == 'cifar' else (model.network_imagenet, 224)
    kw = dict(genotype=genotypes.DARTS_V2, c=8, num_classes=10, layers=3, auxiliary=True)
    paddle.enable_static()
    try:
        layout = model.layout_of(build, size, **kw)
    finally:
        paddle.disable_static()
    rng = np.random.default_rng(0)
    weights = layout.initial_weights(rng)
    x = paddle.to_tensor(rng.standard_normal((4, 3, size, size)).astype('float32'))
    y = paddle.to_tensor(rng.integers(0, 10, 4))

    def run():
        w = paddle.to_tensor(weights, stop_gradient=False)
        logits, aux = build(ParamSet(layout, w, 'update'), x, **kw)
        loss = F.cross_entropy(logits, y) + 0.4 * F.cross_entropy(aux, y)
        return logits.numpy(), paddle.grad(loss, [w])[0].numpy()
    compiled_logits, compiled_grad = run()
    with kernels.paddle_kernels():
        logits, grad = run()
    np.testing.assert_allclose(compiled_logits, logits, rtol=1e-4, atol=1e-4 * np.abs(logits).max())
    np.testing.assert_allclose(compiled_grad, grad, rtol=1e-3, atol=1e-4 * np.abs(grad).max())
