"""Training a genotype from scratch: the programs, the loop, export and prediction.

Shared by train.py (CIFAR-10, digits, MNIST, own images) and train_imagenet.py; each
script keeps only its flags, its defaults and how it makes its batches (a Task).
"""
import contextlib
import json
import os

import numpy as np
import paddle

import genotypes
import model
import visualize
from darts import datasets, files, kernels, loop, numeric, onnx_export, runfolder, tensors
from darts.distributed import mean_across_ranks, select_place
from darts.errors import UserError
from darts.optim import MOMENTUM, WEIGHTS, clip_by_global_norm, sgd_momentum_step
from operations import ParamSet, declare
from reader import load_image, normalize


def add_arguments(p, drop_path_prob):
    """The flags train.py and train_imagenet.py share beyond the run's: the genotype, the auxiliary head,
    drop path, and the other things the commands do (evaluate, export, classify)."""
    a = p.add_argument
    a('--arch', default='DARTS_V2', metavar='GENOTYPE',
      help=f'the cell to train: a name ({", ".join(genotypes.NAMED)}; DARTS_V2 is the cell of the paper\'s '
           f'CIFAR-10 figures), a genotype JSON file (RUN_DIR/genotype.json of a search), or the '
           f'Genotype(...) text a search log prints')
    a('--genotype_file', default=None, metavar='FILE', help='the same as --arch FILE (default: not given)')
    a('--no_auxiliary', action='store_true', help='train without the auxiliary head')
    a('--auxiliary_weight', type=float, default=0.4, help="the auxiliary head's share of the training loss")
    a('--drop_path_prob', type=float, default=drop_path_prob, help='reached linearly at the last epoch')
    a('--eval_only', default=None, metavar='CHECKPOINT', help='evaluate a checkpoint (best.npz) on the test set')
    a('--export_onnx', default=None, metavar='RUN_DIR',
      help="convert a finished run's inference model to RUN_DIR/inference/model.onnx, checked against Paddle "
           "on its test images (a finished run writes it already)")
    a('--predict', nargs='+', default=None, metavar=('MODEL', 'IMAGE'),
      help='classify image files with an exported model (RUN_DIR/inference/model, or model.onnx by ONNX Runtime)')


def load_genotype(args):
    """The genotype a run trains: the one its args.json records (--resume, --eval_only), else --arch
    (or --genotype_file): a name, a genotype JSON file or the Genotype(...) text (genotypes.resolve)."""
    recorded = vars(args).get('genotype')
    if recorded:
        return genotypes.from_dict(recorded)
    return genotypes.resolve(args.genotype_file or args.arch)


def record_genotype(args, genotype):
    """args as args.json records them: --arch is what was given (a --genotype_file's path too), and
    genotype the cell itself, so a resumed run trains the same cell whatever became of the file."""
    if args.genotype_file:
        args.arch = args.genotype_file
    args.genotype = genotypes.to_dict(genotype)


def searched_costs(args):
    """A line with the costs train_search.py --budget stored in the genotype file, or None."""
    spec = args.genotype_file or args.arch
    if not (spec.endswith('.json') and os.path.isfile(spec)):
        return None
    saved = files.read_json(spec).get('costs')
    if not isinstance(saved, dict) or 'params' not in saved:
        return None
    t = saved.get('target') or {}
    where = (f' in the {t.get("network")} network, C={t.get("channels")}, {t.get("layers")} cells, '
             f'{t.get("image_size")} px' if t else '')
    limits = ', '.join(f'{k} <= {v:,.0f}' for k, v in (saved.get('budgets') or {}).items())
    return (f'the search costed this genotype at {saved["params"]:,} parameters, {saved.get("madds", 0):,} '
            f'multiply-adds{where}' + (f' (budget {limits})' if limits else ''))


