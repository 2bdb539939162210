"""The DARTS paper's selection protocol: one search per seed, a short retrain of each cell from
scratch, and the cell that retrains best on validation data picked; with random cells, published
baselines, several search variants and several retrain seeds, whether searching pays at all.

    python protocol.py --seeds 4 --save runs/protocol --dataset digits --epochs 10 --retrain_epochs 20
    python protocol.py --seeds 4 --save runs/protocol --data ./data             # CIFAR-10: days on a CPU
    python protocol.py --seeds 2,5 --save runs/p --dataset folder --data ./parts --first_order --max_skip 2
    python protocol.py --seeds 4 --variants "paper=;first=--first_order" --random 10 --random_match params \\
        --baselines DARTS_V2 --retrain_seeds 3 --save runs/pays --dataset digits --image_size 16 ...

Liu et al. (2018) ran the search four times and chose by a 100-epoch retrain of a smaller
network; their code leaves this to the user.  Here, for each variant v (--variants; one
unnamed variant without it), budget b (--budget) and seed s:

  search   train_search.py --seed s --save OUT/search-KEY  [every flag not listed below] [v's flags]
  retrain  train.py --genotype_file OUT/search-KEY/genotype.json --seed s+r --save OUT/retrain-KEY[-rR]
           --epochs RETRAIN_EPOCHS --layers RETRAIN_LAYERS --init_channels RETRAIN_INIT_CHANNELS
           --batch_size RETRAIN_BATCH_SIZE --val_fraction VAL_FRACTION [RETRAIN_FLAGS],
           with the search's data, device and worker flags, for r = 0..RETRAIN_SEEDS-1

(KEY: [v-][budget-]s).  Random cells (OUT/random-I) and baselines (OUT/baseline-NAME) are
retrained the same way.  The retrains are evaluated on a stratified hold-out of the training
images (--val_fraction), never on the test set, so choosing between cells does not look at the
test data.  Then OUT/summary.json, OUT/summary.md (tables, the groups side by side, the noise
floor) and OUT/summary.png, OUT/comparison.png.  Interrupted, the same command continues:
finished runs are kept, an unfinished one is resumed from its checkpoint.
"""
import contextlib
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import numpy as np

from darts import process

process.prepare()   # first: Paddle's logging quiet, malloc tuned, before paddle is imported

import genotypes
from darts import cli, distributed, files, lifecycle
from darts.errors import UserError
from darts.search import budget, compare, guards
from darts import datasets
from visualize import figure_class, line_figure, line_panels
from visualize import DPI

HERE = os.path.dirname(os.path.abspath(__file__))
# search flags the retrain takes too (as well as the data flags)
SHARED = ('device', 'num_workers', 'no_custom_kernels', 'report_freq')
OWNED = ('save', 'resume', 'seed')   # set per seed by the protocol
MATCH_WINDOW = 0.10    # --random_match: within +-10 % of the searched cells' median
MAX_DRAWS = 20000      # cells drawn per random cell before --random_match gives up
NAME = re.compile(r'[A-Za-z0-9_]+')
RESERVED = ('random', 'baseline')   # folder prefixes of the other groups


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__,
                           epilog='Any other flag is a train_search.py flag (see python train_search.py --help).')
    add_arguments(p)
    args, search_flags = p.parse_known_args(argv)
    check_args(p, args)
    plan(p, args, search_flags)
    return args


def add_arguments(p):
    a = p.add_argument
    a('--seeds', default='0-3', metavar='S,S,...|A-B',
      help='the search seeds: a comma list (1,2,3), a range (0-3: 0, 1, 2 and 3), or both (0-2,7); one search '
           'per seed (and variant, and budget)')
    a('--save', default=None, help='the protocol folder (default runs/protocol-DATE-TIME); re-run to continue')
    a('--retrain_epochs', type=int, default=20, help='epochs of each retrain (the paper: 100)')
    a('--retrain_layers', type=int, default=8, help='cells of the retrain network')
    a('--retrain_init_channels', type=int, default=16, help='initial channels of the retrain network')
    a('--retrain_batch_size', type=int, default=64, help='batch of each retrain')
    a('--retrain_seeds', type=int, default=1, metavar='K',
      help='retrain every cell (searched, random, baseline) K times, with seeds S..S+K-1 (S: the cell\'s first '
           'seed); the summary then gives each cell\'s mean and spread and the noise floor')
    a('--val_fraction', type=float, default=0.1,
      help='the held-out share of the training images the retrains are compared on')
    a('--retrain_flags', default='', metavar='"FLAGS"', help='more train.py flags for every retrain, quoted')
    a('--random', type=int, default=0, metavar='N',
      help='also N cells drawn uniformly from the same search space (--primitives without none, --nodes), '
           'retrained exactly as the searched ones, and the summary compares the groups')
    a('--random_seed', type=int, default=0, help='seeds the random cells (cell i: seed (RANDOM_SEED, i))')
    a('--random_match', choices=['params'], default=None,
      help='draw the random cells at equal size: their retrain network\'s parameter count within +-10 %% of '
           'the searched cells\' median (rejection sampling from the uniform draw, seeded as above)')
    a('--baselines', default=None, metavar='NAME|FILE,...',
      help=f'also retrain these genotypes as the cells are: names ({", ".join(genotypes.NAMED)}) or genotype '
           f'JSON files')
    a('--variants', default=None, metavar='"NAME=FLAGS;NAME=FLAGS"',
      help='search variants side by side: each runs every seed with its own train_search.py flags added '
           '(NAME=, with no flags, is the search as the other flags give it); the same random cells, '
           'baselines and retrains for all')
    a('--jobs', type=int, default=1, metavar='J',
      help='run J searches or retrains at once (each its own process; their lines interleave, each run\'s '
           'log.txt is whole): on 2 cores 2 jobs of the small networks here take about 0.55x the time of one '
           'after another')
    a('--budget', action='append', default=None, metavar='KIND=N[,KIND=N]',
      help='a sweep, one point per --budget: every seed searched once per budget (train_search.py --budget B, '
           'e.g. params=1M, or params=1M,madds=200M for both), then summary.md and budget_sweep.png: retrain '
           'accuracy against the target network\'s parameters and multiply-adds')


