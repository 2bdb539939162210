"""DARTS architecture search (second order by default) on CIFAR-10, the embedded digits,
MNIST / Fashion-MNIST, or your own images (class folders or a CSV file).

    python train_search.py --data ./data                   # CIFAR-10, the paper's settings (C=16, 8 cells, 50 epochs)
    python train_search.py --config configs/demo.yaml      # the README's 1.5-minute demo on the embedded digits
    python train_search.py --dataset folder --data ./parts --image_size 64

The search uses the training data only (its two halves: search-train and search-val);
the test split is never seen.  Writes RUN_DIR/{args.json, data.json (class names),
log.txt, checkpoint.npz, genotype.json, history.jsonl, result.json and the pictures at the end}, and with --max_skip
genotype_raw.json, with --budget genotype_unbudgeted.json (genotype.json is then the cell made to
fit), with --early_stop early_stop.json once it stops.  A folder whose run
stopped before its first checkpoint is continued by --resume from the beginning.

Collapse: every epoch logs the derived cells' skip / parameter-free op counts and the
alphas' entropy; the guards --max_skip, --auxiliary_skip, --beta_decay, --early_stop and
the diagnostic --hessian_eigen_every are described in darts/search/guards.py and docs/collapse.md.
"""
import os
import shlex
import shutil
import time

from darts import process

process.prepare()   # first: Paddle's logging quiet, malloc tuned, before paddle is imported


import genotypes
import visualize
from architect import (SearchConfig, build_search_programs, count_ops, evaluate_batch, hessian_eigenvalue,
                       initial_state, run_search_step, schedule_values, scratch_state)
from darts import cli, datasets, distributed, lifecycle, loop, numeric, tensors
from darts.errors import SearchSpaceError, UserError
from darts.search import budget, guards
from model_search import SearchSpace, derive_genotype, edge_weights_numpy, normalized_betas_numpy
from operations import OPS, lookup
from reader import ArrayBatches, search_split

# --preset NAME: a published method's settings as defaults (flags given explicitly still win).
PRESETS = {
    # PC-DARTS (Xu et al., ICLR 2020), CIFAR-10: K=4 with edge normalisation, batch 256,
    # lr 0.1 cosine to 0, Adam arch lr 6e-4, first order, no architecture steps for 15 epochs.
    'pc_darts': dict(partial_channels=4, batch_size=256, learning_rate=0.1, learning_rate_min=0.0,
                     arch_learning_rate=6e-4, arch_warmup_epochs=15, first_order=True),
}


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__, epilog=distributed.LAUNCH_HELP, config=True)
    p.add_argument('--preset', choices=sorted(PRESETS), default=None,
                   help='a published setting as defaults; pc_darts: ' + ', '.join(
                       f'--{k} {v}' if v is not True else f'--{k}' for k, v in PRESETS['pc_darts'].items()))
    datasets.add_arguments(p)
    cli.add_training_arguments(p, epochs=50, batch_size=64, learning_rate=0.025, weight_decay=3e-4,
                               init_channels=16, layers=8, learning_rate_min=0.001)
    add_search_arguments(p)
    guards.add_arguments(p)
    budget.add_arguments(p)
    cli.add_run_arguments(p, 'search', seed=2)
    preset = p.parse_known_args(argv)[0].preset
    if preset:
        p.set_defaults(**PRESETS[preset])
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def add_search_arguments(p):
    """The flags of the architecture's optimizer and of the search space."""
    a = p.add_argument
    a('--arch_learning_rate', type=float, default=3e-4, help="Adam's learning rate for the alphas")
    a('--arch_learning_rate_schedule', choices=('constant', 'cosine'), default='constant',
      help='constant: the paper\'s; cosine: from --arch_learning_rate to 0 over the epochs with '
           'architecture steps, like the weights\' lr (not in the paper: lets a short search settle)')
    a('--arch_weight_decay', type=float, default=1e-3, help="the alphas' weight decay")
    a('--train_portion', type=float, default=0.5,
      help='the fraction of the training images in search-train; the rest is search-val')
    a('--first_order', action='store_true', help='first-order alpha gradient (DARTS V1)')
    a('--second_order', dest='first_order', action='store_false',
      help='second-order alpha gradient (the default; overrides a preset\'s --first_order)')
    a('--primitives', default=','.join(genotypes.PRIMITIVES), metavar='OP,OP,...',
      help=f'the candidate ops, comma-separated (default: the paper\'s eight); registered: {", ".join(OPS)}')
    a('--nodes', type=int, default=4, help='intermediate nodes per cell; the cell output concatenates them')
    a('--partial_channels', type=int, default=1, metavar='K',
      help='PC-DARTS: the mixed ops see 1/K of the channels, with edge normalisation (1: plain DARTS; paper: 4)')
    a('--no_edge_normalization', action='store_true',
      help='PC-DARTS without the per-node edge weights softmax(beta)')
    a('--arch_warmup_epochs', type=int, default=0,
      help='train the weights only (no alpha/beta steps) for the first N epochs (PC-DARTS: 15)')


