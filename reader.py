"""Data on disk and batches: CIFAR-10 in its python format (and its download), the embedded
digits, ImageNet files; augmentation; the worker pool.  datasets.py builds the formats a
user picks with --dataset on top of these.

Batches are produced by worker processes (`num_workers`); each batch's augmentation
is drawn from its own seed (run seed, epoch, batch index), so the data a step sees
does not depend on how many workers made it, and a resumed run sees the same data.
"""
import contextlib
import ctypes
import gzip
import hashlib
import io
import multiprocessing as mp
import os
import pickle
import signal
import sys
import tarfile
import urllib.error
import urllib.request
import zlib

import numpy as np

from darts.distributed import shard_bounds
from darts.errors import DataError

CIFAR_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
CIFAR_MD5 = 'c58f30108f718f92721af3b95e74349a'
CIFAR_ARCHIVE = 'cifar-10-python.tar.gz'
CIFAR_DIR = 'cifar-10-batches-py'
CIFAR_TRAIN_FILES = [f'data_batch_{i}' for i in range(1, 6)]
CIFAR_TEST_FILE = 'test_batch'
CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], 'float32')
CIFAR_STD = np.array([0.2470, 0.2435, 0.2616], 'float32')


# ---------------------------------------------------------------- CIFAR-10 on disk

def _latin1_encode(text, encoding):
    """_codecs.encode as Python 3 pickles bytes at protocols 0-2: (str, 'latin1') only."""
    if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
        raise pickle.UnpicklingError('_codecs.encode is admitted only to rebuild bytes from latin-1 text')
    return text.encode('latin-1')


def _empty_bytes(*args):
    """bytes() as Python 3 pickles b'' at protocols 0-2: no arguments only."""
    if args:
        raise pickle.UnpicklingError('bytes is admitted only without arguments (b\'\')')
    return b''


def _admitted_globals():
    """(module, name) -> object: all a CIFAR-10 batch's pickle may name.  The numpy functions are
    taken from numpy's own reductions, so the same objects serve numpy 1 (numpy.core) and 2
    (numpy._core) whichever wrote the file, without importing numpy.core."""
    rebuild = np.zeros(1).__reduce__()[0]            # multiarray._reconstruct: any ndarray, protocols 0-4
    from_buffer = np.zeros(1).__reduce_ex__(5)[0]    # numeric._frombuffer: an ndarray at protocol 5
    scalar = np.int64(1).__reduce__()[0]             # multiarray.scalar: a numpy number (np.int64 labels)
    admitted = {}
    for core in ('numpy.core', 'numpy._core'):
        admitted[core + '.multiarray', '_reconstruct'] = rebuild
        admitted[core + '.multiarray', 'scalar'] = scalar
        admitted[core + '.numeric', '_frombuffer'] = from_buffer
    admitted['numpy', 'ndarray'] = np.ndarray        # the class _reconstruct is asked to make
    admitted['numpy', 'dtype'] = np.dtype            # the arrays' and numbers' element types
    admitted['_codecs', 'encode'] = _latin1_encode   # bytes from Python 3 at protocols 0-2
    for builtins in ('builtins', '__builtin__'):     # b'' from Python 3 at protocols 0-2
        admitted[builtins, 'bytes'] = _empty_bytes
    return admitted


_CIFAR_GLOBALS = _admitted_globals()


