"""Where a search or training step's time goes: Paddle's profiler over a few steps, the top
operators as JSON.

    python benchmarks/profile_step.py                       # search, second order, batch 16, C=8, 5 cells
    python benchmarks/profile_step.py --no_custom_kernels   # with Paddle's convolutions
    python benchmarks/profile_step.py --order first --top 15
    python benchmarks/profile_step.py --what train --batch_size 32 --init_channels 16 --layers 8
    python benchmarks/profile_step.py --what train --network imagenet --batch_size 8 --init_channels 48 --layers 14

Operator time is the profiler's CPU time per operator type, summed over every thread (the
kernels run on 2 OpenMP threads), so shares are of the summed operator time.
"""
import argparse
import json
import os
import re
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from search_step import add_size_arguments, random_batch, ready_programs  # noqa: E402  (benchmarks/)
from train_step import ready_train_step  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_size_arguments(p)
    p.add_argument('--what', choices=['search', 'train'], default='search',
                   help="a search step, or train.py's / train_imagenet.py's step (DARTS_V2, auxiliary head)")
    p.add_argument('--network', choices=['cifar', 'imagenet'], default='cifar', help='--what train: which network')
    p.add_argument('--order', choices=['first', 'second'], default='second')
    p.add_argument('--steps', type=int, default=3, help='profiled steps (after 2 unprofiled ones)')
    p.add_argument('--top', type=int, default=10)
    p.add_argument('--no_custom_kernels', action='store_true')
    args = p.parse_args()
    if args.no_custom_kernels:
        os.environ['PADDLE_DARTS_CUSTOM_KERNELS'] = '0'
    from darts import process
    process.prepare()   # before paddle is imported
    import paddle
    import paddle.profiler as profiler
    from darts import kernels
    paddle.enable_static()
    if args.what == 'train':
        step, _ = ready_train_step('DARTS_V2', args.init_channels, args.layers, args.batch_size, args.network)
    else:
        from architect import SearchConfig, run_search_step
        cfg = SearchConfig(init_channels=args.init_channels, layers=args.layers, image_size=args.image_size,
                           second_order=args.order == 'second')
        progs, exe, _, _ = ready_programs(cfg, paddle.CPUPlace())
        batch = random_batch(args.batch_size, args.image_size)

        def step():
            run_search_step(exe, progs, batch, 0.025)
    for _ in range(2):
        step()
    prof = profiler.Profiler(targets=[profiler.ProfilerTarget.CPU])
    prof.start()
    for _ in range(args.steps):
        step()
    prof.stop()
    with tempfile.TemporaryFile('w+') as f:
        saved = sys.stdout
        sys.stdout = f
        try:
            prof.summary(op_detail=False, sorted_by=profiler.SortedKeys.CPUTotal, time_unit='ms')
        finally:
            sys.stdout = saved
        f.seek(0)
        text = f.read()
    # the operator table of all threads merged: "name  calls  total / avg / max / min / ratio ..."
    section = text.split('Operator Summary', 1)[-1].split('All threads merged', 1)[-1]
    rows = []
    for line in section.splitlines():
        m = re.match(r'^(\S+)\s+(\d+)\s+([\d.]+) / ([\d.]+) / [\d.]+ / [\d.]+ / ([\d.]+)', line)
        if m:
            rows.append(dict(op=m.group(1), calls=int(m.group(2)), total_ms=float(m.group(3)),
                             avg_ms=float(m.group(4)), share_percent=float(m.group(5))))
        elif rows and line.startswith('---'):
            break
    rows.sort(key=lambda r: -r['total_ms'])
    print(json.dumps(dict(config=vars(args), kernels=kernels.status(), steps=args.steps,
                          top=rows[:args.top]), indent=1))


if __name__ == '__main__':
    main()
