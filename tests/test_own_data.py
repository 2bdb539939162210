"""Your own images end to end, as a user runs them: search, train the found cell, predict.

One chain per on-disk format (class folders, a train/val tree, CSV files, gzipped IDX),
on tiny learnable data the tests write in exactly those formats.
"""
import csv
import gzip
import json
import os
import struct

import numpy as np
import pytest
from PIL import Image

from conftest import COLOURS, onnx_paddle_and_test_program, run_script

SEARCH = ['--init_channels', '4', '--layers', '3', '--batch_size', '16', '--epochs', '2', '--num_workers', '0',
          '--seed', '1', '--report_freq', '5']
TRAIN = ['--init_channels', '8', '--layers', '3', '--batch_size', '16', '--epochs', '3', '--num_workers', '0',
         '--seed', '1', '--report_freq', '5', '--learning_rate', '0.05', '--cutout_length', '0']


def colour_image(k, rng, gray=False):
    """Class k: its colour from COLOURS plus noise and a bright square, at a random size."""
    h, w = rng.integers(24, 56, 2)
    pixels = COLOURS[k] + rng.normal(0, 25, (h, w, 3))
    y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
    pixels[y0:y0 + h // 4, x0:x0 + w // 4] = 255
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return img.convert('L') if gray else img


def write_class_folders(root, classes, per_class, seed, gray_one=False):
    """root/<class>/<k>.png|jpg, alternating PNG and JPEG; one grayscale image if asked."""
    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            img = colour_image(k, rng, gray=gray_one and k == 0 and i == 0)
            img.save(os.path.join(root, name, f'{i}.png' if i % 2 else f'{i}.jpg'), quality=95)


def bar_image(k, rng):
    """28x28 grayscale, class k: a background of brightness 40 + 70 k and a bright horizontal (0),
    vertical (1) or diagonal (2) bar."""
    x = rng.normal(40 + 70 * k, 20, (28, 28))
    pos = rng.integers(6, 22)
    if k == 0:
        x[pos - 2:pos + 2, 4:24] = 230
    elif k == 1:
        x[4:24, pos - 2:pos + 2] = 230
    else:
        for t in range(4, 24):
            x[t, max(t - 2, 0):t + 2] = 230
    return np.clip(x, 0, 255).astype(np.uint8)


def write_idx(folder, split, images, labels):
    """IDX files as MNIST ships them, gzipped: magic, sizes (big-endian int32), uint8 payload."""
    prefix = 'train' if split == 'train' else 't10k'
    with gzip.open(os.path.join(folder, f'{prefix}-images-idx3-ubyte.gz'), 'wb') as f:
        f.write(struct.pack('>iiii', 0x803, len(images), 28, 28) + images.tobytes())
    with gzip.open(os.path.join(folder, f'{prefix}-labels-idx1-ubyte.gz'), 'wb') as f:
        f.write(struct.pack('>ii', 0x801, len(labels)) + labels.astype(np.uint8).tobytes())


def history(run_dir):
    with open(os.path.join(run_dir, 'history.jsonl')) as f:
        return [json.loads(line) for line in f]


def search_train_predict(tmp_path, data_args, images, truth, classes, channels):
    """Run the three steps and check what each leaves; returns (search val_acc, test top-1, predictions)."""
    import train
    import train_search
    search_dir, eval_dir = str(tmp_path / 'search'), str(tmp_path / 'eval')
    cache = ['--cache_dir', str(tmp_path / 'cache')]
    assert train_search.main([*data_args, *cache, '--save', search_dir, *SEARCH]) == 0
    meta = json.load(open(os.path.join(search_dir, 'data.json')))
    assert meta['classes'] == classes and meta['channels'] == channels
    search_acc = history(search_dir)[-1]['val_acc']

    assert train.main([*data_args, *cache, '--genotype_file', os.path.join(search_dir, 'genotype.json'),
                       '--save', eval_dir, *TRAIN]) == 0
    top1 = max(r['val_acc'] for r in history(eval_dir))
    confusion = json.load(open(os.path.join(eval_dir, 'confusion.json')))
    assert confusion['classes'] == classes
    matrix = np.array(confusion['matrix'])
    assert matrix.shape == (len(classes), len(classes))
    delivered = history(eval_dir)[-1]   # no hold-out: the last epoch (nothing chosen on the test split)
    assert np.trace(matrix) / matrix.sum() == pytest.approx(delivered['val_acc'])
    log = open(os.path.join(eval_dir, 'log.txt')).read()
    assert 'per-class accuracy' in log and classes[-1] in log
    preprocess = json.load(open(os.path.join(eval_dir, 'inference', 'preprocess.json')))
    assert preprocess['classes'] == classes and preprocess['channels'] == channels

    r = run_script('train.py', '--predict', os.path.join(eval_dir, 'inference', 'model'), *images)
    assert r.returncode == 0, r.stderr
    rows = [line.split('\t') for line in r.stdout.strip().splitlines()]
    assert [row[0] for row in rows] == images
    assert all(row[1] in classes and 0 < float(row[2]) <= 1 for row in rows)
    predicted = [row[1] for row in rows]
    # the ONNX model beside it: the same probabilities as Paddle Inference and the test program
    import reader
    from darts import training
    mean, std = np.array(preprocess['mean'], 'float32'), np.array(preprocess['std'], 'float32')
    x = reader.normalize(np.stack([training.load_for_predict(p, preprocess) for p in images]), mean, std)
    by_onnx, by_inference, by_program = onnx_paddle_and_test_program(eval_dir, train.TASK, x)
    assert by_onnx.shape == (len(images), len(classes))
    np.testing.assert_allclose(by_onnx, by_inference, atol=1e-4)
    np.testing.assert_allclose(by_onnx, by_program, atol=1e-4)
    assert [classes[k] for k in by_onnx.argmax(1)] == predicted
    return search_acc, top1, np.mean([p == t for p, t in zip(predicted, truth)])


def _new_images(folder, classes, per_class, seed, make):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths, truth = [], []
    for k, name in enumerate(classes):
        for i in range(per_class):
            paths.append(os.path.join(folder, f'{name.replace("/", "_")}_{i}.png'))
            make(k, rng).save(paths[-1])
            truth.append(name)
    return paths, truth


@pytest.mark.slow
def test_class_folders_with_mixed_sizes_formats_and_a_grayscale_image(tmp_path):
    classes = ['bad', 'good', 'scratch']
    write_class_folders(str(tmp_path / 'parts'), classes, 40, seed=0, gray_one=True)
    images, truth = _new_images(str(tmp_path / 'new'), classes, 4, 9, colour_image)
    search_acc, top1, predict_acc = search_train_predict(
        tmp_path, ['--dataset', 'folder', '--data', str(tmp_path / 'parts'), '--image_size', '32'],
        images, truth, classes, channels=3)
    assert search_acc > 0.6 and top1 > 0.8 and predict_acc > 0.8, (search_acc, top1, predict_acc)


def test_train_val_tree(tmp_path):
    """ROOT/train/<class>/ with ROOT/val/<class>/: val is the test split, in class-name order.
    (What happens after loading is the same for every format: the other tests run the chain.)"""
    import argparse
    from darts import datasets
    classes = ['cat', 'dog']
    write_class_folders(str(tmp_path / 'pets' / 'train'), classes, 48, seed=1)
    write_class_folders(str(tmp_path / 'pets' / 'val'), classes, 12, seed=2)
    args = datasets.add_arguments(argparse.ArgumentParser()).parse_args(
        ['--dataset', 'folder', '--data', str(tmp_path / 'pets'), '--image_size', '16',
         '--cache_dir', str(tmp_path / 'cache')])
    data = datasets.load(args, 0, lambda line: None)
    assert data.classes == classes and data.channels == 3 and data.image_size == 16
    assert data.train_x.shape == (96, 3, 16, 16) and data.test_x.shape == (24, 3, 16, 16)
    assert np.bincount(data.train_y).tolist() == [48, 48] and np.bincount(data.test_y).tolist() == [12, 12]
    # the two splits are the two trees' images: colour_image draws class k in its own hue
    for x, y in ((data.train_x, data.train_y), (data.test_x, data.test_y)):
        means = [x[y == k].reshape(-1, 3, 256).mean(axis=(0, 2)) for k in range(2)]
        assert np.abs(means[0] - means[1]).max() > 20


@pytest.mark.slow
def test_csv_with_string_labels_and_a_test_csv(tmp_path):
    classes = ['female', 'male']
    rng = np.random.default_rng(3)
    os.makedirs(tmp_path / 'photos' / 'img')
    for split, n in (('train', 96), ('test', 24)):
        with open(tmp_path / 'photos' / f'{split}.csv', 'w', newline='') as f:
            w = csv.writer(f)
            w.writerow(['id', 'gender', 'file'])
            for i in range(n):
                k = i % 2
                name = f'img/{split}_{i}.jpg'
                colour_image(k, rng).save(tmp_path / 'photos' / name, quality=95)
                w.writerow([i, classes[k], name])
    images, truth = _new_images(str(tmp_path / 'new'), classes, 4, 7, colour_image)
    search_acc, top1, predict_acc = search_train_predict(
        tmp_path, ['--dataset', 'csv', '--data', str(tmp_path / 'photos' / 'train.csv'),
                   '--test_data', str(tmp_path / 'photos' / 'test.csv'), '--csv_columns', 'file,gender',
                   '--image_size', '16'],
        images, truth, classes, channels=3)
    assert search_acc > 0.7 and top1 > 0.8 and predict_acc > 0.8, (search_acc, top1, predict_acc)


FASHION = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot']


@pytest.mark.slow
def test_one_channel_idx_files_at_28_px(tmp_path):
    rng = np.random.default_rng(4)
    folder = tmp_path / 'fashion'
    folder.mkdir()
    for split, n in (('train', 240), ('test', 30)):
        labels = np.arange(n) % 3
        write_idx(str(folder), split, np.stack([bar_image(k, rng) for k in labels]), labels)
    images, truth = _new_images(str(tmp_path / 'new'), FASHION[:3], 4, 6,
                                lambda k, r: Image.fromarray(bar_image(k, r), 'L'))
    search_acc, top1, predict_acc = search_train_predict(
        tmp_path, ['--dataset', 'fashion_mnist', '--data', str(folder)], images, truth, FASHION, channels=1)
    assert search_acc > 0.6 and top1 > 0.8 and predict_acc > 0.8, (search_acc, top1, predict_acc)


@pytest.mark.slow   # a subprocess each; the quick tier keeps one-line errors of its own (test_cli, test_search_space)
@pytest.mark.parametrize('case', ['one_class', 'missing_csv_paths', 'small_image_size'])
def test_bad_own_data_is_one_line_and_leaves_no_run_folder(tmp_path, case):
    write_class_folders(str(tmp_path / 'd'), ['only'], 4, seed=0)
    with open(tmp_path / 'list.csv', 'w') as f:
        f.write('path,label\n' + ''.join(f'gone/{i}.jpg,a\n' for i in range(3)) + 'd/only/0.jpg,b\n')
    args = {'one_class': ['--dataset', 'folder', '--data', tmp_path / 'd'],
            'missing_csv_paths': ['--dataset', 'csv', '--data', tmp_path / 'list.csv'],
            'small_image_size': ['--dataset', 'folder', '--data', tmp_path / 'd', '--image_size', '8']}[case]
    expect = {'one_class': 'class', 'missing_csv_paths': '3 of 4', 'small_image_size': 'at least 16'}[case]
    for script in ('train_search.py', 'train.py'):
        r = run_script(script, *args, '--save', tmp_path / 'run', '--cache_dir', tmp_path / 'cache')
        lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: '), r.stderr
        assert expect in lines[0], lines[0]
        assert not os.path.exists(tmp_path / 'run')