def check_args(p, args):
    """The flags in range, each failure one line."""
    cli.check_at_least(p, args, ('epochs', 'batch_size', 'init_channels', 'report_freq', 'nodes',
                                 'partial_channels', 'target_channels', 'target_layers', 'target_image_size'))
    cli.check_at_least(p, args, ('arch_warmup_epochs',), 0)
    if args.layers < 2:
        p.error('--layers must be at least 2: the search learns a normal and a reduction cell')
    guards.check_arguments(p, args)
    if not 0 < args.train_portion < 1:
        p.error('--train_portion must be between 0 and 1')
    if not args.budget_weight >= 0:
        p.error('--budget_weight must be at least 0')


def search(args):
    """Set up, then epoch after epoch (an alpha and a weight step per batch, then the end of the
    epoch: evaluate, derive, guards, persist) until the last or an early stop, then the result."""
    return Search(args).run()


class Search(loop.RunLoop):
    """One search run (the lifecycle: darts.loop.RunLoop)."""

    kind = prefix = 'search'
    resumable = loop.RESUMABLE + ('continue_stopped',)
    loss_label = 'train loss'
    parse = staticmethod(parse_args)

    # ------------------------------------------------------------- set-up

    def check_input(self):
        self.space = search_space(self.args)
        self.budgets = budget.parse(self.args.budget)

    def load_data(self, say):
        args = self.args
        self.data = data = datasets.load(args, args.num_workers, say)
        self.search_train, self.search_val = search_split(len(data.train_x), args.train_portion, seed=args.seed)
        if args.batch_size > min(len(self.search_train), len(self.search_val)):
            raise UserError(f'--batch_size {args.batch_size} is larger than the search split '
                            f'({len(self.search_train)} train / {len(self.search_val)} val images)')
        self.penalty = self.target = None
        if self.budgets:
            self.target = budget.Target.default(args.target_image_size or data.image_size, data.channels,
                                                data.num_classes, args.target_network, args.target_channels,
                                                args.target_layers)
            self.penalty = budget.penalty_for(self.target, self.space, self.budgets, args.budget_weight)
        self.batches = search_batches(args, data, self.world, self.search_train, self.search_val)
        self.eigen_batch = None

    def build_programs(self):
        args = self.args
        self.cfg = SearchConfig(
            init_channels=args.init_channels, layers=args.layers, num_classes=self.data.num_classes,
            image_size=self.data.image_size, in_channels=self.data.channels, momentum=args.momentum,
            weight_decay=args.weight_decay, grad_clip=args.grad_clip, arch_learning_rate=args.arch_learning_rate,
            arch_weight_decay=args.arch_weight_decay, second_order=not args.first_order, space=self.space,
            beta_decay=bool(args.beta_decay), hessian_eigen=args.hessian_eigen_every > 0, world_size=self.world.size,
            budget=self.penalty, arch_lr_annealed=args.arch_learning_rate_schedule != 'constant')
        if self.world.writer:
            print('building the search programs (once per run; this takes a while)', flush=True)
        try:
            self.progs = build_search_programs(self.cfg)
        except SearchSpaceError as e:
            raise UserError(str(e)) from None

    def data_info(self):
        return dict(self.data.meta(), describe=self.data.describe())

    def describe(self, build_seconds):
        args, progs = self.args, self.progs
        lines = [f'data: {self.data.describe()}; search on {len(self.search_train)} / {len(self.search_val)} '
                 f'training images (search-train / search-val)',
                 f'run folder {self.run_folder.path}; {"first" if args.first_order else "second"}-order search, '
                 f'{numeric.describe_count(progs.layout.size)} weights; programs built in {build_seconds:.1f}s '
                 f'({sum(count_ops(p) for p in progs.programs.values())} ops)',
                 f'search space: {self.space.describe()}']
        if self.penalty:
            lines.append(f'budget: {budget.describe_budgets(self.penalty.budgets)} in the {self.target.describe()} '
                         f'(lambda {self.penalty.weight:g}); cheapest possible cell there: '
                         f'{budget.describe_costs(self.penalty.table.cheapest())}')
        return lines

    def initial_state(self):
        return initial_state(self.progs.layout, self.args.seed, self.cfg.arch_shapes)

    def restored(self, meta):
        run = self.run_folder
        if self.history:
            write_genotypes(run, self.history[-1], self.space, self.args)
        self.saved = self.history[-1] if self.history else None   # the last epoch on disk
        self.early_stop, self.stopped = guards.EarlyStop.resume(run, self.args.early_stop, self.args.continue_stopped)

    def steps_per_epoch(self):
        return min(len(self.batches['train']), len(self.batches['val']))

    def finished_before(self):
        if self.stopped is not None:
            run = self.run_folder
            run.log(f'this search stopped early at epoch {self.stopped["stopped_at"]} ({self.stopped["reason"]}); '
                    f'its genotype (epoch {self.stopped["chosen_epoch"]}) is in {run.file("genotype.json")}; '
                    f'search on with --resume {run.path} --continue_stopped')
        return self.stopped is not None

    def start_tensors(self):
        return {**self.state, **scratch_state(self.progs.layout, self.cfg.arch_shapes)}

    # ------------------------------------------------------------- an epoch

    def train_epoch(self, epoch):
        """One pass over the batches: an alpha step on search-val, then a weight step on search-train."""
        args = self.args
        lr = numeric.cosine_lr(epoch, args.epochs, args.learning_rate, args.learning_rate_min)
        update_arch = epoch >= args.arch_warmup_epochs
        schedule = self.schedule(epoch)
        tensors.set_tensors(self.scope, self.place, schedule_values(self.cfg, **schedule))  # fed, never rebuilt
        if not update_arch:
            self.run_folder.log(f'epoch {epoch + 1}: warm-up, weights only (architecture steps from epoch '
                                f'{args.arch_warmup_epochs + 1})')
        meter = self.epoch_meter(epoch, self.steps_per_epoch())
        for (tx, ty), (vx, vy) in zip(self.batches['train'].epoch(epoch), self.batches['val'].epoch(epoch)):
            loss, logits, _ = run_search_step(self.exe, self.progs, dict(train_x=tx, train_y=ty, val_x=vx, val_y=vy),
                                              lr, update_arch)
            meter.step(loss, logits, ty)
        return dict(lr=lr, stats=meter.close(), arch_updates=update_arch, **schedule)

    def schedule(self, epoch):
        """The epoch's scheduled coefficients: DARTS-'s skip weight, beta-DARTS' lambda, the budget
        penalty's weights, the annealed arch lr."""
        args = self.args
        schedule = dict(aux_skip=guards.auxiliary_skip_coefficient(epoch, args.epochs),
                        beta_decay=guards.beta_decay_weight(args.beta_decay or 0.0, epoch, args.epochs))
        if self.penalty:   # on while the cell derived now is over
            derived = derive_genotype(self.arch(), self.space)
            schedule['budget_weights'] = budget.epoch_weights(self.penalty, self.penalty.table.genotype_cost(derived))
        if self.cfg.arch_lr_annealed:
            schedule['arch_lr'] = arch_lr(args, epoch)
        return schedule

    def end_of_epoch(self, epoch, train):
        """Evaluate, derive, apply the guards, persist, log; True when the search stops here."""
        args, run, ops = self.args, self.run_folder, self.space.ops
        record, genotype, raw = self.epoch_record(epoch, train)
        self.history.append(record)
        stop = self.early_stop.check(self.history, ops) if self.early_stop else None
        if stop and stop['chosen_epoch'] < epoch + 1:
            # the checkpoint, history and genotype on disk are the chosen (previous) epoch's
            self.early_stop.save(run, stop, genotypes.to_dict(genotype))
            run.log(f'epoch {epoch + 1}: {guards.describe(record, len(ops))}')
            run.log(f'early stop (--early_stop {args.early_stop}): {stop["reason"]}; keeping epoch '
                    f'{stop["chosen_epoch"]}\'s checkpoint and genotype')
            return True
        self.persist(self.current_tensors(), seed=args.seed,
                     note='data order and augmentation are seeded by (seed, epoch, batch)')
        write_genotypes(run, record, self.space, args)
        self.saved = record
        write_events(self.events, record, self.space)
        changed = len(self.history) < 2 or not guards.same_cells(final_genotype(self.history[-2]),
                                                                 genotypes.to_dict(genotype))
        for line in epoch_lines(record, genotype, raw, args, len(ops), changed):
            run.log(line)
        if stop:
            self.early_stop.save(run, stop, None)
            run.log(f'early stop (--early_stop {args.early_stop}): {stop["reason"]}; keeping this epoch')
            return True
        return False

    def epoch_record(self, epoch, train):
        """(the epoch's history record, its genotype, the genotype before --max_skip): search-val
        accuracy, the derived cells, the collapse figures and guards, the softmaxed architecture."""
        args, space, stats = self.args, self.space, train['stats']
        self.average_buffers(self.progs.layout.buffers)
        val_loss, val_acc, _, _ = loop.evaluate(lambda x, y: evaluate_batch(self.exe, self.progs, x, y),
                                                self.batches['val_eval'], self.data.num_classes, self.sum_over_ranks)
        arch = self.arch()
        raw = genotype = derive_genotype(arch, space)
        record = dict(epoch=epoch + 1, lr=train['lr'], train_loss=stats.loss, train_acc=stats.accuracy,
                      val_loss=val_loss, val_acc=val_acc, images_per_sec=stats.images_per_sec,
                      epoch_time=stats.elapsed(), arch_updates=train['arch_updates'],
                      genotype=genotypes.to_dict(genotype), **guards.diagnostics(arch, genotype))
        if args.auxiliary_skip:
            record['aux_skip'] = train['aux_skip']
        if args.beta_decay:
            record['beta_decay_weight'] = train['beta_decay']
        if 'arch_lr' in train:
            record['arch_lr'] = train['arch_lr']
        genotype = guarded_genotype(record, raw, arch, args, space, self.penalty, self.target,
                                    train.get('budget_weights'))
        if args.hessian_eigen_every and (epoch + 1) % args.hessian_eigen_every == 0:
            self.eigen_batch = self.eigen_batch or next(iter(self.batches['eigen'].epoch(0)))   # the same each time
            record.update(hessian_figures(self.exe, self.scope, self.place, self.progs, self.eigen_batch,
                                          args.hessian_eigen_step))
        for kind in ('normal', 'reduce'):  # softmax(alpha): rows = edges, columns = --primitives
            record['alpha_' + kind] = numeric.softmax(arch['alpha_' + kind]).round(6).tolist()
            if space.edge_normalization:
                record['beta_' + kind] = normalized_betas_numpy(arch['beta_' + kind], space.nodes).round(6).tolist()
        return record, genotype, raw

    def arch(self):
        """The architecture parameters now, as numpy arrays."""
        return tensors.get_tensors(self.scope, list(self.cfg.arch_shapes))

    # ------------------------------------------------------------- finish

    def result(self):
        run, saved = self.run_folder, self.saved
        if saved is not None:
            run.write_json('result.json', dict(
                epoch=saved['epoch'], epochs=self.args.epochs, search_val_top1=saved['val_acc'],
                genotype=final_genotype(saved), **({'costs': saved['budget']['cost']} if 'budget' in saved else {}),
                early_stop=os.path.isfile(run.file(guards.EarlyStop.FILE))))
            kept = self.history[:saved['epoch']]
            if 'moved_normal' in kept[-1]:
                run.log(guards.how_far(kept))
        run.log(f'done: genotype in {run.file("genotype.json")}')
        for line in next_steps(self.args, run.path, self.draw_pictures()):
            run.log(line)