def check_args(p, args):
    """The protocol's own flags in range, each failure one line; args.seed_list."""
    args.seed_list = seed_list(args.seeds, p)
    for name in ('retrain_epochs', 'retrain_seeds'):
        if getattr(args, name) < 1:
            p.error(f'--{name} must be at least 1')
    if args.random < 0:
        p.error('--random must be at least 0')
    if args.jobs < 1:
        p.error('--jobs must be at least 1')
    if args.jobs > 1 and distributed.WORLD > 1:
        p.error('--jobs: one run at a time under Paddle\'s launcher (each run uses every process)')
    if args.random_match and not args.random:
        p.error('--random_match: give the number of random cells with --random N')
    if distributed.WORLD > 1 and not args.save:
        p.error(f'--save: name the protocol folder when running {distributed.WORLD} processes (they share it)')


def plan(p, args, search_flags):
    """What the runs will be: the variants' search flags (each checked by train_search.py's parser), the
    search space the random cells are drawn from, the baselines, and the retrain flags (checked by train.py's)."""
    owned = OWNED + (('budget',) if args.budget else ())
    args.budget_list = _budgets(args.budget, p) if args.budget else [None]
    for flag in search_flags:
        if flag.startswith('--') and flag[2:].split('=')[0] in owned:
            p.error(f'{flag.split("=")[0]} is set by the protocol (per seed: OUT/search-SEED, --seed SEED)')
    import train
    import train_search
    args.search_flags = search_flags
    args.variant_flags = _variants(args.variants, owned, p)
    spaces, data_flags = set(), set()
    for name, flags in args.variant_flags.items():
        where = 'train_search.py' + (f' (variant {name})' if name else '')
        search_args = _checked(train_search.parse_args, [*search_flags, *flags], where)
        ops = tuple(op.strip() for op in search_args.primitives.split(',') if op.strip())
        spaces.add((ops, search_args.nodes))
        shared = cli.changed_flags(search_args, SHARED, train_search.parse_args([]))
        data_flags.add(tuple(datasets.changed_flags(search_args) + shared))
    if len(data_flags) > 1:
        p.error('--variants: a variant changes the data or device flags; the retrains need one data set for all')
    if args.random and len(spaces) > 1:
        p.error('--random with --variants: the variants search different spaces (--primitives, --nodes); '
                'random cells are drawn from one')
    (space_ops, args.space_nodes), = list(spaces)[:1]
    args.space_ops = list(space_ops)
    if args.random and not [op for op in args.space_ops if op != 'none']:
        p.error('--random: the op list has no op other than none to draw from')
    args.baseline_genotypes = _baselines(args.baselines, p)
    args.data_flags = list(data_flags.pop())
    args.retrain_flag_list = [
        '--epochs', str(args.retrain_epochs), '--layers', str(args.retrain_layers),
        '--init_channels', str(args.retrain_init_channels), '--batch_size', str(args.retrain_batch_size),
        '--val_fraction', str(args.val_fraction), *args.data_flags, *shlex.split(args.retrain_flags)]
    args.retrain_args = _checked(train.parse_args, ['--genotype_file', 'x.json', *args.retrain_flag_list], 'train.py')


def seed_list(text, p):
    """[1, 2, 3] from '1,2,3', '1-3' or '1-2,3': every seed once (p.error: one line)."""
    seeds = []
    for part in (x.strip() for x in text.split(',')):
        match = re.fullmatch(r'([0-9]+)(?:-([0-9]+))?', part)
        if not match or (match.group(2) and int(match.group(2)) < int(match.group(1))):
            p.error(f'--seeds {text!r}: seeds as a comma list (1,2,3) or ranges (0-3) of whole numbers')
        seeds += range(int(match.group(1)), int(match.group(2) or match.group(1)) + 1)
    if len(set(seeds)) != len(seeds):
        p.error(f'--seeds {text!r}: a seed is given twice')
    return seeds