def _printable(text, limit=80):
    text = text if text.isprintable() else text.encode('unicode_escape').decode('ascii')
    return text if len(text) <= limit else text[:limit - 3] + '...'


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch and nothing else: find_class hands out only the numpy
    reconstructors in _CIFAR_GLOBALS, so no other callable a doctored file names can run."""

    def __init__(self, raw, where):
        super().__init__(io.BytesIO(raw), encoding='bytes')   # keys stay bytes: b'data', b'labels'
        self.where = where

    def find_class(self, module, name):
        found = _CIFAR_GLOBALS.get((module, name))
        if found is None:
            raise DataError(f'{self.where}: refused to unpickle {_printable(module)}.{_printable(name)} (a CIFAR-10 '
                            f'batch holds only dicts, lists, bytes, strings, numbers and numpy arrays)')
        return found

    def persistent_load(self, pid):
        raise pickle.UnpicklingError('a CIFAR-10 batch has no persistent ids')


def _unpickle_batch(raw, where):
    try:
        d = _BatchUnpickler(raw, where).load()
        data = np.asarray(d[b'data'], dtype=np.uint8)
        labels = np.asarray(d[b'labels'], dtype=np.int64)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or not a CIFAR batch: say where, not a traceback
        raise DataError(f'{where} is not a readable CIFAR-10 batch ({type(e).__name__}: {e})') from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data) or not len(data):
        raise DataError(f'{where}: expected N x 3072 images and N labels, got {data.shape} and {labels.shape}')
    if labels.min() < 0 or labels.max() > 9:
        raise DataError(f'{where}: labels outside 0..9')
    return data.reshape(-1, 3, 32, 32), labels


def _find_cifar(root):
    """The folder holding the batch files, or the archive, under root; None if absent."""
    for folder in (os.path.join(root, CIFAR_DIR), root):
        if all(os.path.isfile(os.path.join(folder, f)) for f in CIFAR_TRAIN_FILES + [CIFAR_TEST_FILE]):
            return folder
    archive = os.path.join(root, CIFAR_ARCHIVE)
    return archive if os.path.isfile(archive) else None


def _read_cifar_files(source, names):
    out = []
    if os.path.isdir(source):
        for n in names:
            with open(os.path.join(source, n), 'rb') as f:
                out.append(_unpickle_batch(f.read(), os.path.join(source, n)))
        return out
    try:
        with tarfile.open(source, 'r:gz') as tar:
            # getmembers() reads the whole archive: damaged compressed data raises here (corrupt)
            members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
            missing = [n for n in names if n not in members]
            if missing:
                _check_gzip_stream(source)  # tarfile stops quietly at a damaged header: tell corrupt from other
                raise DataError(f'{source} lacks {", ".join(missing)}: not a CIFAR-10 python archive')
            for n in names:
                out.append(_unpickle_batch(tar.extractfile(members[n]).read(), f'{source}:{n}'))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(f'{source} is corrupt: not a readable tar.gz archive ({type(e).__name__}: {e})') from None
    return out


def _check_gzip_stream(path):
    """Read the gzip stream to its end (its CRC is checked there); DataError if it is damaged."""
    try:
        with gzip.open(path, 'rb') as g:
            while g.read(1 << 22):
                pass
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f'{path} is corrupt ({type(e).__name__}: {e}); download it again') from None


def missing_cifar_message(root):
    return (f'no CIFAR-10 in {root}: expected {CIFAR_DIR}/ with {", ".join(CIFAR_TRAIN_FILES)} and '
            f'{CIFAR_TEST_FILE}, or {CIFAR_ARCHIVE} (the python version from {CIFAR_URL})')


def load_cifar10(root, download=True, url=CIFAR_URL, md5=CIFAR_MD5):
    """(train_x, train_y, test_x, test_y): uint8 [N, 3, 32, 32] and int64 labels."""
    source = _find_cifar(root)
    if source is None and download:
        download_cifar10(root, url, md5)
        source = _find_cifar(root)
    if source is None:
        raise DataError(missing_cifar_message(root))
    batches = _read_cifar_files(source, CIFAR_TRAIN_FILES + [CIFAR_TEST_FILE])
    train_x = np.concatenate([b[0] for b in batches[:-1]])
    train_y = np.concatenate([b[1] for b in batches[:-1]])
    return train_x, train_y, batches[-1][0], batches[-1][1]


def download_cifar10(root, url=CIFAR_URL, md5=CIFAR_MD5, timeout=20):
    """Fetch the archive into root (progress on stderr), check its MD5, keep it as is.

    Written to a .part file and renamed only once complete and verified.
    """
    os.makedirs(root, exist_ok=True)
    dest = os.path.join(root, CIFAR_ARCHIVE)
    part = dest + '.part'
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, 'wb') as f:
            total = int(response.headers.get('Content-Length') or 0)
            digest, done = hashlib.md5(), 0
            while True:
                chunk = response.read(1 << 20)
                if not chunk:
                    break
                f.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                pct = f' {100 * done / total:5.1f}%' if total else ''
                print(f'\rdownloading {url}: {done / 2**20:.1f} MiB{pct}', end='', file=sys.stderr, flush=True)
        print(file=sys.stderr)
    except (urllib.error.URLError, OSError, ValueError) as e:
        if os.path.exists(part):
            os.remove(part)
        reason = getattr(e, 'reason', e)
        raise DataError(f'{missing_cifar_message(root)}; downloading it failed ({reason}): '
                        f'put the archive there by hand') from None
    if md5 and digest.hexdigest() != md5:
        os.remove(part)
        raise DataError(f'download from {url} has MD5 {digest.hexdigest()}, expected {md5}: not kept')
    os.replace(part, dest)


# ---------------------------------------------------------------- embedded digits

def load_digits(test_fraction=1 / 6, seed=0):
    """scikit-learn's 1,797 real 8x8 handwritten digits as 32x32 RGB uint8, split train/test."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:
        raise DataError('--dataset digits needs scikit-learn (pip install scikit-learn)') from None
    d = sk_digits()
    gray = (d.images / 16.0 * 255.0).clip(0, 255)
    # 8x8 -> 32x32 by repeating each pixel 4x4, then the same value in R, G and B.
    big = gray.repeat(4, axis=1).repeat(4, axis=2).astype(np.uint8)
    x = np.repeat(big[:, None], 3, axis=1)
    y = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def search_split(n, train_portion=0.5, seed=0):
    """Disjoint (search-train, search-val) index arrays from a fixed-seed permutation."""
    order = np.random.default_rng(seed).permutation(n)
    k = int(np.floor(train_portion * n))
    return np.sort(order[:k]), np.sort(order[k:])