def hessian_figures(exe, scope, place, progs, batch, step):
    """The dominant eigenvalue of the alpha Hessian of L_val on a search-val batch, and its seconds."""
    t0 = time.time()
    value = hessian_eigenvalue(exe, scope, place, progs, *batch, step=step)[0]
    return dict(hessian_eigenvalue=value, hessian_seconds=time.time() - t0)


def next_steps(args, run_dir, pictures):
    """The last lines of a search: where its pictures are, and the command that trains its cell on
    the same data (train.py's network and epochs are the paper's unless given)."""
    look = (f'look at the cells and the search: {", ".join(os.path.relpath(p) for p in pictures)}' if pictures
            else f'draw the cells and the search: python visualize.py --run {shlex.quote(run_dir)}')
    train = ['python', 'train.py', '--arch', os.path.join(run_dir, 'genotype.json'), *datasets.changed_flags(args),
             '--save', os.path.normpath(run_dir) + '-eval']
    return ['next:', f'  {look}', f'  train the cell found: {shlex.join(train)}',
            '    (the paper\'s network and schedule: C=36, 20 cells, 600 epochs; for a short first look add e.g. '
            '--epochs 10 --layers 6 --init_channels 8)']


def epoch_lines(record, genotype, raw, args, num_ops, changed=True):
    """The log lines of an epoch's end: its figures, the collapse figures, the budget, the cells (when
    they changed)."""
    lines = [f'epoch {record["epoch"]}/{args.epochs} lr {record["lr"]:.5f} train loss {record["train_loss"]:.4f} '
             f'top1 {100 * record["train_acc"]:.2f}% | search-val loss {record["val_loss"]:.4f} top1 '
             f'{100 * record["val_acc"]:.2f}% | {record["images_per_sec"]:.1f} img/s, epoch '
             f'{record["epoch_time"]:.1f}s', guards.describe(record, num_ops)]
    if 'budget' in record:
        lines.append(budget.epoch_line(record['budget']))
    if args.max_skip is not None and record['skips_removed']:
        lines.append(f'genotype (unlimited) = {raw}')
    return lines + [f'genotype = {genotype}' if changed else 'genotype unchanged']


