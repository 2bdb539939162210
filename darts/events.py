"""TensorBoard event files of a run, written as it goes: `tensorboard --logdir runs` shows every run live.

Written with tensorboardX (event files TensorBoard reads, no TensorFlow needed).  VisualDL,
Paddle's own dashboard, writes a format of its own that TensorBoard cannot read, and most DARTS
users already watch pt.darts-style runs in TensorBoard.  Tags:
    epoch/<name>   every number of the epoch's history record (losses, accuracies, lr, images/s,
                   collapse figures ...), at step = epoch (from 1)
    step/<name>    the running loss, top-1 and images/s at each progress line, at step = the global
                   step (from 1)
    <name>         images: the softmaxed alphas and the derived cells of a search per epoch, the
                   confusion matrix at the end of a training run
"""
import io
import os

import numpy as np
from darts.errors import UserError

FOLDER = 'tensorboard'


class Events:
    """The event writer of a run folder; inert when disabled (--no_tensorboard, or not the
    writing rank).  first_epoch > 0 (a resumed run): TensorBoard drops what the interrupted
    run wrote from that epoch on, so the curves do not double back."""

    def __init__(self, run_dir, enabled=True, first_epoch=0, steps_per_epoch=1):
        self.writer, self.steps_per_epoch = None, steps_per_epoch
        if enabled:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise UserError('TensorBoard event files need tensorboardX: pip install -r requirements.txt '
                                '(or run with --no_tensorboard)') from None
            self.writer = SummaryWriter(os.path.join(run_dir, FOLDER), flush_secs=20,
                                        purge_step=first_epoch + 1 if first_epoch else None)

    @property
    def enabled(self):
        return self.writer is not None

    def epoch(self, record):
        """epoch/<key> for every int or float of the record (nested dicts and lists left out)."""
        if self.writer is None:
            return
        for key, value in record.items():
            if key != 'epoch' and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f'epoch/{key}', value, record['epoch'])
        self.writer.flush()

    def step(self, epoch, step, **values):
        """step/<key> at the global step of this epoch's step (both from 0 here, from 1 in the file)."""
        if self.writer is None:
            return
        for key, value in values.items():
            self.writer.add_scalar(f'step/{key}', value, epoch * self.steps_per_epoch + step + 1)

    def image(self, tag, image, step):
        """An image: PNG bytes, or an HxWx3 uint8 array."""
        if self.writer is None:
            return
        if isinstance(image, (bytes, bytearray)):
            from PIL import Image
            image = np.asarray(Image.open(io.BytesIO(image)).convert('RGB'))
        self.writer.add_image(tag, image, step, dataformats='HWC')

    def figure(self, tag, figure, step):
        """A matplotlib figure, rendered."""
        if self.writer is not None:
            self.writer.add_figure(tag, figure, step, close=False)

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
