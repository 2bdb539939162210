"""Data sets for the DARTS scripts: CIFAR-10, digits, (Fashion-)MNIST, image folders, CSV lists.

`add_arguments` adds the data flags to a parser; `load` turns the parsed flags into a
`Data`: uint8 NCHW train/test arrays, int64 labels, class names and normalisation.
Image files (folder, csv) are decoded once, resized to --image_size, and cached under
--cache_dir as a .npy that later loads map read-only instead of decoding again.
"""
import argparse
import csv
import gzip
import hashlib
import json
import os
import sys
from dataclasses import dataclass

import numpy as np

import reader
from darts import cli
from darts.progress import Progress
from reader import DataError

FORMATS = ('cifar10', 'digits', 'mnist', 'fashion_mnist', 'folder', 'csv')
DEFAULT_IMAGE_SIZE = 64
MIN_IMAGE_SIZE = 16
NATIVE_SIZE = {'cifar10': 32, 'digits': 32, 'mnist': 28, 'fashion_mnist': 28}
DEFAULT_CACHE_DIR = os.environ.get('PADDLE_DARTS_CACHE',
                                   os.path.join(os.path.expanduser('~'), '.cache', 'paddle-darts'))
CACHE_VERSION = 'paddle-darts-images-v1'
HOLDOUT_SEED = 0
PROGRESS_INTERVAL = 10.0  # seconds between progress lines when stderr is not a terminal
MAX_SKIP_LINES = 10  # unreadable images reported one by one; the rest only counted

CIFAR10_CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
DIGIT_CLASSES = [str(d) for d in range(10)]
FASHION_CLASSES = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                   'Ankle boot']
IMAGE_EXTENSIONS = tuple(reader.IMAGE_EXTENSIONS) + ('.gif', '.tif', '.tiff')
IDX_FILES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801
GRAY_MODES = ('1', 'L', 'LA', 'I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F')


@dataclass
class Data:
    """A data set ready for training: uint8 NCHW images, int64 labels, normalisation."""
    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list
    mean: np.ndarray
    std: np.ndarray
    flip: bool
    source: str = ''  # where the data came from (--data)
    split: str = ''  # where the test split came from

    @property
    def channels(self):
        return int(self.train_x.shape[1])

    @property
    def image_size(self):
        return int(self.train_x.shape[2])

    @property
    def num_classes(self):
        return len(self.classes)

    def describe(self):
        """One line: format, source, classes, split sizes and image shape."""
        shown = self.classes if len(self.classes) <= 10 else self.classes[:8] + ['...']
        split = f' ({self.split})' if self.split else ''
        source = f' {self.source}' if self.source else ''
        return (f'{self.name}{source}: {self.num_classes} classes ({", ".join(shown)}), '
                f'{len(self.train_x)} train / {len(self.test_x)} test images{split}, '
                f'{self.channels}x{self.image_size}x{self.image_size}')

    def meta(self):
        """What a trained model needs to know about its input, JSON-able."""
        return dict(dataset=self.name, classes=list(self.classes), channels=self.channels,
                    image_size=self.image_size, mean=[float(v) for v in self.mean], std=[float(v) for v in self.std])


# ---------------------------------------------------------------- flags

