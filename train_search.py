"""DARTS architecture search (second order by default) on CIFAR-10, the embedded digits,
MNIST / Fashion-MNIST, or your own images (class folders or a CSV file).

    python train_search.py --data ./data                               # CIFAR-10, paper settings
    python train_search.py --dataset digits --epochs 5                 # small offline demo
    python train_search.py --dataset folder --data ./parts --image_size 64

The search uses the training data only (its two halves: search-train and search-val);
the test split is never seen.  Writes RUN_DIR/{args.json, data.json (class names),
log.txt, checkpoint.npz, genotype.json, history.jsonl, result.json at the end}, and with --max_skip
genotype_raw.json, with --budget genotype_unbudgeted.json (genotype.json is then the cell made to
fit), with --early_stop early_stop.json once it stops.  A folder whose run
stopped before its first checkpoint is continued by --resume from the beginning.

Collapse: every epoch logs the derived cells' skip / parameter-free op counts and the
alphas' entropy; the guards --max_skip, --auxiliary_skip, --beta_decay, --early_stop and
the diagnostic --hessian_eigen_every are described in darts/search/guards.py and docs/collapse.md.
"""
import argparse
import dataclasses
import os
import shutil
import time

from darts import process

process.prepare()   # first: Paddle's logging quiet, malloc tuned, before paddle is imported

import genotypes
from darts import cli, datasets, distributed, events, kernels, lifecycle, numeric, progress, runfolder, tensors
from darts.errors import SearchSpaceError, UserError
from darts.search import budget, guards
from reader import ArrayBatches, search_split
import visualize

# Flags a resumed run may change; everything else is taken from the run's args.json.
RESUMABLE_OVERRIDES = ('epochs', 'device', 'no_custom_kernels', 'num_workers', 'report_freq', 'data', 'test_data',
                       'cache_dir', 'continue_stopped', 'no_tensorboard')

# --preset NAME: a published method's settings as defaults (flags given explicitly still win).
PRESETS = {
    # PC-DARTS (Xu et al., ICLR 2020), CIFAR-10: K=4 with edge normalisation, batch 256,
    # lr 0.1 cosine to 0, Adam arch lr 6e-4, first order, no architecture steps for 15 epochs.
    'pc_darts': dict(partial_channels=4, batch_size=256, learning_rate=0.1, learning_rate_min=0.0,
                     arch_learning_rate=6e-4, arch_warmup_epochs=15, first_order=True),
}


