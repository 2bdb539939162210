"""The DARTS paper's selection protocol: one search per seed, a short retrain of each cell from
scratch, and the cell that retrains best on validation data picked.

    python protocol.py --seeds 4 --save runs/protocol --dataset digits --epochs 10 --retrain_epochs 20
    python protocol.py --seeds 4 --save runs/protocol --data ./data             # CIFAR-10: days on a CPU
    python protocol.py --seeds 2,5 --save runs/p --dataset folder --data ./parts --first_order --max_skip 2

Liu et al. (2018) ran the search four times and chose by a 100-epoch retrain of a smaller
network; their code leaves this to the user.  Here, for each seed s:

  search   train_search.py --seed s --save OUT/search-s  [every flag not listed below]
  retrain  train.py --genotype_file OUT/search-s/genotype.json --seed s --save OUT/retrain-s
           --epochs RETRAIN_EPOCHS --layers RETRAIN_LAYERS --init_channels RETRAIN_INIT_CHANNELS
           --batch_size RETRAIN_BATCH_SIZE --val_fraction VAL_FRACTION [RETRAIN_FLAGS],
           with the search's data, device and worker flags

The retrains are evaluated on a stratified hold-out of the training images (--val_fraction),
never on the test set, so choosing between cells does not look at the test data.  Then
OUT/summary.json, OUT/summary.md (a table with mean and standard deviation) and
OUT/summary.png.  Interrupted, the same command continues: finished runs are kept, an
unfinished one is resumed from its checkpoint.
"""
import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import utils
from errors import UserError

HERE = os.path.dirname(os.path.abspath(__file__))
# search flags the retrain takes too (as well as the data flags)
SHARED = ('device', 'num_workers', 'no_custom_kernels', 'report_freq')
OWNED = ('save', 'resume', 'seed')   # set per seed by the protocol


def parse_args(argv=None):
    p = utils.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                             allow_abbrev=False,  # --seed is a search flag, not short for --seeds
                             epilog='Any other flag is a train_search.py flag (see python train_search.py --help).')
    a = p.add_argument
    a('--seeds', default='4', help='how many searches (seeds 0..N-1), or the seeds as a comma list')
    a('--save', default=None, help='the protocol folder (default runs/protocol-DATE-TIME); re-run to continue')
    a('--retrain_epochs', type=int, default=20, help='epochs of each retrain (the paper: 100)')
    a('--retrain_layers', type=int, default=8, help='cells of the retrain network')
    a('--retrain_init_channels', type=int, default=16, help='initial channels of the retrain network')
    a('--retrain_batch_size', type=int, default=64)
    a('--val_fraction', type=float, default=0.1,
      help='the held-out share of the training images the retrains are compared on')
    a('--retrain_flags', default='', metavar='"FLAGS"', help='more train.py flags for every retrain, quoted')
    a('--random', type=int, default=0, metavar='N',
      help='also N cells drawn uniformly from the same search space (--primitives without none, --nodes), '
           'retrained exactly as the searched ones, and the summary compares the two groups')
    a('--random_seed', type=int, default=0, help='seeds the random cells (cell i: seed (RANDOM_SEED, i))')
    a('--budgets', default=None, metavar='B,B,...',
      help='a sweep: every seed searched once per budget (train_search.py --budget B; KIND=N, '
           'params=1M+madds=200M for both), then summary.md and budget_sweep.png: retrain accuracy against '
           'the target network\'s parameters and multiply-adds')
    args, search_flags = p.parse_known_args(argv)
    try:
        args.seed_list = ([int(s) for s in args.seeds.split(',')] if ',' in args.seeds
                          else list(range(int(args.seeds))))
    except ValueError:
        p.error(f'--seeds {args.seeds!r}: a count or a comma-separated list of integers')
    if not args.seed_list or len(set(args.seed_list)) != len(args.seed_list) or args.seeds.strip() == '0':
        p.error('--seeds: at least one seed, none repeated')
    if args.retrain_epochs < 1:
        p.error('--retrain_epochs must be at least 1')
    if args.random < 0:
        p.error('--random must be at least 0')
    import distributed
    if distributed.WORLD > 1 and not args.save:
        p.error(f'--save: name the protocol folder when running {distributed.WORLD} processes (they share it)')
    owned = OWNED + (('budget',) if args.budgets else ())
    args.budget_list = _budgets(args.budgets, p) if args.budgets else [None]
    for flag in search_flags:
        if flag.startswith('--') and flag[2:].split('=')[0] in owned:
            p.error(f'{flag.split("=")[0]} is set by the protocol (per seed: OUT/search-SEED, --seed SEED)')
    import train
    import train_search
    args.search_flags = search_flags
    search_args = _checked(train_search.parse_args, search_flags, 'train_search.py')
    args.space_ops = [op.strip() for op in search_args.primitives.split(',') if op.strip()]
    args.space_nodes = search_args.nodes
    if args.random and not [op for op in args.space_ops if op != 'none']:
        p.error('--random: the op list has no op other than none to draw from')
    args.data_flags = _changed_flags(search_args, _data_flag_names() + SHARED, train_search.parse_args([]))
    args.retrain_flag_list = [
        '--epochs', str(args.retrain_epochs), '--layers', str(args.retrain_layers),
        '--init_channels', str(args.retrain_init_channels), '--batch_size', str(args.retrain_batch_size),
        '--val_fraction', str(args.val_fraction), *args.data_flags, *shlex.split(args.retrain_flags)]
    _checked(train.parse_args, ['--genotype_file', 'x.json', *args.retrain_flag_list], 'train.py')
    return args