def add_arguments(parser, default_dataset='cifar10'):
    """Add the data flags (--dataset, --data, --test_data, ...) to an argparse parser."""
    parser.add_argument('--dataset', choices=FORMATS, default=default_dataset,
                        help='data format: cifar10 (python batches), digits (scikit-learn 8x8 digits, built in), '
                             'mnist / fashion_mnist (the four IDX files), folder (ROOT/<class>/<images>, or '
                             'ROOT/train/<class>/ with ROOT/val/ or ROOT/test/), csv (a file with image path and '
                             f'label columns) (default: {default_dataset})')
    parser.add_argument('--data', default='./data',
                        help='cifar10: folder with cifar-10-batches-py/ or the .tar.gz; mnist/fashion_mnist: folder '
                             'with the IDX files (plain or .gz); folder: the root folder; csv: the CSV file '
                             '(default: ./data)')
    parser.add_argument('--data_url', default=reader.CIFAR_URL, help='where to download CIFAR-10 from')
    parser.add_argument('--data_md5', default=reader.CIFAR_MD5,
                        help='MD5 of the CIFAR-10 archive ("" to skip the check)')
    parser.add_argument('--no_download', action='store_true', help='do not download CIFAR-10 when it is missing')
    parser.add_argument('--test_data', default=None,
                        help='folder / csv: the test split, in the same format as --data (a root with class '
                             'folders, or another CSV); default: the data set\'s own test split or a hold-out')
    parser.add_argument('--test_fraction', type=float, default=0.2,
                        help='folder / csv without a test split of their own and without --test_data: hold out '
                             'this fraction of each class for testing (stratified, fixed seed: the same hold-out '
                             'in every script) (default: 0.2)')
    parser.add_argument('--csv_columns', default=None, metavar='PATH_COL,LABEL_COL',
                        help='csv: header names of the image path and label columns (default: the first two columns)')
    parser.add_argument('--image_size', type=int, default=None,
                        help='resize images to this many pixels square (shorter side, centre crop), at least '
                             f'{MIN_IMAGE_SIZE}; default: native (cifar10/digits 32, mnist/fashion_mnist 28, '
                             f'folder/csv {DEFAULT_IMAGE_SIZE})')
    parser.add_argument('--no_flip', action='store_true',
                        help='no horizontal-flip augmentation (never used for mnist: mirrored digits are '
                             'different shapes)')
    parser.add_argument('--cache_dir', default=DEFAULT_CACHE_DIR,
                        help='where decoded folder/csv images are cached (default: $PADDLE_DARTS_CACHE or '
                             '~/.cache/paddle-darts)')
    return parser


_DEFAULTS = vars(add_arguments(argparse.ArgumentParser()).parse_args([]))


def _arg(args, name):
    # Saved args of older runs may lack the newer flags: fall back to their defaults.
    return getattr(args, name, _DEFAULTS[name])


# ---------------------------------------------------------------- entry point

def load(args, num_workers=0, log=print):
    """The Data that the parsed data flags describe; DataError if it is missing or malformed."""
    name = _arg(args, 'dataset')
    if name not in FORMATS:
        raise DataError(f'--dataset {name}: unknown format; expected one of {", ".join(FORMATS)}')
    size = _arg(args, 'image_size')
    if size is not None and size < MIN_IMAGE_SIZE:
        raise DataError(f'--image_size {size}: must be at least {MIN_IMAGE_SIZE}')
    test_data = _arg(args, 'test_data')
    if test_data is not None and name not in ('folder', 'csv'):
        raise DataError(f'--test_data is for --dataset folder or csv; {name} has its own test split')
    data = _LOADERS[name](args, size, num_workers, log)
    _check_labels(data)
    data.flip = (name != 'mnist') and not _arg(args, 'no_flip')
    if data.mean is None:
        data.mean, data.std = channel_stats(data.train_x)
    return data


def _check_labels(data):
    missing = sorted(set(np.unique(data.test_y).tolist()) - set(np.unique(data.train_y).tolist()))
    if missing:
        names = _names(data.classes[k] for k in missing)
        raise DataError(f'{data.name} {data.source}: test labels {names} never occur in the training data')


