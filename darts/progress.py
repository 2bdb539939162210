"""An epoch's running figures and its progress bar or lines."""
import sys
import time

import numpy as np

from darts.errors import UserError


class EpochStats:
    """The running figures of an epoch's training steps: images, mean loss, top-1, images/s.

    reduce(array) -> array: the sum over the ranks of a data-parallel job (identity in one
    process), so every rank holds the whole job's figures and decides alike."""

    def __init__(self, epoch, reduce=lambda local: local):
        self.epoch, self.reduce = epoch, reduce
        self.steps, self.images, self.loss_sum, self.correct = 0, 0, 0.0, 0
        self.started, self.train_seconds = time.time(), None

    def add(self, loss, logits, labels):
        """One step's mean loss and logits (of this rank's share); returns the step's images (of
        every rank).  A non-finite loss is one line (the last checkpoint is kept)."""
        n = len(labels)
        loss_sum, correct, images = self.reduce(np.array([float(loss) * n, (logits.argmax(1) == labels).sum(), n]))
        if not np.isfinite(loss_sum):
            raise UserError(f'training loss became {loss_sum / images} at epoch {self.epoch + 1} step '
                            f'{self.steps + 1}; lower --learning_rate (the last checkpoint is kept)')
        self.steps += 1
        self.images += int(images)
        self.loss_sum += float(loss_sum)
        self.correct += int(correct)
        return int(images)

    def close(self):
        """The training part of the epoch is over (what follows, evaluation, is not in images/s)."""
        self.train_seconds = time.time() - self.started

    @property
    def loss(self):
        return self.loss_sum / self.images

    @property
    def accuracy(self):
        return self.correct / self.images

    @property
    def images_per_sec(self):
        return self.images / self.train_seconds

    def elapsed(self):
        return time.time() - self.started


class Progress:
    """Progress within an epoch.

    On a terminal: a tqdm bar (steps, images/s, ETA) on stdout, and the periodic lines
    go to log.txt only.  Otherwise (a pipe, a file, a batch job) the lines are printed
    too.  A line is written every `every` steps, at least every `seconds` seconds, and
    at the last step.
    """

    def __init__(self, log, total, prefix, every, seconds=30.0, on_line=None):
        self.log, self.total, self.prefix, self.every, self.seconds = log, total, prefix, every, seconds
        self.on_line = on_line   # on_line(steps, images/s) with every line (TensorBoard's step curves)
        self.steps, self.images, self.t0 = 0, 0, time.time()
        self.last_line = self.t0
        self.bar = None
        if sys.stdout.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=prefix, unit='step', leave=False, dynamic_ncols=True, file=sys.stdout)

    def update(self, images, message):
        """One step of `images` images done; message() gives the text of a line."""
        self.steps += 1
        self.images += images
        now = time.time()
        rate = self.images / max(now - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix_str(f'{rate:.1f} img/s', refresh=False)
            self.bar.update(1)
        if self.steps % self.every == 0 or self.steps == self.total or now - self.last_line >= self.seconds:
            self.last_line = now
            self.log(f'{self.prefix} step {self.steps}/{self.total} {message()} {rate:.1f} img/s',
                     file_only=self.bar is not None)
            if self.on_line is not None:
                self.on_line(self.steps, rate)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
