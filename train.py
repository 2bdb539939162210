"""Train a genotype from scratch on CIFAR-10 (or the embedded digits) and report its test accuracy.

    python train.py --arch DARTS_PADDLE --data ./data           # paper settings: C=36, 20 cells, 600 epochs
    python train.py --genotype_file runs/demo/genotype.json --dataset digits --epochs 5 --layers 6 --init_channels 8
    python train.py --eval_only runs/eval-X/best.npz

Writes RUN_DIR/{args.json, log.txt, checkpoint.npz, best.npz, history.jsonl}.
"""
import argparse
import json
import os
import time

import numpy as np

import utils  # first: sets Paddle's environment flags before paddle is imported
import genotypes
from reader import CIFAR_MD5, CIFAR_URL, ArrayBatches, load_dataset
from architect import MOMENTUM, WEIGHTS
from utils import UserError

RESUMABLE_OVERRIDES = ('epochs', 'device', 'num_workers', 'report_freq', 'data')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a('--arch', default='DARTS_PADDLE', help=f'a named genotype: {", ".join(genotypes.NAMED)}')
    a('--genotype_file', default=None, help='a genotype JSON written by train_search.py (overrides --arch)')
    a('--dataset', default='cifar10', choices=['cifar10', 'digits'])
    a('--data', default='./data', help='folder with cifar-10-batches-py/ or cifar-10-python.tar.gz')
    a('--data_url', default=CIFAR_URL)
    a('--data_md5', default=CIFAR_MD5)
    a('--no_download', action='store_true')
    a('--epochs', type=int, default=600)
    a('--batch_size', type=int, default=96)
    a('--learning_rate', type=float, default=0.025)
    a('--learning_rate_min', type=float, default=0.0)
    a('--momentum', type=float, default=0.9)
    a('--weight_decay', type=float, default=3e-4)
    a('--grad_clip', type=float, default=5.0)
    a('--init_channels', type=int, default=36)
    a('--layers', type=int, default=20)
    a('--no_auxiliary', action='store_true', help='train without the auxiliary head')
    a('--auxiliary_weight', type=float, default=0.4)
    a('--cutout_length', type=int, default=16, help='0: no cutout')
    a('--drop_path_prob', type=float, default=0.2, help='reached linearly at the last epoch')
    a('--device', default='auto', choices=['auto', 'gpu', 'cpu'])
    a('--seed', type=int, default=0)
    a('--num_workers', type=int, default=min(2, os.cpu_count() or 1))
    a('--report_freq', type=int, default=50)
    a('--save', default=None, help='run folder (default runs/eval-DATE-TIME); must not exist')
    a('--resume', default=None, metavar='RUN_DIR')
    a('--eval_only', default=None, metavar='CHECKPOINT', help='evaluate a checkpoint (best.npz) on the test set')
    a('--predict', nargs='+', default=None, metavar=('MODEL', 'IMAGE'),
      help='classify image files with an exported model (RUN_DIR/inference/model)')
    args = p.parse_args(argv)
    for name in ('epochs', 'batch_size', 'init_channels', 'layers', 'report_freq'):
        if getattr(args, name) < 1:
            p.error(f'--{name} must be at least 1')
    return args


def load_genotype(args):
    return genotypes.load(args.genotype_file) if args.genotype_file else genotypes.by_name(args.arch)