def channel_stats(x, rows_per_chunk=None):
    """Per-channel mean and std of x / 255 (float32 [C]), summed in integer chunks so a
    memmap of any size is read once and never copied whole."""
    n, c = x.shape[:2]
    per_image = int(np.prod(x.shape[1:]))
    rows_per_chunk = rows_per_chunk or max(1, (64 << 20) // max(per_image, 1))
    total = np.zeros(c, np.int64)
    squares = np.zeros(c, np.int64)
    for start in range(0, n, rows_per_chunk):
        chunk = np.asarray(x[start:start + rows_per_chunk])
        total += chunk.sum(axis=(0, 2, 3), dtype=np.int64)
        wide = chunk.astype(np.int32)
        squares += (wide * wide).sum(axis=(0, 2, 3), dtype=np.int64)
    count = n * x.shape[2] * x.shape[3]
    mean = total / count
    var = np.maximum(squares / count - mean * mean, 0.0)
    return (mean / 255.0).astype(np.float32), (np.sqrt(var) / 255.0).astype(np.float32)


# ---------------------------------------------------------------- array data sets

def _load_cifar10(args, size, num_workers, log):
    root = _arg(args, 'data')
    tx, ty, vx, vy = reader.load_cifar10(root, not _arg(args, 'no_download'), _arg(args, 'data_url'),
                                         _arg(args, 'data_md5'))
    data = Data('cifar10', tx, ty, vx, vy, list(CIFAR10_CLASSES), reader.CIFAR_MEAN, reader.CIFAR_STD, True,
                source=root, split='own test split')
    if size not in (None, 32):
        # The published statistics are for 32 px; at other sizes they are measured.
        data.train_x, data.test_x = resize_array(tx, size), resize_array(vx, size)
        data.mean = data.std = None
    return data


def _load_digits(args, size, num_workers, log):
    tx, ty, vx, vy = reader.load_digits()
    # reader gives the same gray value in R, G and B: one channel carries it all.
    tx, vx = np.ascontiguousarray(tx[:, :1]), np.ascontiguousarray(vx[:, :1])
    if size not in (None, 32):
        tx, vx = resize_array(tx, size), resize_array(vx, size)
    return Data('digits', tx, ty, vx, vy, list(DIGIT_CLASSES), None, None, True,
                source='scikit-learn', split='own test split')


def _load_mnist_like(name, classes):
    def load_idx_set(args, size, num_workers, log):
        root = _arg(args, 'data')
        paths = [_find_idx(root, f, name) for f in IDX_FILES]
        tx, ty = read_idx_images(paths[0]), read_idx_labels(paths[1])
        vx, vy = read_idx_images(paths[2]), read_idx_labels(paths[3])
        for images, labels, ip, lp in ((tx, ty, paths[0], paths[1]), (vx, vy, paths[2], paths[3])):
            if len(images) != len(labels):
                raise DataError(f'{ip} has {len(images)} images but {lp} has {len(labels)} labels: '
                                f'expected equal counts')
            if len(labels) and labels.max() >= len(classes):
                raise DataError(f'{lp}: label {labels.max()} outside 0..{len(classes) - 1}')
        if size is not None and size != tx.shape[2]:
            tx, vx = resize_array(tx, size), resize_array(vx, size)
        return Data(name, tx, ty, vx, vy, list(classes), None, None, True, source=root, split='own test split')
    return load_idx_set


def _find_idx(root, base, name):
    # Some mirrors spell the files train-images.idx3-ubyte; accept both, plain or gzipped.
    for stem in (base, base.replace('-idx', '.idx')):
        for candidate in (stem, stem + '.gz'):
            path = os.path.join(root, candidate)
            if os.path.isfile(path):
                return path
    raise DataError(f'--dataset {name}: no {base} in {root}; expected {", ".join(IDX_FILES)} there '
                    f'(each plain or .gz)')


def _read_bytes(path):
    try:
        if path.endswith('.gz'):
            with gzip.open(path, 'rb') as f:
                return f.read()
        with open(path, 'rb') as f:
            return f.read()
    except (OSError, EOFError) as e:
        raise DataError(f'{path}: cannot read ({e})') from None


def _idx_payload(path, magic, dims):
    raw = _read_bytes(path)
    header = 4 + 4 * dims
    if len(raw) < header:
        raise DataError(f'{path}: truncated IDX file: expected a {header}-byte header, found {len(raw)} bytes')
    found_magic = int.from_bytes(raw[:4], 'big')
    if found_magic != magic:
        raise DataError(f'{path}: IDX magic 0x{found_magic:08x}, expected 0x{magic:08x} '
                        f'({"images" if dims == 3 else "labels"} file)')
    shape = tuple(int.from_bytes(raw[4 + 4 * k:8 + 4 * k], 'big') for k in range(dims))
    expected = int(np.prod(shape))
    found = len(raw) - header
    if found != expected:
        what = 'truncated' if found < expected else 'oversized'
        raise DataError(f'{path}: {what} IDX file: expected {expected} bytes of data after the header for shape '
                        f'{shape}, found {found}')
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def read_idx_images(path):
    """uint8 [N, 1, rows, cols] from an IDX image file (plain or .gz)."""
    images = _idx_payload(path, IDX_IMAGES_MAGIC, 3)
    return images[:, None]


def read_idx_labels(path):
    """int64 [N] from an IDX label file (plain or .gz)."""
    return _idx_payload(path, IDX_LABELS_MAGIC, 1).astype(np.int64)


def resize_array(x, size):
    """uint8 [N, C, H, W] images resized like decoded files: shorter side to size, centre crop."""
    from PIL import Image
    n, c, h, w = x.shape
    if h == w == size:
        return x
    out = np.empty((n, c, size, size), np.uint8)
    for i in range(n):
        img = Image.fromarray(x[i, 0]) if c == 1 else Image.fromarray(np.ascontiguousarray(x[i].transpose(1, 2, 0)))
        out[i] = _to_chw(fit_square(img, size))
    return out


# ---------------------------------------------------------------- image files

def fit_square(img, size):
    """The PIL image with its shorter side resized to size (bilinear) and centre-cropped to size x size."""
    from PIL import Image
    w, h = img.size
    side = min(w, h)
    # Cropping the centre square in source coordinates and resizing it is the same
    # computation as resizing the whole image and cropping, without the waste.
    x0, y0 = (w - side) / 2, (h - side) / 2
    return img.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side))


