"""Evaluation training speed (train.py's NetworkCIFAR step, or --network imagenet: train_imagenet.py's)
and reader throughput, as JSON.

    python benchmarks/train_step.py --init_channels 16 --layers 8 --batch_size 32
    python benchmarks/train_step.py --no_reader --network imagenet --init_channels 48 --layers 14 --batch_size 16

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


def ready_train_step(arch, init_channels, layers, batch_size, network='cifar', place=None, rows=slice(None)):
    """(run(): one evaluation-training step, the programs), on random data, as train.py (network
    'cifar': 32 px, 10 classes, drop path 0.2) or train_imagenet.py ('imagenet': 224 px, 1000
    classes, label smoothing 0.1, no drop path) runs it, auxiliary head on.  rows: this process's
    share of the batch (benchmarks/data_parallel.py)."""
    import numpy as np
    from darts import process
    process.prepare()   # before paddle is imported
    import paddle
    import genotypes
    import model
    from darts import training
    from darts.tensors import set_tensors
    paddle.enable_static()
    if network == 'imagenet':
        import train_imagenet as script
        image_size, classes, smoothing, drop_prob, build = 224, 1000, 0.1, 0.0, model.network_imagenet
    else:
        import train as script
        image_size, classes, smoothing, drop_prob, build = 32, 10, 0.0, 0.2, model.network_cifar
    targs = script.parse_args(['--init_channels', str(init_channels), '--layers', str(layers),
                               '--batch_size', str(batch_size)])
    progs = training.build_programs(genotypes.by_name(arch), targs, image_size=image_size, num_classes=classes,
                                    network=build, label_smoothing=smoothing)
    place = place or paddle.CPUPlace()
    exe = paddle.static.Executor(place)
    set_tensors(paddle.static.global_scope(), place, training.initial_state(progs['layout'], 0))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch_size, 3, image_size, image_size)).astype('float32')
    feed = dict(x=x[rows], y=rng.integers(0, classes, batch_size)[rows], lr=np.array([0.025], 'float32'),
                drop_prob=np.array([drop_prob], 'float32'),
                drop_noise=model.drop_noise(0, 0, 0, progs['drop_sites'], batch_size)[:, rows])
    return (lambda: exe.run(progs['train'], feed=feed, fetch_list=progs['train_fetch'][:1])), progs


def train_step(args):
    run, _ = ready_train_step(args.arch, args.init_channels, args.layers, args.batch_size, args.network)
    times = []
    for _ in range(args.warmup + args.steps):
        t = time.time()
        run()
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
    p.add_argument('--network', choices=['cifar', 'imagenet'], default='cifar',
                   help="train.py's NetworkCIFAR at 32 px, or train_imagenet.py's network at 224 px")
    p.add_argument('--no_reader', action='store_true', help='the train step only')
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
    flags = ('arch', 'network', 'init_channels', 'layers', 'batch_size', 'steps', 'warmup')
    cmd = [sys.executable, __file__, '--_child'] + [f'--{k}={getattr(args, k)}' for k in flags]
    step = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    report = dict(config=dict(arch=args.arch, network=args.network, init_channels=args.init_channels,
                              layers=args.layers, batch_size=args.batch_size, threads=os.cpu_count()),
                  train_step=step)
    if not args.no_reader:
        report['reader'] = reader_throughput(args.batch_size, args.reader_batches)
    print_report(report, args.out)


if __name__ == '__main__':
    main()
