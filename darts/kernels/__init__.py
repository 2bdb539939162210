"""Compiled CPU kernels (Paddle custom operators), with Paddle's own kernels as the fallback.

`depthwise_conv(x, w, stride, padding, dilation)` and `pointwise_conv(x, w, stride, groups)`
are the calls the graph builders make for a depthwise and a 1x1 convolution.  On the CPU
they use kernels/depthwise_conv.cc and kernels/pointwise_conv.cc, compiled on first use by
paddle.utils.cpp_extension for this machine into ~/.cache/paddle-darts/kernels/<hash>
(PADDLE_DARTS_CACHE overrides the root) and loaded from there afterwards.

One source serves every vector width (common.h picks it from the compiler's ISA macros); the
flags choose the ISA: the widest this CPU has (avx512: 16 floats, avx2: 8, scalar: 1), or
DARTS_KERNEL_ISA=avx512|avx2|scalar for a narrower build (`isa_flags`).  The ISA and the flags
are part of the cache key, as is the CPU.  DARTS_KERNEL_DEFINES adds -D flags (register-tile
sizes: benchmarks/conv_kernels.py --sweep_tiles).

Anything else (a GPU, no C++ compiler: $CXX or c++, a failed build, `disable()` /
--no_custom_kernels, PADDLE_DARTS_CUSTOM_KERNELS=0) gives Paddle's conv2d, and `status()` says
which is in use and why.
"""
import contextlib
import hashlib
import io
import logging
import os
import platform
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = [os.path.join(HERE, name) for name in ('depthwise_conv.cc', 'pointwise_conv.cc')]
HEADERS = [os.path.join(HERE, 'common.h')]
ISAS = ('avx512', 'avx2', 'scalar')            # widest first
WIDTH = dict(avx512=16, avx2=8, scalar=1)      # floats per vector

_state = dict(module=None, tried=False, enabled=None, status=None, forced_off=False, isa=None)


def disable(reason='--no_custom_kernels'):
    """Use Paddle's kernels from now on (before the programs are built)."""
    _state.update(enabled=False, module=None, tried=True, status=f"Paddle's convolutions ({reason})")


@contextlib.contextmanager
def paddle_kernels():
    """Within: depthwise_conv and pointwise_conv build Paddle's kernel (for programs that leave the process)."""
    saved = _state['forced_off']
    _state['forced_off'] = True
    try:
        yield
    finally:
        _state['forced_off'] = saved


def enabled():
    if _state['enabled'] is None:
        _state['enabled'] = os.environ.get('PADDLE_DARTS_CUSTOM_KERNELS', '1') not in ('0', 'false', 'no', 'off')
        if not _state['enabled']:
            disable('PADDLE_DARTS_CUSTOM_KERNELS=0')
    return _state['enabled']


def cache_dir():
    """One build per (source, flags, Paddle version, CPU, checkout): -march=native code runs only on its CPU
    kind, and Paddle's loader rebuilds a folder whose recorded source paths differ, so two checkouts
    sharing one folder would each rebuild it under the other's feet."""
    import paddle
    key = hashlib.sha256()
    for source in SOURCES + HEADERS:
        with open(source, 'rb') as f:
            key.update(f.read())
    key.update(' '.join(build_flags()[1] + [paddle.__version__, _cpu_model(), sys.version] + SOURCES).encode())
    root = os.environ.get('PADDLE_DARTS_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'paddle-darts'))
    return os.path.join(root, 'kernels', key.hexdigest()[:16])


def _cpuinfo():
    """The first 'model name', 'flags' and 'Features' (ARM) lines of /proc/cpuinfo, by field ({} elsewhere)."""
    found = {}
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                for field in ('model name', 'flags', 'Features'):
                    if line.startswith(field) and field not in found:
                        found[field] = line.strip()
    except OSError:
        pass
    return found


def _cpu_model():
    """The CPU's model name and feature flags (the name alone, e.g. "AMD EPYC", covers CPUs with and without
    AVX-512)."""
    return ' | '.join(_cpuinfo().values()) or platform.processor()


def host_isas():
    """The ISAs this CPU runs, widest first (scalar always)."""
    line = _cpuinfo().get('flags', '')
    flags = set(line.split(':', 1)[1].split()) if ':' in line else set()
    have = dict(avx512='avx512f' in flags, avx2={'avx2', 'fma'} <= flags, scalar=True)
    return [isa for isa in ISAS if have[isa]]


def isa_flags(isa):
    """The compiler flags of one ISA's build: the host's own code (-march=native) less any wider vectors."""
    flags = ['-O3', '-march=native', '-fopenmp']
    if isa == 'avx2':
        flags += ['-mno-avx512f']
    elif isa == 'scalar':
        if platform.machine().lower() in ('x86_64', 'amd64', 'i386', 'i686'):
            flags += ['-mno-avx', '-mno-avx2', '-mno-fma']
        flags += ['-DDARTS_SCALAR']
    extra = os.environ.get('DARTS_KERNEL_DEFINES', '').split()
    return flags + [f for f in extra if f.startswith('-D')] + [f'-DDARTS_EXPECT_WIDTH={WIDTH[isa]}']


def build_flags():
    """(ISA, flags, note): DARTS_KERNEL_ISA's choice if this CPU runs it, else the widest it runs; the note says
    why a request was not followed ('' if it was, or nothing was asked)."""
    host = host_isas()
    asked = os.environ.get('DARTS_KERNEL_ISA', '').strip().lower()
    note = ''
    if asked and asked not in ISAS:
        note = f'DARTS_KERNEL_ISA={asked!r} is not one of {", ".join(ISAS)}'
    elif asked and asked not in host:
        note = f'DARTS_KERNEL_ISA={asked}: this CPU has no {asked}'
    isa = asked if asked in host else host[0]
    return isa, isa_flags(isa), note


def module():
    """The compiled op module, or None; compiled or loaded once per process."""
    if _state['tried']:
        return _state['module']
    _state['tried'] = True
    if not enabled():
        return None
    compiler = os.environ.get('CXX', 'c++')
    if shutil.which(compiler) is None:
        _state['status'] = (f"Paddle's convolutions (no C++ compiler: {compiler!r} not found; "
                            f"Debian: apt-get install g++)")
        return None
    isa, flags, note = build_flags()
    build = cache_dir()
    os.makedirs(build, exist_ok=True)
    fresh = not any(name.endswith('.so') for _, _, files in os.walk(build) for name in files)
    t0 = time.time()
    try:
        with _lock(os.path.join(build, '.lock')), _quiet():
            from paddle.utils.cpp_extension import load
            _state['module'] = load(name='darts_kernels', sources=SOURCES, extra_cxx_cflags=flags,
                                    extra_ldflags=['-fopenmp'], build_directory=build)
    except Exception as e:  # noqa: BLE001 - a failed build must never stop a run: Paddle's kernel does the same work
        _state['status'] = f"Paddle's convolutions (compiling {' '.join(SOURCES)} failed: {type(e).__name__}: " \
                           f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''})"[:400]
        return None
    how = f'compiled in {time.time() - t0:.0f}s, once' if fresh else 'loaded from the cache'
    note = f'; {note}' if note else ''
    _state['status'] = f'compiled, {isa}, {WIDTH[isa]} float{"s" if WIDTH[isa] > 1 else ""}: depthwise and ' \
                       f'pointwise convolutions ({how}: {build}{note})'
    _state['isa'] = isa
    return _state['module']