def _to_chw(img):
    a = np.asarray(img, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _is_gray(img):
    if img.mode in GRAY_MODES:
        return True
    if img.mode in ('P', 'PA'):
        palette = img.getpalette() or []
        return all(palette[k] == palette[k + 1] == palette[k + 2] for k in range(0, len(palette) - 2, 3))
    return False


def probe_image(path):
    """(True if the image is grayscale, None) or (None, reason it cannot be opened)."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            return _is_gray(img), None
    except Exception as e:  # noqa: BLE001 - any failure to open: the image is skipped
        return None, f'{type(e).__name__}: {e}'


def decode_image(path, size, channels):
    """uint8 [channels, size, size]: the image decoded, converted, resized and centre-cropped."""
    from PIL import Image, ImageOps
    with Image.open(path) as img:
        # JPEG: let the decoder downscale by 1/2..1/8 while keeping both sides >= size.
        img.draft(img.mode, (size, size))
        img = ImageOps.exif_transpose(img)
        if img.mode.startswith('I') or img.mode == 'F':
            # 16/32-bit gray: scale to 8 bits (convert('L') would clip at 255 instead).
            a = np.asarray(img).astype(np.float64)
            a = a if img.mode == 'F' else a / 257.0
            img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), 'L')
        img = img.convert('L' if channels == 1 else 'RGB')
    return _to_chw(fit_square(img, size))


def _decode_task(task):
    path, size, channels = task
    try:
        return decode_image(path, size, channels), None
    except Exception as e:  # noqa: BLE001 - any decode failure: the image is skipped
        return None, f'{type(e).__name__}: {e}'


def _map(pool, workers, func, items):
    if pool is None:
        return map(func, items)
    # Chunks amortise the pipe round trips but stay small enough to balance the workers.
    return pool.imap(func, items, chunksize=max(1, min(32, len(items) // (8 * workers))))


def _cache_key(paths, size):
    h = hashlib.sha1(CACHE_VERSION.encode())
    h.update(str(size).encode())
    for p in paths:
        st = os.stat(p)
        h.update(json.dumps([p, st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()


def _read_cache(base, n_rows, size):
    """(images memmap, record) from a complete cache entry, or None if there is none usable."""
    try:
        with open(base + '.json') as f:
            record = json.load(f)
        images = np.load(base + '.npy', mmap_mode='r')
    except (OSError, ValueError):
        return None
    kept = record.get('kept', [])
    if (record.get('version') != CACHE_VERSION or record.get('rows') != n_rows or images.ndim != 4
            or images.shape[0] != len(kept) or images.shape[2:] != (size, size)):
        return None
    return images, record


class _CacheWriteError(Exception):
    pass


class _FileSink:
    """Rows appended to a .npy being written; its header is rewritten with the final count."""

    def __init__(self, path, rows, channels, size):
        self.path, self.shape = path, (channels, size, size)
        self.count = 0
        try:
            self.f = open(path, 'wb')
            self.header_len = self._header(rows)
        except OSError as e:
            raise _CacheWriteError(e.strerror or str(e)) from None

    def _header(self, rows):
        self.f.seek(0)
        # numpy pads the header so the first dimension can grow: same length for any count.
        np.lib.format.write_array_header_1_0(self.f, {'descr': '|u1', 'fortran_order': False,
                                                      'shape': (rows,) + self.shape})
        return self.f.tell()

    def add(self, image):
        try:
            self.f.write(image.tobytes())
        except OSError as e:
            raise _CacheWriteError(e.strerror or str(e)) from None
        self.count += 1

    def finish(self):
        try:
            if self._header(self.count) != self.header_len:
                raise OSError('the .npy header changed length')
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
        except OSError as e:
            raise _CacheWriteError(e.strerror or str(e)) from None

    def abort(self):
        self.f.close()
        if os.path.exists(self.path):
            os.remove(self.path)


class _MemorySink:
    def __init__(self, rows, channels, size):
        self.images = np.empty((rows, channels, size, size), np.uint8)
        self.count = 0

    def add(self, image):
        self.images[self.count] = image
        self.count += 1

    def finish(self):
        pass

    def abort(self):
        pass


def decode_files(paths, size, cache_dir, num_workers=0, log=print):
    """(images uint8 [K, C, S, S], kept): row j of images is image file paths[kept[j]],
    resized to S = size; unreadable files are reported and left out.

    Cached under cache_dir, keyed by sha1 over every file's (absolute path, size, mtime_ns)
    in row order, the size and CACHE_VERSION, and then read as a read-only memmap.  An
    unwritable cache_dir (None: no cache) means decoding into memory.
    """
    paths = [os.path.abspath(p) for p in paths]
    if cache_dir:
        try:
            key = _cache_key(paths, size)
        except OSError as e:
            raise DataError(f'cannot read {e.filename}: {e.strerror}') from None
        base = os.path.join(cache_dir, key)
        cached = _read_cache(base, len(paths), size)
        if cached is not None:
            images, record = cached
            log(f'decoded images from cache {base}.npy')
            if record['skipped']:
                log(f'skipped {len(record["skipped"])} unreadable images (listed in {base}.json)')
            return images, np.asarray(record['kept'], np.int64)
        try:
            return _decode_into(paths, size, base, num_workers, log)
        except _CacheWriteError as e:
            log(f'warning: cannot write the image cache in {cache_dir} ({e}); decoding into memory')
    return _decode_into(paths, size, None, num_workers, log)


def _decode_into(paths, size, base, num_workers, log):
    """decode_files' work: into the cache entry `base` (None: into memory)."""
    with reader.worker_pool(num_workers) as pool:
        skipped, gray, readable = [], [], []
        for row, (is_gray, reason) in enumerate(_map(pool, num_workers, probe_image, paths)):
            if reason is None:
                gray.append(is_gray)
                readable.append(row)
            else:
                skipped.append((paths[row], reason))
        # One channel only if every image is grayscale: mixed sets become RGB throughout.
        channels = 1 if readable and all(gray) else 3
        if base is None:
            sink = _MemorySink(len(readable), channels, size)
        else:
            try:
                os.makedirs(os.path.dirname(base), exist_ok=True)
            except OSError as e:
                raise _CacheWriteError(e.strerror or str(e)) from None
            sink = _FileSink(f'{base}.npy.{os.getpid()}.tmp', len(readable), channels, size)
        kept = []
        progress = Progress(lambda line, file_only=False: None if file_only else log(line), len(readable),
                            lambda k, rate: f'decoded {k}/{len(readable)} images ({rate:.0f}/s)', every=0,
                            seconds=PROGRESS_INTERVAL, at_last=False, desc='decoded', unit='img', stream=sys.stderr)
        try:
            tasks = [(paths[row], size, channels) for row in readable]
            for row, (image, reason) in zip(readable, _map(pool, num_workers, _decode_task, tasks)):
                if reason is None:
                    sink.add(image)
                    kept.append(row)
                else:
                    skipped.append((paths[row], reason))
                progress.update()
            sink.finish()
        except BaseException:
            sink.abort()
            raise
    for path, reason in skipped[:MAX_SKIP_LINES]:
        log(f'skipping unreadable image {path}: {reason}')
    kept = np.asarray(kept, np.int64)
    if base is None:
        progress.close('')
        images = sink.images[:sink.count]
    else:
        record = dict(version=CACHE_VERSION, image_size=size, channels=channels, rows=len(paths),
                      kept=kept.tolist(), paths=[paths[i] for i in kept], skipped=[list(s) for s in skipped])
        try:
            os.replace(sink.path, base + '.npy')
            tmp = f'{base}.json.{os.getpid()}.tmp'
            with open(tmp, 'w') as f:
                json.dump(record, f)
            os.replace(tmp, base + '.json')  # written last: an entry with both files is complete
            progress.close(f' into cache {base}.npy')
        except OSError as e:
            progress.close('')
            log(f'warning: could not finish the image cache {base}.npy ({e.strerror or e})')
        written = base + '.npy' if os.path.exists(base + '.npy') else sink.path
        images = np.load(written, mmap_mode='r')
        if written == sink.path:
            os.remove(sink.path)  # the mapping stays valid; nothing is left behind
    if skipped:
        listed = f' (listed in {base}.json)' if base is not None and len(skipped) > MAX_SKIP_LINES else ''
        log(f'skipped {len(skipped)} unreadable images{listed}')
    return images, kept


# ---------------------------------------------------------------- file data sets

def holdout_split(labels, fraction, seed=HOLDOUT_SEED):
    """(train, test) index arrays: per class round(n_c * fraction) test items (at least one
    when n_c >= 2, never all), from a permutation seeded by (seed, class)."""
    labels = np.asarray(labels)
    test = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_test = int(np.floor(len(idx) * fraction + 0.5))
        if len(idx) >= 2 and fraction > 0:
            n_test = min(max(n_test, 1), len(idx) - 1)
        else:
            n_test = 0
        test.append(np.random.default_rng([seed, int(c)]).permutation(idx)[:n_test])
    test = np.sort(np.concatenate(test)) if test else np.zeros(0, np.int64)
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def _list_class_folder(root, min_classes):
    """(class names, [(path, class name)]) for root/<class>/**/<image>."""
    if not os.path.isdir(root):
        raise DataError(f'{root}: no such folder; expected class folders {root}/<class>/<images>')
    classes = sorted(d for d in os.listdir(root) if not d.startswith('.') and os.path.isdir(os.path.join(root, d)))
    if len(classes) < min_classes:
        found = f' ({", ".join(classes)})' if classes else ''
        raise DataError(f'{root} has {len(classes)} class folder{"s" if len(classes) != 1 else ""}{found}: '
                        f'expected at least {min_classes}, as {root}/<class>/<images>')
    samples = []
    for c in classes:
        files = []
        for folder, subdirs, names in os.walk(os.path.join(root, c)):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith('.'))
            files += [os.path.join(folder, n) for n in sorted(names)
                      if not n.startswith('.') and n.lower().endswith(IMAGE_EXTENSIONS)]
        if not files:
            raise DataError(f'class folder {os.path.join(root, c)} has no images '
                            f'({", ".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)})')
        samples += [(p, c) for p in files]
    return classes, samples