def search_batches(args, data, world, search_train, search_val):
    """This rank's share of every batch: search-train and search-val (augmented), search-val for
    evaluation, and the Hessian's batches (unaugmented search-val, whole on every rank)."""
    def batches(indices, shard=(world.rank, world.size), **kw):
        return ArrayBatches(data.train_x[indices], data.train_y[indices], mean=data.mean, std=data.std,
                            shard=shard, **kw)
    augmented = dict(batch_size=args.batch_size, shuffle=True, augment=True, seed=args.seed,
                     num_workers=args.num_workers, drop_last=True, flip=data.flip)
    return dict(train=batches(search_train, stream=0, **augmented), val=batches(search_val, stream=1, **augmented),
                val_eval=batches(search_val, batch_size=max(args.batch_size, 256), shuffle=False, augment=False),
                eigen=batches(search_val, (0, 1), batch_size=args.batch_size, shuffle=False, augment=False))


def guarded_genotype(record, raw, arch, args, space, penalty=None, target=None, lambdas=None):
    """The derived genotype `raw` with --max_skip's limit, then fitted to the penalty's budgets in the
    target network (lambdas: the epoch's penalty weights); what each did goes into record."""
    genotype = raw
    if args.max_skip is not None:
        normal, zeroed = guards.limit_skips(edge_weights_numpy(arch, space, 'normal'), args.max_skip,
                                            space.nodes, space.ops)
        genotype = raw._replace(normal=normal)
        record.update(genotype_limited=genotypes.to_dict(genotype), skips_removed=len(zeroed))
    if penalty:
        weights = {t: edge_weights_numpy(arch, space, t) for t in ('normal', 'reduce')}
        genotype, entries = budget.fit_epoch(penalty, target, genotype, weights, arch, args.max_skip, lambdas)
        record.update(entries)
    return genotype


