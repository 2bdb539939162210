import json
import os
import re
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from matplotlib.backends.backend_agg import FigureCanvasAgg

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


@pytest.mark.slow   # a subprocess each; the quick tier keeps one-line errors of its own (test_cli, test_search_space)
def test_cli_renders_both_cells_as_valid_images(tmp_path):
    r = run_script('visualize.py', 'DARTS_PADDLE', '--out', tmp_path / 'cells')
    assert r.returncode == 0, r.stderr
    for cell in ('normal', 'reduce'):
        img = Image.open(tmp_path / 'cells' / f'DARTS_PADDLE_{cell}.png')
        img.load()
        assert img.width > 200 and img.height > 150
    r = run_script('visualize.py', 'DARTS_V1', '--format', 'svg', '--out', tmp_path / 'v1')
    assert r.returncode == 0 and '<svg' in (tmp_path / 'v1' / 'DARTS_V1_normal.svg').read_text()
    # the Genotype(...) text a search log prints is drawn as the name is
    r = run_script('visualize.py', 'genotype = ' + str(genotypes.DARTS_V1), '--format', 'svg', '--out', tmp_path / 't')
    assert r.returncode == 0 and (tmp_path / 't' / 'genotype_normal.svg').read_text() == \
        (tmp_path / 'v1' / 'DARTS_V1_normal.svg').read_text()


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
        "the cells and cells.gif not drawn: they need graphviz's dot (Debian/Ubuntu: apt-get install graphviz; "
        "macOS: brew install graphviz)"], r.stderr
    assert os.path.isfile(tmp_path / 'curves.png') and not os.path.exists(tmp_path / 'cells.gif')


def _confusion(matrix, classes=None):
    return dict(split='test', epoch=3, classes=classes or [f'class{i}' for i in range(len(matrix))], matrix=matrix)


def _squares(ax):
    """{(row, column): text} of the numbers written on an axes' squares."""
    return {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}