def build_programs(genotype, args, image_size=32, num_classes=10, network=None, label_smoothing=0.0):
    """Startup-free train and test programs over flat weights, built once per run.

    train: loss = CE(logits) + aux_weight * CE(aux_logits); g = clip(grad_w loss);
           v = mu v + g + wd w;  w = w - lr v.   lr and drop_prob are fed.
    test:  logits with BN running statistics, no auxiliary head, no drop path.
    """
    import paddle
    import model
    from architect import clip_by_global_norm, sgd_momentum_step
    from operations import ParamSet, declare
    network = network or model.network_cifar
    auxiliary = not args.no_auxiliary
    kw = dict(genotype=genotype, c=args.init_channels, num_classes=num_classes, layers=args.layers)
    layout = model.layout_of(network, image_size, auxiliary=auxiliary, **kw)

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

    train = paddle.static.Program()
    with paddle.static.program_guard(train, paddle.static.Program()):
        x, y = data('x', [-1, 3, image_size, image_size]), data('y', [-1], 'int64')
        lr, drop_prob = data('lr', [1]), data('drop_prob', [1])
        w, v = declare(WEIGHTS, [p], trainable=True), declare(MOMENTUM, [p])
        logits, aux_logits = network(ParamSet(layout, w, 'update'), x, auxiliary=auxiliary, drop_prob=drop_prob, **kw)
        loss = train_loss(logits, y)
        total = loss + args.auxiliary_weight * train_loss(aux_logits, y) if auxiliary else loss
        g = clip_by_global_norm(paddle.static.gradients(total, [w])[0], args.grad_clip)
        w_new, v_new = sgd_momentum_step(w, g, v, lr, args.momentum, args.weight_decay)
        paddle.assign(v_new, output=v)
        paddle.assign(w_new, output=w)
    test = paddle.static.Program()
    with paddle.static.program_guard(test, paddle.static.Program()):
        tx, ty = data('x', [-1, 3, image_size, image_size]), data('y', [-1], 'int64')
        test_logits, _ = network(ParamSet(layout, declare(WEIGHTS, [p]), 'running'), tx, auxiliary=False, **kw)
        test_loss = paddle.nn.functional.cross_entropy(test_logits, ty)
        test_probs = paddle.nn.functional.softmax(test_logits, axis=-1)
    return dict(layout=layout, train=train, test=test, train_fetch=[loss, logits, total],
                test_fetch=[test_loss, test_logits], test_x=tx, test_probs=test_probs)


def initial_state(layout, seed):
    rng = np.random.default_rng(seed)
    return {WEIGHTS: layout.initial_weights(rng), MOMENTUM: np.zeros(layout.size, 'float32'),
            **layout.initial_buffers()}


def evaluate(exe, progs, batches):
    """(loss, top-1, top-5) over every test batch."""
    loss_sum, top1, top5, n = 0.0, 0.0, 0.0, 0
    for x, y in batches.epoch(0):
        loss, logits = exe.run(progs['test'], feed={'x': x, 'y': y}, fetch_list=progs['test_fetch'])
        loss_sum += float(loss) * len(y)
        top1 += utils.accuracy(logits, y, 1) * len(y)
        top5 += utils.accuracy(logits, y, 5) * len(y)
        n += len(y)
    return loss_sum / n, top1 / n, top5 / n


class Task:
    """What differs between CIFAR and ImageNet training; the loop below is shared.

    data(args, for_eval) -> (train_batches or None, test_batches, num_classes)
    lr_at(args, epoch) -> the learning rate of that epoch
    label_smoothing(args) -> eps of the training loss
    """

    def __init__(self, data, network, image_size, lr_at, label_smoothing=lambda args: 0.0, prefix='eval', parse=None,
                 preprocess=None):
        self.data, self.network, self.image_size, self.preprocess = data, network, image_size, preprocess
        self.lr_at, self.label_smoothing, self.prefix, self.parse = lr_at, label_smoothing, prefix, parse

    def programs(self, genotype, args, num_classes):
        return build_programs(genotype, args, self.image_size(args), num_classes, self.network,
                              self.label_smoothing(args))


