"""train_imagenet.py on small generated JPEG data in both ImageNet layouts."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import COLOURS, onnx_paddle_and_test_program, run_script

TINY = ['--arch', 'DARTS_V2', '--init_channels', '8', '--layers', '3', '--batch_size', '16', '--epochs', '3',
        '--image_size', '64', '--num_workers', '2', '--report_freq', '2', '--learning_rate', '0.05']


def _write_images(root, split, per_class, seed, list_file=False):
    """Colour-coded JPEGs of varied sizes: class folders, or flat files plus a list file."""
    rng = np.random.default_rng(seed)
    lines = []
    for label, colour in enumerate(COLOURS):
        for k in range(per_class):
            h, w = rng.integers(72, 110, 2)
            pixels = np.clip(colour + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
            rel = f'{split}/img_{label}_{k}.JPEG' if list_file else f'{split}/n0{label}/img_{k}.JPEG'
            os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
            Image.fromarray(pixels).save(os.path.join(root, rel), quality=90)
            lines.append(f'{rel} {label}')
    if list_file:
        with open(os.path.join(root, f'{split}_list.txt'), 'w') as f:
            f.write('\n'.join(lines) + '\n')


@pytest.mark.slow
@pytest.mark.parametrize('layout', ['folders', 'list_files'])
def test_learns_in_both_layouts_and_skips_a_corrupt_image(tmp_path, layout):
    root = tmp_path / 'imagenet'
    _write_images(str(root), 'train', 24, 0, layout == 'list_files')
    _write_images(str(root), 'val', 8, 1, layout == 'list_files')
    bad = root / 'train' / ('img_0_0.JPEG' if layout == 'list_files' else 'n00/img_0.JPEG')
    bad.write_bytes(b'\xff\xd8 not really a jpeg')
    run_dir = tmp_path / 'run'
    r = run_script('train_imagenet.py', '--data', root, '--save', run_dir, *TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f'skipping unreadable image {bad}' in r.stderr
    h = [json.loads(line) for line in open(run_dir / 'history.jsonl')]
    assert [x['epoch'] for x in h] == [1, 2, 3]
    assert [round(x['lr'], 6) for x in h] == [0.05, round(0.05 * 0.97, 6), round(0.05 * 0.97 ** 2, 6)]
    assert max(x['val_acc'] for x in h) > 0.5          # 4 classes: chance 0.25
    if layout == 'folders':   # the exported ImageNet network as ONNX: as Paddle Inference and the test program
        import train_imagenet
        x = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype('float32')
        by_onnx, by_inference, by_program = onnx_paddle_and_test_program(str(run_dir), train_imagenet.IMAGENET, x)
        assert by_onnx.shape == (3, 4)
        np.testing.assert_allclose(by_onnx, by_inference, atol=1e-4)
        np.testing.assert_allclose(by_onnx, by_program, atol=1e-4)


@pytest.mark.slow   # a subprocess each; the quick tier keeps one-line errors of its own (test_cli, test_search_space)
def test_empty_class_folder_and_missing_data(tmp_path):
    root = tmp_path / 'imagenet'
    _write_images(str(root), 'train', 2, 0)
    _write_images(str(root), 'val', 2, 1)
    (root / 'train' / 'n09').mkdir()
    r = run_script('train_imagenet.py', '--data', root, '--save', tmp_path / 'run', *TINY)
    assert r.returncode == 2 and 'n09 has no images' in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_script('train_imagenet.py', '--data', tmp_path / 'nothing', '--save', tmp_path / 'run2', *TINY)
    assert r.returncode == 2 and 'no ImageNet val data' in r.stderr


@pytest.mark.slow   # a subprocess each; the quick tier keeps one-line errors of its own (test_cli, test_search_space)
def test_bad_list_file_line(tmp_path):
    root = tmp_path / 'imagenet'
    _write_images(str(root), 'val', 2, 1, list_file=True)
    with open(root / 'val_list.txt', 'a') as f:
        f.write('just_a_path.jpg\n')
    r = run_script('train_imagenet.py', '--data', root, '--save', tmp_path / 'run', *TINY)
    assert r.returncode == 2 and 'val_list.txt:9' in r.stderr