def _budgets(text, p):
    """['params=1M', 'params=1M+madds=200M', ...] from --budgets, each checked (budget.parse)."""
    import budget
    out = [b.strip() for b in text.split(',') if b.strip()]
    if not out or len(set(out)) != len(out):
        p.error('--budgets: at least one budget, none repeated')
    for b in out:
        try:
            budget.parse(b.split('+'))
        except budget.BudgetError as e:
            p.error(f'--budgets: {e}')
    return out


def budget_flags(b):
    return [] if b is None else [f for part in b.split('+') for f in ('--budget', part)]


def run_key(b, seed):
    """The run folders' suffix: the seed, or budget and seed (search-params1M-0)."""
    return str(seed) if b is None else b.replace('=', '').replace('+', '_') + f'-{seed}'


def _checked(parse, flags, script):
    """parse(flags), with a bad flag reported in one line naming the script it is for."""
    import contextlib
    import io
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parse(flags)
    except SystemExit:
        message = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else 'bad flags'
        print(f'protocol.py: {script} flags: {message.split("error: ", 1)[-1]}', file=sys.stderr)
        raise SystemExit(2)


def _data_flag_names():
    import datasets
    return tuple(datasets._DEFAULTS)


def _changed_flags(args, names, defaults):
    """The command-line form of the flags in names whose value differs from the default."""
    out = []
    for name in names:
        value = getattr(args, name)
        if value == getattr(defaults, name):
            continue
        out += [f'--{name}'] if value is True else [f'--{name}', str(value)]
    return out


def finished(run_dir):
    """A search or retrain writes result.json when it is done (or stopped early)."""
    return os.path.isfile(os.path.join(run_dir, 'result.json'))


class Terminated(Exception):
    """SIGTERM reached the protocol (raised by its handler, in main)."""


def _terminated(signum, frame):
    raise Terminated


def run_step(what, script, flags, run_dir):
    """Run (or resume, or skip when done) one search or retrain; its output goes to ours.  Stopped
    (Ctrl-C or SIGTERM), the child is stopped too, and only the protocol says so (utils.QUIET_STOP)."""
    if finished(run_dir):
        print(f'protocol: {what}: done already ({run_dir})', flush=True)
        return
    resume = os.path.isfile(os.path.join(run_dir, 'args.json'))
    cmd = [sys.executable, os.path.join(HERE, script)] + (['--resume', run_dir] if resume else flags)
    print(f'protocol: {what}: {"resuming " + run_dir if resume else " ".join(shlex.quote(c) for c in cmd[1:])}',
          flush=True)
    child = subprocess.Popen(cmd, env=dict(os.environ, **{utils.QUIET_STOP: '1'}))
    try:
        rc = child.wait()
    except BaseException:   # Ctrl-C (which the child has had too) or a SIGTERM that may be ours alone
        child.send_signal(signal.SIGTERM)   # the child stops at once, its last checkpoint whole
        child.wait()
        raise
    if rc in (130, -signal.SIGINT):
        raise KeyboardInterrupt
    if rc in (143, -signal.SIGTERM):
        raise Terminated
    if rc != 0 or not finished(run_dir):
        raise UserError(f'{what} failed (exit {rc}); see {os.path.join(run_dir, "log.txt")}; '
                        f're-run this command to continue')