def _names(items, limit=10):
    """Comma-separated items, the first `limit` of them when there are more."""
    items = list(items)
    more = f', ... ({len(items)} in all)' if len(items) > limit else ''
    return ', '.join(items[:limit]) + more


def _class_labels(samples, classes, where):
    index = {c: k for k, c in enumerate(classes)}
    unknown = sorted({c for _, c in samples if c not in index})
    if unknown:
        raise DataError(f'{where}: test classes {_names(unknown)} are not among the training classes '
                        f'({_names(classes)})')
    return [p for p, _ in samples], np.array([index[c] for _, c in samples], np.int64)


def _load_folder(args, size, num_workers, log):
    root = _arg(args, 'data')
    test_data = _arg(args, 'test_data')
    if not os.path.isdir(root):
        raise DataError(f'--data {root}: no such folder; --dataset folder expects ROOT/<class>/<images> or '
                        f'ROOT/train/<class>/ with ROOT/val/ or ROOT/test/')
    subdirs = {d for d in os.listdir(root) if not d.startswith('.') and os.path.isdir(os.path.join(root, d))}
    train_root, test_root, split = root, None, None
    if 'train' in subdirs and subdirs <= {'train', 'val', 'test'}:
        train_root = os.path.join(root, 'train')
        own = 'test' if 'test' in subdirs else 'val' if 'val' in subdirs else None
        if own is not None:
            if test_data is not None:
                raise DataError(f'--test_data {test_data}: {root} has its own test split {own}/; drop one of them')
            if subdirs >= {'val', 'test'}:
                log(f'{root} has val/ and test/: test/ is the test split, val/ is not used')
            test_root, split = os.path.join(root, own), f'test split {own}/'
    if test_root is None and test_data is not None:
        test_root, split = test_data, f'test split --test_data {test_data}'
    classes, train_samples = _list_class_folder(train_root, 2)
    test_samples = None
    if test_root is not None:
        _, test_samples = _list_class_folder(test_root, 1)
        test_samples = _class_labels(test_samples, classes, test_root)
    return _file_data('folder', root, _class_labels(train_samples, classes, train_root), test_samples, classes,
                      split, args, size, num_workers, log)