# ---------------------------------------------------------------- augmentation

def crop_padding_for(image_size):
    """Zero padding of the random crop: 1/8 of the image side (CIFAR-10: 4 at 32 px)."""
    return max(1, int(round(image_size / 8)))


def augment_cifar(images, rng, crop_padding=4, flip=True, cutout=0):
    """Random crop with zero padding, horizontal flip, cutout (length `cutout`) on uint8 NCHW."""
    return apply_augmentation(images, draw_augmentation(rng, len(images), images.shape[2], images.shape[3],
                                                        crop_padding, flip, cutout), crop_padding, cutout)


def draw_augmentation(rng, n, h, w, crop_padding, flip, cutout):
    """The random numbers of augment_cifar for a batch of n images of h x w, in a fixed order: a
    data-parallel rank draws them for the whole batch and applies its rows' (ArrayBatches.make)."""
    draws = {}
    if crop_padding:
        draws['dy'] = rng.integers(0, 2 * crop_padding + 1, n)
        draws['dx'] = rng.integers(0, 2 * crop_padding + 1, n)
    if flip:
        draws['flip'] = rng.random(n) < 0.5
    if cutout:
        draws['cy'], draws['cx'] = rng.integers(0, h, n), rng.integers(0, w, n)
    return draws


def apply_augmentation(images, draws, crop_padding, cutout):
    """augment_cifar with its draws made (draw_augmentation, rows already picked)."""
    n, c, h, w = images.shape
    out = images
    if crop_padding:
        padded = np.zeros((n, c, h + 2 * crop_padding, w + 2 * crop_padding), np.uint8)
        padded[:, :, crop_padding:crop_padding + h, crop_padding:crop_padding + w] = images
        dy, dx = draws['dy'], draws['dx']
        out = np.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if 'flip' in draws:
        mask = draws['flip']
        out = out.copy() if out is images else out
        out[mask] = out[mask][..., ::-1]
    if cutout:
        out = out.copy() if out is images else out
        cy, cx = draws['cy'], draws['cx']
        for i in range(n):
            y0, y1 = max(cy[i] - cutout // 2, 0), min(cy[i] + cutout // 2, h)
            x0, x1 = max(cx[i] - cutout // 2, 0), min(cx[i] + cutout // 2, w)
            out[i, :, y0:y1, x0:x1] = 0
    return out


def normalize(images, mean, std):
    """(x / 255 - mean) / std per channel, float32 NCHW."""
    return ((images.astype(np.float32) / 255.0 - mean[:, None, None]) / std[:, None, None]).astype(np.float32)


# ---------------------------------------------------------------- batches

class ArrayBatches:
    """Batches of (x, y) from in-memory uint8 images, optionally augmented.

    Batch b of epoch e uses indices from a permutation seeded by (seed, e) and
    augmentation seeded by (seed, e, b).  Work is done by `num_workers` forked
    processes (0: in this process), ahead of the consumer.  Augmentation: random crop
    with `crop_padding` (default: 1/8 of the image side), horizontal flip when `flip`,
    cutout when `cutout` > 0.

    shard = (rank, ranks): a data-parallel rank's batches, its contiguous share of each batch
    (distributed.shard_bounds), augmented with the whole batch's draws, so the shares of all
    ranks together are the single-process batch.
    """

    may_drop_images = False   # FileBatches: a batch (or a share of one) can lose unreadable images

    def __init__(self, images, labels, batch_size, mean, std, shuffle, augment,
                 seed=0, num_workers=0, drop_last=False, cutout=0, stream=0, flip=True, crop_padding=None,
                 shard=(0, 1)):
        self.images, self.labels = images, labels
        self.batch_size, self.mean, self.std = batch_size, mean, std
        self.shuffle, self.augment, self.cutout, self.flip = shuffle, augment, cutout, flip
        self.crop_padding = crop_padding
        self.seed, self.stream, self.num_workers, self.drop_last = seed, stream, num_workers, drop_last
        self.shard = shard

    def __len__(self):
        n = len(self.images)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _plan(self, epoch):
        n = len(self.images)
        order = (np.random.default_rng([self.seed, self.stream, epoch]).permutation(n)
                 if self.shuffle else np.arange(n))
        return [(order[b * self.batch_size:(b + 1) * self.batch_size], epoch, b) for b in range(len(self))]

    def rows(self, batch):
        """This shard's rows of a batch of `batch` items."""
        return slice(*shard_bounds(batch, *self.shard))

    def make(self, job):
        idx, epoch, b = job
        rows = self.rows(len(idx))
        x = self.images[idx[rows]]
        if self.augment:
            rng = np.random.default_rng([self.seed, self.stream, epoch, b])
            pad = crop_padding_for(x.shape[-1]) if self.crop_padding is None else self.crop_padding
            draws = draw_augmentation(rng, len(idx), x.shape[2], x.shape[3], pad, self.flip, self.cutout)
            x = apply_augmentation(x, {k: v[rows] for k, v in draws.items()}, pad, self.cutout)
        return normalize(x, self.mean, self.std), self.labels[idx[rows]]

    def epoch(self, epoch, start=0):
        """Iterate the batches of `epoch`, from batch `start`."""
        jobs = self._plan(epoch)[start:]
        if self.num_workers <= 0:
            for job in jobs:
                yield self.make(job)
            return
        # Forked workers inherit the arrays; only (key, indices) cross the pipe.
        key = id(self)
        _SOURCES[key] = self
        try:
            with worker_pool(self.num_workers) as pool:
                yield from pool.imap(_make_batch, [(key, job) for job in jobs], chunksize=1)
        finally:
            _SOURCES.pop(key, None)


_SOURCES = {}


def worker_init(parent):
    """In a forked worker: Ctrl-C is the main process's to handle (it ends the pool), SIGTERM
    just ends the worker (the handler inherited from Paddle would print a C++ 'FatalError:
    Termination signal' block; the parent blocks it, see lifecycle.stop_on_sigterm), and the worker
    is killed when its parent dies, however it dies (else it would wait on the pool's pipe for ever)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
    with contextlib.suppress(OSError, AttributeError):   # not Linux: no parent-death signal
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)        # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:   # the parent died before the prctl
        os._exit(0)


@contextlib.contextmanager
def worker_pool(num_workers):
    """A fork pool whose workers run worker_init; closed and joined when the work is
    done (no signals sent), terminated only when the consumer stops early.
    num_workers <= 0: no pool (None), the work is done in this process."""
    if num_workers <= 0:
        yield None
        return
    pool = mp.get_context('fork').Pool(num_workers, initializer=worker_init, initargs=(os.getpid(),))
    finished = False
    try:
        yield pool
        finished = True
    finally:
        if finished:
            pool.close()
        else:
            pool.terminate()
        pool.join()


def _make_batch(task):
    key, job = task
    return _SOURCES[key].make(job)


# ---------------------------------------------------------------- ImageNet on disk

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], 'float32')
IMAGENET_STD = np.array([0.229, 0.224, 0.225], 'float32')
IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png', '.bmp', '.webp')


def scan_imagenet(root, split):
    """[(path, label)] for split 'train' or 'val', and the class names (index = label).

    Either a list file root/{split}_list.txt with lines `relative/path label`, or
    class folders root/{split}/<class>/<image> (labels: sorted class names).
    """
    list_file = os.path.join(root, f'{split}_list.txt')
    folder = os.path.join(root, split)
    if os.path.isfile(list_file):
        samples = []
        with open(list_file) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.split()
                if len(parts) != 2 or not parts[1].isdigit():
                    raise DataError(f'{list_file}:{n}: expected "relative/path label" with a label 0, 1, 2, ..., '
                                    f'got {line.strip()!r}')
                samples.append((os.path.join(root, parts[0]), int(parts[1])))
        if not samples:
            raise DataError(f'{list_file} lists no images')
        return samples, [str(k) for k in range(max(label for _, label in samples) + 1)]
    if not os.path.isdir(folder):
        raise DataError(f'no ImageNet {split} data in {root}: expected {split}/<class>/<images> '
                        f'or {split}_list.txt with lines "relative/path label"')
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if not classes:
        raise DataError(f'{folder} has no class folders')
    samples = []
    for label, c in enumerate(classes):
        files = sorted(f for f in os.listdir(os.path.join(folder, c)) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise DataError(f'class folder {os.path.join(folder, c)} has no images')
        samples += [(os.path.join(folder, c, f), label) for f in files]
    return samples, classes


def _random_resized_crop(img, size, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """A random area fraction and aspect ratio of the image, resized to size x size."""
    from PIL import Image
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            return img.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
    side = min(w, h)  # fall back to a centre crop
    x0, y0 = (w - side) // 2, (h - side) // 2
    return img.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side))


def _colour_jitter(img, rng, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1):
    """Brightness, contrast, saturation by factors in [1-x, 1+x] (random order), hue shifted by up to +-hue."""
    from PIL import Image, ImageEnhance
    ops = [(ImageEnhance.Brightness, brightness), (ImageEnhance.Contrast, contrast), (ImageEnhance.Color, saturation)]
    for k in rng.permutation(3):
        enhancer, amount = ops[k]
        img = enhancer(img).enhance(rng.uniform(1 - amount, 1 + amount))
    if hue:
        h, s, v = img.convert('HSV').split()
        shift = int(round(rng.uniform(-hue, hue) * 255))
        h = h.point(lambda p: (p + shift) % 256)
        img = Image.merge('HSV', (h, s, v)).convert('RGB')
    return img


def load_image(path, train, size, rng):
    """Decode and transform one image to uint8 CHW: train = random-resized-crop, flip, colour
    jitter; eval = resize the short side to size * 256/224, centre crop size."""
    from PIL import Image
    with Image.open(path) as im:
        img = im.convert('RGB')
    if train:
        img = _random_resized_crop(img, size, rng)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        img = _colour_jitter(img, rng)
    else:
        short = int(round(size * 256 / 224))
        w, h = img.size
        scale = short / min(w, h)
        img = img.resize((max(short, int(round(w * scale))), max(short, int(round(h * scale)))), Image.BILINEAR)
        w, h = img.size
        x0, y0 = (w - size) // 2, (h - size) // 2
        img = img.crop((x0, y0, x0 + size, y0 + size))
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


class FileBatches(ArrayBatches):
    """Batches decoded from image files in worker processes; image k of batch b draws its
    augmentation from (seed, epoch, b, k), so a rank's share needs no other rank's draws.

    A file that cannot be decoded is reported on stderr (path and reason) and left out
    of its batch; a batch with no readable image is skipped (a data-parallel rank's share
    with none is yielded empty: the ranks decide together, see training.Training.train_epoch).
    """

    may_drop_images = True

    def __init__(self, samples, batch_size, train, image_size=224, seed=0, num_workers=0, drop_last=False,
                 shard=(0, 1)):
        self.paths = [p for p, _ in samples]
        labels = np.array([label for _, label in samples], np.int64)
        super().__init__(self.paths, labels, batch_size, IMAGENET_MEAN, IMAGENET_STD, shuffle=train,
                         augment=train, seed=seed, num_workers=num_workers, drop_last=drop_last, shard=shard)
        self.image_size = image_size

    def make(self, job):
        idx, epoch, b = job
        rows = self.rows(len(idx))
        images, keep = [], []
        for k in range(len(idx))[rows]:
            i = idx[k]
            rng = np.random.default_rng([self.seed, self.stream, epoch, b, k])
            try:
                images.append(load_image(self.paths[i], self.augment, self.image_size, rng))
                keep.append(i)
            except Exception as e:  # noqa: BLE001 - any decode failure: report, skip, go on
                print(f'skipping unreadable image {self.paths[i]}: {type(e).__name__}: {e}', file=sys.stderr)
        if not images:
            size = self.image_size
            return np.zeros((0, 3, size, size), np.float32), np.zeros(0, np.int64)
        return normalize(np.stack(images), self.mean, self.std), self.labels[np.array(keep, np.int64)]

    def epoch(self, epoch, start=0):
        for x, y in super().epoch(epoch, start):
            if len(y) or self.shard[1] > 1:
                yield x, y