def build_programs(genotype, args, image_size=32, num_classes=10, network=None, label_smoothing=0.0,
                   in_channels=3):
    """Startup-free train and test programs over flat weights, built once per run.

    train: loss = CE(logits) + aux_weight * CE(aux_logits); g = clip(grad_w loss);
           v = mu v + g + wd w;  w = w - lr v.   lr, drop_prob and drop_noise are fed
           (model.DropPath; drop_sites rows of noise per step, model.drop_noise; none with
           --drop_path_prob 0).
    test:  logits with BN running statistics, no auxiliary head, no drop path.
    """
    network = network or model.network_cifar
    auxiliary = not args.no_auxiliary
    kw = dict(genotype=genotype, c=args.init_channels, num_classes=num_classes, layers=args.layers)
    sites = model.CountDropSites() if args.drop_path_prob else None
    layout = model.layout_of(network, image_size, in_channels, auxiliary=auxiliary, drop_prob=sites, **kw)

    def train_loss(logits, y):
        """mean_n [(1 - eps) * -log p(y_n) + eps * mean_k -log p(k)]  (label smoothing eps)."""
        if not label_smoothing:
            return paddle.nn.functional.cross_entropy(logits, y)
        logp = paddle.nn.functional.log_softmax(logits, axis=-1)
        nll = -paddle.take_along_axis(logp, paddle.unsqueeze(y, 1), axis=1)
        return paddle.mean((1 - label_smoothing) * paddle.squeeze(nll, 1) - label_smoothing * paddle.mean(logp, -1))
    p = layout.size

    def data(name, shape, dtype='float32'):
        return paddle.static.data(name, shape, dtype)

    def images():
        return data('x', [-1, in_channels, image_size, image_size]), data('y', [-1], 'int64')

    train = paddle.static.Program()
    with paddle.static.program_guard(train, paddle.static.Program()):
        x, y = images()
        lr = data('lr', [1])
        # no drop-path ops when its probability stays 0 (train_imagenet.py's default); the feeds are then unused
        drop = None
        if sites is not None:
            drop = model.DropPath(data('drop_prob', [1]), data('drop_noise', [max(sites.sites, 1), -1]))
        w, v = declare(WEIGHTS, [p], trainable=True), declare(MOMENTUM, [p])
        logits, aux_logits = network(ParamSet(layout, w, 'update'), x, auxiliary=auxiliary, drop_prob=drop, **kw)
        loss = train_loss(logits, y)
        total = loss + args.auxiliary_weight * train_loss(aux_logits, y) if auxiliary else loss
        # data-parallel: the mean of the ranks' gradients, one all-reduce, before the clip
        g = clip_by_global_norm(mean_across_ranks(paddle.static.gradients(total, [w]))[0], args.grad_clip)
        w_new, v_new = sgd_momentum_step(w, g, v, lr, args.momentum, args.weight_decay)
        paddle.assign(v_new, output=v)
        paddle.assign(w_new, output=w)
    test = paddle.static.Program()
    # Paddle's own kernels in the test program: it is the one exported, and an inference
    # model must load anywhere, without this project's compiled operators.
    with paddle.static.program_guard(test, paddle.static.Program()), kernels.paddle_kernels():
        tx, ty = images()
        test_logits, _ = network(ParamSet(layout, declare(WEIGHTS, [p]), 'running'), tx, auxiliary=False, **kw)
        test_loss = paddle.nn.functional.cross_entropy(test_logits, ty)
        test_probs = paddle.nn.functional.softmax(test_logits, axis=-1)
    return dict(layout=layout, train=train, test=test, train_fetch=[loss, logits, total],
                drop_sites=drop.sites if drop else 0, test_fetch=[test_loss, test_logits], test_x=tx,
                test_probs=test_probs)


def initial_state(layout, seed):
    rng = np.random.default_rng(seed)
    return {WEIGHTS: layout.initial_weights(rng), MOMENTUM: np.zeros(layout.size, 'float32'),
            **layout.initial_buffers()}


def evaluate(exe, progs, batches, num_classes, world=None):
    """(loss, top-1, top-5, confusion) of the test program over every batch (darts.loop.evaluate);
    world (distributed.World): the batches are this rank's shares, the sums added over the ranks."""
    def run_batch(x, y):
        return exe.run(progs['test'], feed={'x': x, 'y': y}, fetch_list=progs['test_fetch'])
    return loop.evaluate(run_batch, batches, num_classes, None if world is None else lambda v: world.sum(exe, v))