def random_cell(out, args, i, writer):
    """OUT/random-I/genotype.json: cell i drawn from the search space with seed (random_seed, i)
    (written once; the other ranks wait for it)."""
    import numpy as np
    import genotypes
    path = os.path.join(out, f'random-{i}', 'genotype.json')
    if writer and not os.path.isfile(path):
        g = genotypes.random_genotype(np.random.default_rng([args.random_seed, i]), args.space_ops, args.space_nodes)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        genotypes.save(g, path, dict(primitives=args.space_ops, nodes=args.space_nodes, random=[args.random_seed, i]))
    deadline = time.time() + 600
    while not os.path.isfile(path):
        if time.time() > deadline:
            raise UserError(f'{path} did not appear: rank 0 of this protocol did not write it')
        time.sleep(0.2)
    return path


def retrain_random(out, args, i, writer):
    """Random cell i retrained exactly as the searched cells are (seed: the i-th of the seeds, cycling)."""
    seed = args.seed_list[i % len(args.seed_list)]
    retrain_dir = os.path.join(out, f'retrain-random-{i}')
    run_step(f'random cell {i + 1}/{args.random} retrain (seed {seed})', 'train.py',
             ['--genotype_file', random_cell(out, args, i, writer), '--seed', str(seed),
              *args.retrain_flag_list, '--save', retrain_dir], retrain_dir)


def compare_with_random(rows, random_rows):
    """The searched against the random cells: each group's mean, std and best, every searched cell's
    rank among the random ones, and a one-sided Mann-Whitney U test (scipy) with a one-line reading."""
    import numpy as np
    from scipy.stats import mannwhitneyu
    searched = [r['retrain_val_top1'] for r in rows]
    drawn = [r['retrain_val_top1'] for r in random_rows]
    for r in rows:   # how many random cells it beats (a tie counts a half)
        r['beats_random'] = sum(1.0 if r['retrain_val_top1'] > d else 0.5 if r['retrain_val_top1'] == d else 0.0
                                for d in drawn)
    test = mannwhitneyu(searched, drawn, alternative='greater')
    share = float(test.statistic) / (len(searched) * len(drawn))
    groups = {name: dict(mean=float(np.mean(v)), std=float(np.std(v)), best=float(np.max(v)), n=len(v))
              for name, v in (('searched', searched), ('random', drawn))}
    verdict = ('the searched cells retrain better than random ones' if test.pvalue < 0.05 else
               'no evidence that the searched cells retrain better than random ones')
    reading = (f"searched cells {100 * groups['searched']['mean']:.2f} ± {100 * groups['searched']['std']:.2f} % "
               f"against random {100 * groups['random']['mean']:.2f} ± {100 * groups['random']['std']:.2f} %; a "
               f"searched cell beats a random one in {100 * share:.0f} % of the {len(searched) * len(drawn)} pairs "
               f"(one-sided Mann-Whitney U p = {test.pvalue:.3f}, {len(searched)} vs {len(drawn)} cells): {verdict}")
    return dict(groups=groups, mann_whitney_p=float(test.pvalue), pairs_won=share, reading=reading)


