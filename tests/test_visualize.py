import json
import os
import re
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

import genotypes
import visualize
from conftest import run_script


def parse_dot(source):
    """(nodes, [(src, dst, label or None)]) from graphviz DOT text."""
    nodes, edges = set(), []
    for line in source.splitlines():
        line = line.strip()
        m = re.match(r'^"?([^"\[\s]+)"?\s*->\s*"?([^"\[\s]+)"?\s*(\[.*\])?$', line)
        if m:
            label = re.search(r'label=("?)([^",\]\s]+)\1', m.group(3) or '')
            edges.append((m.group(1), m.group(2), label.group(2) if label else None))
            continue
        m = re.match(r'^"?([^"\[\s]+)"?\s*\[', line)
        if m and m.group(1) not in ('graph', 'node', 'edge'):
            nodes.add(m.group(1))
    return nodes, edges


@pytest.mark.parametrize('cell', ['normal', 'reduce'])
def test_dot_has_exactly_the_genotype_nodes_and_edges(cell):
    g = genotypes.DARTS_V2
    nodes, edges = parse_dot(visualize.cell_graph(g, cell).source)
    assert nodes == {'c_{k-2}', 'c_{k-1}', '0', '1', '2', '3', 'c_{k}'}
    name = {0: 'c_{k-2}', 1: 'c_{k-1}'}
    expected = Counter((name.get(j, str(j - 2)), str(k // 2), op) for k, (op, j) in enumerate(getattr(g, cell)))
    assert Counter(e for e in edges if e[2] is not None) == expected
    assert sorted(e[0] for e in edges if e[2] is None) == ['0', '1', '2', '3']
    assert all(e[1] == 'c_{k}' for e in edges if e[2] is None)


def test_cli_renders_both_cells_as_valid_images(tmp_path):
    r = run_script('visualize.py', 'DARTS_PADDLE', '--out', tmp_path / 'paddle')
    assert r.returncode == 0, r.stderr
    for cell in ('normal', 'reduce'):
        img = Image.open(tmp_path / f'paddle_{cell}.png')
        img.load()
        assert img.width > 200 and img.height > 150
    r = run_script('visualize.py', 'DARTS_V1', '--format', 'svg', '--out', tmp_path / 'v1')
    assert r.returncode == 0 and '<svg' in (tmp_path / 'v1_normal.svg').read_text()


def _history(run_dir, epochs):
    rng = np.random.default_rng(0)
    with open(run_dir / 'history.jsonl', 'w') as f:
        for e in range(epochs):
            g = genotypes.derive(rng.random((14, 8)), rng.random((14, 8)))
            f.write(json.dumps(dict(epoch=e + 1, genotype=json.loads(genotypes.to_json(g)), train_loss=2 - 0.1 * e,
                                    val_loss=2.1 - 0.1 * e, train_acc=0.2 + 0.05 * e, val_acc=0.18 + 0.05 * e)) + '\n')


def test_run_pictures_gif_has_one_frame_per_epoch(tmp_path):
    _history(tmp_path, 4)
    r = run_script('visualize.py', '--run', tmp_path)
    assert r.returncode == 0, r.stderr
    gif = Image.open(tmp_path / 'cells.gif')
    assert gif.n_frames == 4
    curves = Image.open(tmp_path / 'curves.png')
    curves.load()
    assert curves.width > 500 and len(np.unique(np.asarray(curves.convert("RGB")).reshape(-1, 3), axis=0)) > 3


def test_unknown_name_lists_the_available_ones():
    r = run_script('visualize.py', 'NOPE')
    assert r.returncode == 2 and 'DARTS_V1, DARTS_V2, DARTS_PADDLE' in r.stderr


@pytest.mark.parametrize('pair, message', [(['skip_connect', 4], 'node 1 can take inputs 0..2'),
                                           (['conv_9x9', 0], 'unknown op')])
def test_malformed_genotype_is_rejected_before_drawing(tmp_path, pair, message):
    d = json.loads(genotypes.to_json(genotypes.DARTS_V2))
    d['normal'][2] = pair
    path = tmp_path / 'bad.json'
    path.write_text(json.dumps(d))
    r = run_script('visualize.py', '--genotype_file', path, '--out', tmp_path / 'bad')
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ['bad.json']


def test_without_dot_says_so_in_one_line(tmp_path):
    import subprocess
    from conftest import ROOT
    env = dict(os.environ, PATH=os.path.dirname(sys.executable))
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'visualize.py'), 'DARTS_V2', '--out', str(tmp_path / 'x')],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 2 and 'apt-get install graphviz' in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    _history(tmp_path, 2)      # a run's pictures: all but the cells' GIF, and one line for it
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'visualize.py'), '--run', str(tmp_path)],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0 and r.stderr.strip().splitlines() == [
        "cells.gif not drawn: it needs graphviz's dot (Debian/Ubuntu: apt-get install graphviz; macOS: brew install "
        "graphviz)"], r.stderr
    assert os.path.isfile(tmp_path / 'curves.png') and not os.path.exists(tmp_path / 'cells.gif')


