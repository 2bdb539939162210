"""Data-parallel speed as JSON: a search step and a train step in 1 process against
2 processes (Paddle's launcher, gloo), and the all-reduces' time and bytes per step.

    python benchmarks/data_parallel.py --batch_size 32 --init_channels 8 --layers 5
    python benchmarks/data_parallel.py --what train --batch_size 32 --init_channels 16 --layers 8

Both sides run the same global batch (the 2-process side half of it per process), the
median of --steps steps after --warmup, after the first step (which prepares the programs).
The all-reduce figure is measured apart from the step: a program that all-reduces as many
floats as each of the step's all-reduces (the flat weight gradient is one of them), timed
alone on the 2 processes; its sum is the communication a step holds.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def timed(run, steps, warmup):
    times = []
    for _ in range(warmup + steps):
        t = time.time()
        run()
        times.append(time.time() - t)
    return times[0], statistics.median(times[warmup:])


def search_step(args, world, exe):
    """(first step s, median s, the sizes of the step's all-reduces in floats)."""
    from architect import SearchConfig, run_search_step
    from search_step import random_batch, ready_programs
    cfg = SearchConfig(init_channels=args.init_channels, layers=args.layers, image_size=args.image_size,
                       second_order=not args.first_order, world_size=world.size)
    progs, exe, scope, _ = ready_programs(cfg, world.place)
    batch = {k: v[world.shard(len(v))] for k, v in random_batch(args.batch_size, args.image_size).items()}
    first, median = timed(lambda: run_search_step(exe, progs, batch, 0.025), args.steps, args.warmup)
    p, arch = progs.layout.size, sum(int(__import__('numpy').prod(s)) for s in cfg.arch_shapes.values())
    # second order: grad_w L_train (w'), [dalpha, dw'], g+, g-, the weight gradient; first: g_alpha, weights
    sizes = [p, arch + p, arch, arch, p] if cfg.second_order else [arch, p]
    return first, median, sizes + [3]   # + the step's loss / correct / images sums (progress.EpochStats)


def train_step(args, world, exe):
    from train_step import ready_train_step
    run, progs = ready_train_step('DARTS_V2', args.init_channels, args.layers, args.batch_size,
                                  place=world.place, rows=world.shard(args.batch_size))
    first, median = timed(run, args.steps, args.warmup)
    return first, median, [progs['layout'].size, 3]


def allreduce_seconds(world, exe, sizes, repeats=20):
    """Median seconds of one all-reduce of n float32 values, for each n in sizes (all ranks alike)."""
    import numpy as np
    import paddle
    from darts.distributed import mean_across_ranks
    out = []
    for n in sizes:
        program = paddle.static.Program()
        with paddle.static.program_guard(program, paddle.static.Program()):
            x = paddle.static.data('x', [n], 'float32')
            (y,) = mean_across_ranks([x * 1.0], world.size)
        value = np.ones(n, 'float32')
        _, median = timed(lambda: exe.run(program, feed={'x': value}, fetch_list=[y]), repeats, 3)
        out.append(median)
    return out


def worker(args):
    from darts import process
    process.prepare()   # before paddle is imported
    import paddle
    from darts import distributed
    paddle.enable_static()
    world = distributed.setup('cpu')
    exe = paddle.static.Executor(world.place)
    first, median, sizes = (train_step if args.what == 'train' else search_step)(args, world, exe)
    result = dict(processes=world.size, omp_num_threads=os.environ.get('OMP_NUM_THREADS'),
                  seconds_per_step_median=median, first_step_seconds=first,
                  images_per_sec=args.batch_size / median,
                  peak_rss_mb_per_process=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if world.size > 1:
        seconds = allreduce_seconds(world, exe, sizes)
        result.update(allreduce_floats=sizes, allreduce_bytes_per_step=4 * sum(sizes),
                      allreduce_seconds_per_step=sum(seconds), allreduce_share_of_step=sum(seconds) / median)
    if world.writer:
        with open(args._out, 'w') as f:
            json.dump(result, f)


def main():
    from search_step import add_size_arguments, print_report
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_size_arguments(p)
    p.add_argument('--what', choices=['search', 'train'], default='search')
    p.add_argument('--first_order', action='store_true', help='a first-order search step (default: second order)')
    p.add_argument('--steps', type=int, default=5)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--out', default=None, help='also write the JSON here')
    p.add_argument('--_out', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._out:
        return worker(args)
    flags = [f'--{k}={getattr(args, k)}' for k in ('batch_size', 'init_channels', 'layers', 'image_size', 'what',
                                                    'steps', 'warmup')] + ['--first_order'] * args.first_order
    results = []
    with tempfile.TemporaryDirectory() as d:
        # one process as a user runs it: OMP_NUM_THREADS unset, which Paddle's import sets to 1 (set to 2
        # by hand on this 2-core machine the search step was twice as slow); the launcher sets it to 1 too
        plain = {k: v for k, v in os.environ.items() if k != 'OMP_NUM_THREADS'}
        for name, prefix in (
                ('1 process', [sys.executable]),
                ('2 processes (launcher)', [sys.executable, '-m', 'paddle.distributed.launch', '--nproc_per_node',
                                            '2', '--log_dir', os.path.join(d, 'log')])):
            out = os.path.join(d, 'result.json')
            subprocess.run(prefix + [__file__, *flags, '--_out', out], check=True, capture_output=True, env=plain)
            with open(out) as f:
                results.append(dict(json.load(f), setting=name))
    report = dict(config=dict(what=args.what, order='first' if args.first_order else 'second',
                              batch_size=args.batch_size, init_channels=args.init_channels, layers=args.layers,
                              image_size=args.image_size, cores=os.cpu_count()),
                  results=results,
                   speedup=results[0]['seconds_per_step_median'] / results[1]['seconds_per_step_median'])
    print_report(report, args.out)


if __name__ == '__main__':
    main()
