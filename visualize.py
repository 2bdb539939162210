"""Draw DARTS cells, and the pictures of a search run.

    python visualize.py DARTS_PADDLE                      # normal + reduction cell, PNG
    python visualize.py --genotype_file runs/x/genotype.json --format svg
    python visualize.py --run runs/x                      # cells.gif + curves.png from a run folder

Cells are drawn by graphviz's `dot` (Debian: apt-get install graphviz); the GIF and
the curves are assembled with Pillow.
"""
import argparse
import io
import json
import os
import shutil
import sys

import genotypes
from utils import UserError, run_main

CELLS = ('normal', 'reduce')


def cell_graph(genotype, cell):
    """A graphviz Digraph of one cell: inputs c_{k-2}, c_{k-1}, nodes 0..n-1, output c_{k}."""
    import graphviz
    pairs = getattr(genotype, cell)
    concat = getattr(genotype, cell + '_concat')
    steps = len(pairs) // 2
    g = graphviz.Digraph(name=f'{cell}_cell', format='png',
                         graph_attr=dict(rankdir='LR', fontname='helvetica', fontsize='20'),
                         node_attr=dict(style='filled', shape='rect', align='center', fontsize='20',
                                        height='0.5', width='0.5', penwidth='2', fontname='helvetica'),
                         edge_attr=dict(fontsize='18', fontname='helvetica'))

    def node(j):
        return 'c_{k-2}' if j == 0 else 'c_{k-1}' if j == 1 else str(j - 2)
    for name in ('c_{k-2}', 'c_{k-1}'):
        g.node(name, fillcolor='darkseagreen2')
    for i in range(steps):
        g.node(str(i), fillcolor='lightblue')
    g.node('c_{k}', fillcolor='palegoldenrod')
    for k, (op, j) in enumerate(pairs):
        g.edge(node(j), str(k // 2), label=op, fillcolor='gray')
    for c in concat:
        g.edge(node(c), 'c_{k}', fillcolor='gray')
    return g


def require_dot():
    if shutil.which('dot') is None:
        raise UserError("graphviz's dot program is not installed (Debian/Ubuntu: apt-get install graphviz; "
                        "macOS: brew install graphviz)")


def render_cell(genotype, cell, path_stem, fmt='png'):
    """Write path_stem.fmt; returns the path."""
    require_dot()
    return cell_graph(genotype, cell).render(outfile=f'{path_stem}.{fmt}', format=fmt, cleanup=True)


def cell_png_bytes(genotype, cell):
    require_dot()
    return cell_graph(genotype, cell).pipe(format='png')


# ---------------------------------------------------------------- run pictures

def read_history(run_dir):
    path = os.path.join(run_dir, 'history.jsonl')
    if not os.path.isfile(path):
        raise UserError(f'{run_dir} has no history.jsonl (is it a run folder?)')
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _font(size):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # older Pillow
        return ImageFont.load_default()


def cells_gif(history, path, duration_ms=800):
    """One frame per epoch: both cells side by side, titled with epoch and search-val top-1."""
    from PIL import Image, ImageDraw
    frames = []
    for record in history:
        g = genotypes.from_dict(record['genotype'])
        cells = [Image.open(io.BytesIO(cell_png_bytes(g, c))).convert('RGB') for c in CELLS]
        width = sum(c.width for c in cells) + 60
        height = max(c.height for c in cells) + 70
        frame = Image.new('RGB', (width, height), 'white')
        x = 20
        for c in cells:
            frame.paste(c, (x, 60))
            x += c.width + 20
        acc = record.get('val_acc')
        title = f"epoch {record['epoch']}" + (f'   search-val top-1 {100 * acc:.1f}%' if acc is not None else '')
        ImageDraw.Draw(frame).text((20, 15), title, fill='black', font=_font(28))
        frames.append(frame)
    if not frames:
        raise UserError('the history is empty: no epoch has finished yet')
    size = (max(f.width for f in frames), max(f.height for f in frames))
    frames = [_pad(f, size) for f in frames]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=duration_ms, loop=0)
    return path


def _pad(img, size):
    from PIL import Image
    out = Image.new('RGB', size, 'white')
    out.paste(img, (0, 0))
    return out


def curves_png(history, path, title='search'):
    """Loss (left) and top-1 accuracy (right) per epoch, train and val, drawn with Pillow."""
    from PIL import Image, ImageDraw
    epochs = [r['epoch'] for r in history]
    panels = [('loss', [('train', [r['train_loss'] for r in history]), ('val', [r['val_loss'] for r in history])]),
              ('top-1 %', [('train', [100 * r['train_acc'] for r in history]),
                           ('val', [100 * r['val_acc'] for r in history])])]
    w, h, m = 520, 380, 60
    img = Image.new('RGB', (2 * w, h + 40), 'white')
    d = ImageDraw.Draw(img)
    font = _font(16)
    d.text((10, 8), f'{title}: {len(history)} epochs', fill='black', font=font)
    colours = {'train': (31, 119, 180), 'val': (214, 39, 40)}
    for p, (name, series) in enumerate(panels):
        x0, y0, x1, y1 = p * w + m, 40 + 20, p * w + w - 20, 40 + h - m
        values = [v for _, s in series for v in s]
        lo, hi = min(values), max(values)
        if hi - lo < 1e-9:
            lo, hi = lo - 1, hi + 1
        lo, hi = lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)  # keep points off the frame
        e_lo, e_hi = min(epochs), max(epochs) if max(epochs) > min(epochs) else min(epochs) + 1
        d.rectangle([x0, y0, x1, y1], outline='black')
        for t in range(5):  # y ticks
            v = lo + (hi - lo) * t / 4
            y = y1 - (y1 - y0) * t / 4
            d.line([x0 - 4, y, x0, y], fill='black')
            d.text((x0 - 55, y - 8), f'{v:.3g}', fill='black', font=font)
        d.text((x0, y1 + 8), f'epoch {e_lo}', fill='black', font=font)
        d.text((x1 - 70, y1 + 8), f'epoch {e_hi}', fill='black', font=font)
        d.text((x0 + 8, y0 + 6), name, fill='black', font=font)
        for k, (label, s) in enumerate(series):
            pts = [(x0 + (x1 - x0) * (e - e_lo) / (e_hi - e_lo), y1 - (y1 - y0) * (v - lo) / (hi - lo))
                   for e, v in zip(epochs, s)]
            if len(pts) > 1:
                d.line(pts, fill=colours[label], width=3)
            for x, y in pts:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colours[label])
            d.text((x1 - 60, y0 + 6 + 18 * k), label, fill=colours[label], font=font)
    img.save(path)
    return path


