"""Small numpy formulas shared by the scripts: the cosine schedule, softmax, top-k accuracy."""
import math

import numpy as np


def cosine_lr(epoch, epochs, lr_max, lr_min):
    """lr_min + (lr_max - lr_min) * (1 + cos(pi * epoch / epochs)) / 2."""
    return lr_min + (lr_max - lr_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2


def softmax(a, axis=-1):
    """exp(a_i - max_j a_j) / sum_k exp(a_k - max_j a_j) along axis, in float64 (numpy)."""
    a = np.asarray(a, np.float64)
    e = np.exp(a - a.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def accuracy(logits, labels, k=1):
    """Fraction of rows whose label is among the k largest logits."""
    top = np.argsort(-logits, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def describe_count(n):
    """A parameter count as a log line shows it: exact below a million (1,806), else in millions (3.349M)."""
    return f'{n:,}' if n < 1_000_000 else f'{n / 1e6:.3f}M'
