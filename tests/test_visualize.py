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