def parse_args(argv=None):
    from operations import OPS
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                             epilog=distributed.LAUNCH_HELP)
    a = p.add_argument
    a('--preset', choices=sorted(PRESETS), default=None,
      help='a published setting as defaults; pc_darts: ' + ', '.join(
          f'--{k} {v}' if v is not True else f'--{k}' for k, v in PRESETS['pc_darts'].items()))
    datasets.add_arguments(p)
    a('--epochs', type=int, default=50)
    a('--batch_size', type=int, default=64, help='the global batch, whatever the number of processes')
    a('--init_channels', type=int, default=16)
    a('--layers', type=int, default=8)
    a('--learning_rate', type=float, default=0.025)
    a('--learning_rate_min', type=float, default=0.001)
    a('--momentum', type=float, default=0.9)
    a('--weight_decay', type=float, default=3e-4)
    a('--grad_clip', type=float, default=5.0)
    a('--arch_learning_rate', type=float, default=3e-4)
    a('--arch_learning_rate_schedule', choices=('constant', 'cosine'), default='constant',
      help='constant: the paper\'s; cosine: from --arch_learning_rate to 0 over the epochs with '
           'architecture steps, like the weights\' lr (not in the paper: lets a short search settle)')
    a('--arch_weight_decay', type=float, default=1e-3)
    a('--train_portion', type=float, default=0.5)
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
    g = p.add_argument_group('collapse guards and diagnostics (all off by default; see docs/collapse.md)')
    g.add_argument('--max_skip', type=int, default=None, metavar='N',
                   help='P-DARTS: the derived normal cell keeps at most N skip connections (paper: 2); '
                        'genotype.json is the limited cell, genotype_raw.json the unlimited one')
    g.add_argument('--auxiliary_skip', action='store_true',
                   help='DARTS-: an extra skip on every edge, outside the softmax, weighted 1 -> 0 over the epochs')
    g.add_argument('--beta_decay', type=float, default=None, metavar='LAMBDA',
                   help='beta-DARTS: add lambda_t * mean_e logsumexp(alpha_e) per cell to the alpha loss, '
                        'lambda_t = LAMBDA * epoch / epochs (paper: 50)')
    g.add_argument('--early_stop', default=None, metavar='RULE',
                   help='DARTS+: skip:N stops once the normal cell has N skips and keeps the epoch before; '
                        'stable:K stops once the ranking of the parametric ops has not changed for K epochs')
    g.add_argument('--continue_stopped', action='store_true',
                   help='with --resume: go on searching after an early stop (the rule is then off)')
    g.add_argument('--hessian_eigen_step', type=float, default=1e-2, metavar='E',
                   help='the finite-difference step of --hessian_eigen_every (the curvature at this scale)')
    g.add_argument('--hessian_eigen_every', type=int, default=0, metavar='N',
                   help='RobustDARTS: every N epochs, the dominant eigenvalue of the Hessian of L_val w.r.t. '
                        'alpha (Lanczos on finite-difference Hessian-vector products: 40 passes on one search-val '
                        'batch; 0: never)')
    b = p.add_argument_group('search under a budget (budget.py; costs are the target network\'s, the one train.py '
                             'or train_imagenet.py will train)')
    b.add_argument('--budget', action='append', default=None, metavar='KIND=N',
                   help='params=3.3M and/or madds=600M (K, M, G suffixes; repeat for both): a penalty on the '
                        'expected cost in the alpha loss, and genotype.json the derived cell made to fit '
                        '(genotype_unbudgeted.json: the plain one)')
    b.add_argument('--budget_weight', type=float, default=1.0, metavar='LAMBDA',
                   help='lambda of the penalty lambda * max(0, E[cost] / budget - 1) per budget, on in the epochs '
                        'that start with the derived cell over that budget')
    b.add_argument('--target_network', choices=['auto', 'cifar', 'imagenet'], default='auto',
                   help='auto: the ImageNet network (train_imagenet.py) for 224 px and up, '
                        'else NetworkCIFAR (train.py)')
    b.add_argument('--target_channels', type=int, default=None, help='C of the target network (CIFAR 36, ImageNet 48)')
    b.add_argument('--target_layers', type=int, default=None, help='its cells (CIFAR 20, ImageNet 14)')
    b.add_argument('--target_image_size', type=int, default=None, help='its input size (default: the data\'s)')
    a('--device', default='auto', choices=['auto', 'gpu', 'cpu'], help='auto: the GPU when there is one')
    a('--no_custom_kernels', action='store_true',
      help="Paddle's own depthwise and 1x1 convolutions instead of the compiled ones (CPU; see darts/kernels/)")
    a('--seed', type=int, default=2)
    a('--num_workers', type=int, default=min(2, os.cpu_count() or 1),
      help='processes that decode images and make batches (0: none)')
    a('--report_freq', type=int, default=50, help='a progress line every N steps (and at least every 30 s)')
    a('--no_tensorboard', action='store_true', help='write no TensorBoard event files (RUN_DIR/tensorboard)')
    a('--save', default=None, help='run folder (default runs/search-DATE-TIME); must not exist')
    a('--resume', default=None, metavar='RUN_DIR',
      help='continue the run in RUN_DIR from its last checkpoint (from the start if it has none yet)')
    preset = p.parse_known_args(argv)[0].preset
    if preset:
        p.set_defaults(**PRESETS[preset])
    args = p.parse_args(argv)
    for name in ('epochs', 'batch_size', 'init_channels', 'report_freq', 'nodes', 'partial_channels'):
        if getattr(args, name) < 1:
            p.error(f'--{name} must be at least 1')
    if args.layers < 2:
        p.error('--layers must be at least 2: the search learns a normal and a reduction cell')
    if args.arch_warmup_epochs < 0:
        p.error('--arch_warmup_epochs must be at least 0')
    for name in ('max_skip', 'beta_decay', 'hessian_eigen_every'):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            p.error(f'--{name} must be at least 0')
    if not args.hessian_eigen_step > 0:
        p.error('--hessian_eigen_step must be above 0')
    if args.early_stop is not None:
        try:
            guards.EarlyStop(args.early_stop)
        except ValueError as e:
            p.error(str(e))
    if not 0 < args.train_portion < 1:
        p.error('--train_portion must be between 0 and 1')
    if not args.budget_weight >= 0:
        p.error('--budget_weight must be at least 0')
    for name in ('target_channels', 'target_layers', 'target_image_size'):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f'--{name} must be at least 1')
    return args