def _cell_colour(img, confusion, i, j):
    """The median colour of cell (row i, column j) of a confusion_png picture (the median skips the count)."""
    L = visualize.confusion_layout(confusion)
    c, x, y = L['cell'], L['x0'] + j * L['cell'], L['y0'] + i * L['cell']
    return np.median(np.asarray(img)[y + 2:y + c - 2, x + 2:x + c - 2].reshape(-1, 3), axis=0)


def _confusion(matrix, classes=None):
    return dict(split='test', epoch=3, classes=classes or [f'class{i}' for i in range(len(matrix))], matrix=matrix)


def test_confusion_png_shades_each_cell_by_its_share_of_the_row(tmp_path):
    diagonal, uniform, unbalanced = _confusion([[9, 1], [2, 8]]), _confusion([[5, 5], [5, 5]]), \
        _confusion([[900, 100], [1, 9]])
    pictures = {}
    for name, confusion in dict(diagonal=diagonal, uniform=uniform, unbalanced=unbalanced).items():
        path = visualize.confusion_png(confusion, tmp_path / f'{name}.png')
        img = Image.open(path).convert('RGB')
        assert 250 < img.width < 800 and 150 < img.height < 600
        pictures[name] = img
    darkness = lambda name, i, j: 765 - _cell_colour(pictures[name], dict(diagonal=diagonal, uniform=uniform,
                                                                         unbalanced=unbalanced)[name], i, j).sum()
    assert darkness('diagonal', 0, 0) > darkness('diagonal', 1, 1) > darkness('diagonal', 1, 0) > \
        darkness('diagonal', 0, 1) > 0
    assert darkness('uniform', 0, 0) == darkness('uniform', 0, 1) == darkness('uniform', 1, 0) > 0
    assert darkness('unbalanced', 0, 0) == darkness('unbalanced', 1, 1)  # 90 % of each row, whatever the counts
    assert darkness('uniform', 0, 0) < darkness('diagonal', 0, 0)


def test_confusion_png_writes_counts_up_to_30_classes_and_shades_only_beyond(tmp_path):
    rng = np.random.default_rng(0)
    for n, numbered in ((20, True), (40, False)):
        m = rng.integers(0, 5, (n, n)) + np.diag(rng.integers(50, 100, n))
        confusion = _confusion(m.tolist(), [f'a_rather_long_class_name_{i}' for i in range(n)])
        img = Image.open(visualize.confusion_png(confusion, tmp_path / f'{n}.png')).convert('RGB')
        assert 400 < img.width < 1400 and 400 < img.height < 1400
        L = visualize.confusion_layout(confusion)
        c = L['cell']
        cell = np.asarray(img)[L['y0'] + 1:L['y0'] + c - 1, L['x0'] + 1:L['x0'] + c - 1].reshape(-1, 3)
        assert (len(np.unique(cell, axis=0)) > 2) == numbered  # a count is the shade plus text pixels


