"""Draw DARTS cells, and the pictures of a search or evaluation run.

    python visualize.py DARTS_PADDLE                      # normal + reduction cell, PNG
    python visualize.py --genotype_file runs/x/genotype.json --format svg
    python visualize.py --run runs/x                      # pictures of a run folder, see below

--run draws curves.png (loss and top-1 per epoch) from the run's history.jsonl, and
cells.gif (the cells, one frame per epoch) when it is a search run (train_search.py),
confusion.png when the run wrote confusion.json (an evaluation run, train.py).

Cells are drawn by graphviz's `dot` (Debian: apt-get install graphviz) and the GIF assembled
with Pillow; the curves and the confusion matrix are drawn with matplotlib (headless).
"""
import io
import json
import logging
import os
import shutil
import sys

import numpy as np

import genotypes
from darts import files, process
from darts.cli import ArgumentParser
from darts.errors import UserError
from darts.lifecycle import run_main
from darts.search.guards import MOVED_MIN

CELLS = ('normal', 'reduce')


def node_name(j):
    """A cell's state j as the diagrams name it: the inputs c_{k-2} and c_{k-1}, then the intermediate
    nodes 0, 1, 2, ..."""
    return 'c_{k-2}' if j == 0 else 'c_{k-1}' if j == 1 else str(j - 2)


