"""Shared test helpers: small data sets written in the real on-disk formats."""
import io
import os
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from darts import process  # noqa: E402

process.prepare()   # as every command does first: Paddle's logging quiet, malloc tuned

# Four classes told apart by colour (plus noise and a random bright square), so a
# tiny network can learn them in a few epochs; chance is 25 %.
COLOURS = np.array([[220, 40, 40], [40, 200, 40], [40, 60, 220], [200, 200, 200]], np.float64)


def make_images(n, seed, classes=4):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    x = COLOURS[labels][:, :, None, None] + rng.normal(0, 30, (n, 3, 32, 32))
    for i in range(n):
        y0, x0 = rng.integers(0, 24, 2)
        x[i, :, y0:y0 + 8, x0:x0 + 8] = 255
    return np.clip(x, 0, 255).astype(np.uint8), labels.astype(np.int64)


def cifar_batch_bytes(images, labels, name):
    d = {b'batch_label': name.encode(), b'labels': [int(v) for v in labels],
         b'data': images.reshape(len(images), -1), b'filenames': [f'{i}.png'.encode() for i in range(len(images))]}
    return pickle.dumps(d, protocol=2)


def write_cifar(root, per_batch=40, test=40, seed=0, archive=False):
    """A CIFAR-10 python-format data set: cifar-10-batches-py/ (or the .tar.gz) under root."""
    files = {}
    for k in range(5):
        x, y = make_images(per_batch, seed + k)
        files[f'data_batch_{k + 1}'] = cifar_batch_bytes(x, y, f'training batch {k + 1}')
    x, y = make_images(test, seed + 99)
    files['test_batch'] = cifar_batch_bytes(x, y, 'testing batch')
    os.makedirs(root, exist_ok=True)
    if archive:
        path = os.path.join(root, 'cifar-10-python.tar.gz')
        with tarfile.open(path, 'w:gz') as tar:
            for name, raw in files.items():
                info = tarfile.TarInfo(f'cifar-10-batches-py/{name}')
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
        return path
    folder = os.path.join(root, 'cifar-10-batches-py')
    os.makedirs(folder, exist_ok=True)
    for name, raw in files.items():
        with open(os.path.join(folder, name), 'wb') as f:
            f.write(raw)
    return folder


def run_script(script, *args, timeout=900, env=None):
    """Run a project script as a user would; returns CompletedProcess (text).  env: extra variables."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=dict(os.environ, **env) if env else None)


@pytest.fixture(scope='session')
def cifar_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('cifar')
    write_cifar(str(root))
    return str(root)


def onnx_paddle_and_test_program(run_dir, task, x):
    """A finished run's class probabilities for the batch x three ways: ONNX Runtime on
    inference/model.onnx, Paddle Inference on inference/model, and the run's own test program
    rebuilt from its flags at best.npz (softmax of its logits, in numpy)."""
    import argparse
    import json
    import paddle
    from darts import onnx_export
    from darts import training
    from darts import files, tensors
    prefix = os.path.join(run_dir, 'inference', 'model')
    by_onnx = onnx_export.run(onnx_export.session(prefix + '.onnx'), x)
    by_inference = onnx_export.paddle_probabilities(prefix, x)
    arrays, meta = files.load_checkpoint(os.path.join(run_dir, 'best.npz'))
    args = argparse.Namespace(**meta['args'])
    with open(os.path.join(run_dir, 'data.json')) as f:
        info = json.load(f)
    paddle.enable_static()
    progs = task.programs(training.load_genotype(args), args, info)
    scope = paddle.static.Scope()
    exe = paddle.static.Executor(paddle.CPUPlace())
    with paddle.static.scope_guard(scope):
        tensors.set_tensors(scope, paddle.CPUPlace(), arrays)
        _, logits = exe.run(progs['test'], feed={'x': x, 'y': np.zeros(len(x), 'int64')},
                            fetch_list=progs['test_fetch'])
    e = np.exp(logits - logits.max(1, keepdims=True))
    return by_onnx, by_inference, e / e.sum(1, keepdims=True)


def read_events(run_dir):
    """A run's TensorBoard event files, read back by TensorBoard's own event processing."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(run_dir, 'tensorboard'), size_guidance={'images': 0, 'scalars': 0})
    events.Reload()
    return events


def draw_run_pictures(run_dir, out):
    """visualize.py --run RUN_DIR --out OUT in this process: {file name: the decoded picture}, in
    the order visualize printed them; every picture checked to be a real, non-blank image."""
    import contextlib
    import io
    from PIL import Image
    import visualize
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert visualize.main(['--run', str(run_dir), '--out', str(out)]) == 0
    pictures = {}
    for path in printed.getvalue().split():
        img = Image.open(path)
        img.load()
        colours = np.unique(np.asarray(img.convert('RGB')).reshape(-1, 3), axis=0)
        assert img.width > 300 and img.height > 200 and len(colours) > 20, path
        pictures[os.path.basename(path)] = img
    return pictures


def assert_one_line_error(r, *phrases, prefix='error: '):
    """r (a finished script) failed with exit status 2 and one stderr line, holding every phrase,
    that starts with prefix (prefix=None: holds 'error: ' anywhere, as argparse's 'prog: error: ')."""
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stdout, r.stderr)
    assert lines[0].startswith(prefix) if prefix else 'error: ' in lines[0], r.stderr
    assert 'Traceback' not in r.stdout + r.stderr
    for p in phrases:
        assert p in lines[0], lines[0]


def synthetic_penalty(space, budgets, fixed, weight, seed):
    """A budget penalty (budget.Penalty) over made-up op costs (uniform 0-500 per edge and op, 0 for
    'none') on top of the fixed costs of the stem and classifier, `fixed` = dict(params=, madds=)."""
    from darts.search import budget
    import genotypes
    rng = np.random.default_rng(seed)
    e, n, zero = genotypes.num_edges(space.nodes), len(space.ops), space.ops.index('none')
    cost = {k: {t: rng.uniform(0, 500, (e, n)) * (np.arange(n) != zero) for t in ('normal', 'reduce')}
            for k in budget.KINDS}
    return budget.Penalty(budget.CostTable(space.ops, space.nodes, fixed, cost, (zero,)), budgets, weight)