def _csv_rows(path, columns):
    """(path column name, label column name, [(image path, label str)]) from a CSV file."""
    if not os.path.isfile(path):
        what = 'is a folder' if os.path.isdir(path) else 'does not exist'
        raise DataError(f'{path} {what}: --dataset csv expects a CSV file with a header row and image path '
                        f'and label columns')
    folder = os.path.dirname(os.path.abspath(path))
    rows = []
    try:
        with open(path, newline='', encoding='utf-8-sig') as f:
            table = csv.reader(f)
            header = next(table, None)
            if not header:
                raise DataError(f'{path} is empty: expected a header row, then rows of image path and label')
            header = [h.strip() for h in header]
            if columns:
                names = [c.strip() for c in columns.split(',')]
                if len(names) != 2:
                    raise DataError(f'--csv_columns {columns}: expected two header names, PATH_COL,LABEL_COL')
                unknown = [n for n in names if n not in header]
                if unknown:
                    raise DataError(f'{path}: no column {", ".join(unknown)} in the header ({", ".join(header)})')
                path_col, label_col = header.index(names[0]), header.index(names[1])
            else:
                if len(header) < 2:
                    raise DataError(f'{path}: the header has one column ({header[0]}): expected an image path '
                                    f'column and a label column')
                path_col, label_col = 0, 1
            width = max(path_col, label_col) + 1
            for row in table:
                if not row or not any(v.strip() for v in row):
                    continue  # blank line
                line = table.line_num
                if len(row) < width:
                    column = header[label_col] if len(row) <= label_col else header[path_col]
                    raise DataError(f'{path} line {line}: no {column} value (the row has {len(row)} '
                                    f'field{"s" if len(row) != 1 else ""}, expected at least {width})')
                image, label = row[path_col].strip(), row[label_col].strip()
                if not label:
                    raise DataError(f'{path} line {line}: empty label in column {header[label_col]}')
                if not image:
                    raise DataError(f'{path} line {line}: empty image path in column {header[path_col]}')
                rows.append((os.path.join(folder, image), label))
    except UnicodeDecodeError as e:
        raise DataError(f'{path} is not UTF-8 text ({e.reason} at byte {e.start}): expected a CSV file') from None
    except csv.Error as e:
        raise DataError(f'{path}: not a readable CSV file ({e})') from None
    if not rows:
        raise DataError(f'{path} has no rows after the header: expected rows of image path and label')
    missing = [p for p, _ in rows if not os.path.isfile(p)]
    if missing:
        raise DataError(f'{len(missing)} of {len(rows)} paths in {path} do not exist, first: {missing[0]}')
    return rows


