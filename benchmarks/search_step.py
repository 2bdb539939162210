"""Seconds per search step and peak memory, first and second order, as JSON.

    python benchmarks/search_step.py --batch_size 16 --init_channels 8 --layers 5 --image_size 32
    python benchmarks/search_step.py --partial_channels 4          # PC-DARTS, K = 4
    python benchmarks/search_step.py --primitives none,skip_connect,sep_conv_3x3,mb_conv_3x3
    python benchmarks/search_step.py --auxiliary_skip --beta_decay --hessian_eigen   # the guards' costs

Each order runs in its own process so its peak resident memory (ru_maxrss) is its own.
Reported: build time, time to the end of the first step (Paddle prepares each program
on its first run), and the median of --steps steps after --warmup.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def print_report(report, out=None):
    """The benchmark's JSON on stdout, and in the file `out` too (--out)."""
    text = json.dumps(report, indent=1)
    print(text)
    if out:
        with open(out, 'w') as f:
            f.write(text + '\n')


def add_size_arguments(p):
    """The network-size flags the search-step benchmarks share."""
    p.add_argument('--batch_size', type=int, default=16)
    p.add_argument('--init_channels', type=int, default=8)
    p.add_argument('--layers', type=int, default=5)
    p.add_argument('--image_size', type=int, default=32)


def random_batch(batch_size, image_size):
    """A fixed random train and val batch (3 channels, 10 classes), as run_search_step takes it."""
    import numpy as np
    rng = np.random.default_rng(0)
    b, s = batch_size, image_size
    return dict(train_x=rng.standard_normal((b, 3, s, s)).astype('float32'), train_y=rng.integers(0, 10, b),
                val_x=rng.standard_normal((b, 3, s, s)).astype('float32'), val_y=rng.integers(0, 10, b))


def ready_programs(cfg, place):
    """(programs, executor, scope, build seconds): cfg's programs built, their state set in the global scope."""
    import paddle
    from architect import build_search_programs, initial_state, schedule_values, scratch_state, set_tensors
    t0 = time.time()
    progs = build_search_programs(cfg)
    build = time.time() - t0
    scope = paddle.static.global_scope()
    set_tensors(scope, place, {**initial_state(progs.layout, 0, cfg.arch_shapes),
                               **scratch_state(progs.layout, cfg.arch_shapes),
                               **schedule_values(cfg, aux_skip=0.5, beta_decay=10.0)})
    return progs, paddle.static.Executor(place), scope, build


def measure(args, second_order):
    from darts import process
    process.prepare()   # before paddle is imported
    import paddle
    from darts import distributed
    from architect import SearchConfig, count_ops, hessian_eigenvalue, run_search_step
    from model_search import SearchSpace
    from operations import stem_reductions
    paddle.enable_static()
    place = distributed.select_place(args.device)
    space = SearchSpace(ops=tuple(args.primitives.split(',')), nodes=args.nodes, partial_channels=args.partial_channels,
                        edge_normalization=args.partial_channels > 1, fast=not args.generic,
                        auxiliary_skip=args.auxiliary_skip)
    cfg = SearchConfig(init_channels=args.init_channels, layers=args.layers, image_size=args.image_size,
                       second_order=second_order, space=space, beta_decay=args.beta_decay,
                       hessian_eigen=args.hessian_eigen)
    progs, exe, scope, build = ready_programs(cfg, place)
    batch = random_batch(args.batch_size, args.image_size)
    times = []
    for _ in range(args.warmup + args.steps):
        t = time.time()
        run_search_step(exe, progs, batch, 0.025)
        times.append(time.time() - t)
    timed = times[args.warmup:]
    eigen = {}
    if args.hessian_eigen:   # one estimate as train_search.py runs it (20 products), the first preparing
        for what in ('hessian_eigen_first_seconds', 'hessian_eigen_seconds'):
            t = time.time()
            hessian_eigenvalue(exe, scope, place, progs, batch['val_x'], batch['val_y'])
            eigen[what] = time.time() - t
    from darts import kernels
    return dict(order='second' if second_order else 'first', seconds_per_step_median=statistics.median(timed),
                kernels=kernels.status(),
                seconds_per_step_min=min(timed), steps_timed=len(timed), first_step_seconds=times[0],
                build_seconds=build, ops=sum(count_ops(p) for p in progs.programs.values()),
                weights=progs.layout.size, stem_reductions=stem_reductions(args.image_size),
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **eigen)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_size_arguments(p)
    p.add_argument('--primitives', default='none,max_pool_3x3,avg_pool_3x3,skip_connect,sep_conv_3x3,sep_conv_5x5,'
                   'dil_conv_3x3,dil_conv_5x5', help='the op list (default: the paper\'s eight)')
    p.add_argument('--nodes', type=int, default=4)
    p.add_argument('--partial_channels', type=int, default=1, help='PC-DARTS K (with edge normalisation when > 1)')
    p.add_argument('--generic', action='store_true', help='every op on the generic per-edge path (no wide builders)')
    p.add_argument('--no_custom_kernels', action='store_true',
                   help="Paddle's depthwise and 1x1 convolutions (the compiled kernels off)")
    p.add_argument('--auxiliary_skip', action='store_true', help='DARTS-: the auxiliary skip on every edge')
    p.add_argument('--beta_decay', action='store_true', help='beta-DARTS: the regularisation in the alpha step')
    p.add_argument('--hessian_eigen', action='store_true', help='also time one Hessian eigenvalue estimate')
    p.add_argument('--steps', type=int, default=10)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--order', choices=['first', 'second', 'both'], default='both')
    p.add_argument('--device', default='cpu', choices=['cpu', 'gpu', 'auto'])
    p.add_argument('--out', default=None, help='also write the JSON here')
    p.add_argument('--_child', choices=['first', 'second'], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        print(json.dumps(measure(args, args._child == 'second')))
        return
    orders = ['first', 'second'] if args.order == 'both' else [args.order]
    results = []
    for order in orders:
        cmd = [sys.executable, __file__, '--_child', order] + [
            f'--{k}={getattr(args, k)}' for k in ('batch_size', 'init_channels', 'layers', 'image_size',
                                                   'steps', 'warmup', 'device', 'primitives', 'nodes',
                                                   'partial_channels')] + ['--generic'] * args.generic + [
            f'--{k}' for k in ('auxiliary_skip', 'beta_decay', 'hessian_eigen') if getattr(args, k)]
        env = dict(os.environ, PADDLE_DARTS_CUSTOM_KERNELS='0') if args.no_custom_kernels else None
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    report = dict(config=dict(batch_size=args.batch_size, init_channels=args.init_channels, layers=args.layers,
                              image_size=args.image_size, device=args.device, threads=os.cpu_count(),
                              primitives=args.primitives, nodes=args.nodes, partial_channels=args.partial_channels,
                              generic=args.generic, custom_kernels=not args.no_custom_kernels,
                              auxiliary_skip=args.auxiliary_skip, beta_decay=args.beta_decay),
                  results=results)
    if len(results) == 2:
        report['second_over_first'] = results[1]['seconds_per_step_median'] / results[0]['seconds_per_step_median']
    print_report(report, args.out)


if __name__ == '__main__':
    main()
