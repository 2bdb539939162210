"""The 1x1 and depthwise convolutions alone, at the networks' shapes: our compiled kernels (each ISA this CPU
runs), Paddle's own and PyTorch's, in GFLOP/s against the machine's peak, as JSON.

    python benchmarks/conv_kernels.py                          # ours (avx2 / scalar here), Paddle's, PyTorch's
    python benchmarks/conv_kernels.py --isas avx2 --no_torch --repeats 20
    python benchmarks/conv_kernels.py --sweep_tiles            # register-tile candidates of the avx2 build

Each implementation runs in its own process (one compiled build per process; DARTS_KERNEL_ISA picks ours),
with --threads OpenMP / intra-op threads, eager (dygraph / PyTorch eager): per shape the median of --repeats
forward calls, and of forward + backward (grad input and grad weight under one output gradient); the
backward time is their difference; the fastest call of each too (on a shared machine the median carries
the other processes' load, and with 2 OpenMP threads a descheduled thread stalls every barrier).
FLOPs: forward 2 * N * C_out * (C_in / groups) * H_out * W_out for a 1x1 convolution,
2 * N * C * H_out * W_out * k * k for a depthwise one; the backward twice the forward (grad input and grad
weight).  Depthwise bytes (it is memory-bound): forward x and out, backward x, dout and dx,
4 bytes each.  The peak is computed, not measured: threads x 2 FMA units x 8 floats (AVX2) x 2 flops x the
clock of /proc/cpuinfo ("cpu MHz", the nominal clock a VM shows; boost clocks are not visible here).  The
load average before and after each process is recorded: on a shared machine it says how much the figures
mean.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from timing import call_seconds   # benchmarks/ is this script's folder

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# (name, batch, c_in, c_out, size, stride, groups): the evaluation networks' 1x1 convolutions (preprocess
# of a cell's inputs, the pointwise halves of sep_conv / dil_conv at each stage's channels, factorized
# reduce at stride 2): train.py's small config (C=16, 8 cells, batch 32) and the paper's (C=36, batch 96);
# one grouped convolution as the search's stacked edges make
POINTWISE = [
    ('small preprocess 32px', 32, 64, 16, 32, 1, 1),
    ('small sep_conv 32px', 32, 16, 16, 32, 1, 1),
    ('small sep_conv 8px', 32, 64, 64, 8, 1, 1),
    ('paper preprocess 32px', 96, 144, 36, 32, 1, 1),
    ('paper sep_conv 32px', 96, 36, 36, 32, 1, 1),
    ('paper sep_conv 16px', 96, 72, 72, 16, 1, 1),
    ('paper sep_conv 8px', 96, 144, 144, 8, 1, 1),
    ('paper factorized reduce', 96, 144, 72, 32, 2, 1),
    ('search grouped 16px', 64, 128, 128, 16, 1, 4),
]
# (name, batch, channels, size, kernel, stride, dilation), 'same' padding: sep_conv 3x3 / 5x5 and dil_conv
# at each stage, a reduction cell's stride-2 one
DEPTHWISE = [
    ('small sep_conv_3x3 32px', 32, 16, 32, 3, 1, 1),
    ('small sep_conv_5x5 32px', 32, 16, 32, 5, 1, 1),
    ('small dil_conv_3x3 8px', 32, 64, 8, 3, 1, 2),
    ('paper sep_conv_3x3 32px', 96, 36, 32, 3, 1, 1),
    ('paper sep_conv_5x5 32px', 96, 36, 32, 5, 1, 1),
    ('paper dil_conv_5x5 16px', 96, 72, 16, 5, 1, 2),
    ('paper sep_conv_3x3 8px', 96, 144, 8, 3, 1, 1),
    ('paper sep_conv_3x3 stride 2', 96, 72, 16, 3, 2, 1),
    ('paper reduction 1 sep_conv_3x3 s2', 96, 72, 32, 3, 2, 1),
    ('paper reduction 2 dil_conv_5x5 s2', 96, 144, 16, 5, 2, 2),
]

# register-tile candidates for --sweep_tiles (pointwise rows x vectors, depthwise rows): AVX2 has 16 ymm
# registers; a pointwise block needs rows x vectors accumulators + vectors for B + 1 for A
TILES = [(6, 2, 4), (4, 3, 2), (3, 4, 6), (8, 1, 8), (5, 2, 3)]


def pointwise_flops(n, ci, co, s, stride, groups):
    so = (s - 1) // stride + 1
    return 2 * n * co * (ci // groups) * so * so


def depthwise_geometry(n, c, s, k, stride, d):
    pad = d * (k - 1) // 2
    so = (s + 2 * pad - d * (k - 1) - 1) // stride + 1
    return pad, so


def depthwise_flops(n, c, s, k, stride, d):
    return 2 * n * c * depthwise_geometry(n, c, s, k, stride, d)[1] ** 2 * k * k


def depthwise_bytes(n, c, s, k, stride, d):
    so = depthwise_geometry(n, c, s, k, stride, d)[1]
    return 4 * (n * c * s * s + n * c * so * so), 4 * (2 * n * c * s * s + n * c * so * so)


def times(fn, repeats, warmup=2):
    """(median, fastest) wall time of fn() over `repeats` calls after `warmup`: the median is the benchmarks'
    rule (timing.py); the fastest call says more when other processes share the cores."""
    seconds = call_seconds(fn, repeats, warmup)
    return statistics.median(seconds), min(seconds)


def worker(impl, repeats, threads, shapes):
    """Times every shape with one implementation: 'ours', 'paddle' or 'torch'; returns {name: row}."""
    sys.path.insert(0, ROOT)
    sys.path.insert(0, HERE)
    import numpy as np
    rng = np.random.default_rng(0)
    rows, info = {}, {}
    if impl == 'torch':
        import torch
        import torch.nn.functional as TF
        torch.set_num_threads(threads)
        info['torch'] = torch.__version__

        def tensor(shape, grad=False):
            return torch.tensor(rng.standard_normal(shape).astype('float32'), requires_grad=grad)

        def grad(y, xs, g):
            return torch.autograd.grad(y, xs, g)
        pw = lambda x, w, st, gr: TF.conv2d(x, w, stride=st, groups=gr)  # noqa: E731
        dw = lambda x, w, st, p, d: TF.conv2d(x, w, stride=st, padding=p, dilation=d, groups=x.shape[1])  # noqa: E731
    else:
        from darts import process
        process.prepare()
        import paddle
        import paddle.nn.functional as F
        from darts import kernels
        paddle.disable_static()
        info['paddle'] = paddle.__version__

        def tensor(shape, grad=False):
            return paddle.to_tensor(rng.standard_normal(shape).astype('float32'), stop_gradient=not grad)

        def grad(y, xs, g):
            return paddle.grad(y, xs, g)
        if impl == 'ours':
            m = kernels.module()
            if m is None:
                sys.exit(f'conv_kernels.py: no compiled kernels: {kernels.status()}')
            info['kernels'] = kernels.status()
            pw, dw = m.darts_pointwise_conv2d, m.darts_depthwise_conv2d
        else:
            pw = lambda x, w, st, gr: F.conv2d(x, w, stride=st, groups=gr)  # noqa: E731
            dw = lambda x, w, st, p, d: F.conv2d(x, w, stride=st, padding=p, dilation=d, groups=x.shape[1])  # noqa: E731
    for kind, name, args in shapes:
        if kind == 'pointwise':
            n, ci, co, s, st, gr = args
            x, w = tensor((n, ci, s, s), True), tensor((co, ci // gr, 1, 1), True)
            fwd = lambda: pw(x, w, st, gr)  # noqa: E731
        else:
            n, c, s, k, st, d = args
            pad, _ = depthwise_geometry(*args)
            x, w = tensor((n, c, s, s), True), tensor((c, 1, k, k), True)
            fwd = lambda: dw(x, w, st, pad, d)  # noqa: E731
        g = tensor(tuple(fwd().shape))
        forward, forward_min = times(fwd, repeats)
        both, both_min = times(lambda: grad(fwd(), [x, w], g), repeats)
        rows[name] = dict(forward_ms=round(forward * 1e3, 3), backward_ms=round(max(both - forward, 1e-6) * 1e3, 3),
                          min_forward_ms=round(forward_min * 1e3, 3),
                          min_backward_ms=round(max(both_min - forward_min, 1e-6) * 1e3, 3))
    return dict(rows=rows, info=info)


def run_worker(impl, args, env=None, shapes=None):
    """One implementation in a fresh process; its rows, with the load average around it."""
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', impl, '--repeats', str(args.repeats),
           '--threads', str(args.threads)]
    if shapes:
        cmd += ['--shapes', ','.join(shapes)]
    load_before = os.getloadavg()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=3600,
                       env=dict(os.environ, OMP_NUM_THREADS=str(args.threads), **(env or {})))
    if r.returncode != 0:
        return dict(error=(r.stderr or r.stdout).strip().splitlines()[-1:])
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out['load_before_after'] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    return out


def all_shapes():
    return [('pointwise', s[0], s[1:]) for s in POINTWISE] + [('depthwise', s[0], s[1:]) for s in DEPTHWISE]


def cpu():
    model, mhz = '', 0.0
    with open('/proc/cpuinfo') as f:
        for line in f:
            if line.startswith('model name') and not model:
                model = line.split(':', 1)[1].strip()
            if line.startswith('cpu MHz') and not mhz:
                mhz = float(line.split(':', 1)[1])
    return model, mhz


def gflops(shape, ms_forward, ms_backward):
    kind, _, args = shape
    f = pointwise_flops(*args) if kind == 'pointwise' else depthwise_flops(*args)
    row = dict(forward_GFLOPs=round(f / ms_forward / 1e6, 2), backward_GFLOPs=round(2 * f / ms_backward / 1e6, 2))
    if kind == 'depthwise':
        fb, bb = depthwise_bytes(*args)
        row.update(forward_GBps=round(fb / ms_forward / 1e6, 2), backward_GBps=round(bb / ms_backward / 1e6, 2))
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--repeats', type=int, default=10)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--isas', nargs='+', default=None, help='our builds to time (default: every one this CPU runs)')
    p.add_argument('--no_torch', action='store_true')
    p.add_argument('--sweep_tiles', action='store_true', help='time the register-tile candidates (avx2 builds)')
    p.add_argument('--tiles', nargs='+', default=None, metavar='MR,NV,ROWS',
                   help='--sweep_tiles: these candidates (pointwise rows, vectors; depthwise rows), each run in turn')
    p.add_argument('--rounds', type=int, default=1, help='--sweep_tiles: run the candidates this many times, in turn')
    p.add_argument('--worker', choices=['ours', 'paddle', 'torch'], help=argparse.SUPPRESS)
    p.add_argument('--shapes', default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    shapes = all_shapes()
    if args.shapes:
        wanted = args.shapes.split(',')
        shapes = [s for s in shapes if s[1] in wanted]
    if args.worker:
        print(json.dumps(worker(args.worker, args.repeats, args.threads, shapes)))
        return
    sys.path.insert(0, ROOT)
    from darts import kernels
    model, mhz = cpu()
    peak_core = 2 * 8 * 2 * mhz / 1e3
    result = dict(cpu=model, cpu_MHz=mhz, cores=os.cpu_count(), threads=args.threads,
                  peak_GFLOPs=round(peak_core * min(args.threads, os.cpu_count()), 1),
                  peak_assumption='threads x 2 FMA units x 8 floats (AVX2) x 2 flops x cpu MHz',
                  host_isas=kernels.host_isas())
    runs = {}
    if args.sweep_tiles:
        cache = tempfile.mkdtemp(prefix='darts-tiles-')
        tiles = [tuple(map(int, t.split(','))) for t in args.tiles] if args.tiles else TILES
        for r in range(args.rounds):
            for mr, nv, rows in tiles:
                env = dict(DARTS_KERNEL_ISA='avx2', PADDLE_DARTS_CACHE=cache,
                           DARTS_KERNEL_DEFINES=f'-DDARTS_PW_MR={mr} -DDARTS_PW_NV={nv} -DDARTS_DW_ROWS={rows}')
                name = f'avx2 pointwise {mr}x{nv * 8} depthwise {rows} rows'
                name += f' round {r + 1}' if args.rounds > 1 else ''
                runs[name] = run_worker('ours', args, env)
                print(json.dumps({k: v.get('load_before_after') for k, v in runs.items()}), file=sys.stderr)
    else:
        for isa in args.isas or kernels.host_isas():
            runs[f'ours {isa}'] = run_worker('ours', args, dict(DARTS_KERNEL_ISA=isa))
            print(f'ours {isa} done', file=sys.stderr)
        runs['paddle'] = run_worker('paddle', args)
        if not args.no_torch:
            runs['torch'] = run_worker('torch', args)
    result['runs'] = {k: {kk: vv for kk, vv in v.items() if kk != 'rows'} for k, v in runs.items()}
    table = []
    for shape in shapes:
        kind, name, dims = shape
        row = dict(op=kind, shape=name, dims=dims)
        for impl, run in runs.items():
            if 'rows' in run and name in run['rows']:
                t = run['rows'][name]
                row[impl] = dict(t, **gflops(shape, t['forward_ms'], t['backward_ms']))
                row[impl]['fastest'] = gflops(shape, t['min_forward_ms'], t['min_backward_ms'])
        table.append(row)
    result['shapes'] = table
    print(json.dumps(result, indent=1))


if __name__ == '__main__':
    main()