def _budgets(texts, p):
    """['params=1M', 'params=1M,madds=200M', ...] from the --budget flags, each checked (budget.parse)."""
    out = [b.strip().replace(' ', '') for b in texts]
    if len(set(out)) != len(out):
        p.error('--budget: the sweep gives a budget twice')
    for b in out:
        try:
            budget.parse([b])
        except budget.BudgetError as e:
            p.error(str(e))
    return out


def _variants(text, owned, p):
    """{name: [flags]} from 'NAME=FLAGS;NAME=FLAGS' ({None: []} without --variants)."""
    if text is None:
        return {None: []}
    out = {}
    for part in (x.strip() for x in text.split(';')):
        if not part:
            continue
        name, sep, flags = part.partition('=')
        name = name.strip()
        if not sep or not NAME.fullmatch(name) or name in RESERVED:
            p.error(f'--variants {part!r}: expected NAME=FLAGS, NAME of letters, digits and _ '
                    f'(not {" or ".join(RESERVED)})')
        if name in out:
            p.error(f'--variants: {name} is given twice')
        try:
            out[name] = shlex.split(flags)
        except ValueError as e:
            p.error(f'--variants {name}: {e}')
        for flag in out[name]:
            if flag.startswith('--') and flag[2:].split('=')[0] in owned:
                p.error(f'--variants {name}: {flag.split("=")[0]} is set by the protocol')
    if not out:
        p.error('--variants: at least one NAME=FLAGS')
    return out


def _baselines(text, p):
    """{name: genotype} from 'DARTS_V2,cells/mine.json': a named genotype, or a file (named by its stem)."""
    out = {}
    for item in (x.strip() for x in (text or '').split(',')):
        if not item:
            continue
        if item in genotypes.NAMED:
            name, g = item, genotypes.NAMED[item]
        elif item.endswith('.json') or os.path.exists(item):
            try:
                g = genotypes.load(item)
            except genotypes.GenotypeError as e:
                p.error(f'--baselines: {e}')
            name = re.sub(r'[^A-Za-z0-9_]', '_', os.path.splitext(os.path.basename(item))[0])
        else:
            p.error(f'--baselines {item!r}: neither a named genotype ({", ".join(genotypes.NAMED)}) nor a '
                    f'genotype file')
        if name in out:
            p.error(f'--baselines: two baselines are called {name}')
        out[name] = g
    return out


def budget_flags(b):
    return [] if b is None else ['--budget', b]


def run_key(b, seed, variant=None):
    """The run folders' suffix: the seed, after the budget and the variant if any (search-first-params1M-0)."""
    parts = ([variant] if variant else []) + ([b.replace('=', '').replace(',', '_')] if b else []) + [str(seed)]
    return '-'.join(parts)


