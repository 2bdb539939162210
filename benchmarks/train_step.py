"""Evaluation training speed (NetworkCIFAR train step) and reader throughput, as JSON.

    python benchmarks/train_step.py --init_channels 16 --layers 8 --batch_size 32

train_step: images/s (median of --steps steps after --warmup) and peak memory, in its own
process.  reader: images/s of CIFAR-style batches (crop, flip, cutout, normalise) and of
ImageNet-style JPEG decoding + random-resized-crop + jitter, with 0, 1 and 2 workers.
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


def train_step(args):
    import numpy as np
    import utils  # noqa: F401
    import paddle
    import genotypes
    import model
    import train
    import training
    from utils import set_tensors
    paddle.enable_static()
    targs = train.parse_args(['--init_channels', str(args.init_channels), '--layers', str(args.layers),
                              '--batch_size', str(args.batch_size)])
    progs = training.build_programs(genotypes.by_name(args.arch), targs)
    place = paddle.CPUPlace()
    exe = paddle.static.Executor(place)
    set_tensors(paddle.static.global_scope(), place, training.initial_state(progs['layout'], 0))
    rng = np.random.default_rng(0)
    feed = dict(x=rng.standard_normal((args.batch_size, 3, 32, 32)).astype('float32'),
                y=rng.integers(0, 10, args.batch_size), lr=np.array([0.025], 'float32'),
                drop_prob=np.array([0.2], 'float32'),
                drop_noise=model.drop_noise(0, 0, 0, progs['drop_sites'], args.batch_size))
    times = []
    for _ in range(args.warmup + args.steps):
        t = time.time()
        exe.run(progs['train'], feed=feed, fetch_list=progs['train_fetch'][:1])
        times.append(time.time() - t)
    s = statistics.median(times[args.warmup:])
    return dict(seconds_per_step_median=s, images_per_sec=args.batch_size / s, first_step_seconds=times[0],
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def reader_throughput(batch_size, batches):
    import numpy as np
    from PIL import Image
    import reader
    rng = np.random.default_rng(0)
    n = batch_size * batches
    x, y = rng.integers(0, 256, (n, 3, 32, 32)).astype(np.uint8), rng.integers(0, 10, n)
    out = {}
    with tempfile.TemporaryDirectory() as d:
        samples = []
        for i in range(n):
            p = os.path.join(d, f'{i}.JPEG')
            Image.fromarray(rng.integers(0, 256, (375, 500, 3)).astype(np.uint8)).save(p, quality=90)
            samples.append((p, i % 10))
        for workers in (0, 1, 2):
            cifar = reader.ArrayBatches(x, y, batch_size, reader.CIFAR_MEAN, reader.CIFAR_STD, shuffle=True,
                                        augment=True, num_workers=workers, cutout=16)
            imagenet = reader.FileBatches(samples, batch_size, True, 224, num_workers=workers)
            for name, src in (('cifar_augment', cifar), ('imagenet_decode_augment', imagenet)):
                t = time.time()
                count = sum(len(b[1]) for b in src.epoch(0))
                out[f'{name}_workers{workers}_images_per_sec'] = count / (time.time() - t)
    return out


def main():
    from search_step import print_report
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--arch', default='DARTS_V2')
    p.add_argument('--init_channels', type=int, default=16)
    p.add_argument('--layers', type=int, default=8)
    p.add_argument('--batch_size', type=int, default=32)
    p.add_argument('--steps', type=int, default=10)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--reader_batches', type=int, default=8)
    p.add_argument('--out', default=None)
    p.add_argument('--_child', action='store_true', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        print(json.dumps(train_step(args)))
        return
    cmd = [sys.executable, __file__, '--_child'] + [f'--{k}={getattr(args, k)}' for k in
                                                    ('arch', 'init_channels', 'layers', 'batch_size', 'steps', 'warmup')]
    step = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    report = dict(config=dict(arch=args.arch, init_channels=args.init_channels, layers=args.layers,
                              batch_size=args.batch_size, threads=os.cpu_count()),
                  train_step=step, reader=reader_throughput(args.batch_size, args.reader_batches))
    print_report(report, args.out)


if __name__ == '__main__':
    main()