def search(args):
    """Set up, then epoch after epoch (an alpha and a weight step per batch, then the end of the
    epoch: evaluate, derive, guards, persist) until the last or an early stop, then the result."""
    return Search(args).run()


class Search:
    """One search run: what its epochs share (flags, data, programs, run folder, executor)."""

    def __init__(self, args):
        args = runfolder.start(args, 'search', RESUMABLE_OVERRIDES, parse_args)
        space = search_space(args)  # everything that can fail on bad input, before the folder is made
        budgets = budget.parse(args.budget)
        world = distributed.setup(args.device, not args.no_custom_kernels, on_stall=lifecycle.stop_now)
        world.check_batch(args.batch_size)
        data = datasets.load(args, args.num_workers, print if world.writer else lifecycle.silent)
        search_train, search_val = search_split(len(data.train_x), args.train_portion, seed=args.seed)
        if args.batch_size > min(len(search_train), len(search_val)):
            raise UserError(f'--batch_size {args.batch_size} is larger than the search split '
                            f'({len(search_train)} train / {len(search_val)} val images)')
        self.args, self.space, self.world, self.place = args, space, world, world.place
        self.penalty = self.budget_penalty(data, budgets) if budgets else None
        build_time = self.build_programs(data)
        from architect import count_ops
        run = self.run_folder = runfolder.Run.open(args, 'search', world)
        run.write_json('data.json', dict(data.meta(), describe=data.describe()))
        run.log(f'data: {data.describe()}; search on {len(search_train)} / {len(search_val)} training images '
                f'(search-train / search-val)')
        run.log(f'run folder {run.path}; {"first" if args.first_order else "second"}-order search, '
                f'{self.progs.layout.size / 1e6:.3f}M weights; programs built in {build_time:.1f}s '
                f'({sum(count_ops(p) for p in self.progs.programs.values())} ops)')
        run.log(f'search space: {space.describe()}')
        if self.penalty:
            run.log(f'budget: {describe_budgets(self.penalty.budgets)} in the {self.target.describe()} (lambda '
                    f'{self.penalty.weight:g}); cheapest possible cell there: '
                    f'{describe_costs(self.penalty.table.cheapest())}')
        run.log(f'convolution kernels: {kernels.status()}')
        run.log(f'processes: {world.describe()}')
        self.restore()
        self.make_batches(data, search_train, search_val)
        self.events = events.Events(run.path, world.writer and not args.no_tensorboard, self.start_epoch,
                                    min(len(self.train_batches), len(self.val_batches)))

    def build_programs(self, data):
        """cfg and the programs (the only place they are built); returns the seconds it took."""
        import paddle
        from architect import SearchConfig, build_search_programs
        args = self.args
        paddle.enable_static()
        self.cfg = SearchConfig(
            init_channels=args.init_channels, layers=args.layers, num_classes=data.num_classes,
            image_size=data.image_size, in_channels=data.channels, momentum=args.momentum,
            weight_decay=args.weight_decay, grad_clip=args.grad_clip, arch_learning_rate=args.arch_learning_rate,
            arch_weight_decay=args.arch_weight_decay, second_order=not args.first_order, space=self.space,
            beta_decay=bool(args.beta_decay), hessian_eigen=args.hessian_eigen_every > 0, world_size=self.world.size,
            budget=self.penalty, arch_lr_annealed=args.arch_learning_rate_schedule != 'constant')
        if self.world.writer:
            print('building the search programs (once per run; this takes a while)', flush=True)
        t0 = time.time()
        try:
            self.progs = build_search_programs(self.cfg)
        except SearchSpaceError as e:
            raise UserError(str(e)) from None
        self.scope, self.exe = paddle.static.Scope(), paddle.static.Executor(self.place)
        return time.time() - t0

    def budget_penalty(self, data, budgets):
        """The cost table of the target network and the penalty; a budget no cell can meet is one line."""
        import paddle
        args = self.args
        paddle.enable_static()
        self.target = budget.Target.default(args.target_image_size or data.image_size, data.channels,
                                            data.num_classes, args.target_network, args.target_channels,
                                            args.target_layers)
        try:   # cost_table checks the target first: a BudgetError is one line as it is
            table = budget.cost_table(self.target, self.space)
        except (ValueError, AssertionError, RuntimeError) as e:   # a target the networks cannot be built at
            raise UserError(f'--target_*: the {self.target.describe()} cannot be built: '
                            f'{str(e).splitlines()[0] if str(e) else type(e).__name__}') from None
        budget.check_feasible(table, budgets)
        return budget.Penalty(table, budgets, args.budget_weight)

    def restore(self):
        """The state to start from (the last checkpoint's, or the seed's), and the early-stop state."""
        from architect import initial_state
        args, run = self.args, self.run_folder
        self.state, self.history, self.start_epoch, _ = run.restore(
            initial_state(self.progs.layout, args.seed, self.cfg.arch_shapes), args.epochs, self.exe)
        if self.history:
            write_genotypes(run, self.history[-1], self.space, args)
        self.saved = self.history[-1] if self.history else None   # the last epoch on disk
        self.early_stop, self.stopped = guards.EarlyStop.resume(run, args.early_stop, args.continue_stopped)

    def make_batches(self, data, search_train, search_val):
        """This rank's share of every batch: search-train and search-val (augmented), search-val for
        evaluation, and the Hessian's batch (the first unaugmented search-val batch, whole on every rank)."""
        args, world = self.args, self.world

        def batches(indices, shard=(world.rank, world.size), **kw):
            return ArrayBatches(data.train_x[indices], data.train_y[indices], mean=data.mean, std=data.std,
                                shard=shard, **kw)
        augmented = dict(batch_size=args.batch_size, shuffle=True, augment=True, seed=args.seed,
                         num_workers=args.num_workers, drop_last=True, flip=data.flip)
        self.train_batches = batches(search_train, stream=0, **augmented)
        self.val_batches = batches(search_val, stream=1, **augmented)
        self.val_eval = batches(search_val, batch_size=max(args.batch_size, 256), shuffle=False, augment=False)
        self.eigen_batches = batches(search_val, (0, 1), batch_size=args.batch_size, shuffle=False, augment=False)
        self.eigen_batch = None

    def run(self):
        import paddle
        from architect import scratch_state
        run = self.run_folder
        if self.stopped is not None:
            run.log(f'this search stopped early at epoch {self.stopped["stopped_at"]} ({self.stopped["reason"]}); '
                    f'its genotype (epoch {self.stopped["chosen_epoch"]}) is in {run.file("genotype.json")}; '
                    f'search on with --resume {run.path} --continue_stopped')
            self.events.close()
            return run.path
        with paddle.static.scope_guard(self.scope):
            tensors.set_tensors(self.scope, self.place, {**self.state,
                                                       **scratch_state(self.progs.layout, self.cfg.arch_shapes)})
            if self.start_epoch == 0:
                run.log('the first step also prepares the programs (Paddle does this once, it takes a while)')
            for epoch in range(self.start_epoch, self.args.epochs):
                if self.end_of_epoch(epoch, self.train_epoch(epoch)):
                    break
        return self.finish()

    def train_epoch(self, epoch):
        """One pass over the batches: an alpha step on search-val, then a weight step on search-train."""
        from architect import run_search_step, schedule_values
        args, run = self.args, self.run_folder
        lr = numeric.cosine_lr(epoch, args.epochs, args.learning_rate, args.learning_rate_min)
        update_arch = epoch >= args.arch_warmup_epochs
        schedule = dict(aux_skip=guards.auxiliary_skip_coefficient(epoch, args.epochs),
                        beta_decay=guards.beta_decay_weight(args.beta_decay or 0.0, epoch, args.epochs))
        if self.penalty:
            schedule['budget_weights'] = self.budget_weights()
        if self.cfg.arch_lr_annealed:
            schedule['arch_lr'] = arch_lr(args, epoch)
        tensors.set_tensors(self.scope, self.place, schedule_values(self.cfg, **schedule))  # fed, never rebuilt
        if not update_arch:
            run.log(f'epoch {epoch + 1}: warm-up, weights only (architecture steps from epoch '
                    f'{args.arch_warmup_epochs + 1})')
        stats = progress.EpochStats(epoch, lambda local: self.world.sum(self.exe, local))
        steps = min(len(self.train_batches), len(self.val_batches))
        meter = progress.Progress.epoch(run.log, steps, f'epoch {epoch + 1}/{args.epochs}', args.report_freq,
                                  on_line=lambda n, rate: self.events.step(epoch, n - 1, loss=stats.loss,
                                                                           top1=stats.accuracy, images_per_sec=rate))
        for (tx, ty), (vx, vy) in zip(self.train_batches.epoch(epoch), self.val_batches.epoch(epoch)):
            loss, logits, _ = run_search_step(self.exe, self.progs, dict(train_x=tx, train_y=ty, val_x=vx, val_y=vy),
                                              lr, update_arch)
            images = stats.add(loss, logits, ty)
            meter.update(images, lambda: f'train loss {stats.loss:.4f} top1 {100 * stats.accuracy:.2f}%')
        meter.close()
        stats.close()
        return dict(lr=lr, stats=stats, arch_updates=update_arch, **schedule)

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
        self.persist(record)
        run.log(f'epoch {epoch + 1}/{args.epochs} lr {record["lr"]:.5f} train loss {record["train_loss"]:.4f} '
                f'top1 {100 * record["train_acc"]:.2f}% | search-val loss {record["val_loss"]:.4f} top1 '
                f'{100 * record["val_acc"]:.2f}% | {record["images_per_sec"]:.1f} img/s, epoch '
                f'{record["epoch_time"]:.1f}s')
        run.log(guards.describe(record, len(ops)))
        if 'budget' in record:
            run.log(budget_line(record['budget']))
        if args.max_skip is not None and record['skips_removed']:
            run.log(f'genotype (unlimited) = {raw}')
        run.log(f'genotype = {genotype}')
        if stop:
            self.early_stop.save(run, stop, None)
            run.log(f'early stop (--early_stop {args.early_stop}): {stop["reason"]}; keeping this epoch')
            return True
        return False

    def epoch_record(self, epoch, train):
        """(the epoch's history record, its genotype, the genotype before --max_skip): search-val
        accuracy, the derived cells, the collapse figures and guards, the softmaxed architecture."""
        from architect import hessian_eigenvalue
        from model_search import derive_genotype, edge_weights_numpy, normalized_betas_numpy
        args, space, stats = self.args, self.space, train['stats']
        # the ranks' BN running statistics (each from its share of the batches) averaged: what is
        # evaluated and saved is then the same on every rank
        self.world.average_tensors(self.exe, self.scope, list(self.progs.layout.buffers))
        val_loss, val_acc = self.evaluate()
        arch = tensors.get_tensors(self.scope, list(self.cfg.arch_shapes))
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
        if args.max_skip is not None:
            normal, zeroed = guards.limit_skips(edge_weights_numpy(arch, space, 'normal'), args.max_skip,
                                                space.nodes, space.ops)
            genotype = raw._replace(normal=normal)
            record.update(genotype_limited=genotypes.to_dict(genotype), skips_removed=len(zeroed))
        if self.penalty:
            genotype = self.fit_budget(record, genotype, arch, train['budget_weights'])
        if args.hessian_eigen_every and (epoch + 1) % args.hessian_eigen_every == 0:
            if self.eigen_batch is None:  # the same batch every time
                self.eigen_batch = next(iter(self.eigen_batches.epoch(0)))
            t_eig = time.time()
            record['hessian_eigenvalue'] = hessian_eigenvalue(self.exe, self.scope, self.place, self.progs,
                                                              *self.eigen_batch, step=args.hessian_eigen_step)[0]
            record['hessian_seconds'] = time.time() - t_eig
        for kind in ('normal', 'reduce'):  # softmax(alpha): rows = edges, columns = --primitives
            record['alpha_' + kind] = numeric.softmax(arch['alpha_' + kind]).round(6).tolist()
            if space.edge_normalization:
                record['beta_' + kind] = normalized_betas_numpy(arch['beta_' + kind], space.nodes).round(6).tolist()
        return record, genotype, raw

    def budget_weights(self):
        """The penalty's lambda per budget for the coming epoch: on while the cell derived now is over."""
        from model_search import derive_genotype
        arch = tensors.get_tensors(self.scope, list(self.cfg.arch_shapes))
        derived = derive_genotype(arch, self.space)
        return budget.epoch_weights(self.penalty, self.penalty.table.genotype_cost(derived))

    def fit_budget(self, record, genotype, arch, epoch_weights):
        """The derived cell made to fit the budgets (budget.fit); costs, and the epoch's penalty
        weights, into record['budget']."""
        from model_search import edge_weights_numpy
        table, budgets = self.penalty.table, self.penalty.budgets
        weights = {t: edge_weights_numpy(arch, self.space, t) for t in ('normal', 'reduce')}
        fitted, fits = budget.fit(genotype, weights, table, budgets, self.args.max_skip)
        changed = sum(a != b for a, b in zip(genotype.normal + genotype.reduce, fitted.normal + fitted.reduce))
        record['budget'] = dict(budgets=budgets, target=dataclasses.asdict(self.target),
                                expected=table.expected(arch), unbudgeted=table.genotype_cost(genotype),
                                cost=table.genotype_cost(fitted), fits=fits, pairs_replaced=int(changed),
                                penalty=budget.penalty_numpy(self.penalty, arch), weights=epoch_weights)
        record['genotype_unbudgeted'] = genotypes.to_dict(genotype)
        record['genotype_budgeted'] = genotypes.to_dict(fitted)
        return fitted

    def evaluate(self):
        """(loss, top-1) at the current weights and alphas over the whole search-val half (each
        rank its share of every batch, the sums added up)."""
        from architect import evaluate_batch
        loss_sum, correct, n = 0.0, 0, 0
        for x, y in self.val_eval.epoch(0):
            if len(y):   # a last batch smaller than the ranks leaves some of them nothing
                loss, logits = evaluate_batch(self.exe, self.progs, x, y)
                loss_sum += loss * len(y)
                correct += int((logits.argmax(1) == y).sum())
                n += len(y)
        loss_sum, correct, n = self.world.sum(self.exe, [loss_sum, correct, n])
        return loss_sum / n, correct / n

    def persist(self, record):
        """The epoch's checkpoint and history line, then its genotype files."""
        arrays = tensors.get_tensors(self.scope, list(self.state))
        self.run_folder.end_epoch(arrays, self.history, seed=self.args.seed,
                                  note='data order and augmentation are seeded by (seed, epoch, batch)')
        write_genotypes(self.run_folder, record, self.space, self.args)
        self.saved = record
        self.write_events(record)

    def write_events(self, record):
        """The epoch in TensorBoard: its numbers, the softmaxed alphas, the cells (when dot is there)."""
        if not self.events.enabled:
            return
        self.events.epoch(record)
        self.events.figure('alphas', visualize.alphas_figure(record, self.space.ops, self.space.nodes), record['epoch'])
        if shutil.which('dot'):
            genotype = genotypes.from_dict(final_genotype(record), check_ops=False)
            for cell in visualize.CELLS:
                self.events.image(f'cell/{cell}', visualize.cell_png_bytes(genotype, cell), record['epoch'])

    def finish(self):
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
        self.events.close()
        self.world.wait_for_writer('search finished')   # no rank ends before result.json is there
        return run.path


