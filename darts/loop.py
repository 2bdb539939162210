"""The one lifecycle of a run, shared by a search (train_search.Search) and a training
(darts.training.Training):

    set up     flags (new or --resume), input checks, processes, data, programs, run folder,
               the last checkpoint, TensorBoard
    epoch      train_epoch(epoch): the steps, with an EpochMeter
    end        end_of_epoch(epoch, train): evaluate, record, persist; True stops the run
    finish     result(): result.json and the last lines; then every rank waits for the writer

A subclass supplies what differs: check_input, load_data, build_programs, data_info, describe,
initial_state, steps_per_epoch, train_epoch, end_of_epoch, result (and optionally
start_tensors, restored, finished_before).
"""
import time

import numpy as np
import paddle

import visualize
from darts import distributed, events, kernels, lifecycle, progress, runfolder, tensors
from darts.errors import UserError

# Flags a resumed run may change; everything else is taken from the run's args.json.
RESUMABLE = ('epochs', 'device', 'no_custom_kernels', 'num_workers', 'report_freq', 'data', 'test_data',
             'cache_dir', 'no_tensorboard')


class RunLoop:
    kind = None          # 'search' or 'train': what a --resume RUN_DIR must hold
    prefix = None        # a new run's folder: runs/PREFIX-DATE-TIME
    resumable = RESUMABLE
    loss_label = 'loss'  # the progress lines' name for the training loss
    parse = None         # parse(argv) -> args: the command's parser (--resume compares with its defaults)

    def __init__(self, args):
        """Set up, in this order, so that bad input fails before anything is written."""
        self.args = args = runfolder.start(args, self.kind, self.resumable, self.parse)
        self.check_input()
        self.world = distributed.setup(args.device, not args.no_custom_kernels, on_stall=lifecycle.stop_now)
        self.world.check_batch(args.batch_size)
        self.place = self.world.place
        paddle.enable_static()
        self.load_data(print if self.world.writer else lifecycle.silent)
        t0 = time.time()
        self.build_programs()
        build_seconds = time.time() - t0
        self.scope, self.exe = paddle.static.Scope(), paddle.static.Executor(self.place)
        self.run_folder = run = runfolder.Run.open(args, self.prefix, self.world)
        run.write_json('data.json', self.data_info())
        for line in self.describe(build_seconds):
            run.log(line)
        run.log(f'convolution kernels: {kernels.status()}')
        run.log(f'processes: {self.world.describe()}')
        self.state, self.history, self.start_epoch, meta = run.restore(self.initial_state(), args.epochs, self.exe)
        self.restored(meta)
        self.events = events.Events(run.path, self.world.writer and not args.no_tensorboard, self.start_epoch,
                                    self.steps_per_epoch())

    def run(self):
        """Epoch after epoch, from the first one not done to the last or an early stop; then finish."""
        if self.finished_before():
            self.events.close()
            return self.run_folder.path
        with paddle.static.scope_guard(self.scope):
            tensors.set_tensors(self.scope, self.place, self.start_tensors())
            if self.start_epoch == 0:
                self.run_folder.log('the first step also prepares the programs (Paddle does this once, it takes a '
                                    'while)')
            for epoch in range(self.start_epoch, self.args.epochs):
                if self.end_of_epoch(epoch, self.train_epoch(epoch)):
                    break
            return self.finish()

    def finish(self):
        self.result()
        self.events.close()
        self.world.wait_for_writer(f'{self.kind} finished')   # no rank ends before result.json is there
        return self.run_folder.path

    # ------------------------------------------------------------- shared by the subclasses

    def epoch_meter(self, epoch, steps):
        """The running figures and progress lines of an epoch's `steps` training steps."""
        stats = progress.EpochStats(epoch, self.sum_over_ranks)
        lines = progress.Progress.epoch(
            self.run_folder.log, steps, f'epoch {epoch + 1}/{self.args.epochs}', self.args.report_freq,
            on_line=lambda n, rate: self.events.step(epoch, n - 1, loss=stats.loss, top1=stats.accuracy,
                                                     images_per_sec=rate))
        return progress.EpochMeter(stats, lines, self.loss_label)

    def sum_over_ranks(self, local):
        return self.world.sum(self.exe, local)

    def current_tensors(self):
        """Every persistable tensor of the run (those of its state), as numpy arrays."""
        return tensors.get_tensors(self.scope, list(self.state))

    def persist(self, arrays, **meta):
        """The epoch's checkpoint (arrays, the history so far, meta), then its history line."""
        self.run_folder.end_epoch(arrays, self.history, **meta)

    def draw_pictures(self):
        """The run's pictures into its folder (visualize.draw_run), unless --no_pictures; their paths.
        A picture that cannot be drawn is a warning: the run's results are already on disk."""
        if self.args.no_pictures or not self.run_folder.writer:
            return []
        try:
            return visualize.draw_run(self.run_folder.path)
        except (UserError, OSError, RuntimeError) as e:
            self.run_folder.log(f'warning: pictures not drawn ({e}); visualize.py --run {self.run_folder.path} '
                                f'tries again')
            return []

    def average_buffers(self, names):
        """The ranks' BN running statistics (each from its share of the batches) averaged: what is
        evaluated and saved is then the same on every rank."""
        self.world.average_tensors(self.exe, self.scope, list(names))

    # ------------------------------------------------------------- defaults a subclass may keep

    def start_tensors(self):
        return self.state

    def restored(self, meta):
        """What else the checkpoint's meta (empty for a new run) tells the subclass."""

    def finished_before(self):
        """True when a resumed run has nothing left to do (it then ends at once)."""
        return False


def evaluate(run_batch, batches, num_classes, reduce=None):
    """(loss, top-1, top-5, confusion) over every batch of `batches`; run_batch(x, y) ->
    (mean loss, logits).  confusion[i, j] counts the images of class i predicted as j.
    reduce(array) -> array: the sum over the ranks when the batches are this rank's shares."""
    loss_sum, top1, top5, n = 0.0, 0, 0, 0
    confusion = np.zeros((num_classes, num_classes), np.int64)
    for x, y in batches.epoch(0):
        if not len(y):   # a last batch smaller than the ranks leaves some of them nothing
            continue
        loss, logits = run_batch(x, y)
        loss_sum += float(loss) * len(y)
        ranked = np.argsort(-logits, axis=1)
        top1 += int((ranked[:, :1] == y[:, None]).any(axis=1).sum())
        top5 += int((ranked[:, :5] == y[:, None]).any(axis=1).sum())
        np.add.at(confusion, (y, ranked[:, 0]), 1)   # the top-1 guess, so the trace is the top-1 count
        n += len(y)
    if reduce is not None:
        totals = reduce(np.concatenate([[loss_sum, top1, top5, n], confusion.reshape(-1)]))
        (loss_sum, top1, top5, n), confusion = totals[:4], totals[4:].reshape(confusion.shape).astype(np.int64)
    if not n:
        raise UserError('the evaluation split has no readable images')
    return loss_sum / n, top1 / n, top5 / n, confusion
