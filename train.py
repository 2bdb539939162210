"""Train a genotype from scratch and report its test accuracy: CIFAR-10, the embedded
digits, MNIST / Fashion-MNIST, or your own images (class folders or a CSV file).

    python train.py --arch DARTS_V2 --data ./data           # the paper's settings: C=36, 20 cells, 600 epochs
    python train.py --arch runs/demo/genotype.json --dataset digits --image_size 16 --epochs 5 --layers 6
    python train.py --arch runs/parts/genotype.json --dataset folder --data ./parts --epochs 50
    python train.py --eval_only runs/eval-X/best.npz
    python train.py --predict runs/eval-X/inference/model a.png b.jpg     # path, class name, probability
    python train.py --predict runs/eval-X/inference/model.onnx a.png      # the same, by ONNX Runtime

Writes RUN_DIR/{args.json, data.json, log.txt, checkpoint.npz, best.npz, history.jsonl,
confusion.json, result.json, inference/{model.json, model.pdiparams, model.onnx, preprocess.json}}.
With --val_fraction F the run trains on the rest of the training images and is evaluated on those F
(a validation split for choosing between cells, as protocol.py does); the test set is then left alone.
Nothing is chosen on the test split: without --val_fraction, best.npz is the last epoch and its test
top-1 the headline; with it, the best validation epoch.  --arch takes a name, a genotype JSON file or
the Genotype(...) text a search log prints.  A folder whose run stopped before its first checkpoint is
continued by --resume from the beginning, with its saved flags.
"""

from darts import process

process.prepare()   # first: Paddle's logging quiet, malloc tuned, before paddle is imported

from darts import cli, datasets, distributed, lifecycle, numeric, training
from darts.errors import UserError
from reader import ArrayBatches


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__, epilog=distributed.LAUNCH_HELP, config=True)
    training.add_arguments(p, drop_path_prob=0.2)
    datasets.add_arguments(p)
    cli.add_training_arguments(p, epochs=600, batch_size=96, learning_rate=0.025, weight_decay=3e-4,
                               init_channels=36, layers=20, learning_rate_min=0.0)
    p.add_argument('--cutout_length', type=int, default=None,
                   help='side of the cutout square (0: no cutout; default: half the image side, the paper\'s 16 '
                        'at 32 px)')
    p.add_argument('--val_fraction', type=float, default=0.0, metavar='F',
                   help='evaluate on a stratified hold-out of F of the training images instead of the test set, '
                        'and keep its best epoch (0: the test set, and the last epoch is kept: nothing is chosen '
                        'on it)')
    cli.add_run_arguments(p, 'eval', seed=0)
    args = p.parse_args(argv)
    cli.check_at_least(p, args, ('epochs', 'batch_size', 'init_channels', 'layers', 'report_freq'))
    if not 0 <= args.val_fraction < 1:
        p.error('--val_fraction must be at least 0 and below 1')
    return args


def cutout_length(args, image_size):
    """--cutout_length, or by default half the image side (DeVries & Taylor's 16 at CIFAR's 32 px)."""
    return image_size // 2 if args.cutout_length is None else args.cutout_length


def array_data(args, for_eval, say, shard=(0, 1)):
    """Batches from a data set held as arrays (datasets.load): random crop, flip, cutout; shard =
    (rank, ranks): that rank's share of every batch."""
    data = datasets.load(args, args.num_workers, say)
    train_x, train_y, eval_x, eval_y, eval_split = data.train_x, data.train_y, data.test_x, data.test_y, 'test'
    fraction = args.val_fraction
    if fraction > 0 and not for_eval:  # choose cells on held-out training images, never on the test set
        tr, va = datasets.holdout_split(data.train_y, fraction)
        train_x, train_y, eval_x, eval_y, eval_split = data.train_x[tr], data.train_y[tr], \
            data.train_x[va], data.train_y[va], 'validation'
    if not for_eval and args.batch_size > len(train_x):
        raise UserError(f'--batch_size {args.batch_size} is larger than the training set ({len(train_x)} images)')
    train = None if for_eval else ArrayBatches(
        train_x, train_y, args.batch_size, data.mean, data.std, shuffle=True, augment=True, seed=args.seed,
        num_workers=args.num_workers, drop_last=True, cutout=cutout_length(args, data.image_size), flip=data.flip,
        shard=shard)
    test = ArrayBatches(eval_x, eval_y, max(args.batch_size, 256), data.mean, data.std, shuffle=False,
                        augment=False, shard=shard)
    describe = data.describe() + (f'; evaluated on a {fraction:.0%} validation hold-out of the training images'
                                  if eval_split == 'validation' else '')
    return training.Split(train, test, dict(data.meta(), resize='short_side_crop', describe=describe,
                                            eval_split=eval_split))


TASK = training.Task(
    data=array_data, network=None, prefix='eval', parse=parse_args,
    lr_at=lambda args, epoch: numeric.cosine_lr(epoch, args.epochs, args.learning_rate, args.learning_rate_min))


def main(argv=None):
    return lifecycle.run_main(lambda args: training.fit(TASK, args), argv, parse_args)


if __name__ == '__main__':
    raise SystemExit(main())