def arch_lr(args, epoch):
    """The alphas' learning rate in epoch (from 0) under --arch_learning_rate_schedule cosine:
    arch_lr * (1 + cos(pi * k / K)) / 2 at the k-th of the K epochs with architecture steps."""
    k, n = epoch - args.arch_warmup_epochs, args.epochs - args.arch_warmup_epochs
    return numeric.cosine_lr(max(k, 0), max(n, 1), args.arch_learning_rate, 0.0)


def search_space(args):
    """The SearchSpace the flags describe; a bad op list or setting is one line."""
    from model_search import SearchSpace
    from operations import lookup
    ops = tuple(op.strip() for op in args.primitives.split(',') if op.strip())
    space = SearchSpace(ops=ops, nodes=args.nodes, partial_channels=args.partial_channels,
                        edge_normalization=args.partial_channels > 1 and not args.no_edge_normalization,
                        auxiliary_skip=args.auxiliary_skip)
    try:
        space.check(args.init_channels)
    except SearchSpaceError as e:
        raise UserError(f'--primitives/--nodes/--partial_channels: {e}') from None
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


def describe_costs(costs):
    return ', '.join(f'{budget.human(costs[k])} {k}' for k in budget.KINDS if k in costs)


def describe_budgets(budgets):
    return ', '.join(f'{k} <= {budget.human(v)}' for k, v in budgets.items())


def budget_line(b):
    """The epoch's budget figures, one log line."""
    text = (f'budget ({describe_budgets(b["budgets"])}): derived cell {describe_costs(b["unbudgeted"])}; '
            f'expected {describe_costs(b["expected"])}; penalty {b["penalty"]:.4f}, '
            f'{"on" if any(b.get("weights") or []) else "off"} this epoch')
    if b['pairs_replaced']:
        text += f'; fitted cell {describe_costs(b["cost"])} ({b["pairs_replaced"]} ops replaced)'
    if not b['fits']:
        text += '; no replacement of ops fits every budget at once'
    return text


def main(argv=None):
    return lifecycle.run_main(search, argv, parse_args)


if __name__ == '__main__':
    raise SystemExit(main())