def confusion_report(confusion, classes, split='test'):
    """Lines of per-class accuracy (recall) and the confusion matrix (rows: true class) on `split`."""
    width = max(5, max(len(c) for c in classes))
    lines = [f'per-class accuracy on the {split} split:']
    for k, (name, row) in enumerate(zip(classes, confusion)):
        total = int(row.sum())
        acc = f'{100 * row[k] / total:6.2f}%' if total else '     - '
        lines.append(f'  {name:<{width}} {acc}  ({total} images)')
    if len(classes) <= 20:
        lines.append('confusion matrix (rows: true class, columns: predicted):')
        lines.append(' ' * (width + 2) + ' '.join(f'{k:>6}' for k in range(len(classes))))
        for k, (name, row) in enumerate(zip(classes, confusion)):
            lines.append(f'  {name:<{width}}' + ' '.join(f'{int(v):>6}' for v in row) + f'   [{k}]')
    return lines


class Split:
    """What a Task's data gives the loop: batches and what the network needs to know.

    info: classes (names), channels, image_size, and the preprocessing that --predict
    must repeat (resize mode, mean, std), as written to preprocess.json.
    """

    def __init__(self, train_batches, test_batches, info):
        self.train, self.test, self.info = train_batches, test_batches, info

    @property
    def num_classes(self):
        return len(self.info['classes'])


class Task:
    """What differs between the training scripts; the loop (fit) is shared.

    data(args, for_eval, say, shard) -> Split (train batches None when for_eval); say(line) reports
        progress; shard = (rank, ranks): the batches are that rank's shares (reader.ArrayBatches)
    network: model.network_cifar or model.network_imagenet
    lr_at(args, epoch) -> the learning rate of that epoch
    label_smoothing(args) -> eps of the training loss
    """

    def __init__(self, data, network, lr_at, label_smoothing=lambda args: 0.0, prefix='eval', parse=None,
                 script='train.py'):
        self.data, self.network, self.lr_at, self.label_smoothing = data, network, lr_at, label_smoothing
        self.prefix, self.parse, self.script = prefix, parse, script

    def programs(self, genotype, args, info):
        return build_programs(genotype, args, info['image_size'], len(info['classes']), self.network,
                              self.label_smoothing(args), info['channels'])


def fit(task, args):
    """Train from scratch (or --resume): set up, then epoch after epoch (the training steps, then
    the end of the epoch: evaluate, keep the best, persist), then the best checkpoint's confusion
    matrix, export and result.  --predict and --eval_only are the other two things it does."""
    if args.predict:
        if len(args.predict) < 2:
            raise UserError('--predict takes the model (RUN_DIR/inference/model) and at least one image')
        return predict(args.predict[0], args.predict[1:], args.device)
    if args.export_onnx:
        return convert_run(task, args)
    if args.eval_only:
        return eval_only(task, args)
    return Training(task, args).run()