def _checked(parse, flags, script):
    """parse(flags), with a bad flag reported in one line naming the script it is for."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parse(flags)
    except SystemExit:
        message = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else 'bad flags'
        message = re.sub(r' \(see \S+ --help\)$', '', message.split('error: ', 1)[-1])
        print(f'error: {script} flags: {message} (see {script.split()[0]} --help)', file=sys.stderr)
        raise SystemExit(2) from None


def finished(run_dir):
    """A search or retrain writes result.json when it is done (or stopped early)."""
    return os.path.isfile(os.path.join(run_dir, 'result.json'))


class Terminated(Exception):
    """SIGTERM reached the protocol (raised by its handler, in main)."""


def _terminated(signum, frame):
    raise Terminated


LIVE = set()   # the children running now (several under --jobs)
LIVE_LOCK = threading.Lock()


def run_step(what, script, flags, run_dir):
    """Run (or resume, or skip when done) one search or retrain; its output goes to ours.  Stopped
    (Ctrl-C or SIGTERM), the child is stopped too, and only the protocol says so (lifecycle.QUIET_STOP)."""
    if finished(run_dir):
        print(f'protocol: {what}: done already ({run_dir})', flush=True)
        return
    resume = os.path.isfile(os.path.join(run_dir, 'args.json'))
    cmd = [sys.executable, os.path.join(HERE, script)] + (['--resume', run_dir] if resume else flags)
    print(f'protocol: {what}: {"resuming " + run_dir if resume else " ".join(shlex.quote(c) for c in cmd[1:])}',
          flush=True)
    child = subprocess.Popen(cmd, env=dict(os.environ, **{lifecycle.QUIET_STOP: '1'}))
    with LIVE_LOCK:
        LIVE.add(child)
    try:
        rc = child.wait()
    except BaseException:   # Ctrl-C (which the child has had too) or a SIGTERM that may be ours alone
        stop_children()
        raise
    finally:
        with LIVE_LOCK:
            LIVE.discard(child)
    if rc in (130, -signal.SIGINT):
        raise KeyboardInterrupt
    if rc in (143, -signal.SIGTERM):
        raise Terminated
    if rc != 0 or not finished(run_dir):
        raise UserError(f'{what} failed (exit {rc}); see {os.path.join(run_dir, "log.txt")}; '
                        f're-run this command to continue')


def stop_children():
    """SIGTERM every running child and wait for it: each stops at once, its last checkpoint whole."""
    with LIVE_LOCK:
        children = list(LIVE)
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        child.wait()


def run_steps(steps, jobs):
    """run_step(*step) for each step, up to jobs at once (they are independent runs); the first
    failure or stop stops the others and is raised."""
    if jobs == 1:
        for step in steps:
            run_step(*step)
        return
    pool = ThreadPoolExecutor(jobs)
    pending = {pool.submit(run_step, *step) for step in steps}
    try:
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_EXCEPTION)
            for future in done:
                future.result()
    except BaseException:
        for future in pending:
            future.cancel()
        stop_children()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def wait_for(path, what):
    """Every rank but the writer waits for a file rank 0 writes."""
    deadline = time.time() + 600
    while not os.path.isfile(path):
        if time.time() > deadline:
            raise UserError(f'{path} did not appear: rank 0 of this protocol did not {what}')
        time.sleep(0.2)
    return path


def retrain_target(out, args, searched):
    """The network the cells are retrained in (train.py's NetworkCIFAR), as a budget.Target, its
    data's size, channels and classes read from a finished search's data.json."""
    meta = files.read_json(os.path.join(os.path.dirname(searched[0]), 'data.json'))
    r = args.retrain_args
    return budget.Target('cifar', r.init_channels, r.layers, meta['image_size'], meta['channels'],
                         len(meta['classes']))


def draw_random_cells(out, args, searched, writer):
    """OUT/random-I/genotype.json for I < --random (drawn once; the other ranks wait for them).
    Cell i is the first draw of the seeded stream (random_seed, i); with --random_match params,
    the first of that stream inside the window around the searched cells' median parameter
    count in the retrain network (and unlike the cells before it)."""
    paths = [os.path.join(out, f'random-{i}', 'genotype.json') for i in range(args.random)]
    if writer and not all(os.path.isfile(p) for p in paths):
        table, window = None, None
        space = dict(primitives=args.space_ops, nodes=args.space_nodes)
        if args.random_match:
            table, window, median = match_window(out, args, searched)
        drawn = []
        for i, path in enumerate(paths):
            rng = np.random.default_rng([args.random_seed, i])
            if table is None:
                g, meta = genotypes.random_genotype(rng, args.space_ops, args.space_nodes), {}
            else:
                hit = budget.draw_within(table, 'params', window, rng, args.space_ops, args.space_nodes,
                                         exclude=drawn, max_draws=MAX_DRAWS)
                if hit is None:
                    raise UserError(f'--random_match params: {MAX_DRAWS:,} cells drawn for random cell {i} and none '
                                    f'has {window[0]:,}-{window[1]:,} parameters (+-10 % of the searched cells\' '
                                    f'median {median:,}) unlike the cells before it; draw fewer --random cells')
                g, cost, draws = hit
                meta = dict(match=dict(kind='params', median=median, window=list(window), params=cost, draws=draws))
            drawn.append(g)
            if not os.path.isfile(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                genotypes.save(g, path, dict(space, random=[args.random_seed, i], **meta))
    return [wait_for(path, 'write it') for path in paths]


def match_window(out, args, searched):
    """(cost table, (low, high), median): the retrain network's parameter window of --random_match (the
    searched cells are cells of the space, so it always holds some; draw_random_cells says when too few)."""
    import paddle
    from model_search import SearchSpace
    paddle.enable_static()
    target = retrain_target(out, args, searched)
    table = budget.cost_table(target, SearchSpace(ops=tuple(args.space_ops), nodes=args.space_nodes))
    counts = sorted(table.genotype_cost(genotypes.load(path, check_ops=False))['params'] for path in searched)
    median = int(round(float(np.median(counts))))
    return table, (int(np.ceil(median * (1 - MATCH_WINDOW))), int(np.floor(median * (1 + MATCH_WINDOW)))), median


class Cell:
    """One cell the protocol retrains: its group, the folders' key, and its first retrain seed."""

    def __init__(self, group, key, label, genotype_file, seed, **info):
        self.group, self.key, self.label, self.genotype_file, self.seed, self.info = \
            group, key, label, genotype_file, seed, info

    def retrain_dir(self, out, r):
        return os.path.join(out, f'retrain-{self.key}' + (f'-r{r}' if r else ''))


def searched_cells(out, plan):
    """The searched cells in run order: variant, budget, seed."""
    cells = []
    for v in plan.get('variants') or [None]:
        for b in plan.get('budgets') or [None]:
            for s in plan['seeds']:
                key = run_key(b, s, v)
                cells.append(Cell(v or 'searched', key, ' '.join(x for x in (v, b, f'seed {s}') if x),
                                  os.path.join(out, f'search-{key}', 'genotype.json'), s, seed_of_search=s,
                                  budget=b, variant=v))
    return cells