def cell_graph(genotype, cell, dpi=None):
    """A graphviz Digraph of one cell: inputs c_{k-2}, c_{k-1}, nodes 0..n-1, output c_{k}.  dpi: the
    resolution dot renders it at (its default 96 when None; lower draws the same picture smaller)."""
    import graphviz
    pairs = getattr(genotype, cell)
    concat = getattr(genotype, cell + '_concat')
    steps = len(pairs) // 2
    graph_attr = dict(rankdir='LR', fontname='helvetica', fontsize='20')
    if dpi is not None:
        graph_attr['dpi'] = f'{dpi:.1f}'
    g = graphviz.Digraph(name=f'{cell}_cell', format='png', graph_attr=graph_attr,
                         node_attr=dict(style='filled', shape='rect', align='center', fontsize='20',
                                        height='0.5', width='0.5', penwidth='2', fontname='helvetica'),
                         edge_attr=dict(fontsize='18', fontname='helvetica'))
    for name in ('c_{k-2}', 'c_{k-1}'):
        g.node(name, fillcolor='darkseagreen2')
    for i in range(steps):
        g.node(str(i), fillcolor='lightblue')
    g.node('c_{k}', fillcolor='palegoldenrod')
    for k, (op, j) in enumerate(pairs):
        g.edge(node_name(j), str(k // 2), label=op, fillcolor='gray')
    for c in concat:
        g.edge(node_name(c), 'c_{k}', fillcolor='gray')
    return g


def require_dot():
    if shutil.which('dot') is None:
        raise UserError("graphviz's dot program is not installed (Debian/Ubuntu: apt-get install graphviz; "
                        "macOS: brew install graphviz)")


def render_cell(genotype, cell, path_stem, fmt='png'):
    """Write path_stem.fmt; returns the path."""
    require_dot()
    path = f'{path_stem}.{fmt}'
    make_folder(os.path.dirname(path) or '.')
    try:
        return cell_graph(genotype, cell).render(outfile=path, format=fmt, cleanup=True)
    except OSError as e:
        raise UserError(f'cannot write {path}: {e.strerror or e}') from None


def make_folder(path):
    """os.makedirs, with a folder that cannot be made (under a file, read-only, ...) one line."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f'cannot create the folder {path}: {e.strerror or e}') from None
    if not os.access(path, os.W_OK):
        raise UserError(f'cannot write into the folder {path}')


def cell_png_bytes(genotype, cell, dpi=None):
    require_dot()
    return cell_graph(genotype, cell, dpi).pipe(format='png')


def figure_class():
    """matplotlib's Figure, headless (Agg).  Importing Paddle gives the root logger a handler at INFO
    (paddle/distributed/utils/log_utils.py get_logger, from paddle.distributed.auto_parallel), so the
    INFO line matplotlib logs when it first builds its font cache ('generated new fontManager') would
    be printed: its logger is set to WARNING first."""
    logging.getLogger('matplotlib').setLevel(logging.WARNING)
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib.figure import Figure
    return Figure


def alphas_figure(record, ops, nodes):
    """A matplotlib figure of a search epoch's softmaxed alphas: one heat map per cell type, rows
    the edges (node <- input, named as in the cell diagrams: `0 <- c_{k-2}`, `1 <- 0`), columns the ops,
    each square labelled with its weight."""
    Figure = figure_class()
    edges = [f'{j} <- {node_name(i)}' for j in range(nodes) for i in range(j + 2)]
    fig = Figure(figsize=(2.2 + 0.9 * len(ops), 1.2 + 0.65 * len(edges)), layout='constrained')
    top = max(w for cell in CELLS for row in record['alpha_' + cell] for w in row)  # one scale for both panels
    for ax, cell in zip(fig.subplots(1, 2, sharey=True), CELLS):
        weights = record['alpha_' + cell]
        image = ax.imshow(weights, cmap='viridis', vmin=0, vmax=top, aspect='auto')
        ax.set_xticks(range(len(ops)), [_short(op, 12) for op in ops], rotation=45, ha='right')
        ax.set_yticks(range(len(edges)), edges)
        ax.set_title(f'{cell} cell, epoch {record["epoch"]}')
        for e, row in enumerate(weights):
            for o, w in enumerate(row):
                ax.text(o, e, f'{w:.2f}', ha='center', va='center', fontsize=7,
                        color='black' if w > 0.6 * image.norm.vmax else 'white')
    fig.colorbar(image, ax=fig.axes, shrink=0.6, label='softmax(alpha)')
    return fig


# ---------------------------------------------------------------- run pictures

HISTORY_KEYS = ('epoch', 'train_loss', 'val_loss', 'train_acc', 'val_acc')


def read_history(run_dir):
    """The per-epoch records of history.jsonl, checked for what curves_png needs."""
    path = os.path.join(run_dir, 'history.jsonl')
    if not os.path.isfile(path):
        raise UserError(f'{run_dir} has no history.jsonl (is it a run folder?)')
    history = []
    with open(path) as f:
        lines = f.read().split('\n')
    last = max((k for k, line in enumerate(lines, 1) if line.strip()), default=0)
    for k, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            if k == last:  # what a kill during the append leaves: the epoch is not in the checkpoint either
                print(f'warning: {path} line {k} is incomplete (the run was stopped while writing it); '
                      f'drawing the {len(history)} complete epochs', file=sys.stderr)
                break
            raise UserError(f'{path} line {k} is not JSON ({e})') from None
        missing = [key for key in HISTORY_KEYS if not isinstance(record, dict) or key not in record]
        if missing:
            raise UserError(f'{path} line {k} has no {", ".join(missing)}')
        history.append(record)
    return history


def _font(size):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # older Pillow
        return ImageFont.load_default()


GIF_WIDTH = 960      # px: cells.gif at most this wide, so a README page (about 880 px) shows it near full size
DOT_DPI = 96         # dot's default resolution: 20-point labels about 27 px high
FRAME_MS, HOLD_MS = 800, 3000   # how long cells.gif shows each epoch, and its last
LABEL_RGB = (20, 90, 140)      # the colour of cells.gif's cell labels, one dot never draws in


def cells_frames(history, max_width=GIF_WIDTH):
    """cells.gif's frames, one per epoch, all the same size: the epoch (and its search-val top-1) on
    top, the normal cell below it and the reduction cell under that, each at the same place in every
    frame.  When a cell is wider than max_width allows, dot draws every cell at a lower resolution
    (the text stays sharp), the same for all frames."""
    from PIL import Image, ImageDraw
    if not history:
        raise UserError('the history is empty: no epoch has finished yet')
    margin, title_h, label_h, gap = 16, 48, 32, 14
    cells = [genotypes.from_dict(r['genotype'], check_ops=False) for r in history]

    def draw(dpi):
        return [[Image.open(io.BytesIO(cell_png_bytes(g, c, dpi))).convert('RGB') for c in CELLS] for g in cells]
    images = draw(None)
    widest = max(im.width for frame in images for im in frame)
    room = max_width - 2 * margin
    if widest > room:
        images = draw(DOT_DPI * room / widest)
        images = [[_fit(im, room) for im in frame] for frame in images]   # dot's rounding, if any
        widest = max(im.width for frame in images for im in frame)
    heights = [max(frame[k].height for frame in images) for k in range(len(CELLS))]
    tops, y = [], title_h
    for h in heights:           # each cell type's fixed place: its label, then its picture
        tops.append(y + label_h)
        y += label_h + h + gap
    size = (max(widest + 2 * margin, 480), y + margin - gap)
    frames = []
    for record, frame_cells in zip(history, images):
        frame = Image.new('RGB', size, 'white')
        draw_ = ImageDraw.Draw(frame)
        acc = record.get('val_acc')
        title = f"epoch {record['epoch']}" + (f'    search-val top-1 {100 * acc:.1f}%' if acc is not None else '')
        draw_.text((margin, 10), title, fill='black', font=_font(26))
        for im, top, label in zip(frame_cells, tops, ('normal cell', 'reduction cell')):
            draw_.text((margin, top - label_h + 4), label, fill=LABEL_RGB, font=_font(20))
            frame.paste(im, (margin, top))
        frames.append(frame)
    return frames


def _fit(img, width):
    """img scaled down to width when it is wider."""
    if img.width <= width:
        return img
    from PIL import Image
    return img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)


def cells_gif(history, path, frame_ms=FRAME_MS, hold_ms=HOLD_MS):
    """cells_frames as a looping GIF: frame_ms per epoch, the last epoch held for hold_ms."""
    frames = cells_frames(history)
    durations = [frame_ms] * (len(frames) - 1) + [hold_ms]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return path


DPI = 100
LOG_SPAN = 20   # max / min of a panel's values above which its y axis is logarithmic


def line_figure(panels, title, x_label='epoch', panel_size=(520, 380), lines=True, columns=None):
    """Line charts drawn with matplotlib (headless), each panel_size pixels, `columns` to a row (all in
    one row by default), under a title.  panels: [(name, series)] or [(name, series, options)];
    series: [(label, xs, ys)] or [(label, xs, ys, style)], a series' points whose y is None left out;
    style: matplotlib's plot keywords (marker, linestyle, colour ...), or dict(reference=True): a
    labelled dashed horizontal line at ys[0] across the panel; options: integer_y=True (counts: whole
    ticks), ymin / ymax (the y axis' ends; either may be given alone), legend_columns.  lines=False: points only (a
    scatter).  An epoch or search x axis has whole ticks; a panel of positive values spanning more than
    LOG_SPAN times (a loss falling by decades) gets a log y axis unless ymin is given; legends go below
    the axes, off the data."""
    Figure = figure_class()
    from matplotlib.ticker import MaxNLocator
    w, h = panel_size
    columns = columns or len(panels)
    rows = -(-len(panels) // columns)
    fig = Figure(figsize=(columns * w / DPI, (rows * h + 40) / DPI), dpi=DPI, layout='constrained')
    fig.suptitle(title)
    axes = list(fig.subplots(rows, columns, squeeze=False).ravel())
    for ax in axes[len(panels):]:
        ax.remove()
    for ax, (name, series, *rest) in zip(axes, panels):
        options = rest[0] if rest else {}
        ys_all = []
        for label, xs, ys, *style in series:
            style = dict(style[0]) if style else {}
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if not pts:
                continue
            ys_all += [y for _, y in pts]
            if style.pop('reference', False):
                ax.axhline(pts[0][1], **{**dict(color='0.4', linestyle='--', linewidth=1.2), **style}, label=label)
                continue
            style = {**dict(marker='o', markersize=3.5 if lines else 6, linestyle='-' if lines else 'none'), **style}
            ax.plot(*zip(*pts), label=label, **style)
        ax.set_title(name, fontsize='medium')
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
        if x_label in ('epoch', 'search'):   # min_n_ticks=1: one epoch is tick 1, not 0.945 ... 1.050
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        if options.get('integer_y'):
            ax.yaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        if ys_all and 'ymin' not in options and min(ys_all) > 0 and max(ys_all) / min(ys_all) > LOG_SPAN:
            ax.set_yscale('log')
        if 'ymin' in options or 'ymax' in options:
            ax.set_ylim(options.get('ymin'), options.get('ymax'))
        if ys_all:
            ax.legend(loc='upper center', bbox_to_anchor=(0.5, -0.18), fontsize='small', frameon=False,
                      ncol=options.get('legend_columns', min(len(series), 3)))
    return fig


def line_panels(panels, path, title, **kwargs):
    """line_figure saved as path (a PNG); returns path."""
    line_figure(panels, title, **kwargs).savefig(path, dpi=DPI)
    return path


def _epochs(n):
    return f'{n} epoch' + ('' if n == 1 else 's')


def curves_figure(history, title='search', held_out='val'):
    """Loss (left) and top-1 accuracy (right) per epoch, on the training data and on the held-out
    split (the history's val_*), named held_out in the legends."""
    epochs = [r['epoch'] for r in history]
    panels = [('loss', [('train', epochs, [r['train_loss'] for r in history]),
                        (held_out, epochs, [r['val_loss'] for r in history])]),
              ('top-1 %', [('train', epochs, [100 * r['train_acc'] for r in history]),
                           (held_out, epochs, [100 * r['val_acc'] for r in history])])]
    return line_figure(panels, f'{title}: {_epochs(len(history))}')


def curves_png(history, path, title='search', held_out='val'):
    """curves_figure saved as path."""
    curves_figure(history, title, held_out).savefig(path, dpi=DPI)
    return path


def collapse_panels(history):
    """collapse.png's panels (line_figure's): the skip and parameter-free op counts of the derived cells
    (whole numbers; a skip is parameter-free too, so where every parameter-free op is a skip the two
    series meet: the parameter-free one is drawn as wide pale rings under the skip one's line; normal
    cell circles and solid lines, reduction cell squares and dashed ones); the
    alphas' mean entropy, on an axis from 0 with the uniform value ln K (K ops, the alpha rows' length)
    as a dashed line, so that a fall of a few percent looks like one; how far the alphas moved from
    uniform (guards.distance_from_uniform: normal, reduce, and their mean, the figure the search's last
    line prints), from 0, with the guards' MOVED_MIN below which it warns; the Hessian eigenvalue
    where it was measured."""
    epochs = [r['epoch'] for r in history]
    values = lambda key: [r.get(key) for r in history]  # noqa: E731
    free = dict(marker='o', markersize=9, markerfacecolor='none', markeredgewidth=1.5, linewidth=5, alpha=0.35)
    skip = dict(marker='o', markersize=4, linewidth=1.5)
    counts = []
    for cell, name, linestyle, marker in (('normal', 'normal', '-', 'o'), ('reduce', 'reduction', '--', 's')):
        counts += [(f'{name}: parameter-free', epochs, values(f'{cell}_param_free'),
                    dict(free, color='C0', linestyle=linestyle, marker=marker)),
                   (f'{name}: skip', epochs, values(f'{cell}_skips'),
                    dict(skip, color='C3', linestyle=linestyle, marker=marker))]
    ops = len(history[-1]['genotype']['normal']) if 'genotype' in history[-1] else None
    panels = [(f'ops{f" (of {ops})" if ops else ""} in the derived cells', counts,
               dict(integer_y=True, ymin=-0.3, legend_columns=2))]
    entropy = [('normal', epochs, values('entropy_normal')), ('reduce', epochs, values('entropy_reduce'))]
    rows, scale = history[-1].get('alpha_normal'), dict(ymin=0)
    if rows:
        k = len(rows[0])
        entropy.append((f'uniform: ln {k} = {np.log(k):.3f}', epochs, [float(np.log(k))] * len(epochs),
                        dict(reference=True)))
        scale['ymax'] = 1.12 * np.log(k)   # room above the line, where the search starts
    panels.append(('mean entropy of softmax(alpha)', entropy, scale))
    if any(r.get('moved_normal') is not None for r in history):
        mean = [None if a is None or b is None else (a + b) / 2
                for a, b in zip(values('moved_normal'), values('moved_reduce'))]
        panels.append(('alphas moved from uniform', [
            ('normal', epochs, values('moved_normal'), dict(linewidth=1)),
            ('reduce', epochs, values('moved_reduce'), dict(linewidth=1)),
            ('mean (the last log line)', epochs, mean, dict(color='black', linewidth=2)),
            (f'mean: warned below {MOVED_MIN}', epochs, [MOVED_MIN] * len(epochs), dict(reference=True, color='C3'))],
            dict(ymin=0, legend_columns=2)))
    if any(r.get('hessian_eigenvalue') is not None for r in history):
        panels.append(('Hessian eigenvalue', [('dominant', epochs, values('hessian_eigenvalue'))]))
    return panels


def collapse_figure(history, title='search'):
    """The collapse diagnostics per epoch (guards.py): collapse_panels, two to a row."""
    return line_figure(collapse_panels(history), f'{title}: collapse diagnostics', columns=2, panel_size=(440, 330))


def collapse_png(history, path, title='search'):
    """collapse_figure saved as path."""
    collapse_figure(history, title).savefig(path, dpi=DPI)
    return path


def budget_png(history, path, title='search'):
    """Per budgeted kind: the derived cell's cost in the target network, the fitted cell's, the
    expected cost E[C] under the alphas, and the budget, over the epochs (train_search.py --budget)."""
    epochs = [r['epoch'] for r in history]
    panels = []
    for kind, limit in history[-1]['budget']['budgets'].items():
        panels.append((f'{kind} of the target network', [
            ('derived (argmax)', epochs, [r['budget']['unbudgeted'][kind] for r in history]),
            ('fitted (genotype.json)', epochs, [r['budget']['cost'][kind] for r in history]),
            ('expected E[C]', epochs, [r['budget']['expected'][kind] for r in history]),
            ('budget', epochs, [limit] * len(history))]))
    return line_panels(panels, path, f'{title}: cost against the budget')


# ---------------------------------------------------------------- confusion matrix

MAX_NUMBERED = 30  # more classes than this: shades only, no counts in the cells
LABEL_INCHES = 0.16  # the least room a class name needs along an axis (a 10-point line)


def read_confusion(path):
    """The confusion.json an evaluation run wrote, checked."""
    confusion = files.read_json(path)
    check_confusion(confusion, path)
    return confusion


def check_confusion(confusion, where='confusion'):
    """UserError unless `confusion` has n class names and an n x n matrix of counts."""
    if not isinstance(confusion, dict):
        raise UserError(f'{where}: expected a JSON object with "classes" and "matrix"')
    classes, matrix = confusion.get('classes'), confusion.get('matrix')
    if not isinstance(classes, list) or not classes or not all(isinstance(c, (str, int)) for c in classes):
        raise UserError(f'{where}: "classes" must be a non-empty list of class names')
    n = len(classes)
    if not isinstance(matrix, list) or len(matrix) != n or \
            any(not isinstance(row, list) or len(row) != n for row in matrix):
        raise UserError(f'{where}: "matrix" must be {n} rows of {n} counts (one row and column per class)')
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for row in matrix for v in row):
        raise UserError(f'{where}: "matrix" entries must be counts (integers >= 0)')


def _short(name, limit=16):
    """The name, its middle cut out when longer than limit (classes often differ at the end)."""
    name = str(name)
    head = (limit - 2) // 2
    return name if len(name) <= limit else name[:head] + '..' + name[len(name) - (limit - 2 - head):]


def confusion_heading(confusion, title=None):
    """'TITLE: SPLIT epoch E: accuracy A% (correct of total)', the parts that are known."""
    matrix = confusion['matrix']
    correct, total = sum(matrix[i][i] for i in range(len(matrix))), sum(map(sum, matrix))
    where = ' '.join(str(confusion[k]) if k == 'split' else f'epoch {confusion[k]}'
                     for k in ('split', 'epoch') if confusion.get(k) is not None)
    accuracy = f'accuracy {100 * correct / total:.1f}% ({correct} of {total})' if total else 'no images'
    return ': '.join(s for s in (title, where, accuracy) if s)


def confusion_figure(confusion, title=None):
    """A matplotlib figure of a confusion matrix (confusion.json's dict): rows the true class,
    columns the predicted one, each square shaded by its share of the row, share_ij = m_ij / sum_k m_ik,
    and labelled with its count up to MAX_NUMBERED classes; recall m_ii / sum_k m_ik in a column at the
    right; the overall accuracy in the title.  Beyond LABEL_INCHES of room per class only every
    k-th class is named, so that names never overlap."""
    Figure = figure_class()
    check_confusion(confusion)
    matrix = np.array(confusion['matrix'])
    n, totals = len(matrix), matrix.sum(1)
    share = matrix / np.maximum(totals, 1)[:, None]
    recall = np.where(totals > 0, np.diag(matrix) / np.maximum(totals, 1), np.nan)
    side = min(max(0.42 * n, 3.5), 12.0)      # inches of the grid
    step = max(1, int(np.ceil(LABEL_INCHES * n / side)))
    fig = Figure(figsize=(side + 3.2, side + 2.6), dpi=DPI, layout='constrained')
    grid, column = fig.subplots(1, 2, sharey=True,
                                gridspec_kw=dict(width_ratios=[10, 1.6 if n <= MAX_NUMBERED else 0.6]))
    image = grid.imshow(share, cmap='Blues', vmin=0, vmax=1, aspect='auto', interpolation='nearest')
    column.imshow(recall[:, None], cmap='Greens', vmin=0, vmax=1, aspect='auto', interpolation='nearest')
    names = [_short(c) for c in confusion['classes']]
    ticks = list(range(0, n, step))
    grid.set_xticks(ticks, [names[k] for k in ticks], rotation=90 if max(map(len, names)) > 3 else 0)
    grid.set_yticks(ticks, [names[k] for k in ticks])
    grid.set_xlabel('predicted class')
    grid.set_ylabel('true class')
    column.set_xticks([0], ['recall'])
    column.tick_params(left=False)
    if n <= MAX_NUMBERED:
        size = max(5.0, min(10.0, 30 * side / n))
        for i in range(n):
            for j in range(n):
                grid.text(j, i, str(matrix[i, j]), ha='center', va='center', fontsize=size,
                          color='white' if share[i, j] > 0.55 else 'black')
            column.text(0, i, 'n/a' if np.isnan(recall[i]) else f'{100 * recall[i]:.1f}%', ha='center',
                        va='center', fontsize=size, color='white' if recall[i] > 0.55 else 'black')
    fig.colorbar(image, ax=[grid, column], shrink=0.5, label='share of the row (true class)')
    fig.suptitle(confusion_heading(confusion, title))
    return fig


def confusion_png(confusion, path, title=None):
    """confusion_figure saved as a PNG."""
    confusion_figure(confusion, title).savefig(path, dpi=DPI)
    return path


# ---------------------------------------------------------------- command line

def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument('genotype', nargs='?', metavar='GENOTYPE',
                   help=f'the cell to draw: a name ({", ".join(genotypes.NAMED)}), a genotype JSON file, or the '
                        f'Genotype(...) text a search log prints (as train.py --arch takes it)')
    p.add_argument('--genotype_file', metavar='FILE', help='the same as GENOTYPE FILE')
    p.add_argument('--run', help='a run folder: draws curves.png, and cells.gif and collapse.png (search run; '
                                 'budget.png with --budget) and confusion.png (when it has confusion.json) into it')
    p.add_argument('--format', default='png', choices=['png', 'pdf', 'svg'], help='file format of the cells')
    p.add_argument('--out', default=None, metavar='FOLDER',
                   help='the folder the pictures go to (default: the current folder for cells, drawn as '
                        'NAME_normal and NAME_reduce; the run folder for --run)')
    args = p.parse_args(argv)
    if sum(x is not None for x in (args.genotype, args.genotype_file, args.run)) != 1:
        p.error('give one of: a genotype name, --genotype_file, --run')
    return args


def visualize(args):
    if args.run:
        for path in draw_run(args.run, args.out):
            print(path)
        return
    require_dot()  # first: checking op names imports Paddle, which needs a usual PATH
    spec = args.genotype_file or args.genotype
    genotype = genotypes.resolve(spec)
    if spec in genotypes.NAMED:
        label = spec
    elif os.path.isfile(spec):
        label = os.path.splitext(os.path.basename(spec))[0]
    else:
        label = 'genotype'
    genotypes.validate(genotype)
    out = args.out or '.'
    make_folder(out)
    for cell in CELLS:
        print(render_cell(genotype, cell, os.path.join(out, f'{label}_{cell}'), args.format))


def draw_run(run_dir, out=None):
    """Every picture of a run folder into out (default: the run folder); returns their paths.  A
    search: its cells (genotype_normal/reduce.png), cells.gif, curves.png, collapse.png (budget.png);
    a training: curves.png and confusion.png.  Without graphviz's dot the cells are skipped, said once."""
    history = read_history(run_dir)
    if not history:
        raise UserError('the history is empty: no epoch has finished yet')
    search = all('genotype' in r for r in history)  # an evaluation run (train.py) records no genotype
    confusion_path = os.path.join(run_dir, 'confusion.json')
    confusion = read_confusion(confusion_path) if os.path.isfile(confusion_path) else None
    out = out or run_dir
    make_folder(out)
    name = os.path.basename(os.path.normpath(run_dir))
    written = []
    if search and shutil.which('dot') is None:   # the rest needs no dot: draw it, say what is missing
        print("the cells and cells.gif not drawn: they need graphviz's dot (Debian/Ubuntu: apt-get install "
              "graphviz; macOS: brew install graphviz)", file=sys.stderr)
    elif search:
        genotype_file = os.path.join(run_dir, 'genotype.json')
        if os.path.isfile(genotype_file):
            genotype = genotypes.load(genotype_file, check_ops=False)
            written += [render_cell(genotype, cell, os.path.join(out, f'genotype_{cell}')) for cell in CELLS]
        written.append(cells_gif(history, os.path.join(out, 'cells.gif')))
    held_out = 'search-val' if search else (confusion or {}).get('split', 'held-out')
    written.append(curves_png(history, os.path.join(out, 'curves.png'),
                              title=f'{name} ({"search" if search else "evaluation"})', held_out=held_out))
    if search and all('normal_skips' in r for r in history):
        written.append(collapse_png(history, os.path.join(out, 'collapse.png'), title=name))
    if search and all('budget' in r for r in history):
        written.append(budget_png(history, os.path.join(out, 'budget.png'), title=name))
    if confusion is not None:
        written.append(confusion_png(confusion, os.path.join(out, 'confusion.png'), title=name))
    return written


def main(argv=None):
    process.prepare()   # first: Paddle's logging quiet, malloc tuned, before checking op names imports paddle
    return run_main(visualize, argv, parse_args)


if __name__ == '__main__':
    sys.exit(main())
