import hashlib
import http.server
import os
import pickle
import struct
import tarfile
import threading

import numpy as np
import pytest

import reader
from conftest import assert_one_line_error, make_images, run_script, write_cifar


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


@pytest.mark.slow   # a subprocess each; the quick tier keeps one-line errors of its own (test_cli, test_search_space)
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


def _py2_str(b):
    """A Python 2 str in a protocol-2 pickle (SHORT_BINSTRING / BINSTRING): bytes under encoding='bytes'."""
    return b'U' + bytes([len(b)]) + b if len(b) < 256 else b'T' + struct.pack('<I', len(b)) + b


def _py2_int(i):
    return b'K' + bytes([i]) if i < 256 else b'M' + struct.pack('<H', i)


def py2_cifar_batch_bytes(images, labels, name):
    """A batch as the official archive holds it: Python 2's cPickle, protocol 2, of {'data': uint8
    N x 3072 array, 'labels': list of int, 'batch_label': str, 'filenames': list of str}, with
    numpy 1's global names (numpy.core.multiarray._reconstruct, numpy.ndarray, numpy.dtype)."""
    n = len(images)
    array = [b'cnumpy.core.multiarray\n_reconstruct\n', b'cnumpy\nndarray\n', _py2_int(0), b'\x85', _py2_str(b'b'),
             b'\x87R(', _py2_int(1), _py2_int(n), _py2_int(3072), b'\x86',                     # version, shape
             b'cnumpy\ndtype\n', _py2_str(b'u1'), _py2_int(0), _py2_int(1), b'\x87R(', _py2_int(3), _py2_str(b'|'),
             b'NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xff', _py2_int(0), b'tb',                        # dtype state
             b'\x89', _py2_str(images.reshape(n, -1).tobytes()), b'tb']                         # C order, data
    return b''.join([b'\x80\x02}(', _py2_str(b'data'), *array,
                     _py2_str(b'labels'), b'](', *[_py2_int(int(v)) for v in labels], b'e',
                     _py2_str(b'batch_label'), _py2_str(name.encode()),
                     _py2_str(b'filenames'), b'](', *[_py2_str(f'{i}.png'.encode()) for i in range(n)], b'eu.'])


def test_batches_as_python_2_and_every_python_3_protocol_write_them_load(tmp_path):
    x, y = make_images(12, 5)
    assert pickle.loads(py2_cifar_batch_bytes(x, y, 'b'), encoding='bytes')[b'labels'] == list(y)   # well formed
    written = {'python 2': py2_cifar_batch_bytes(x, y, 'training batch 1')}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):   # np.int64 labels, an empty str: numpy scalars, b''
        d = {b'batch_label': b'', b'labels': list(np.asarray(y)), b'data': x.reshape(12, -1), b'filenames': [b'']}
        written[f'protocol {protocol}'] = pickle.dumps(d, protocol=protocol)
    for how, raw in written.items():
        images, labels = reader._unpickle_batch(raw, how)
        np.testing.assert_array_equal(images, x, err_msg=how)
        np.testing.assert_array_equal(labels, y, err_msg=how)


class _RunsCode:
    """Unpickling this runs command (what a doctored batch would do with plain pickle.loads)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _WritesFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, 'w')


def _doctored_folder(root, marker, payload=_RunsCode, archive=False):
    """A valid CIFAR-10 folder (or archive) whose data_batch_1 carries payload(marker) beside real data."""
    folder = write_cifar(root)
    path = os.path.join(folder, 'data_batch_1')
    d = pickle.loads(open(path, 'rb').read(), encoding='bytes')
    d[b'batch_label'] = payload(f'touch {marker}' if payload is _RunsCode else str(marker))
    open(path, 'wb').write(pickle.dumps(d, protocol=2))
    if not archive:
        return folder
    with tarfile.open(os.path.join(root, 'cifar-10-python.tar.gz'), 'w:gz') as tar:
        tar.add(folder, arcname='cifar-10-batches-py')
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    os.rmdir(folder)
    return root


@pytest.mark.parametrize('payload, refused', [(_RunsCode, os.system.__module__ + '.system'),
                                              (_WritesFile, 'io.open')])
@pytest.mark.parametrize('archive', [False, True])
def test_a_batch_that_would_run_code_is_refused(tmp_path, payload, refused, archive):
    marker = tmp_path / 'MARKER'
    _doctored_folder(str(tmp_path / 'c'), marker, payload, archive)
    with pytest.raises(reader.DataError) as err:
        reader.load_cifar10(str(tmp_path / 'c'), download=False)
    message = str(err.value)
    assert len(message.splitlines()) == 1, message
    assert 'data_batch_1: refused to unpickle ' + refused + ' (a CIFAR-10 batch holds only' in message, message
    assert not marker.exists()


def test_the_admitted_reconstructors_take_only_what_a_batch_needs():
    # bytes at protocol 2 are _codecs.encode(text, 'latin1'): another codec is refused, and so is bytes(n)
    codec = b'\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x04\x00\x00\x00zlib\x86R.'
    alloc = b'\x80\x02c__builtin__\nbytes\nJ\x00\x00\x00\x40\x85R.'
    for raw in (codec, alloc):
        with pytest.raises(reader.DataError, match='not a readable CIFAR-10 batch .UnpicklingError: .* admitted only'):
            reader._unpickle_batch(raw, 'b')
    # a name from STACK_GLOBAL can hold a newline: the message stays one line
    raw = b'\x80\x04\x8c\x04os\nx\x94\x8c\x06system\x94\x93.'
    with pytest.raises(reader.DataError, match=r'refused to unpickle os\\nx\.system') as err:
        reader._unpickle_batch(raw, 'b')
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.slow
def test_a_doctored_batch_is_one_line_from_the_command(tmp_path):
    marker = tmp_path / 'MARKER'
    _doctored_folder(str(tmp_path / 'c'), marker)
    r = run_script('train_search.py', '--data', tmp_path / 'c', '--save', tmp_path / 'run', '--no_download')
    assert_one_line_error(r, 'data_batch_1: refused to unpickle', '.system')
    assert not marker.exists()