def summarise(out, seeds, budgets=(None,), random_cells=0):
    """summary.json / .md / .png (with --budgets budget_sweep.png, with --random random.png) from the run folders."""
    import numpy as np
    import genotypes
    import guards
    rows = []
    for b in budgets:
        for s in seeds:
            key = run_key(b, s)
            search = utils.read_json(os.path.join(out, f'search-{key}', 'result.json'))
            retrain = utils.read_json(os.path.join(out, f'retrain-{key}', 'result.json'))
            g = genotypes.from_dict(search['genotype'], check_ops=False)
            counts = guards.cell_counts(g)
            rows.append(dict(seed=s, budget=b, target_costs=search.get('costs'),
                             search_val_top1=search['search_val_top1'], search_epochs=search['epoch'],
                             early_stop=search['early_stop'], retrain_val_top1=retrain['best_top1'],
                             retrain_best_epoch=retrain['best_epoch'], parameters=retrain['parameters'],
                             normal_skips=counts['normal_skips'], reduce_skips=counts['reduce_skips'],
                             genotype=search['genotype'], search_dir=os.path.join(out, f'search-{key}'),
                             retrain_dir=os.path.join(out, f'retrain-{key}')))
    seeds = [r['seed'] for r in rows]
    best = max(rows, key=lambda r: (r['retrain_val_top1'], -rows.index(r)))   # ties: the first run
    stats = {k: dict(mean=float(np.mean([r[k] for r in rows])), std=float(np.std([r[k] for r in rows])))
             for k in ('search_val_top1', 'retrain_val_top1', 'parameters', 'normal_skips')}
    summary = dict(seeds=seeds, best_seed=best['seed'], best_genotype_file=os.path.join(best['search_dir'],
                   'genotype.json'), runs=rows, stats=stats)
    random_rows = []
    for i in range(random_cells):
        retrain = utils.read_json(os.path.join(out, f'retrain-random-{i}', 'result.json'))
        g = genotypes.from_dict(retrain['genotype'], check_ops=False)
        random_rows.append(dict(cell=i, retrain_val_top1=retrain['best_top1'], parameters=retrain['parameters'],
                                normal_skips=guards.cell_counts(g)['normal_skips'], genotype=retrain['genotype'],
                                genotype_file=os.path.join(out, f'random-{i}', 'genotype.json'),
                                retrain_dir=os.path.join(out, f'retrain-random-{i}')))
    if random_rows:
        summary['random'] = dict(runs=random_rows, **compare_with_random(rows, random_rows))
    utils.write_json(os.path.join(out, 'summary.json'), summary)
    swept = budgets != (None,) and budgets != [None]
    lines = ['| seed | search-val top-1 | retrain val top-1 | params (M) | skips (normal / reduce) |',
             '|---|---|---|---|---|']
    if swept:
        lines = ['| budget | seed | target params | target madds | search-val top-1 | retrain val top-1 | '
                 'retrain params (M) | skips (normal / reduce) |', '|---|---|---|---|---|---|---|---|']
    for r in rows:
        mark = ' (best)' if r is best else ''
        budget_cells = ''
        if swept:
            c = r['target_costs'] or {}
            budget_cells = f"{r['budget']} | " + ''.join(
                f"{c[k] / 1e6:.3f}M | " if k in c else '- | ' for k in ('params', 'madds'))
        lines.append(f"| {budget_cells}{r['seed']}{mark} | {100 * r['search_val_top1']:.2f}% | "
                     f"{100 * r['retrain_val_top1']:.2f}% | "
                     f"{r['parameters'] / 1e6:.3f} | {r['normal_skips']} / {r['reduce_skips']} |")
    st = stats
    lines.append(f"| {'| ' * 3 if swept else ''}mean ± std | {100 * st['search_val_top1']['mean']:.2f} ± {100 * st['search_val_top1']['std']:.2f}% "
                 f"| {100 * st['retrain_val_top1']['mean']:.2f} ± {100 * st['retrain_val_top1']['std']:.2f}% "
                 f"| {st['parameters']['mean'] / 1e6:.3f} ± {st['parameters']['std'] / 1e6:.3f} "
                 f"| {st['normal_skips']['mean']:.2f} ± {st['normal_skips']['std']:.2f} (normal) |")
    lines += ['', f"Best: seed {best['seed']}; train it in full with "
              f"`python train.py --genotype_file {summary['best_genotype_file']}`"]
    if random_rows:
        lines += random_lines(rows, summary['random'])
    with open(os.path.join(out, 'summary.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    if random_rows:
        random_png(rows, random_rows, os.path.join(out, 'random.png'))
    from visualize import line_panels
    xs = list(range(1, len(rows) + 1))
    line_panels([('top-1 % per search (in seed order)',
                  [('search-val', xs, [100 * r['search_val_top1'] for r in rows]),
                   ('retrain val', xs, [100 * r['retrain_val_top1'] for r in rows])]),
                 ('skips in the normal cell', [('skips', xs, [r['normal_skips'] for r in rows])])],
                os.path.join(out, 'summary.png'), f'{len(rows)} searches, seeds {",".join(map(str, seeds))}; '
                f'best: seed {best["seed"]}', x_label='search')
    if swept:
        sweep_png(rows, os.path.join(out, 'budget_sweep.png'))
    return summary, lines


def random_lines(rows, comparison):
    """summary.md's part on the random cells: their table, each searched cell's rank, the reading."""
    g = comparison['groups']
    lines = ['', f"Random cells, retrained the same way ({g['random']['n']}):", '',
             '| random cell | retrain val top-1 | params (M) | skips (normal) |', '|---|---|---|---|']
    for r in comparison['runs']:
        lines.append(f"| {r['cell']} | {100 * r['retrain_val_top1']:.2f}% | {r['parameters'] / 1e6:.3f} | "
                     f"{r['normal_skips']} |")
    for name in ('searched', 'random'):
        lines.append(f"| {name}: mean ± std (best) | {100 * g[name]['mean']:.2f} ± {100 * g[name]['std']:.2f}% "
                     f"({100 * g[name]['best']:.2f}%) | | |")
    lines += ['', 'Each searched cell among the random ones: ' + '; '.join(
        f"seed {r['seed']}{' (' + r['budget'] + ')' if r.get('budget') else ''} beats {r['beats_random']:g} "
        f"of {g['random']['n']}" for r in rows), '', comparison['reading']]
    return lines


def random_png(rows, random_rows, path):
    """Retrain accuracy against parameters, searched and random cells: did the search just pick bigger cells?"""
    from visualize import line_panels
    series = []
    for label, group in (('searched', rows), ('random', random_rows)):
        pts = sorted((r['parameters'] / 1e3, 100 * r['retrain_val_top1']) for r in group)
        series.append((label, [x for x, _ in pts], [y for _, y in pts]))
    return line_panels([('retrain val top-1 % against K parameters', series)], path,
                       f'{len(rows)} searched against {len(random_rows)} random cells', x_label='K params',
                       lines=False)


def sweep_png(rows, path):
    """Retrain validation top-1 against the target network's parameters and multiply-adds."""
    from visualize import line_panels
    panels = []
    for kind, unit in (('params', 'M parameters'), ('madds', 'M multiply-adds')):
        pts = sorted((r['target_costs'][kind] / 1e6, 100 * r['retrain_val_top1']) for r in rows if r['target_costs'])
        panels.append((f'retrain val top-1 % against {unit}', [('cells', [x for x, _ in pts], [y for _, y in pts])]))
    return line_panels(panels, path, 'budget sweep: accuracy against the target network\'s cost', x_label='')


def open_folder(out, plan, writer):
    """The protocol folder, made (with protocol.json, the plan) or continued by the writer.  Under
    Paddle's launcher the other processes wait for protocol.json and check it is their plan: each
    runs its share of every search and retrain (its children inherit its rank), only rank 0 writes."""
    plan_path = os.path.join(out, 'protocol.json')
    if not writer:
        deadline = time.time() + 600
        while not os.path.isfile(plan_path):
            if time.time() > deadline:
                raise UserError(f'{plan_path} did not appear: rank 0 of this protocol did not start it')
            time.sleep(0.2)
    if os.path.isfile(plan_path):
        before = utils.read_json(plan_path)
        if before != plan:
            raise UserError(f'{out} was started with other settings ({json.dumps(before)}); run the same command '
                            f'to continue it, or pick another --save')
    elif os.path.exists(out) and os.listdir(out):
        raise UserError(f'{out} exists and is not a protocol folder; pick another --save')
    else:
        os.makedirs(out, exist_ok=True)
        utils.write_json(plan_path, plan)


def protocol(args):
    import distributed
    writer = distributed.RANK == 0
    out = args.save or os.path.join('runs', time.strftime('protocol-%Y%m%d-%H%M%S'))
    plan = dict(seeds=args.seed_list, search_flags=args.search_flags, retrain_flags=args.retrain_flag_list)
    if args.budgets:
        plan['budgets'] = args.budget_list
    if args.random:
        plan['random'] = dict(cells=args.random, seed=args.random_seed)
    open_folder(out, plan, writer)
    runs = [(b, s) for b in args.budget_list for s in args.seed_list]
    n = len(runs)

    def what(k, b, s):
        return f'{k}/{n} (seed {s}{"" if b is None else ", budget " + b})'
    for k, (b, s) in enumerate(runs, 1):
        search_dir = os.path.join(out, f'search-{run_key(b, s)}')
        try:
            run_step(f'search {what(k, b, s)}', 'train_search.py',
                     [*args.search_flags, *budget_flags(b), '--seed', str(s), '--save', search_dir], search_dir)
        finally:
            if writer and os.listdir(out) == ['protocol.json']:   # nothing started (bad data, say): leave nothing
                os.remove(os.path.join(out, 'protocol.json'))
                os.rmdir(out)
    for k, (b, s) in enumerate(runs, 1):
        key = run_key(b, s)
        retrain_dir = os.path.join(out, f'retrain-{key}')
        run_step(f'retrain {what(k, b, s)}', 'train.py',
                 ['--genotype_file', os.path.join(out, f'search-{key}', 'genotype.json'), '--seed', str(s),
                  *args.retrain_flag_list, '--save', retrain_dir], retrain_dir)
    for i in range(args.random):
        retrain_random(out, args, i, writer)
    if not writer:
        return None
    summary, lines = summarise(out, args.seed_list, args.budget_list, args.random)
    print('\n'.join(lines))
    print(f'protocol: done; {os.path.join(out, "summary.md")}, summary.json, summary.png'
          + (', budget_sweep.png' if args.budgets else '') + (', random.png' if args.random else ''))
    return summary


def main(argv=None):
    import distributed
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
