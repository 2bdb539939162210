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
    """Progress through `total` steps (an epoch's batches, a data set's images).

    On a terminal (`stream` a tty): a tqdm bar; the periodic lines then go to log.txt only
    (log(line, file_only=True)).  Otherwise (a pipe, a file, a batch job) the lines are printed.
    A line is written every `every` steps (0: not by count), at least every `seconds` seconds,
    and at the last step when at_last; close(suffix) ends the bar and, with a suffix, writes the
    closing line.  text(steps, rate) is a line's text, rate the units (images) per second.
    """

    def __init__(self, log, total, text, every=0, seconds=30.0, at_last=True, on_line=None, desc='',
                 unit='step', stream=None):
        self.log, self.total, self.text = log, total, text
        self.every, self.seconds, self.at_last = every, seconds, at_last
        self.on_line = on_line   # on_line(steps, rate) with every line (TensorBoard's step curves)
        self.steps, self.units, self.t0 = 0, 0, time.time()
        self.last_line = self.t0
        self.bar = None
        stream = stream or sys.stdout
        if stream.isatty():
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, file=stream)
            except ImportError:   # optional: lines instead of a bar
                pass

    @classmethod
    def epoch(cls, log, total, prefix, every, seconds=30.0, on_line=None):
        """An epoch's steps: `prefix step k/total MESSAGE R img/s` (update(images, message))."""
        return cls(log, total, lambda k, rate, message: f'{prefix} step {k}/{total} {message()} {rate:.1f} img/s',
                   every, seconds, on_line=on_line, desc=prefix)

    def rate(self):
        return self.units / max(time.time() - self.t0, 1e-9)

    def update(self, units=1, message=None):
        """One step of `units` units (images) done; message() is the line's own part, if any."""
        self.steps += 1
        self.units += units
        now, rate = time.time(), self.rate()
        if self.bar is not None:
            self.bar.set_postfix_str(f'{rate:.1f} img/s', refresh=False)
            self.bar.update(1)
        due = (self.every and self.steps % self.every == 0) or (self.at_last and self.steps == self.total)
        if due or now - self.last_line >= self.seconds:
            self.last_line = now
            self.log(self._text(rate, message), file_only=self.bar is not None)
            if self.on_line is not None:
                self.on_line(self.steps, rate)

    def _text(self, rate, message):
        return self.text(self.steps, rate, message) if message is not None else self.text(self.steps, rate)

    def close(self, suffix=None):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if suffix is not None:
            self.log(self._text(self.rate(), None) + suffix)


class EpochMeter:
    """An epoch's training steps: their running figures (EpochStats) and progress lines (Progress)."""

    def __init__(self, stats, lines, loss_label='loss'):
        self.stats, self.lines, self.loss_label = stats, lines, loss_label

    def step(self, loss, logits, labels):
        """One step's mean loss and logits of this rank's share of the batch."""
        stats = self.stats
        images = stats.add(loss, logits, labels)
        self.lines.update(images, lambda: f'{self.loss_label} {stats.loss:.4f} top1 {100 * stats.accuracy:.2f}%')

    def close(self):
        """The steps are over; returns the epoch's figures."""
        self.lines.close()
        self.stats.close()
        return self.stats