class Training(loop.RunLoop):
    """One training run of a genotype from scratch (the lifecycle: darts.loop.RunLoop)."""

    kind = 'train'

    def __init__(self, task, args):
        self.task, self.prefix, self.parse = task, task.prefix, task.parse
        super().__init__(args)

    # ------------------------------------------------------------- set-up

    def check_input(self):
        self.genotype = load_genotype(self.args)
        record_genotype(self.args, self.genotype)

    def load_data(self, say):
        self.split = self.task.data(self.args, False, say, (self.world.rank, self.world.size))
        self.eval_split = self.split.info.get('eval_split', 'test')
        self.by_validation = self.eval_split == 'validation'   # best.npz: the best epoch, else the last

    def build_programs(self):
        self.progs = self.task.programs(self.genotype, self.args, self.split.info)
        self.parameters = model.count_parameters(self.progs['layout'])

    def data_info(self):
        return self.split.info

    def describe(self, build_seconds):
        searched = searched_costs(self.args)
        return [f'run folder {self.run_folder.path}; genotype {self.genotype}',
                f'data: {self.split.info["describe"]}',
                f'{numeric.describe_count(self.parameters)} parameters (auxiliary head excluded); '
                f'programs built in {build_seconds:.1f}s'] + ([searched] if searched else [])

    def initial_state(self):
        return initial_state(self.progs['layout'], self.args.seed)

    def restored(self, meta):
        self.best = meta.get('best_top1', 0.0)
        # the best epoch's tensors, kept in memory: every rank evaluates them at the end, when
        # reading best.npz back could race with the writer replacing it
        self.best_arrays = files.load_checkpoint(self.run_folder.file('best.npz')) if self.history else None

    def steps_per_epoch(self):
        return len(self.split.train)

    # ------------------------------------------------------------- an epoch

    def train_epoch(self, epoch):
        """One pass over the training batches, a weight step each; drop path's uniforms drawn on the host."""
        args, progs, world, batches = self.args, self.progs, self.world, self.split.train
        lr = self.task.lr_at(args, epoch)
        drop_prob = args.drop_path_prob * epoch / args.epochs
        feed_const = dict(lr=np.array([lr], 'float32'), drop_prob=np.array([drop_prob], 'float32'))
        meter = self.epoch_meter(epoch, len(batches))
        for step, (x, y) in enumerate(batches.epoch(epoch)):
            if batches.may_drop_images and world.size > 1 and world.sum(self.exe, [len(y) == 0]) > 0:
                continue   # a rank's share had no readable image: every rank skips the step
            # this rank's columns of the global batch's uniforms (fewer when images were unreadable)
            noise = model.drop_noise(args.seed, epoch, step, progs['drop_sites'], args.batch_size)
            noise = noise[:, world.shard(args.batch_size)][:, :len(y)]
            loss, logits, _ = self.exe.run(progs['train'], feed=dict(feed_const, x=x, y=y, drop_noise=noise),
                                           fetch_list=progs['train_fetch'])
            meter.step(float(loss), logits, y)
        stats = meter.close()
        if not stats.images:
            raise UserError(f'epoch {epoch + 1} had no readable training images')
        return dict(lr=lr, drop_prob=drop_prob, stats=stats)

    def end_of_epoch(self, epoch, train):
        """Evaluate, keep the best checkpoint, persist the epoch, log it."""
        args, run, stats = self.args, self.run_folder, train['stats']
        self.average_buffers(self.progs['layout'].buffers)
        test_loss, top1, top5, _ = evaluate(self.exe, self.progs, self.split.test, self.split.num_classes,
                                            self.world)
        record = dict(epoch=epoch + 1, lr=train['lr'], drop_prob=train['drop_prob'], train_loss=stats.loss,
                      train_acc=stats.accuracy, val_loss=test_loss, val_acc=top1, val_top5=top5,
                      images_per_sec=stats.images_per_sec, epoch_time=stats.elapsed())
        self.history.append(record)
        arrays = self.current_tensors()
        # best.npz is the checkpoint the run delivers: the best epoch on a validation hold-out, and
        # without one the last epoch, so that nothing is ever chosen on the test split
        if not self.by_validation or top1 > self.best or self.best_arrays is None:
            self.best = top1
            self.best_arrays = arrays, dict(epoch=epoch, top1=top1, top5=top5, args=vars(args))
            run.save_checkpoint(*self.best_arrays, 'best.npz')
        self.persist(arrays, best_top1=self.best, args=vars(args))
        self.events.epoch(record)
        best = f' (best {100 * self.best:.2f}%)' if self.by_validation else ''
        run.log(f'epoch {epoch + 1}/{args.epochs} lr {train["lr"]:.5f} drop_path {train["drop_prob"]:.3f} train loss '
                f'{stats.loss:.4f} top1 {100 * stats.accuracy:.2f}% | {self.eval_split} loss {test_loss:.4f} '
                f'top1 {100 * top1:.2f}% top5 {100 * top5:.2f}%{best} | '
                f'{stats.images_per_sec:.1f} img/s, {record["epoch_time"]:.1f}s')

    # ------------------------------------------------------------- finish

    def result(self):
        """The best checkpoint: its per-class accuracy and confusion matrix, the inference model, result.json."""
        run, split = self.run_folder, self.split
        best_arrays, best_meta = self.best_arrays
        tensors.set_tensors(self.scope, self.place, best_arrays)
        _, top1, _, confusion = evaluate(self.exe, self.progs, split.test, split.num_classes, self.world)
        for line in confusion_report(confusion, split.info['classes'], self.eval_split):
            run.log(line)
        confusion_record = dict(split=self.eval_split, epoch=best_meta['epoch'] + 1, classes=split.info['classes'],
                                matrix=confusion.tolist())
        run.write_json('confusion.json', confusion_record)
        if self.events.enabled:
            self.events.figure('confusion', visualize.confusion_figure(confusion_record), best_meta['epoch'] + 1)
        exported = export_inference(self.exe, self.progs, run.path, split.info) if run.writer else None
        if exported:
            run.log(export_onnx(exported, split.test))
        chosen = 'the best validation epoch' if self.by_validation else 'the last epoch'
        run.write_json('result.json', dict(
            top1=self.best, epoch=best_meta['epoch'] + 1, chosen=chosen, eval_split=self.eval_split,
            parameters=self.parameters, epochs=self.args.epochs, genotype=genotypes.to_dict(self.genotype)))
        pictures = self.draw_pictures()
        if pictures:
            run.log(f'pictures: {", ".join(os.path.relpath(p) for p in pictures)}')
        run.log(f'done: {self.eval_split} top-1 {100 * self.best:.2f}% at {chosen} ({best_meta["epoch"] + 1}; '
                f'checkpoint {run.file("best.npz")}); inference model {exported}; classify images with: '
                f'python {self.task.script} --predict {exported} IMAGE...')


