"""Own-data loading speed, as JSON: decoding a folder of large JPEGs, and reading the cache.

    python benchmarks/own_data.py --images 200 --out own_data.json

Makes --images synthetic photo-sized RGB JPEGs (smooth random content, quality 90) as a
two-class folder tree, then measures images/s of datasets.load decoding and resizing them
to --image_size with 0, 1 and 2 workers (a fresh cache each time), and of using the cache
afterwards: the load alone, and the load plus one augmented, shuffled epoch of batches.
"""
import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def make_jpegs(root, n, width, height, seed=0):
    """n smooth random width x height JPEGs under root/<class>/ (two classes)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = os.path.join(root, f'class{i % 2}')
        os.makedirs(folder, exist_ok=True)
        # A coarse random grid upsampled bicubically: smooth like a photo, so the JPEG
        # size and decode cost are realistic (noise would be far larger and slower).
        coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((width, height), Image.BICUBIC).save(
            os.path.join(folder, f'{i:05d}.jpg'), quality=90)


def measure(args):
    import numpy as np
    from darts import datasets
    import reader
    quiet = lambda *a: None  # noqa: E731 - the benchmark prints only its JSON
    out = dict(config=dict(images=args.images, source_size=[args.width, args.height], image_size=args.image_size,
                           batch_size=args.batch_size, cpus=os.cpu_count()))
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, 'photos')
        t = time.time()
        make_jpegs(root, args.images, args.width, args.height)
        out['config']['make_seconds'] = time.time() - t
        out['config']['jpeg_mean_kib'] = float(np.mean([os.path.getsize(os.path.join(d, f)) for d, _, fs in
                                                         os.walk(root) for f in fs]) / 1024)
        p = argparse.ArgumentParser()
        datasets.add_arguments(p)
        decode = {}
        for workers in (0, 1, 2):
            cache = os.path.join(tmp, f'cache{workers}')
            flags = p.parse_args(['--dataset', 'folder', '--data', root, '--image_size', str(args.image_size),
                                  '--cache_dir', cache])
            t = time.time()
            data = datasets.load(flags, num_workers=workers, log=quiet)
            decode[f'workers{workers}_images_per_sec'] = args.images / (time.time() - t)
        out['decode_resize'] = decode
        t = time.time()
        data = datasets.load(flags, log=quiet)
        load_s = time.time() - t
        batches = reader.ArrayBatches(data.train_x, data.train_y, args.batch_size, data.mean, data.std,
                                      shuffle=True, augment=True)
        t = time.time()
        seen = sum(len(y) for _, y in batches.epoch(0))
        epoch_s = time.time() - t
        out['cached'] = dict(load_seconds=load_s, load_images_per_sec=args.images / load_s,
                             epoch_images=seen, epoch_images_per_sec=seen / epoch_s,
                             load_plus_epoch_images_per_sec=seen / (load_s + epoch_s),
                             is_memmap=isinstance(data.train_x, np.memmap), describe=data.describe())
    return out


def main():
    from search_step import print_report
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--images', type=int, default=200)
    p.add_argument('--width', type=int, default=1600)
    p.add_argument('--height', type=int, default=1200)
    p.add_argument('--image_size', type=int, default=64)
    p.add_argument('--batch_size', type=int, default=32)
    p.add_argument('--out', default=None)
    args = p.parse_args()
    print_report(measure(args), args.out)


if __name__ == '__main__':
    main()
