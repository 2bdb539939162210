"""Optimiser arithmetic on flat weight vectors, as graph-building functions.

Shared by the search programs (architect.py) and the evaluation training programs
(training.py).  Weights live in one persistable flat vector WEIGHTS with its momentum
buffer MOMENTUM, so each update is a handful of vector ops.
"""
import paddle

WEIGHTS, MOMENTUM = 'weights', 'weights.momentum'


def global_norm(tensors):
    """sqrt(sum_i ||t_i||^2)."""
    return paddle.sqrt(paddle.add_n([paddle.sum(t * t) for t in tensors]))


def virtual_step(w, g, v, xi, mu, wd):
    """w' = w - xi * (mu * v + g + wd * w): one SGD-momentum step, no clipping."""
    return w - xi * (mu * v + g + wd * w)


def adam_step(p, g, m, v, t, lr, betas, eps, wd):
    """Adam with L2 weight decay (torch.optim.Adam semantics), t already incremented:
    g = g + wd * p;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
    p = p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    """
    b1, b2 = betas
    g = g + wd * p
    m = b1 * m + (1.0 - b1) * g
    v = b2 * v + (1.0 - b2) * g * g
    c1 = 1.0 - paddle.pow(paddle.full([1], b1), t)
    c2 = 1.0 - paddle.pow(paddle.full([1], b2), t)
    return p - lr * (m / c1) / (paddle.sqrt(v / c2) + eps), m, v


def clip_by_global_norm(g, max_norm):
    """g * min(1, max_norm / (||g|| + 1e-6)), as torch.nn.utils.clip_grad_norm_."""
    return g * paddle.clip(max_norm / (global_norm([g]) + 1e-6), max=1.0)


def sgd_momentum_step(w, g, v, lr, mu, wd):
    """v = mu * v + g + wd * w;  w = w - lr * v  (torch.optim.SGD semantics)."""
    v_new = mu * v + g + wd * w
    return w - lr * v_new, v_new