def write_events(events, record, space):
    """The epoch in TensorBoard: its numbers, the softmaxed alphas, the cells (when dot is there)."""
    if not events.enabled:
        return
    events.epoch(record)
    events.figure('alphas', visualize.alphas_figure(record, space.ops, space.nodes), record['epoch'])
    if shutil.which('dot'):
        genotype = genotypes.from_dict(final_genotype(record), check_ops=False)
        for cell in visualize.CELLS:
            events.image(f'cell/{cell}', visualize.cell_png_bytes(genotype, cell), record['epoch'])


def arch_lr(args, epoch):
    """The alphas' learning rate in epoch (from 0) under --arch_learning_rate_schedule cosine:
    arch_lr * (1 + cos(pi * k / K)) / 2 at the k-th of the K epochs with architecture steps."""
    k, n = epoch - args.arch_warmup_epochs, args.epochs - args.arch_warmup_epochs
    return numeric.cosine_lr(max(k, 0), max(n, 1), args.arch_learning_rate, 0.0)


def search_space(args):
    """The SearchSpace the flags describe; a bad op list or setting is one line."""
    ops = tuple(op.strip() for op in args.primitives.split(',') if op.strip())
    space = SearchSpace(ops=ops, nodes=args.nodes, partial_channels=args.partial_channels,
                        edge_normalization=args.partial_channels > 1 and not args.no_edge_normalization,
                        auxiliary_skip=args.auxiliary_skip)
    try:
        space.check(args.init_channels)
    except SearchSpaceError as e:
        raise UserError(str(e)) from None
    if args.max_skip is not None and guards.SKIP in ops and not any(
            op != guards.SKIP and not lookup(op).zero for op in ops):
        raise UserError(f'--max_skip needs an op other than {guards.SKIP} and none in --primitives')
    return space