def _eval_history(run_dir, epochs):
    with open(run_dir / 'history.jsonl', 'w') as f:
        for e in range(epochs):
            f.write(json.dumps(dict(epoch=e + 1, lr=0.025, train_loss=2 - 0.1 * e, val_loss=2.1 - 0.1 * e,
                                    train_acc=0.2 + 0.05 * e, val_acc=0.18 + 0.05 * e)) + '\n')


def test_evaluation_run_draws_curves_and_confusion_but_no_gif(tmp_path, capsys):
    _eval_history(tmp_path, 3)
    (tmp_path / 'confusion.json').write_text(json.dumps(
        dict(split='test', epoch=3, classes=['bad', 'good'], matrix=[[40, 2], [5, 33]])))
    assert visualize.main(['--run', str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / 'curves.png'), str(tmp_path / 'confusion.png')]
    assert not (tmp_path / 'cells.gif').exists()
    for name in ('curves.png', 'confusion.png'):
        img = Image.open(tmp_path / name)
        img.load()
        assert img.width > 250 and len(np.unique(np.asarray(img.convert('RGB')).reshape(-1, 3), axis=0)) > 3


def test_search_run_with_confusion_draws_all_three(tmp_path, capsys):
    _history(tmp_path, 2)
    (tmp_path / 'confusion.json').write_text(json.dumps(dict(classes=['a', 'b', 'c'], matrix=[[1, 0, 0]] * 3)))
    out = tmp_path / 'pictures'
    assert visualize.main(['--run', str(tmp_path), '--out', str(out)]) == 0
    assert sorted(os.listdir(out)) == ['cells.gif', 'confusion.png', 'curves.png']


@pytest.mark.parametrize('text, message', [
    ('{"classes": ["a", "b"], "matrix": [[1, 2], [3', 'cannot read'),
    ('{"classes": ["a", "b"], "matrix": [[1, 2, 0], [3, 4, 0]]}', '2 rows of 2 counts'),
    ('{"classes": ["a", "b"], "matrix": [[1, -2], [3, 4]]}', 'integers >= 0'),
    ('{"classes": [], "matrix": []}', 'non-empty list of class names'),
    ('[[1, 2], [3, 4]]', 'expected a JSON object'),
])
def test_malformed_confusion_is_one_line_and_draws_nothing(tmp_path, capsys, text, message):
    _eval_history(tmp_path, 2)
    (tmp_path / 'confusion.json').write_text(text)
    assert visualize.main(['--run', str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'confusion.json' in err[0] and message in err[0]
    assert sorted(os.listdir(tmp_path)) == ['confusion.json', 'history.jsonl']


def test_history_without_the_curve_values_is_one_line(tmp_path, capsys):
    (tmp_path / 'history.jsonl').write_text(json.dumps(dict(epoch=1, train_loss=1.0)) + '\n')
    assert visualize.main(['--run', str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'val_loss' in err[0]


def test_an_incomplete_last_history_line_is_skipped_with_a_warning(tmp_path, capsys):
    _history(tmp_path, 3)
    text = (tmp_path / 'history.jsonl').read_text()
    (tmp_path / 'history.jsonl').write_text(text + text.splitlines()[0][:40])   # a kill during the append
    assert visualize.main(['--run', str(tmp_path)]) == 0
    assert 'incomplete' in capsys.readouterr().err
    assert Image.open(tmp_path / 'cells.gif').n_frames == 3
    lines = text.splitlines()                                                     # but not in the middle
    (tmp_path / 'history.jsonl').write_text('\n'.join([lines[0], lines[1][:30], lines[2]]) + '\n')
    assert visualize.main(['--run', str(tmp_path)]) == 2
    assert 'line 2 is not JSON' in capsys.readouterr().err


def test_an_out_that_cannot_be_created_is_one_line(tmp_path, capsys):
    (tmp_path / 'file').write_text('x')
    for argv in (['DARTS_V2', '--out', str(tmp_path / 'file' / 'cells' / 'v2')],
                 ['--run', str(tmp_path), '--out', str(tmp_path / 'file' / 'pictures')]):
        _history(tmp_path, 1)
        assert visualize.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and 'cannot create the folder' in err[0], err
