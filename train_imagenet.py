"""Train a genotype from scratch on ImageNet (mobile setting) and report top-1/top-5.

    python train_imagenet.py --arch DARTS_V2 --data /data/imagenet
    python train_imagenet.py --config configs/train-imagenet.yaml --data /data/imagenet

--data holds train/<class>/<images> and val/<class>/<images>, or train_list.txt and
val_list.txt with lines `relative/path label`.  Images are decoded and augmented by
--num_workers processes; an unreadable image is reported and skipped.
Paper settings: C=48, 14 cells, auxiliary 0.4, label smoothing 0.1, 250 epochs,
batch 128, lr 0.1 decayed by 0.97 per epoch, momentum 0.9, wd 3e-5, clip 5.
"""
import os

from darts import process

process.prepare()   # first: Paddle's logging quiet, malloc tuned, before paddle is imported

import model
from darts import cli, distributed, lifecycle, training
from darts.errors import UserError
from reader import IMAGENET_MEAN, IMAGENET_STD, FileBatches, scan_imagenet


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__, epilog=distributed.LAUNCH_HELP, config=True)
    training.add_arguments(p, drop_path_prob=0.0)
    p.add_argument('--data', default='./data/imagenet',
                   help='train/ and val/ class folders, or train_list.txt and val_list.txt')
    cli.add_training_arguments(p, epochs=250, batch_size=128, learning_rate=0.1, weight_decay=3e-5,
                               init_channels=48, layers=14)
    p.add_argument('--decay_rate', type=float, default=0.97, help='lr of epoch e = learning_rate * decay_rate ** e')
    p.add_argument('--label_smoothing', type=float, default=0.1, help='eps of the label-smoothed training loss')
    p.add_argument('--image_size', type=int, default=224, help='training crop; validation resizes to size*256/224 '
                                                               'first')
    cli.add_run_arguments(p, 'imagenet', seed=0, num_workers=4, report_freq=100)
    args = p.parse_args(argv)
    cli.check_at_least(p, args, ('epochs', 'batch_size', 'init_channels', 'layers', 'report_freq', 'image_size'))
    return args


def check_labels(root, train, val, classes, val_classes):
    """The validation samples with labels of the training classes (matched by name), after
    checking that list-file training labels are 0..K-1 with each used (K sets the network's
    outputs) and that every validation class is a training class.  Before anything trains."""
    used = {label for _, label in train}
    unused = [k for k in range(len(classes)) if k not in used]
    if unused:
        raise UserError(
            f'{os.path.join(root, "train_list.txt")}: labels must be 0..K-1 with every one used, but the largest is '
            f'{len(classes) - 1} and {len(unused)} below it have no image (first: {unused[0]}); renumber the labels')
    index = {name: k for k, name in enumerate(classes)}
    stray = sorted({val_classes[label] for _, label in val} - set(index))
    if stray:
        listed = os.path.isfile(os.path.join(root, 'val_list.txt'))
        where = os.path.join(root, 'val_list.txt' if listed else 'val')
        raise UserError(f'{where}: {"label" if listed else "class"} {stray[0]} is not in the training data'
                              + (f' ({len(stray)} such)' if len(stray) > 1 else ''))
    return [(path, index[val_classes[label]]) for path, label in val]


def imagenet_data(args, for_eval, say, shard=(0, 1)):
    val, val_classes = scan_imagenet(args.data, 'val')
    train_batches, classes = None, val_classes
    if not for_eval:
        train, classes = scan_imagenet(args.data, 'train')
        if args.batch_size > len(train):
            raise UserError(f'--batch_size {args.batch_size} is larger than the training set ({len(train)} images)')
        val = check_labels(args.data, train, val, classes, val_classes)
        train_batches = FileBatches(train, args.batch_size, True, args.image_size, args.seed, args.num_workers,
                                    drop_last=True, shard=shard)
    test_batches = FileBatches(val, min(args.batch_size, 256), False, args.image_size, num_workers=args.num_workers,
                               shard=shard)
    info = dict(dataset='imagenet', classes=classes, channels=3, image_size=args.image_size, resize='center_crop',
                mean=IMAGENET_MEAN.tolist(), std=IMAGENET_STD.tolist(),
                describe=f'{args.data}: {len(classes)} classes, {len(val)} val images'
                         + ('' if for_eval else f', {len(train_batches.paths)} train images'))
    return training.Split(train_batches, test_batches, info)


IMAGENET = training.Task(data=imagenet_data, network=model.network_imagenet,
                         lr_at=lambda args, epoch: args.learning_rate * args.decay_rate ** epoch,
                         label_smoothing=lambda args: args.label_smoothing, prefix='imagenet', parse=parse_args,
                         script='train_imagenet.py')


def main(argv=None):
    return lifecycle.run_main(lambda args: training.fit(IMAGENET, args), argv, parse_args)


if __name__ == '__main__':
    raise SystemExit(main())