def test_confusion_figure_shades_each_square_by_its_share_of_the_row_and_writes_counts_and_recall(tmp_path):
    matrix = [[9, 1, 0], [2, 6, 0], [0, 0, 0]]    # the last class has no images: recall n/a
    fig = visualize.confusion_figure(_confusion(matrix))
    grid, column = fig.axes[:2]
    share = np.array([[0.9, 0.1, 0.0], [0.25, 0.75, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(grid.images[0].get_array(), share)
    recall = np.asarray(column.images[0].get_array()).ravel()
    np.testing.assert_allclose(recall[:2], [0.9, 0.75])
    assert np.isnan(recall[2])
    assert _squares(grid) == {(i, j): str(matrix[i][j]) for i in range(3) for j in range(3)}
    assert _squares(column) == {(0, 0): '90.0%', (1, 0): '75.0%', (2, 0): 'n/a'}
    assert fig._suptitle.get_text() == 'test epoch 3: accuracy 83.3% (15 of 18)'
    assert [t.get_text() for t in grid.get_yticklabels()] == ['class0', 'class1', 'class2']
    img = Image.open(visualize.confusion_png(_confusion(matrix), tmp_path / 'c.png', title='run'))
    assert 300 < img.width < 1000 and 300 < img.height < 1000


def _overlap(labels, renderer):
    boxes = [t.get_window_extent(renderer) for t in labels if t.get_text()]
    return any(a.overlaps(b) for k, a in enumerate(boxes) for b in boxes[k + 1:])


def test_confusion_figure_counts_up_to_30_classes_and_names_never_overlap(tmp_path):
    rng = np.random.default_rng(0)
    for n, numbered in ((20, True), (40, False), (300, False)):
        m = rng.integers(0, 5, (n, n)) + np.diag(rng.integers(50, 100, n))
        fig = visualize.confusion_figure(_confusion(m.tolist(), [f'a_rather_long_class_name_{i}' for i in range(n)]))
        grid = fig.axes[0]
        assert bool(grid.texts) == numbered
        canvas = FigureCanvasAgg(fig)   # lays the figure out as savefig does
        canvas.draw()
        renderer = canvas.get_renderer()
        named = [t for t in grid.get_yticklabels() if t.get_text()]
        assert len(named) == n if n <= 40 else n // 20 < len(named) < n // 2
        assert not _overlap(grid.get_yticklabels(), renderer) and not _overlap(grid.get_xticklabels(), renderer)
        assert all(len(t.get_text()) <= 16 for t in named)   # long names shortened in the middle


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


def test_alphas_figure_shades_both_cells_on_one_scale_and_labels_every_weight():
    rng = np.random.default_rng(1)
    ops, nodes = ['none', 'max_pool_3x3', 'sep_conv_3x3'], 2
    record = dict(epoch=4, **{f'alpha_{c}': (w / w.sum(1, keepdims=True)).round(4).tolist()
                              for c, w in (('normal', rng.uniform(1, 2, (5, 3))),
                                           ('reduce', rng.uniform(0, 9, (5, 3))))})
    fig = visualize.alphas_figure(record, ops, nodes)
    top = max(max(max(row) for row in record[k]) for k in ('alpha_normal', 'alpha_reduce'))
    for ax, cell in zip(fig.axes[:2], visualize.CELLS):
        np.testing.assert_allclose(ax.images[0].get_array(), record['alpha_' + cell])
        assert (ax.images[0].norm.vmin, ax.images[0].norm.vmax) == (0, top)   # one colour means one weight
        assert sorted(t.get_text() for t in ax.texts) == \
            sorted(f'{w:.2f}' for row in record['alpha_' + cell] for w in row)
    # the cell diagrams' names: inputs c_{k-2}, c_{k-1}, intermediate nodes from 0
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == \
        ['0 <- c_{k-2}', '0 <- c_{k-1}', '1 <- c_{k-2}', '1 <- c_{k-1}', '1 <- 0']


def _collapse_history(epochs, ops=4):
    """A search's history with the collapse figures: the normal cell's skips its only parameter-free ops."""
    rng = np.random.default_rng(2)
    history = []
    for e in range(epochs):
        g = genotypes.derive(rng.random((14, 8)), rng.random((14, 8)))
        alphas = rng.dirichlet(np.ones(ops), 14).round(4).tolist()
        history.append(dict(epoch=e + 1, genotype=genotypes.to_dict(g), train_loss=1.0, val_loss=1.0, train_acc=0.5,
                            val_acc=0.5, normal_skips=e, normal_param_free=e, reduce_skips=0, reduce_param_free=1,
                            entropy_normal=1.386 - 0.01 * e, entropy_reduce=1.38 - 0.02 * e,
                            moved_normal=0.01 * e, moved_reduce=0.03 * e, alpha_normal=alphas, alpha_reduce=alphas))
    return history


def _series(panels):
    """{panel name: {series label: (ys, style)}} of line_figure's panels."""
    return {name: {s[0]: (s[2], s[3] if len(s) > 3 else {}) for s in series} for name, series, *_ in panels}


def _ticks(axis, lo, hi):
    return [t for t in axis.get_majorticklocs() if lo - 1e-9 <= t <= hi + 1e-9]


def test_collapse_figure_shows_uniform_entropy_moved_from_uniform_and_both_normal_counts():
    history = _collapse_history(4)
    panels = visualize.collapse_panels(history)
    series = _series(panels)
    entropy = series['mean entropy of softmax(alpha)']
    ys, style = entropy['uniform: ln 4 = 1.386']          # K = 4: the alpha rows' length
    assert style.get('reference') and ys == pytest.approx([np.log(4)] * 4)
    moved = series['alphas moved from uniform']
    assert moved['normal'][0] == [0, 0.01, 0.02, 0.03] and moved['reduce'][0] == [0, 0.03, 0.06, 0.09]
    assert moved['mean (the last log line)'][0] == pytest.approx([0, 0.02, 0.04, 0.06])   # guards.how_far's figure
    counts = next(s for name, s in series.items() if name.startswith('ops'))
    (skips, skip_style), (free, free_style) = counts['normal: skip'], counts['normal: parameter-free']
    assert skips == free       # the same values: drawn so that both show
    assert skip_style['markersize'] < free_style['markersize'] and skip_style['linewidth'] < free_style['linewidth']

    fig = visualize.collapse_figure(history)
    axes = {ax.get_title(): ax for ax in fig.axes}
    lo, hi = axes['mean entropy of softmax(alpha)'].get_ylim()
    assert lo == 0 and hi > np.log(4)        # a 2.5 % fall from uniform looks like one
    ax = axes['alphas moved from uniform']
    assert ax.get_ylim()[0] == 0 and 'mean: warned below 0.02' in [t.get_text() for t in ax.get_legend().texts]
    ax = next(a for t, a in axes.items() if t.startswith('ops'))
    assert all(float(t).is_integer() for t in _ticks(ax.yaxis, *ax.get_ylim()))
    assert visualize.collapse_panels(_collapse_history(3, ops=8))[1][1][-1][0] == 'uniform: ln 8 = 2.079'


def test_cells_gif_fixed_canvas_readable_width_last_frame_held(tmp_path):
    _history(tmp_path, 4)
    history = visualize.read_history(tmp_path)
    frames = visualize.cells_frames(history)
    assert len(frames) == 4 and len({f.size for f in frames}) == 1 and frames[0].width <= 1000
    # the cells' labels ("normal cell", "reduction cell", in a colour of their own) at the same pixels in every frame
    labels = [np.all(np.asarray(f) == visualize.LABEL_RGB, axis=2) for f in frames]
    assert labels[0].sum() > 100 and all((m == labels[0]).all() for m in labels[1:])
    gif = Image.open(visualize.cells_gif(history, tmp_path / 'cells.gif'))
    assert gif.n_frames == 4 and gif.size == frames[0].size
    durations = []
    for k in range(gif.n_frames):
        gif.seek(k)
        durations.append(gif.info['duration'])
    assert durations[:3] == [visualize.FRAME_MS] * 3 and durations[3] >= 3 * visualize.FRAME_MS


def test_one_epoch_curves_have_a_whole_epoch_tick_and_a_singular_title():
    history = [dict(epoch=1, train_loss=2.0, val_loss=2.1, train_acc=0.2, val_acc=0.18)]
    fig = visualize.curves_figure(history, 'run')
    assert fig.get_suptitle() == 'run: 1 epoch'
    for ax in fig.axes:
        assert _ticks(ax.xaxis, *ax.get_xlim()) == [1]
    assert visualize.curves_figure(history * 2, 'run').get_suptitle() == 'run: 2 epochs'


def test_protocol_summary_draws_searches_as_points_and_skips_on_whole_ticks():
    import protocol
    rows = [dict(search_val_top1=0.5 + 0.01 * k, retrain_val_top1=0.6, normal_skips=s) for k, s in enumerate((1, 2, 2))]
    fig = protocol.seeds_figure(rows, dict(label='seed 1'))
    _, skips = fig.axes
    assert all(line.get_linestyle() == 'None' for ax in fig.axes for line in ax.lines)   # no line joins two searches
    assert all(float(t).is_integer() for t in _ticks(skips.yaxis, *skips.get_ylim()))
    assert all(float(t).is_integer() for ax in fig.axes for t in _ticks(ax.xaxis, *ax.get_xlim()))


def test_matplotlib_first_run_logs_nothing_through_paddles_logger(tmp_path):
    """Paddle's import gives the root logger an INFO handler; matplotlib building its font cache (a
    fresh MPLCONFIGDIR) logs 'generated new fontManager' at INFO."""
    import subprocess
    from conftest import ROOT
    code = ('import paddle, visualize; '
            f'visualize.line_panels([("p", [("s", [1], [1.0])])], {str(tmp_path / "p.png")!r}, "t")')
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, MPLCONFIGDIR=str(tmp_path / 'mpl')))
    assert r.returncode == 0, r.stderr
    assert 'fontManager' not in r.stdout + r.stderr and (tmp_path / 'p.png').is_file()