def all_cells(out, plan):
    """Searched, random and baseline cells, each with its folders and first retrain seed (random
    cell i: the i-th of the seeds, cycling; baselines: the first seed)."""
    seeds = plan['seeds']
    cells = searched_cells(out, plan)
    n = (plan.get('random') or {}).get('cells', 0)
    cells += [Cell('random', f'random-{i}', f'random cell {i}', os.path.join(out, f'random-{i}', 'genotype.json'),
                   seeds[i % len(seeds)], cell=i) for i in range(n)]
    cells += [Cell('baseline', f'baseline-{name}', f'baseline {name}',
                   os.path.join(out, f'baseline-{name}', 'genotype.json'), seeds[0], name=name)
              for name in plan.get('baselines') or {}]
    return cells


def open_folder(out, plan, writer):
    """The protocol folder, made (with protocol.json, the plan) or continued by the writer.  Under
    Paddle's launcher the other processes wait for protocol.json and check it is their plan: each
    runs its share of every search and retrain (its children inherit its rank), only rank 0 writes."""
    plan_path = os.path.join(out, 'protocol.json')
    if not writer:
        wait_for(plan_path, 'start it')
    if os.path.isfile(plan_path):
        before = files.read_json(plan_path)
        if before != plan:
            raise UserError(f'{out} was started with other settings ({json.dumps(before)}); run the same command '
                            f'to continue it, or pick another --save')
    elif os.path.exists(out) and os.listdir(out):
        raise UserError(f'{out} exists and is not a protocol folder; pick another --save')
    else:
        os.makedirs(out, exist_ok=True)
        files.write_json(plan_path, plan)


def make_plan(args):
    """protocol.json: what the folder holds (a flag the plan does not name is at its old default)."""
    plan = dict(seeds=args.seed_list, search_flags=args.search_flags, retrain_flags=args.retrain_flag_list)
    if args.budget:
        plan['budgets'] = args.budget_list
    if args.random:
        plan['random'] = dict(cells=args.random, seed=args.random_seed)
        if args.random_match:
            plan['random']['match'] = args.random_match
    if args.variants is not None:
        plan['variants'] = {name: flags for name, flags in args.variant_flags.items()}
    if args.baseline_genotypes:
        plan['baselines'] = {name: genotypes.to_dict(g) for name, g in args.baseline_genotypes.items()}
    if args.retrain_seeds > 1:
        plan['retrain_seeds'] = args.retrain_seeds
    return plan