def fit(task, args):
    """Train from scratch (or --resume), evaluating on the test set after every epoch."""
    if getattr(args, 'predict', None):
        if len(args.predict) < 2:
            raise UserError('--predict takes the model (RUN_DIR/inference/model) and at least one image')
        return predict(args.predict[0], args.predict[1:], args.device)
    import paddle
    if args.eval_only:
        return eval_only(task, args)
    if args.resume:
        resume = args.resume
        args = utils.saved_args(args, utils.load_run_args(resume), RESUMABLE_OVERRIDES, task.parse)
        args.resume = resume
    genotype = load_genotype(args)   # a bad name or file fails before anything is written
    run_dir = utils.prepare_run_dir(args.save, args.resume, task.prefix)
    log = utils.Log(run_dir)
    if not args.resume:
        utils.write_json(os.path.join(run_dir, 'args.json'), vars(args))
    train_batches, test_batches, num_classes = task.data(args, for_eval=False)
    place = utils.select_place(args.device)
    paddle.enable_static()
    t0 = time.time()
    progs = task.programs(genotype, args, num_classes)
    from model import count_parameters
    log(f'run folder {run_dir}; genotype {genotype}')
    log(f'{count_parameters(progs["layout"]) / 1e6:.3f}M parameters (auxiliary head excluded); '
        f'programs built in {time.time() - t0:.1f}s')

    state, history, start_epoch, best = initial_state(progs['layout'], args.seed), [], 0, 0.0
    ckpt = os.path.join(run_dir, 'checkpoint.npz')
    if args.resume:
        arrays, meta = utils.load_checkpoint(ckpt)
        if set(arrays) != set(state) or any(arrays[k].shape != state[k].shape for k in state):
            raise UserError(f'{ckpt} does not match this network')
        state, history, start_epoch, best = arrays, meta['history'], meta['epoch'] + 1, meta['best_top1']
        log(f'resumed from epoch {start_epoch} of {args.epochs}')

    scope, exe = paddle.static.Scope(), paddle.static.Executor(place)
    from architect import get_tensors, set_tensors
    with paddle.static.scope_guard(scope):
        set_tensors(scope, place, state)
        for epoch in range(start_epoch, args.epochs):
            lr = task.lr_at(args, epoch)
            drop_prob = args.drop_path_prob * epoch / args.epochs
            t_epoch, seen, loss_sum, correct = time.time(), 0, 0.0, 0
            feed_const = dict(lr=np.array([lr], 'float32'), drop_prob=np.array([drop_prob], 'float32'))
            for step, (x, y) in enumerate(train_batches.epoch(epoch)):
                loss, logits, _ = exe.run(progs['train'], feed=dict(feed_const, x=x, y=y),
                                          fetch_list=progs['train_fetch'])
                loss = float(loss)
                if not np.isfinite(loss):
                    raise UserError(f'training loss became {loss} at epoch {epoch + 1}; lower --learning_rate')
                seen += len(y)
                loss_sum += loss * len(y)
                correct += int((logits.argmax(1) == y).sum())
                if (step + 1) % args.report_freq == 0:
                    log(f'epoch {epoch + 1}/{args.epochs} step {step + 1}/{len(train_batches)} loss {loss_sum / seen:.4f} '
                        f'top1 {100 * correct / seen:.2f}% {seen / (time.time() - t_epoch):.1f} img/s')
            if not seen:
                raise UserError(f'epoch {epoch + 1} had no readable training images')
            train_time = time.time() - t_epoch
            test_loss, top1, top5 = evaluate(exe, progs, test_batches)
            record = dict(epoch=epoch + 1, lr=lr, drop_prob=drop_prob, train_loss=loss_sum / seen,
                          train_acc=correct / seen, val_loss=test_loss, val_acc=top1, val_top5=top5,
                          images_per_sec=seen / train_time, epoch_time=time.time() - t_epoch)
            history.append(record)
            arrays = get_tensors(scope, list(state))
            if top1 > best:
                best = top1
                utils.save_checkpoint(os.path.join(run_dir, 'best.npz'), arrays,
                                      dict(epoch=epoch, top1=top1, top5=top5, args=vars(args)))
            utils.save_checkpoint(ckpt, arrays, dict(epoch=epoch, history=history, best_top1=best, args=vars(args)))
            with open(os.path.join(run_dir, 'history.jsonl'), 'w') as f:
                f.writelines(json.dumps(r) + '\n' for r in history)
            log(f'epoch {epoch + 1}/{args.epochs} lr {lr:.5f} drop_path {drop_prob:.3f} train loss '
                f'{record["train_loss"]:.4f} top1 {100 * record["train_acc"]:.2f}% | test loss {test_loss:.4f} '
                f'top1 {100 * top1:.2f}% top5 {100 * top5:.2f}% (best {100 * best:.2f}%) | '
                f'{record["images_per_sec"]:.1f} img/s, {record["epoch_time"]:.1f}s')
        best_arrays, _ = utils.load_checkpoint(os.path.join(run_dir, 'best.npz'))
        set_tensors(scope, place, best_arrays)
        exported = export_inference(exe, progs, run_dir, task.preprocess(args))
    log(f'done: best test top-1 {100 * best:.2f}% (checkpoint {os.path.join(run_dir, "best.npz")}); '
        f'inference model {exported}; classify images with: python train.py --predict {exported} IMAGE...')


def export_inference(exe, progs, run_dir, preprocess):
    """The test network at the current weights as a Paddle inference model (image -> class
    probabilities), with the preprocessing it expects in preprocess.json beside it."""
    import paddle
    folder = os.path.join(run_dir, 'inference')
    os.makedirs(folder, exist_ok=True)
    prefix = os.path.join(folder, 'model')
    paddle.static.save_inference_model(prefix, [progs['test_x']], [progs['test_probs']], exe, program=progs['test'])
    utils.write_json(os.path.join(folder, 'preprocess.json'), preprocess)
    return prefix