def _sorted_labels(labels):
    # Integer labels sort as numbers (2 before 10); anything else as text.
    if all(v.lstrip('-').isdigit() for v in labels):
        return sorted(labels, key=lambda v: (int(v), v))
    return sorted(labels)


def _load_csv(args, size, num_workers, log):
    path = _arg(args, 'data')
    test_data = _arg(args, 'test_data')
    columns = _arg(args, 'csv_columns')
    rows = _csv_rows(path, columns)
    classes = _sorted_labels({label for _, label in rows})
    if len(classes) < 2:
        raise DataError(f'{path} has {len(classes)} label ({classes[0]}): expected at least two classes')
    train = _class_labels(rows, classes, path)
    test, split = None, None
    if test_data is not None:
        test = _class_labels(_csv_rows(test_data, columns), classes, test_data)
        split = f'test split --test_data {test_data}'
    return _file_data('csv', path, train, test, classes, split, args, size, num_workers, log)


def _file_data(name, source, train, test, classes, split, args, size, num_workers, log):
    """Data from (paths, labels) of the training split and of the test split (None: hold-out)."""
    train_paths, train_y = train
    if test is None:
        fraction = _arg(args, 'test_fraction')
        if not 0 < fraction < 1:
            raise DataError(f'--test_fraction {fraction}: must be between 0 and 1 (exclusive) when the data has '
                            f'no test split of its own and no --test_data')
        tr, te = holdout_split(train_y, fraction)
        test = ([train_paths[i] for i in te], train_y[te])
        train_paths, train_y = [train_paths[i] for i in tr], train_y[tr]
        split = f'test: {fraction:.0%} stratified hold-out'
    test_paths, test_y = test
    size = size or DEFAULT_IMAGE_SIZE
    images, kept = decode_files(train_paths + test_paths, size, _arg(args, 'cache_dir'), num_workers, log)
    # Rows are in (train, test) order, so both splits are slices of the one (memmapped) array.
    n_train = int(np.searchsorted(kept, len(train_paths)))
    labels = np.concatenate([train_y, test_y])[kept]
    train_y, test_y = labels[:n_train], labels[n_train:]
    empty = [classes[k] for k in range(len(classes)) if not np.any(train_y == k)]
    if empty:
        raise DataError(f'{source}: no readable training images left for class {", ".join(empty)}')
    return Data(name, images[:n_train], train_y, images[n_train:], test_y, list(classes), None, None, True,
                source=source, split=split)


_LOADERS = {'cifar10': _load_cifar10, 'digits': _load_digits,
            'mnist': _load_mnist_like('mnist', DIGIT_CLASSES),
            'fashion_mnist': _load_mnist_like('fashion_mnist', FASHION_CLASSES),
            'folder': _load_folder, 'csv': _load_csv}


def changed_flags(args):
    """The data flags of args that differ from their defaults, in command-line form: what a later
    command (train.py after a search, the protocol's retrains) must repeat to see the same data."""
    return cli.changed_flags(args, tuple(_DEFAULTS), argparse.Namespace(**_DEFAULTS))
