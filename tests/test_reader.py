import hashlib
import http.server
import os
import threading

import numpy as np
import pytest

import reader
from conftest import run_script, write_cifar


def test_folder_and_archive_read_the_same(tmp_path):
    write_cifar(str(tmp_path / 'folder'))
    write_cifar(str(tmp_path / 'archive'), archive=True)
    a = reader.load_cifar10(str(tmp_path / 'folder'), download=False)
    b = reader.load_cifar10(str(tmp_path / 'archive'), download=False)
    assert a[0].shape == (200, 3, 32, 32) and a[0].dtype == np.uint8 and a[2].shape == (40, 3, 32, 32)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_search_split_is_disjoint_fixed_and_half():
    t1, v1 = reader.search_split(101, 0.5, seed=3)
    t2, v2 = reader.search_split(101, 0.5, seed=3)
    assert len(t1) == 50 and len(v1) == 51 and not set(t1) & set(v1)
    assert set(t1) | set(v1) == set(range(101))
    np.testing.assert_array_equal(t1, t2)
    assert not np.array_equal(t1, reader.search_split(101, 0.5, seed=4)[0])


def test_augmentation_crops_flips_and_normalises():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 3, 32, 32)).astype(np.uint8)
    out = reader.augment_cifar(x, np.random.default_rng(1))
    assert out.shape == x.shape and out.dtype == np.uint8
    # each image is a shifted (and maybe mirrored) window of the zero-padded original
    padded = np.pad(x, ((0, 0), (0, 0), (4, 4), (4, 4)))
    for i in range(8):
        found = any(np.array_equal(out[i], win) or np.array_equal(out[i], win[..., ::-1])
                    for dy in range(9) for dx in range(9) for win in [padded[i, :, dy:dy + 32, dx:dx + 32]])
        assert found
    n = reader.normalize(x, reader.CIFAR_MEAN, reader.CIFAR_STD)
    np.testing.assert_allclose(n[0, 1, 2, 3], (x[0, 1, 2, 3] / 255 - reader.CIFAR_MEAN[1]) / reader.CIFAR_STD[1],
                               rtol=1e-5)


def test_worker_processes_give_the_same_batches():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (50, 3, 32, 32)).astype(np.uint8), rng.integers(0, 10, 50)
    kw = dict(batch_size=16, mean=reader.CIFAR_MEAN, std=reader.CIFAR_STD, shuffle=True, augment=True,
              seed=7, drop_last=True)
    inline = list(reader.ArrayBatches(x, y, num_workers=0, **kw).epoch(2))
    workers = list(reader.ArrayBatches(x, y, num_workers=2, **kw).epoch(2))
    assert len(inline) == 3
    for (a, ya), (b, yb) in zip(inline, workers):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ya, yb)
    other_epoch = list(reader.ArrayBatches(x, y, num_workers=0, **kw).epoch(3))
    assert not np.array_equal(inline[0][1], other_epoch[0][1])
    # resuming mid-epoch yields the same later batches
    tail = list(reader.ArrayBatches(x, y, num_workers=0, **kw).epoch(2, start=1))
    np.testing.assert_array_equal(tail[0][0], inline[1][0])


def test_digits_are_real_and_upscaled():
    tx, ty, vx, vy = reader.load_digits()
    assert tx.shape[1:] == (3, 32, 32) and len(tx) + len(vx) == 1797
    assert set(np.unique(ty)) == set(range(10))
    # 4x4 blocks of equal pixels, equal in R, G, B
    assert np.array_equal(tx[0, 0, ::4, ::4].repeat(4, 0).repeat(4, 1), tx[0, 0])
    assert np.array_equal(tx[:, 0], tx[:, 2])


@pytest.fixture
def http_server(tmp_path):
    """Serve tmp_path/www on 127.0.0.1 (a free port) for the duration of a test."""
    www = tmp_path / 'www'
    www.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(www), **k)

        def log_message(self, *a):
            pass
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield www, f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()
    server.server_close()


def test_download_checks_md5_and_then_loads(tmp_path, http_server, capsys):
    www, base = http_server
    archive = write_cifar(str(www), archive=True)
    md5 = hashlib.md5(open(archive, 'rb').read()).hexdigest()
    root = str(tmp_path / 'data')
    data = reader.load_cifar10(root, download=True, url=f'{base}/cifar-10-python.tar.gz', md5=md5)
    assert data[0].shape == (200, 3, 32, 32)
    assert os.path.isfile(os.path.join(root, 'cifar-10-python.tar.gz'))
    assert 'downloading' in capsys.readouterr().err

    bad_root = str(tmp_path / 'bad')
    with pytest.raises(reader.DataError, match='MD5'):
        reader.load_cifar10(bad_root, download=True, url=f'{base}/cifar-10-python.tar.gz', md5='0' * 32)
    assert os.listdir(bad_root) == []   # nothing half-written kept


def test_an_archive_damaged_in_the_middle_is_called_corrupt(tmp_path):
    path = write_cifar(str(tmp_path), archive=True)
    raw = bytearray(open(path, 'rb').read())
    for k in range(len(raw) // 2, len(raw) // 2 + 64):     # scribble over the middle of the deflate stream
        raw[k] ^= 0x5A
    open(path, 'wb').write(bytes(raw))
    with pytest.raises(reader.DataError, match='corrupt'):
        reader.load_cifar10(str(tmp_path), download=False)


def test_imagenet_lists_refuse_negative_and_gapped_labels(tmp_path):
    from PIL import Image
    for k in range(3):
        Image.new('RGB', (8, 8), (k * 80, 0, 0)).save(tmp_path / f'{k}.jpg')
    (tmp_path / 'train_list.txt').write_text('0.jpg 0\n1.jpg -1\n')
    with pytest.raises(reader.DataError, match='train_list.txt:2'):
        reader.scan_imagenet(str(tmp_path), 'train')
    (tmp_path / 'train_list.txt').write_text('0.jpg 0\n1.jpg 1\n2.jpg 500\n')
    (tmp_path / 'val_list.txt').write_text('0.jpg 0\n')
    r = run_script('train_imagenet.py', '--data', tmp_path, '--batch_size', '2', '--epochs', '1', '--save',
                   tmp_path / 'run', '--num_workers', '0')
    assert r.returncode == 2 and 'train_list.txt' in r.stderr and '500' in r.stderr, r.stderr
    (tmp_path / 'train_list.txt').write_text('0.jpg 0\n1.jpg 1\n')
    (tmp_path / 'val_list.txt').write_text('0.jpg 0\n2.jpg 2\n')
    r = run_script('train_imagenet.py', '--data', tmp_path, '--batch_size', '2', '--epochs', '1', '--save',
                   tmp_path / 'run', '--num_workers', '0')
    assert r.returncode == 2 and 'val_list.txt' in r.stderr and 'label 2' in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / 'run')