# ---------------------------------------------------------------- command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('genotype', nargs='?', help=f'a named genotype: {", ".join(genotypes.NAMED)}')
    p.add_argument('--genotype_file', help='a genotype JSON written by train_search.py')
    p.add_argument('--run', help='a run folder: draws cells.gif and curves.png from its history.jsonl')
    p.add_argument('--format', default='png', choices=['png', 'pdf', 'svg'])
    p.add_argument('--out', default=None,
                   help='output path stem for cells (default: <genotype>_normal / <genotype>_reduce), '
                        'or folder for --run pictures (default: the run folder)')
    args = p.parse_args(argv)
    if sum(x is not None for x in (args.genotype, args.genotype_file, args.run)) != 1:
        p.error('give one of: a genotype name, --genotype_file, --run')
    return args


def visualize(args):
    if args.run:
        history = read_history(args.run)
        out = args.out or args.run
        os.makedirs(out, exist_ok=True)
        print(cells_gif(history, os.path.join(out, 'cells.gif')))
        print(curves_png(history, os.path.join(out, 'curves.png'), title=os.path.basename(os.path.normpath(args.run))))
        return
    if args.genotype_file:
        genotype = genotypes.load(args.genotype_file)
        label = os.path.splitext(os.path.basename(args.genotype_file))[0]
    else:
        genotype, label = genotypes.by_name(args.genotype), args.genotype
    genotypes.validate(genotype)
    require_dot()
    for cell in CELLS:
        stem = f'{args.out}_{cell}' if args.out else f'{label}_{cell}'
        print(render_cell(genotype, cell, stem, args.format))


def main(argv=None):
    return run_main(visualize, argv, parse_args)


if __name__ == '__main__':
    sys.exit(main())