def protocol(args):
    writer = distributed.RANK == 0
    out = args.save or os.path.join('runs', time.strftime('protocol-%Y%m%d-%H%M%S'))
    plan = make_plan(args)
    open_folder(out, plan, writer)
    searched = searched_cells(out, plan)
    steps = []
    for k, cell in enumerate(searched, 1):
        search_dir = os.path.dirname(cell.genotype_file)
        flags = [*args.search_flags, *args.variant_flags[cell.info['variant']], *budget_flags(cell.info['budget'])]
        steps.append((f'search {k}/{len(searched)} ({cell.label})', 'train_search.py',
                      [*flags, '--seed', str(cell.seed), '--save', search_dir], search_dir))
    try:
        run_steps(steps, args.jobs)
    finally:
        if writer and os.listdir(out) == ['protocol.json']:   # nothing started (bad data, say): leave nothing
            os.remove(os.path.join(out, 'protocol.json'))
            os.rmdir(out)
    draw_random_cells(out, args, [c.genotype_file for c in searched], writer)
    for name, g in args.baseline_genotypes.items():
        path = os.path.join(out, f'baseline-{name}', 'genotype.json')
        if writer and not os.path.isfile(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            genotypes.save(g, path, dict(baseline=name))
        wait_for(path, 'write it')
    cells = all_cells(out, plan)
    rounds = [(r, cell) for r in range(args.retrain_seeds) for cell in cells]   # every cell once, then again
    run_steps([(f'retrain {k}/{len(rounds)} ({cell.label}, seed {cell.seed + r})', 'train.py',
                ['--genotype_file', cell.genotype_file, '--seed', str(cell.seed + r), *args.retrain_flag_list,
                 '--save', cell.retrain_dir(out, r)], cell.retrain_dir(out, r))
               for k, (r, cell) in enumerate(rounds, 1)], args.jobs)
    if not writer:
        return None
    summary, lines = summarise(out, plan)
    print('\n'.join(lines))
    print(f'protocol: done; {os.path.join(out, "summary.md")}, summary.json, summary.png, comparison.png'
          + (', budget_sweep.png' if args.budget else ''))
    return summary


# ---------------------------------------------------------------- the summary

def cell_row(out, cell, k):
    """A cell's summary row: its retrains' validation top-1 (each the best epoch's), their mean and sd."""
    retrains = [files.read_json(os.path.join(cell.retrain_dir(out, r), 'result.json')) for r in range(k)]
    values = [r['top1'] for r in retrains]
    mean, sd = compare.cell_spread(values)
    g = genotypes.from_dict(retrains[0]['genotype'], check_ops=False)
    counts = guards.cell_counts(g)
    return dict(group=cell.group, key=cell.key, label=cell.label, retrain_val_top1=mean, retrain_val_top1_sd=sd,
                retrain_val_top1_seeds=values, retrain_seeds=[cell.seed + r for r in range(k)],
                retrain_best_epoch=retrains[0]['epoch'], parameters=retrains[0]['parameters'],
                normal_skips=counts['normal_skips'], reduce_skips=counts['reduce_skips'],
                genotype=retrains[0]['genotype'], genotype_file=cell.genotype_file,
                retrain_dir=cell.retrain_dir(out, 0), retrain_dirs=[cell.retrain_dir(out, r) for r in range(k)])


def summarise(out, plan):
    """summary.json / .md / .png and comparison.png (with --budget budget_sweep.png) from the run folders."""
    k = plan.get('retrain_seeds', 1)
    rows, random_rows, baseline_rows = [], [], []
    for cell in all_cells(out, plan):
        row = cell_row(out, cell, k)
        if cell.group == 'random':
            random_rows.append(dict(row, cell=cell.info['cell']))
        elif cell.group == 'baseline':
            baseline_rows.append(dict(row, name=cell.info['name']))
        else:
            search = files.read_json(os.path.join(os.path.dirname(cell.genotype_file), 'result.json'))
            rows.append(dict(row, seed=cell.info['seed_of_search'], budget=cell.info['budget'],
                             variant=cell.info['variant'], target_costs=search.get('costs'),
                             search_val_top1=search['search_val_top1'], search_epochs=search['epoch'],
                             early_stop=search['early_stop'], search_dir=os.path.dirname(cell.genotype_file)))
    best = max(rows, key=lambda r: (r['retrain_val_top1'], -rows.index(r)))   # ties: the first run
    stats = {key: dict(mean=float(np.mean([r[key] for r in rows])), std=float(np.std([r[key] for r in rows])))
             for key in ('search_val_top1', 'retrain_val_top1', 'parameters', 'normal_skips')}
    summary = dict(seeds=[r['seed'] for r in rows], best_seed=best['seed'], best_variant=best['variant'],
                   best_genotype_file=os.path.join(best['search_dir'], 'genotype.json'), runs=rows, stats=stats,
                   retrain_seeds=k)
    if random_rows:
        summary['random'] = dict(runs=random_rows, **compare_with_random(rows, random_rows))
    if baseline_rows:
        summary['baselines'] = baseline_rows
    summary['groups'], summary['noise'] = groups_and_noise(rows, random_rows, baseline_rows)
    files.write_json(os.path.join(out, 'summary.json'), summary)
    lines = summary_lines(summary, plan)
    with open(os.path.join(out, 'summary.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    seeds_png(rows, best, os.path.join(out, 'summary.png'))
    comparison_png(summary, os.path.join(out, 'comparison.png'))
    if plan.get('budgets'):
        sweep_png(rows, os.path.join(out, 'budget_sweep.png'))
    return summary, lines


def compare_with_random(rows, random_rows):
    """The searched against the random cells: each group's mean, std and best, every searched cell's
    rank among the random ones, and a one-sided Mann-Whitney U test (scipy) with a one-line reading."""
    searched = [r['retrain_val_top1'] for r in rows]
    drawn = [r['retrain_val_top1'] for r in random_rows]
    for r in rows:   # how many random cells it beats (a tie counts a half)
        r['beats_random'] = sum(1.0 if r['retrain_val_top1'] > d else 0.5 if r['retrain_val_top1'] == d else 0.0
                                for d in drawn)
    p, share = compare.rank_test(searched, drawn)
    groups = {name: dict(mean=float(np.mean(v)), std=float(np.std(v)), best=float(np.max(v)), n=len(v))
              for name, v in (('searched', searched), ('random', drawn))}
    verdict = ('the searched cells retrain better than random ones' if p < 0.05 else
               'no evidence that the searched cells retrain better than random ones')
    reading = (f"searched cells {100 * groups['searched']['mean']:.2f} ± {100 * groups['searched']['std']:.2f} % "
               f"against random {100 * groups['random']['mean']:.2f} ± {100 * groups['random']['std']:.2f} %; a "
               f"searched cell beats a random one in {100 * share:.0f} % of the {len(searched) * len(drawn)} pairs "
               f"(one-sided Mann-Whitney U p = {p:.3f}, {len(searched)} vs {len(drawn)} cells): {verdict}")
    return dict(groups=groups, mann_whitney_p=p, pairs_won=share, reading=reading)


def groups_and_noise(rows, random_rows, baseline_rows):
    """One entry per group (each variant, random, each baseline): its cells' mean, sd of the cell
    means, best, median parameters and, against the random cells, the rank test and the smallest
    detectable difference; and the noise floor (darts.compare) over the groups with several cells."""
    by_group = {}
    for r in rows + random_rows:
        by_group.setdefault(r['group'], []).append(r)
    for r in baseline_rows:
        by_group[r['label']] = [r]
    noise = compare.noise_floor({g: [r['retrain_val_top1_seeds'] for r in rs] for g, rs in by_group.items()})
    out = []
    for name, rs in by_group.items():
        means = [r['retrain_val_top1'] for r in rs]
        entry = dict(group=name, cells=len(rs), mean=float(np.mean(means)),
                     sd=float(np.std(means, ddof=1)) if len(rs) > 1 else 0.0, best=float(np.max(means)),
                     parameters_median=float(np.median([r['parameters'] for r in rs])))
        if random_rows and name != 'random':
            drawn = [r['retrain_val_top1'] for r in random_rows]
            entry['vs_random'] = dict(difference=entry['mean'] - float(np.mean(drawn)),
                                      detectable=compare.detectable(noise, len(rs), len(drawn)),
                                      min_p=compare.min_p(len(rs), len(drawn)))
            if len(rs) > 1:
                entry['vs_random']['p'], entry['vs_random']['pairs_won'] = compare.rank_test(means, drawn)
        out.append(entry)
    searched_n = max(sum(r['group'] == g for r in rows) for g in {r['group'] for r in rows})
    other = len(random_rows) or searched_n
    noise['line'] = compare.noise_line(noise, searched_n, other)
    return out, noise


def summary_lines(summary, plan):
    """summary.md: the searched cells, the random cells and baselines, the groups side by side, the noise floor."""
    rows, k = summary['runs'], summary['retrain_seeds']
    swept, varied = bool(plan.get('budgets')), bool(plan.get('variants'))
    retrain_head = 'retrain val top-1' + (f' (mean ± sd, {k} seeds)' if k > 1 else '')
    head = (['variant'] if varied else []) + (['budget'] if swept else []) + ['seed']
    head += ['target params', 'target madds'] if swept else []
    head += ['search-val top-1', retrain_head, 'params (M)' if not swept else 'retrain params (M)',
             'skips (normal / reduce)']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        cells = ([r['variant']] if varied else []) + ([r['budget']] if swept else [])
        cells.append(f"{r['seed']}{' (best)' if r['genotype_file'] == summary['best_genotype_file'] else ''}")
        if swept:
            c = r['target_costs'] or {}
            cells += [f"{c[key] / 1e6:.3f}M" if key in c else '-' for key in ('params', 'madds')]
        cells += [f"{100 * r['search_val_top1']:.2f}%", _top1(r, k), f"{r['parameters'] / 1e6:.3f}",
                  f"{r['normal_skips']} / {r['reduce_skips']}"]
        lines.append('| ' + ' | '.join(cells) + ' |')
    st = summary['stats']
    pad = len(head) - 5
    lines.append('| ' + '| ' * pad + f"mean ± std | {100 * st['search_val_top1']['mean']:.2f} ± "
                 f"{100 * st['search_val_top1']['std']:.2f}% | {100 * st['retrain_val_top1']['mean']:.2f} ± "
                 f"{100 * st['retrain_val_top1']['std']:.2f}% | {st['parameters']['mean'] / 1e6:.3f} ± "
                 f"{st['parameters']['std'] / 1e6:.3f} | {st['normal_skips']['mean']:.2f} ± "
                 f"{st['normal_skips']['std']:.2f} (normal) |")
    best = next(r for r in rows if r['genotype_file'] == summary['best_genotype_file'])
    lines += ['', f"Best: {best['label']}; train it in full with "
              f"`python train.py --genotype_file {summary['best_genotype_file']}`"]
    if 'random' in summary:
        lines += random_lines(rows, summary['random'], k)
    if 'baselines' in summary:
        lines += ['', 'Baselines, retrained the same way:', '', f'| baseline | {retrain_head} | params (M) |',
                  '|---|---|---|']
        lines += [f"| {r['name']} | {_top1(r, k)} | {r['parameters'] / 1e6:.3f} |" for r in summary['baselines']]
    lines += ['', 'The groups side by side (each cell counted once, by its mean over the retrain seeds):', '',
              '| group | cells | retrain val top-1, mean ± sd of the cells | best cell | params (median) | '
              'against random: difference, detectable, p |', '|---|---|---|---|---|---|']
    for g in summary['groups']:
        vs = g.get('vs_random')
        against = '-'
        if vs:
            d = vs['detectable']
            against = (f"{100 * vs['difference']:+.2f} points; "
                       + (f"{100 * d:.2f}" if d is not None else 'n/a') + ' detectable; '
                       + (f"p = {vs['p']:.3f}" if 'p' in vs else 'one cell, no test'))
        lines.append(f"| {g['group']} | {g['cells']} | {100 * g['mean']:.2f} ± {100 * g['sd']:.2f}% | "
                     f"{100 * g['best']:.2f}% | {g['parameters_median'] / 1e3:.1f}K | {against} |")
    lines += ['', summary['noise']['line']]
    return lines


def _top1(row, k):
    return (f"{100 * row['retrain_val_top1']:.2f} ± {100 * row['retrain_val_top1_sd']:.2f}%" if k > 1
            else f"{100 * row['retrain_val_top1']:.2f}%")


def random_lines(rows, comparison, k):
    """summary.md's part on the random cells: their table, each searched cell's rank, the reading."""
    g = comparison['groups']
    head = 'retrain val top-1' + (f' (mean ± sd, {k} seeds)' if k > 1 else '')
    lines = ['', f"Random cells, retrained the same way ({g['random']['n']}):", '',
             f'| random cell | {head} | params (M) | skips (normal) |', '|---|---|---|---|']
    for r in comparison['runs']:
        lines.append(f"| {r['cell']} | {_top1(r, k)} | {r['parameters'] / 1e6:.3f} | {r['normal_skips']} |")
    for name in ('searched', 'random'):
        lines.append(f"| {name}: mean ± std (best) | {100 * g[name]['mean']:.2f} ± {100 * g[name]['std']:.2f}% "
                     f"({100 * g[name]['best']:.2f}%) | | |")
    lines += ['', 'Each searched cell among the random ones: ' + '; '.join(
        f"{r['label']} beats {r['beats_random']:g} of {g['random']['n']}" for r in rows), '', comparison['reading']]
    return lines


def seeds_figure(rows, best):
    """Search-val and retrain accuracy, and skips, per search: points, one per search, not a series
    (no line joins two searches); the skips, a count, on whole ticks."""
    xs = list(range(1, len(rows) + 1))
    return line_figure([('top-1 % per search (in run order)',
                         [('search-val', xs, [100 * r['search_val_top1'] for r in rows]),
                          ('retrain val', xs, [100 * r['retrain_val_top1'] for r in rows])]),
                        ('skips in the normal cell', [('skips', xs, [r['normal_skips'] for r in rows])],
                         dict(integer_y=True))],
                       f'{len(rows)} searches; best: {best["label"]}', x_label='search', lines=False)


def seeds_png(rows, best, path):
    """seeds_figure saved as path."""
    seeds_figure(rows, best).savefig(path, dpi=DPI)
    return path


def comparison_png(summary, path):
    """Retrain validation top-1 against the retrain network's parameters: a point per cell at its
    mean over the retrain seeds, the bar its sd over them; one colour per group (each variant,
    random, baselines).  Shows at a glance whether a group wins by being bigger."""
    Figure = figure_class()
    groups = {}
    for r in summary['runs'] + summary.get('random', {}).get('runs', []) + summary.get('baselines', []):
        groups.setdefault('baselines' if r['group'] == 'baseline' else r['group'], []).append(r)
    fig = Figure(figsize=(720 / DPI, 480 / DPI), dpi=DPI, layout='constrained')
    ax = fig.subplots()
    markers = dict(random='x', baselines='D')
    for name, rs in groups.items():
        ax.errorbar([r['parameters'] / 1e3 for r in rs], [100 * r['retrain_val_top1'] for r in rs],
                    yerr=[100 * r['retrain_val_top1_sd'] for r in rs], fmt=markers.get(name, 'o'), capsize=3,
                    markersize=5, label=f'{name} ({len(rs)})')
        if name == 'baselines':
            for r in rs:
                ax.annotate(r['name'], (r['parameters'] / 1e3, 100 * r['retrain_val_top1']), fontsize='small',
                            xytext=(4, 4), textcoords='offset points')
    k = summary['retrain_seeds']
    ax.set_xlabel('parameters of the retrain network (K)')
    ax.set_ylabel('retrain validation top-1 %')
    ax.set_title(f'each cell: mean over {k} retrain seed{"s" if k > 1 else ""}'
                 + (', bar: sd over them' if k > 1 else ''), fontsize='medium')
    ax.grid(alpha=0.3)
    ax.legend(loc='upper center', bbox_to_anchor=(0.5, -0.14), ncol=min(len(groups), 4), fontsize='small',
              frameon=False)
    fig.savefig(path, dpi=DPI)
    return path


def sweep_png(rows, path):
    """Retrain validation top-1 against the target network's parameters and multiply-adds."""
    panels = []
    for kind, unit in (('params', 'M parameters'), ('madds', 'M multiply-adds')):
        pts = sorted((r['target_costs'][kind] / 1e6, 100 * r['retrain_val_top1']) for r in rows if r['target_costs'])
        panels.append((f'retrain val top-1 % against {unit}', [('cells', [x for x, _ in pts], [y for _, y in pts])]))
    return line_panels(panels, path, 'budget sweep: accuracy against the target network\'s cost', x_label='')


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)
    try:
        protocol(args)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as e:
        what = 'interrupted' if isinstance(e, KeyboardInterrupt) else 'terminated (SIGTERM)'
        line = f'{what}: finished runs are kept; run the same command again to continue'
        print('\n' + line, file=sys.stderr)
        distributed.tell_console(line)
        return 130 if isinstance(e, KeyboardInterrupt) else 143
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
