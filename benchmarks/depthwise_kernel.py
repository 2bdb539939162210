"""The depthwise convolution alone: compiled op against Paddle's kernel, and GB/s against a copy, as JSON.

    python benchmarks/depthwise_kernel.py                 # the search network's shapes + 64x64x32x32
    python benchmarks/depthwise_kernel.py --repeats 50

For each shape (batch, channels, size, kernel, dilation; stride 1, 'same' padding):
milliseconds of the forward and of the backward (grad input + grad weight), each the median
of --repeats calls, for the compiled op and Paddle's conv2d with groups = channels; and the
compiled op's bandwidth, counted as the bytes it must move at least (forward: read x, write
out; backward: read x and dout, write dx), beside a plain copy (numpy, one thread) of the
same bytes (which fit in this machine's L3 cache) and of 1 GiB (main memory).
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from timing import median_seconds  # noqa: E402

# (batch, channels, size, kernel, dilation): the widest depthwise convolutions of the search
# network at batch 16, C=8 (the wide path stacks an op's edges along the channels), and the
# issue's 64x64x32x32
SHAPES = [(16, 128, 8, 3, 2), (16, 64, 8, 5, 1), (16, 64, 16, 3, 2), (16, 32, 16, 5, 1), (16, 16, 32, 3, 1),
          (16, 16, 32, 5, 2), (64, 64, 32, 3, 1), (64, 64, 32, 5, 1)]


def copy_seconds(nbytes, repeats):
    import numpy as np
    src = np.ones(nbytes // 4, dtype='float32')
    dst = np.empty_like(src)
    return median_seconds(lambda: np.copyto(dst, src), repeats)


def build(op_name, n, c, s, k, d, backward):
    """A static program over persistable x, w, dout (set once, so nothing is fed per call) that
    fetches one element of each result: the timing is the kernels' and Paddle's per-op overhead."""
    import paddle
    import paddle.nn.functional as F
    from darts import kernels
    from operations import declare
    pad = d * (k - 1) // 2
    program = paddle.static.Program()
    with paddle.static.program_guard(program, paddle.static.Program()):
        x = declare('bench/x', [n, c, s, s], trainable=True)
        w = declare('bench/w', [c, 1, k, k], trainable=True)
        if op_name == 'compiled':
            out = kernels.module().darts_depthwise_conv2d(x, w, 1, pad, d)
        else:
            out = F.conv2d(x, w, padding=pad, dilation=d, groups=c)
        fetch = [out[0, 0, 0, 0]]
        if backward:
            dx, dw = paddle.static.gradients([out], [x, w], [declare('bench/dout', [n, c, s, s])])
            fetch = [dx[0, 0, 0, 0], dw[0, 0, 0, 0]]
    return program, fetch


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--repeats', type=int, default=20)
    args = p.parse_args()
    import numpy as np
    from darts import process
    process.prepare()   # before paddle is imported
    import paddle
    from darts import kernels, tensors
    paddle.enable_static()
    if kernels.module() is None:
        sys.exit(f'depthwise_kernel.py: no compiled op: {kernels.status()}')
    exe = paddle.static.Executor(paddle.CPUPlace())
    scope = paddle.static.global_scope()
    rng = np.random.default_rng(0)
    rows = []
    for n, c, s, k, d in SHAPES:
        tensors.set_tensors(scope, paddle.CPUPlace(), {
            'bench/x': rng.standard_normal((n, c, s, s)), 'bench/w': rng.standard_normal((c, 1, k, k)),
            'bench/dout': rng.standard_normal((n, c, s, s))})
        row = dict(batch=n, channels=c, size=s, kernel=k, dilation=d)
        for name in ('compiled', 'paddle'):
            seconds = {}
            for backward in (False, True):
                program, fetch = build(name, n, c, s, k, d, backward)
                seconds[backward] = median_seconds(lambda: exe.run(program, fetch_list=fetch), args.repeats)
            row[f'{name}_forward_ms'] = round(seconds[False] * 1e3, 3)
            row[f'{name}_backward_ms'] = round(max(seconds[True] - seconds[False], 0.0) * 1e3, 3)
        plane_bytes = n * c * s * s * 4
        row['compiled_forward_GBps'] = round(2 * plane_bytes / row['compiled_forward_ms'] / 1e6, 2)
        row['compiled_backward_GBps'] = round(3 * plane_bytes / max(row['compiled_backward_ms'], 1e-6) / 1e6, 2)
        row['copy_same_bytes_GBps'] = round(2 * plane_bytes / copy_seconds(plane_bytes, args.repeats) / 1e9, 2)
        for name in ('forward', 'backward'):
            row[f'{name}_speedup'] = round(row[f'paddle_{name}_ms'] / max(row[f'compiled_{name}_ms'], 1e-6), 2)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    gib = 1 << 30
    memory = round(2 * gib / copy_seconds(gib, 5) / 1e9, 2)
    print(json.dumps(dict(shapes=rows, copy_1GiB_GBps=memory, omp_threads=os.environ.get('OMP_NUM_THREADS'),
                          cores=os.cpu_count(), depthwise=kernels.status(), paddle=paddle.__version__),
                     indent=1))


if __name__ == '__main__':
    main()