def export_inference(exe, progs, run_dir, info):
    """The test network at the current weights as a Paddle inference model (image -> class
    probabilities), with the preprocessing and class names it expects in preprocess.json."""
    folder = os.path.join(run_dir, 'inference')
    os.makedirs(folder, exist_ok=True)
    prefix = os.path.join(folder, 'model')
    paddle.static.save_inference_model(prefix, [progs['test_x']], [progs['test_probs']], exe, program=progs['test'])
    files.write_json(os.path.join(folder, 'preprocess.json'), info)
    return prefix


def first_images(batches, n=32):
    """Up to n images of the first non-empty batch, as the network takes them."""
    with contextlib.closing(batches.epoch(0)) as epoch:
        for x, y in epoch:
            if len(y):
                return x[:n]
    raise UserError('the test split has no readable images')


def export_onnx(prefix, batches):
    """prefix.onnx, checked against the Paddle model on test images; the line to log (a failure
    is a warning: the Paddle model stays what the run delivers)."""
    try:
        x = first_images(batches)
        path, diff = onnx_export.export(prefix, x)
    except UserError as e:
        return f'warning: no ONNX model: {e}'
    return (f'ONNX model {path} (its probabilities equal Paddle Inference\'s to {diff:.1e} on {len(x)} test images; '
            f'python train.py --predict {path} IMAGE... runs it with ONNX Runtime)')


def convert_run(task, args):
    """--export_onnx RUN_DIR: the run's inference model as ONNX, checked on its test images."""
    run_dir = args.export_onnx
    prefix = os.path.join(run_dir, 'inference', 'model')
    if not os.path.isfile(prefix + '.json'):
        raise UserError(f'--export_onnx {run_dir}: no inference model there '
                        f'(a finished training run writes RUN_DIR/inference/model.json)')
    saved = files.read_json(os.path.join(run_dir, 'args.json'), f'--export_onnx {run_dir}')
    saved = runfolder.saved_args(args, saved, ('device', 'data', 'test_data', 'no_download', 'num_workers',
                                               'cache_dir'), task.parse)
    x = first_images(task.data(saved, True, print).test)
    path, diff = onnx_export.export(prefix, x)
    print(f'ONNX model {path}: its probabilities equal Paddle Inference\'s to {diff:.1e} on {len(x)} test images')
    return path