def status():
    """One line: which convolution kernels the programs use, and why."""
    module()
    return _state['status']


def isa():
    """The ISA of the compiled kernels in use ('avx512', 'avx2', 'scalar'), or None (Paddle's)."""
    module()
    return _state['isa'] if _state['module'] is not None else None


def compile_only(isa, flags, out_dir):
    """Compile (not link, not load) both sources for `isa` with these compiler flags into out_dir, as the
    loader's build would compile them; common.h fails the compile unless the flags give `isa`'s vector width.
    For building code this CPU cannot run, e.g. isa='avx512', flags=['-O3', '-march=skylake-avx512'].
    Returns (ok, the compiler's last lines)."""
    import sysconfig
    from paddle.utils.cpp_extension.extension_utils import find_paddle_includes
    compiler = os.environ.get('CXX', 'c++')
    includes = [f'-I{d}' for d in find_paddle_includes() + [sysconfig.get_paths()['include']]]
    extra = ['-DDARTS_SCALAR'] if isa == 'scalar' else []
    for source in SOURCES:
        obj = os.path.join(out_dir, os.path.basename(source) + '.o')
        cmd = [compiler, '-std=c++17', '-fPIC', '-fopenmp', '-D_GLIBCXX_USE_CXX11_ABI=1', *includes, *flags, *extra,
               f'-DDARTS_EXPECT_WIDTH={WIDTH[isa]}', '-DPADDLE_EXTENSION_NAME=darts_kernels', '-c', source, '-o', obj]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            return False, '\n'.join((r.stderr or r.stdout).strip().splitlines()[-20:])
    return True, ''


def depthwise_conv(x, w, stride=1, padding=0, dilation=1):
    """out[n, c] = sum_{kh, kw} w[c, 0, kh, kw] * x[n, c, oh*s - p + kh*d, ow*s - p + kw*d] (zero padding)."""
    import paddle.nn.functional as F
    m = _compiled_for(x)
    if m is None:
        return F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation, groups=x.shape[1])
    return m.darts_depthwise_conv2d(x, w, int(stride), int(padding), int(dilation))


def pointwise_conv(x, w, stride=1, groups=1):
    """out[n, g*Co + o, oh, ow] = sum_i w[g*Co + o, i, 0, 0] * x[n, g*Ci + i, oh*s, ow*s] (no padding)."""
    import paddle.nn.functional as F
    m = _compiled_for(x)
    if m is None:
        return F.conv2d(x, w, stride=stride, groups=groups)
    return m.darts_pointwise_conv2d(x, w, int(stride), int(groups))


def _compiled_for(x):
    """The compiled module when x is a float32 tensor on the CPU and it is in use, else None."""
    import paddle
    on_cpu = paddle.get_device() == 'cpu' and x.dtype == paddle.float32
    return module() if on_cpu and not _state['forced_off'] else None


@contextlib.contextmanager
def _lock(path):
    """An exclusive file lock: two processes never build into one folder at once."""
    import fcntl
    with open(path, 'w') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet():
    """Keep the compiler's and Paddle's build chatter (Python-level and fd 1/2) out of the run's output.
    Paddle's build logger ('utils.cpp_extension') has a handler bound to the stderr of its import, which
    neither redirect reaches when that is not fd 2 (a test's captured stderr): it is raised to WARNING."""
    build_log = logging.getLogger('utils.cpp_extension')
    level = build_log.level
    build_log.setLevel(logging.WARNING)
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, 'w') as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            build_log.setLevel(level)