def guard_settings(args):
    """The guards a search ran with (saved beside its genotype)."""
    return dict(max_skip=args.max_skip, auxiliary_skip=args.auxiliary_skip, beta_decay=args.beta_decay,
                early_stop=args.early_stop)


def write_genotypes(run, record, space, args):
    """genotype.json (and with --max_skip genotype_raw.json) of an epoch's history record."""
    if not run.writer:
        return
    saved_with = dict(space.to_dict(), guards=guard_settings(args))
    raw = genotypes.from_dict(record['genotype'], check_ops=False)
    if 'genotype_limited' in record:
        genotypes.save(raw, run.file('genotype_raw.json'), saved_with)
    costs = {}
    if 'budget' in record:
        b = record['budget']
        target = b['target']
        costs = dict(costs=dict(b['cost'], budgets=b['budgets'], fits=b['fits'], target=target))
        unbudgeted = genotypes.from_dict(record['genotype_unbudgeted'], check_ops=False)
        genotypes.save(unbudgeted, run.file('genotype_unbudgeted.json'), saved_with,
                       costs=dict(b['unbudgeted'], budgets=b['budgets'], target=target))
    final = genotypes.from_dict(final_genotype(record), check_ops=False)
    genotypes.save(final, run.file('genotype.json'), saved_with, **costs)


def final_genotype(record):
    """The genotype an epoch's record ends with: fitted to the budget, else --max_skip's, else derived."""
    return record.get('genotype_budgeted', record.get('genotype_limited', record['genotype']))


def main(argv=None):
    return lifecycle.run_main(search, argv, parse_args)


if __name__ == '__main__':
    raise SystemExit(main())