def predict(prefix, images, device='auto'):
    """Classify image files with an exported model; prints `path<TAB>class<TAB>probability`."""
    import paddle
    from reader import load_image, normalize
    meta_path = os.path.join(os.path.dirname(prefix), 'preprocess.json')
    if not os.path.isfile(prefix + '.json') and not os.path.isfile(prefix + '.pdmodel'):
        raise UserError(f'--predict {prefix}: no exported model there (a finished run writes RUN_DIR/inference/model)')
    with open(meta_path) as f:
        meta = json.load(f)
    place = utils.select_place(device)
    paddle.enable_static()
    exe = paddle.static.Executor(place)
    program, feeds, fetches = paddle.static.load_inference_model(prefix, exe)
    mean, std = np.array(meta['mean'], 'float32'), np.array(meta['std'], 'float32')
    results = []
    for path in images:
        try:
            if meta['resize'] == 'center_crop':
                x = load_image(path, False, meta['image_size'], None)
            else:  # CIFAR-style: the whole image, resized to image_size x image_size
                from PIL import Image
                with Image.open(path) as im:
                    x = np.asarray(im.convert('RGB').resize((meta['image_size'],) * 2, Image.BILINEAR)).transpose(2, 0, 1)
        except Exception as e:  # noqa: BLE001
            raise UserError(f'cannot read image {path}: {type(e).__name__}: {e}') from None
        (probs,) = exe.run(program, feed={feeds[0]: normalize(x[None], mean, std)}, fetch_list=fetches)
        k = int(probs[0].argmax())
        results.append((path, k, float(probs[0, k])))
        print(f'{path}\t{k}\t{probs[0, k]:.4f}')
    return results


def eval_only(task, args):
    """Evaluate a checkpoint written by this script, with the network settings it was trained with."""
    import paddle
    if not os.path.isfile(args.eval_only):
        raise UserError(f'--eval_only {args.eval_only}: no such checkpoint')
    arrays, meta = utils.load_checkpoint(args.eval_only)
    saved = utils.saved_args(args, meta['args'], ('device', 'data', 'no_download', 'num_workers'), task.parse)
    genotype = load_genotype(saved)
    _, test_batches, num_classes = task.data(saved, for_eval=True)
    place = utils.select_place(saved.device)
    paddle.enable_static()
    progs = task.programs(genotype, saved, num_classes)
    scope, exe = paddle.static.Scope(), paddle.static.Executor(place)
    from architect import set_tensors
    with paddle.static.scope_guard(scope):
        set_tensors(scope, place, arrays)
        loss, top1, top5 = evaluate(exe, progs, test_batches)
    print(f'test loss {loss:.4f} top1 {100 * top1:.2f}% top5 {100 * top5:.2f}% '
          f'(checkpoint of epoch {meta["epoch"] + 1})')
    return top1, top5


def cifar_data(args, for_eval):
    train_x, train_y, test_x, test_y, mean, std = load_dataset(args.dataset, args.data, not args.no_download,
                                                               args.data_url, args.data_md5)
    if args.batch_size > len(train_x):
        raise UserError(f'--batch_size {args.batch_size} is larger than the training set ({len(train_x)} images)')
    train_batches = None if for_eval else ArrayBatches(
        train_x, train_y, args.batch_size, mean, std, shuffle=True, augment=True, seed=args.seed,
        num_workers=args.num_workers, drop_last=True, cutout=args.cutout_length)
    test_batches = ArrayBatches(test_x, test_y, max(args.batch_size, 256), mean, std, shuffle=False, augment=False)
    return train_batches, test_batches, 10


def cifar_preprocess(args):
    from reader import CIFAR_MEAN, CIFAR_STD
    if args.dataset == 'digits':
        *_, mean, std = load_dataset('digits', args.data)
    else:
        mean, std = CIFAR_MEAN, CIFAR_STD
    return dict(image_size=32, resize='whole', mean=[float(v) for v in mean], std=[float(v) for v in std])


CIFAR = Task(data=cifar_data, network=None, image_size=lambda args: 32,
             lr_at=lambda args, epoch: utils.cosine_lr(epoch, args.epochs, args.learning_rate, args.learning_rate_min),
             prefix='eval', parse=parse_args, preprocess=cifar_preprocess)


def main(argv=None):
    return utils.run_main(lambda args: fit(CIFAR, args), argv, parse_args)


if __name__ == '__main__':
    raise SystemExit(main())
