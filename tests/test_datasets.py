"""datasets.py: every format from files written in its real on-disk layout."""
import argparse
import gzip
import os

import numpy as np
import pytest
from PIL import Image

import conftest  # noqa: F401 - puts the repository root on sys.path
from darts import datasets
from reader import DataError


def parse(*argv):
    p = argparse.ArgumentParser()
    datasets.add_arguments(p)
    return p.parse_args([str(a) for a in argv])


def load(tmp_path, *argv, num_workers=0, log=None):
    lines = [] if log is None else log
    return datasets.load(parse(*argv, '--cache_dir', tmp_path / 'cache'), num_workers=num_workers,
                         log=lines.append)


def save_image(path, shape, seed, mode='RGB'):
    """A random image of shape (h, w) saved at path (format from the extension)."""
    rng = np.random.default_rng(seed)
    h, w = shape
    a = rng.integers(0, 256, (h, w, 3) if mode == 'RGB' else (h, w), dtype=np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(a, mode).save(path)
    return path


def make_tree(root, classes=('cat', 'dog'), per_class=5, mode='RGB', seed=0):
    """root/<class>/<i>.png|jpg with mixed sizes; returns the paths."""
    paths = []
    for k, c in enumerate(classes):
        for i in range(per_class):
            ext = 'png' if i % 2 else 'jpg'
            shape = (40, 60) if i % 2 else (90, 70)
            paths.append(save_image(os.path.join(root, c, f'{i}.{ext}'), shape, seed + 100 * k + i, mode))
    return paths


# ---------------------------------------------------------------- folder

def test_folder_mixed_sizes_one_gray_image_gives_rgb(tmp_path):
    make_tree(tmp_path / 'data', classes=('zebra', 'ant', 'moth'), per_class=4)
    save_image(str(tmp_path / 'data' / 'ant' / 'gray.PNG'), (50, 50), 7, mode='L')
    d = load(tmp_path, '--dataset', 'folder', '--data', tmp_path / 'data', '--image_size', 24)
    assert d.classes == ['ant', 'moth', 'zebra']
    assert d.channels == 3 and d.image_size == 24 and d.num_classes == 3
    assert d.train_x.shape[1:] == (3, 24, 24) and d.test_x.shape[1:] == (3, 24, 24)
    assert d.train_x.dtype == np.uint8 and d.train_y.dtype == np.int64
    assert len(d.train_x) + len(d.test_x) == 13
    assert np.bincount(np.concatenate([d.train_y, d.test_y])).tolist() == [5, 4, 4]
    assert d.flip and 'folder' in d.describe() and '3x24x24' in d.describe()


def test_folder_all_gray_gives_one_channel_and_default_size(tmp_path):
    make_tree(tmp_path / 'data', mode='L')
    d = load(tmp_path, '--dataset', 'folder', '--data', tmp_path / 'data')
    assert d.train_x.shape[1:] == (1, datasets.DEFAULT_IMAGE_SIZE, datasets.DEFAULT_IMAGE_SIZE)
    assert d.mean.shape == (1,) and d.meta()['channels'] == 1


def test_folder_train_val_layout_uses_val_as_test(tmp_path):
    make_tree(tmp_path / 'data' / 'train', per_class=4)
    make_tree(tmp_path / 'data' / 'val', per_class=2, seed=50)
    d = load(tmp_path, '--dataset', 'folder', '--data', tmp_path / 'data', '--image_size', 16)
    assert len(d.train_x) == 8 and len(d.test_x) == 4
    assert d.test_y.tolist() == [0, 0, 1, 1] and 'val/' in d.describe()
    one = datasets.decode_image(str(tmp_path / 'data' / 'val' / 'dog' / '1.png'), 16, 3)
    assert np.array_equal(d.test_x[3], one)


def test_resize_and_centre_crop_match_independent_pil(tmp_path):
    path = save_image(str(tmp_path / 'data' / 'a' / 'wide.png'), (40, 60), 3)  # 60 wide, 40 high
    save_image(str(tmp_path / 'data' / 'b' / 'x.png'), (30, 30), 4)
    d = load(tmp_path, '--dataset', 'folder', '--data', tmp_path / 'data', '--image_size', 20,
             '--test_data', tmp_path / 'data')
    # Shorter side 40 -> 20, so 60 -> 30; then the middle 20 columns.
    expected = np.asarray(Image.open(path).convert('RGB').resize((30, 20), Image.BILINEAR).crop((5, 0, 25, 20)))
    assert np.array_equal(d.train_x[0], expected.transpose(2, 0, 1))


def test_folder_test_data_flag(tmp_path):
    make_tree(tmp_path / 'train', per_class=3)
    make_tree(tmp_path / 'test', classes=('dog',), per_class=2, seed=9)
    d = load(tmp_path, '--dataset', 'folder', '--data', tmp_path / 'train', '--test_data', tmp_path / 'test',
             '--image_size', 16)
    assert len(d.train_x) == 6 and d.test_y.tolist() == [1, 1]


# ---------------------------------------------------------------- csv

def write_csv(path, header, rows):
    with open(path, 'w') as f:
        f.write(','.join(header) + '\n')
        for r in rows:
            f.write(','.join(r) + '\n')
    return path


def test_csv_string_labels_relative_paths_and_test_csv(tmp_path):
    rows = []
    for i in range(8):
        save_image(str(tmp_path / 'img' / f'{i}.jpg'), (30 + i, 40), i)
        rows.append((f'img/{i}.jpg', 'male' if i % 2 else 'female'))
    write_csv(tmp_path / 'train.csv', ['path', 'sex'], rows)
    save_image(str(tmp_path / 'other' / 't.png'), (20, 20), 99)
    write_csv(tmp_path / 'test.csv', ['path', 'sex'], [(str(tmp_path / 'other' / 't.png'), 'male')])
    d = load(tmp_path, '--dataset', 'csv', '--data', tmp_path / 'train.csv', '--test_data', tmp_path / 'test.csv',
             '--image_size', 16)
    assert d.classes == ['female', 'male']
    assert d.train_y.tolist() == [0, 1] * 4 and d.test_y.tolist() == [1]
    assert d.train_x.shape == (8, 3, 16, 16) and d.test_x.shape == (1, 3, 16, 16)


def test_csv_columns_by_name_in_other_order_and_numeric_classes(tmp_path):
    rows = []
    for i in range(6):
        save_image(str(tmp_path / f'{i}.png'), (20, 20), i, mode='L')
        rows.append(('x', ['2', '10', '3'][i % 3], f'{i}.png'))
    write_csv(tmp_path / 'list.csv', ['junk', 'label', 'file'], rows)
    d = load(tmp_path, '--dataset', 'csv', '--data', tmp_path / 'list.csv', '--csv_columns', 'file,label',
             '--image_size', 16, '--test_fraction', 0.5)
    assert d.classes == ['2', '3', '10'] and d.channels == 1
    assert sorted(np.concatenate([d.train_y, d.test_y]).tolist()) == [0, 0, 1, 1, 2, 2]


# ---------------------------------------------------------------- IDX

def write_idx(folder, n_train=30, n_test=12, gz=(), seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for prefix, n in (('train', n_train), ('t10k', n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        out[prefix] = (x, y)
        for name, raw in ((f'{prefix}-images-idx3-ubyte', b''.join(int(v).to_bytes(4, 'big') for v in
                                                                    (0x803, n, 28, 28)) + x.tobytes()),
                          (f'{prefix}-labels-idx1-ubyte', (0x801).to_bytes(4, 'big') + n.to_bytes(4, 'big')
                           + y.tobytes())):
            opener = gzip.open if name in gz else open
            with opener(os.path.join(folder, name + ('.gz' if name in gz else '')), 'wb') as f:
                f.write(raw)
    return out


@pytest.mark.parametrize('name', ['mnist', 'fashion_mnist'])
def test_idx_plain_and_gzipped_round_trip(tmp_path, name):
    truth = write_idx(str(tmp_path), gz=('train-images-idx3-ubyte', 't10k-labels-idx1-ubyte'))
    d = load(tmp_path, '--dataset', name, '--data', tmp_path)
    assert d.channels == 1 and d.image_size == 28
    assert np.array_equal(d.train_x[:, 0], truth['train'][0]) and np.array_equal(d.test_x[:, 0], truth['t10k'][0])
    assert d.train_y.tolist() == truth['train'][1].tolist() and d.test_y.dtype == np.int64
    assert d.classes[0] == ('T-shirt/top' if name == 'fashion_mnist' else '0')
    assert d.flip == (name == 'fashion_mnist')
    assert load(tmp_path, '--dataset', name, '--data', tmp_path, '--image_size', 32).train_x.shape[1:] == (1, 32, 32)


def test_idx_wrong_magic_truncated_missing_and_count_mismatch(tmp_path):
    write_idx(str(tmp_path))
    labels = tmp_path / 'train-labels-idx1-ubyte'
    images = tmp_path / 'train-images-idx3-ubyte'
    raw_labels, raw_images = labels.read_bytes(), images.read_bytes()
    labels.write_bytes((0x803).to_bytes(4, 'big') + raw_labels[4:])
    with pytest.raises(DataError, match='magic 0x00000803, expected 0x00000801'):
        load(tmp_path, '--dataset', 'mnist', '--data', tmp_path)
    labels.write_bytes(raw_labels)
    images.write_bytes(raw_images[:-100])
    with pytest.raises(DataError, match=f'truncated.*expected {30 * 784} bytes.*found {30 * 784 - 100}'):
        load(tmp_path, '--dataset', 'mnist', '--data', tmp_path)
    images.write_bytes(raw_images)
    labels.write_bytes((0x801).to_bytes(4, 'big') + (29).to_bytes(4, 'big') + raw_labels[8:-1])
    with pytest.raises(DataError, match='30 images but .* 29 labels'):
        load(tmp_path, '--dataset', 'mnist', '--data', tmp_path)
    os.remove(labels)
    with pytest.raises(DataError, match='no train-labels-idx1-ubyte .*t10k-labels-idx1-ubyte'):
        load(tmp_path, '--dataset', 'mnist', '--data', tmp_path)


# ---------------------------------------------------------------- hold-out, cache, workers, statistics

def test_stratified_holdout_is_fixed_disjoint_and_proportional(tmp_path):
    make_tree(tmp_path / 'data', classes=('a', 'b', 'c'), per_class=10)
    for extra in range(10, 20):
        save_image(str(tmp_path / 'data' / 'a' / f'{extra}.png'), (20, 20), extra)
    argv = ('--dataset', 'folder', '--data', tmp_path / 'data', '--image_size', 16, '--test_fraction', 0.3)
    d1, d2 = load(tmp_path, *argv), load(tmp_path, *argv, '--no_flip')
    assert np.bincount(d1.test_y).tolist() == [6, 3, 3] and np.bincount(d1.train_y).tolist() == [14, 7, 7]
    assert np.array_equal(d1.test_x, d2.test_x) and np.array_equal(d1.train_y, d2.train_y)
    train_rows = {bytes(x) for x in np.asarray(d1.train_x)}
    assert not train_rows & {bytes(x) for x in np.asarray(d1.test_x)}
    tr, te = datasets.holdout_split(np.repeat([0, 1], [2, 5]), 0.2)
    assert len(np.intersect1d(tr, te)) == 0 and sorted(np.concatenate([tr, te])) == list(range(7))
    assert np.repeat([0, 1], [2, 5])[te].tolist() == [0, 1]  # at least one per class


def test_cache_reused_without_decoding_and_invalidated_by_a_touch(tmp_path, monkeypatch):
    paths = make_tree(tmp_path / 'data')
    argv = ('--dataset', 'folder', '--data', tmp_path / 'data', '--image_size', 16)
    first = load(tmp_path, *argv)
    assert len(os.listdir(tmp_path / 'cache')) == 2

    def no_decoding(*a):
        raise AssertionError('decoded although cached')
    monkeypatch.setattr(datasets, 'decode_image', no_decoding)
    monkeypatch.setattr(datasets, 'probe_image', no_decoding)
    lines = []
    second = load(tmp_path, *argv, log=lines)
    assert any('from cache' in line for line in lines)
    assert isinstance(second.train_x, np.memmap) and not second.train_x.flags.writeable
    assert np.array_equal(first.train_x, second.train_x) and np.array_equal(first.test_y, second.test_y)
    st = os.stat(paths[0])
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match='decoded although cached'):
        load(tmp_path, *argv)


def test_unwritable_cache_dir_falls_back_to_memory(tmp_path):
    make_tree(tmp_path / 'data', per_class=2)
    (tmp_path / 'file').write_text('not a folder')
    lines = []
    d = datasets.load(parse('--dataset', 'folder', '--data', tmp_path / 'data', '--image_size', 16,
                            '--cache_dir', tmp_path / 'file' / 'cache'), log=lines.append)
    assert len(d.train_x) + len(d.test_x) == 4
    assert sum('warning' in line for line in lines) == 1


def test_corrupt_and_truncated_images_are_skipped_and_counted(tmp_path):
    make_tree(tmp_path / 'data', per_class=4)
    (tmp_path / 'data' / 'cat' / 'bad.jpg').write_bytes(np.random.default_rng(0).bytes(500))
    good = (tmp_path / 'data' / 'dog' / '0.jpg').read_bytes()
    (tmp_path / 'data' / 'dog' / 'cut.jpg').write_bytes(good[:len(good) // 2])
    lines = []
    d = load(tmp_path, '--dataset', 'folder', '--data', tmp_path / 'data', '--image_size', 16, log=lines)
    assert len(d.train_x) + len(d.test_x) == 8 and len(d.train_y) + len(d.test_y) == 8
    assert 'skipped 2 unreadable images' in lines
    assert any('bad.jpg' in line for line in lines) and any('cut.jpg' in line for line in lines)
    again = []
    d2 = load(tmp_path, '--dataset', 'folder', '--data', tmp_path / 'data', '--image_size', 16, log=again)
    assert np.array_equal(d.train_x, d2.train_x) and any('skipped 2' in line for line in again)


def test_workers_give_the_same_arrays(tmp_path):
    make_tree(tmp_path / 'data', per_class=6)
    argv = ('--dataset', 'folder', '--data', tmp_path / 'data', '--image_size', 20)
    serial = datasets.load(parse(*argv, '--cache_dir', tmp_path / 'c0'), num_workers=0, log=lambda *a: None)
    forked = datasets.load(parse(*argv, '--cache_dir', tmp_path / 'c2'), num_workers=2, log=lambda *a: None)
    assert np.array_equal(serial.train_x, forked.train_x) and np.array_equal(serial.test_x, forked.test_x)
    assert np.array_equal(serial.train_y, forked.train_y)


def test_mean_std_equal_numpy_and_chunking(tmp_path):
    make_tree(tmp_path / 'data', per_class=4)
    d = load(tmp_path, '--dataset', 'folder', '--data', tmp_path / 'data', '--image_size', 16)
    x = np.asarray(d.train_x) / 255.0
    np.testing.assert_allclose(d.mean, x.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(d.std, x.std(axis=(0, 2, 3)), rtol=1e-5)
    mean, std = datasets.channel_stats(d.train_x, rows_per_chunk=3)
    np.testing.assert_allclose(mean, d.mean, rtol=1e-6)
    np.testing.assert_allclose(std, d.std, rtol=1e-6)


def test_digits_one_channel_and_cifar_defaults(tmp_path, cifar_dir):
    d = datasets.load(parse('--dataset', 'digits'), log=lambda *a: None)
    assert d.channels == 1 and d.image_size == 32 and d.classes == [str(k) for k in range(10)]
    c = datasets.load(parse('--data', cifar_dir, '--no_download'), log=lambda *a: None)
    assert c.name == 'cifar10' and c.classes[0] == 'airplane' and c.train_x.shape[1:] == (3, 32, 32)
    assert np.array_equal(c.mean, datasets.reader.CIFAR_MEAN) and c.flip
    big = datasets.load(parse('--data', cifar_dir, '--no_download', '--image_size', 40, '--no_flip'))
    assert big.train_x.shape[1:] == (3, 40, 40) and not big.flip


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize('case, message', [
    ('one_class', 'has 1 class folder .*at least 2'),
    ('empty_class', r'class folder .*dog has no images'),
    ('missing', 'no such folder'),
    ('image_size', '--image_size 8: must be at least 16'),
    ('test_class_unknown', 'test classes bird are not among the training classes'),
])
def test_folder_errors(tmp_path, case, message):
    root = tmp_path / 'data'
    argv = ['--dataset', 'folder', '--data', root]
    if case == 'one_class':
        make_tree(root, classes=('cat',))
    elif case == 'empty_class':
        make_tree(root, classes=('cat',))
        os.makedirs(root / 'dog')
        (root / 'dog' / 'notes.txt').write_text('no images here')
    elif case == 'missing':
        argv[-1] = tmp_path / 'nowhere'
    elif case == 'image_size':
        make_tree(root)
        argv += ['--image_size', 8]
    elif case == 'test_class_unknown':
        make_tree(root / 'train')
        make_tree(root / 'test', classes=('cat', 'bird'))
    with pytest.raises(DataError, match=message) as err:
        load(tmp_path, *argv)
    assert '\n' not in str(err.value)


@pytest.mark.parametrize('case, message', [
    ('no_label_column', 'line 3: no label value'),
    ('empty_label', 'line 2: empty label in column label'),
    ('missing_paths', r'2 of 3 paths in .*list.csv do not exist, first: .*gone0.png'),
    ('one_class', 'expected at least two classes'),
    ('unknown_column', r'no column kind in the header \(path, label\)'),
    ('test_label_unknown', 'test classes owl are not among'),
    ('not_a_file', 'is a folder: --dataset csv expects a CSV file'),
])
def test_csv_errors(tmp_path, case, message):
    save_image(str(tmp_path / 'a.png'), (20, 20), 0)
    rows = [('a.png', 'cat'), ('a.png', 'dog')]
    argv = ['--dataset', 'csv', '--data', tmp_path / 'list.csv']
    if case == 'no_label_column':
        rows[1] = ('a.png',)
    elif case == 'empty_label':
        rows[0] = ('a.png', '')
    elif case == 'missing_paths':
        rows = [('gone0.png', 'cat'), ('a.png', 'dog'), ('gone1.png', 'dog')]
    elif case == 'one_class':
        rows = [('a.png', 'cat'), ('a.png', 'cat')]
    elif case == 'unknown_column':
        argv += ['--csv_columns', 'path,kind']
    elif case == 'test_label_unknown':
        write_csv(tmp_path / 'test.csv', ['path', 'label'], [('a.png', 'owl')])
        argv += ['--test_data', tmp_path / 'test.csv']
    elif case == 'not_a_file':
        argv[-1] = tmp_path
    write_csv(tmp_path / 'list.csv', ['path', 'label'], rows)
    with pytest.raises(DataError, match=message) as err:
        load(tmp_path, *argv)
    assert '\n' not in str(err.value)


def test_other_errors(tmp_path):
    with pytest.raises(DataError, match='no CIFAR-10 in'):
        load(tmp_path, '--data', tmp_path / 'none', '--no_download')
    with pytest.raises(DataError, match='--test_data is for --dataset folder or csv'):
        load(tmp_path, '--dataset', 'digits', '--test_data', tmp_path)
    with pytest.raises(DataError, match='no train-images-idx3-ubyte in'):
        load(tmp_path, '--dataset', 'fashion_mnist', '--data', tmp_path / 'none')