def _read_preprocess(prefix):
    path = os.path.join(os.path.dirname(prefix), 'preprocess.json')
    try:
        with open(path) as f:
            meta = json.load(f)
        missing = [key for key in ('image_size', 'mean', 'std') if key not in meta]
        if missing:
            raise KeyError(', '.join(missing))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f'--predict {prefix}: cannot read {path} ({type(e).__name__}: {e}); '
                        f'it is written beside the model by a finished train.py run') from None
    return meta


def load_for_predict(path, meta):
    """One image file as the network's uint8 CHW input, prepared as in training."""
    if meta.get('resize') == 'center_crop':    # ImageNet evaluation: resize to size * 256/224, crop
        return load_image(path, False, meta['image_size'], None)
    return datasets.decode_image(path, meta['image_size'], meta.get('channels', 3))


def predict(prefix, images, device='auto'):
    """Classify image files with an exported model (Paddle's RUN_DIR/inference/model, or
    model.onnx, run by ONNX Runtime); prints `path<TAB>class<TAB>probability`."""
    if prefix.endswith('.onnx'):
        if not os.path.isfile(prefix):
            raise UserError(f'--predict {prefix}: no such file (a finished run writes RUN_DIR/inference/model.onnx)')
        meta = _read_preprocess(prefix)
        sess = onnx_export.session(prefix)
        classify = lambda x: onnx_export.run(sess, x)  # noqa: E731
    else:
        if not os.path.isfile(prefix + '.json') and not os.path.isfile(prefix + '.pdmodel'):
            raise UserError(f'--predict {prefix}: no exported model there (a finished run writes '
                            f'RUN_DIR/inference/model)')
        meta = _read_preprocess(prefix)
        paddle.enable_static()
        exe = paddle.static.Executor(select_place(device))
        program, feeds, fetches = paddle.static.load_inference_model(prefix, exe)
        classify = lambda x: exe.run(program, feed={feeds[0]: x}, fetch_list=fetches)[0]  # noqa: E731
    mean, std = np.array(meta['mean'], 'float32'), np.array(meta['std'], 'float32')
    results = []
    for path in images:
        try:
            x = load_for_predict(path, meta)
        except Exception as e:  # noqa: BLE001 - any unreadable file: one line
            raise UserError(f'cannot read image {path}: {type(e).__name__}: {e}') from None
        probs = classify(normalize(x[None], mean, std))
        k = int(probs[0].argmax())
        classes = meta.get('classes')
        name = classes[k] if classes else str(k)
        results.append((path, name, float(probs[0, k])))
        print(f'{path}\t{name}\t{probs[0, k]:.4f}')
    return results


def eval_only(task, args):
    """Evaluate a checkpoint written by this script, with the network settings it was trained with."""
    if not os.path.isfile(args.eval_only):
        raise UserError(f'--eval_only {args.eval_only}: no such checkpoint')
    arrays, meta = files.load_checkpoint(args.eval_only)
    if 'args' not in meta:
        raise UserError(f'--eval_only {args.eval_only}: not a checkpoint of a training run '
                        f'(a search checkpoint? train its genotype first)')
    saved = runfolder.saved_args(args, meta['args'], ('device', 'data', 'test_data', 'no_download', 'num_workers',
                                                  'cache_dir'), task.parse)
    genotype = load_genotype(saved)
    split = task.data(saved, True, print)
    place = select_place(saved.device, not saved.no_custom_kernels)
    paddle.enable_static()
    progs = task.programs(genotype, saved, split.info)
    scope, exe = paddle.static.Scope(), paddle.static.Executor(place)
    with paddle.static.scope_guard(scope):
        tensors.set_tensors(scope, place, arrays)
        loss, top1, top5, confusion = evaluate(exe, progs, split.test, split.num_classes)
    print(f'test loss {loss:.4f} top1 {100 * top1:.2f}% top5 {100 * top5:.2f}% '
          f'(checkpoint of epoch {meta["epoch"] + 1})')
    return top1, top5
