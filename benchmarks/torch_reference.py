"""The same DARTS search step in eager PyTorch, structured as the official code runs it,
to compare against benchmarks/search_step.py on the same machine (JSON out).

    pip install torch   # CPU build; not a dependency of this project
    python benchmarks/torch_reference.py --batch_size 16 --init_channels 8 --layers 5

Written from the paper and design.md, not from the official source, but with its
computational structure: every edge a MixedOp evaluating all 8 primitives (`none`
as x * 0), pools followed by a non-affine BN, the second-order step as an unrolled
model (a new network loaded with w'), then the finite-difference Hessian-vector
product by perturbing the weights in place, then the weight step with clipping.
"""
import argparse
import json
import os
import resource
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PRIMITIVES = ['none', 'max_pool_3x3', 'avg_pool_3x3', 'skip_connect',
              'sep_conv_3x3', 'sep_conv_5x5', 'dil_conv_3x3', 'dil_conv_5x5']


def bn(c):
    return nn.BatchNorm2d(c, affine=False)


class FactorizedReduce(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.a = nn.Conv2d(c_in, c_out // 2, 1, 2, bias=False)
        self.b = nn.Conv2d(c_in, c_out - c_out // 2, 1, 2, bias=False)
        self.bn = bn(c_out)

    def forward(self, x):
        x = F.relu(x)
        return self.bn(torch.cat([self.a(x), self.b(x[:, :, 1:, 1:])], 1))


def sep(c, k, stride):
    p = k // 2
    return nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, k, stride, p, groups=c, bias=False),
                         nn.Conv2d(c, c, 1, bias=False), bn(c),
                         nn.ReLU(), nn.Conv2d(c, c, k, 1, p, groups=c, bias=False),
                         nn.Conv2d(c, c, 1, bias=False), bn(c))


def dil(c, k, stride):
    return nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, k, stride, k - 1, 2, groups=c, bias=False),
                         nn.Conv2d(c, c, 1, bias=False), bn(c))


class Zero(nn.Module):
    def __init__(self, stride):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        return x[:, :, ::self.stride, ::self.stride].mul(0.)


def primitive(name, c, stride):
    return {'none': lambda: Zero(stride),
            'max_pool_3x3': lambda: nn.Sequential(nn.MaxPool2d(3, stride, 1), bn(c)),
            'avg_pool_3x3': lambda: nn.Sequential(nn.AvgPool2d(3, stride, 1, count_include_pad=False), bn(c)),
            'skip_connect': lambda: nn.Identity() if stride == 1 else FactorizedReduce(c, c),
            'sep_conv_3x3': lambda: sep(c, 3, stride), 'sep_conv_5x5': lambda: sep(c, 5, stride),
            'dil_conv_3x3': lambda: dil(c, 3, stride), 'dil_conv_5x5': lambda: dil(c, 5, stride)}[name]()


class MixedOp(nn.Module):
    def __init__(self, c, stride):
        super().__init__()
        self.ops = nn.ModuleList(primitive(p, c, stride) for p in PRIMITIVES)

    def forward(self, x, w):
        return sum(wi * op(x) for wi, op in zip(w, self.ops))


class Cell(nn.Module):
    def __init__(self, c_pp, c_p, c, reduction, reduction_prev):
        super().__init__()
        self.reduction = reduction
        self.pre0 = FactorizedReduce(c_pp, c) if reduction_prev else nn.Sequential(
            nn.ReLU(), nn.Conv2d(c_pp, c, 1, bias=False), bn(c))
        self.pre1 = nn.Sequential(nn.ReLU(), nn.Conv2d(c_p, c, 1, bias=False), bn(c))
        self.edges = nn.ModuleList(MixedOp(c, 2 if reduction and j < 2 else 1) for i in range(4) for j in range(i + 2))

    def forward(self, s0, s1, weights):
        states, e = [self.pre0(s0), self.pre1(s1)], 0
        for _ in range(4):
            states.append(sum(self.edges[e + j](h, weights[e + j]) for j, h in enumerate(states)))
            e += len(states) - 1
        return torch.cat(states[-4:], 1)


class Network(nn.Module):
    def __init__(self, c, classes, layers):
        super().__init__()
        self.args = (c, classes, layers)
        self.stem = nn.Sequential(nn.Conv2d(3, 3 * c, 3, padding=1, bias=False), nn.BatchNorm2d(3 * c))
        c_pp, c_p, c_cur, cells, reduction_prev = 3 * c, 3 * c, c, [], False
        for k in range(layers):
            reduction = k in (layers // 3, 2 * layers // 3)
            c_cur = c_cur * 2 if reduction else c_cur
            cells.append(Cell(c_pp, c_p, c_cur, reduction, reduction_prev))
            c_pp, c_p, reduction_prev = c_p, 4 * c_cur, reduction
        self.cells = nn.ModuleList(cells)
        self.classifier = nn.Linear(c_p, classes)
        self.alphas = [(1e-3 * torch.randn(14, 8)).requires_grad_() for _ in range(2)]

    def weights(self):
        return self.parameters()

    def forward(self, x):
        s0 = s1 = self.stem(x)
        normal, reduce = (F.softmax(a, dim=-1) for a in self.alphas)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, reduce if cell.reduction else normal)
        return self.classifier(F.adaptive_avg_pool2d(s1, 1).flatten(1))

    def loss(self, x, y):
        return F.cross_entropy(self(x), y)


def second_order_alpha_step(model, opt_w, opt_a, xt, yt, xv, yv, lr, mom, wd):
    params = list(model.weights())
    g = torch.autograd.grad(model.loss(xt, yt), params)
    with torch.no_grad():
        theta = [p - lr * (opt_w.state[p].get('momentum_buffer', torch.zeros_like(p)) * mom + gi + wd * p)
                 for p, gi in zip(params, g)]
    unrolled = Network(*model.args)                                # the official code builds a new model
    unrolled.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p, t in zip(unrolled.weights(), theta):
            p.copy_(t)
    unrolled.alphas = [a.detach().clone().requires_grad_() for a in model.alphas]
    unrolled.loss(xv, yv).backward()
    dalpha = [a.grad for a in unrolled.alphas]
    v = [p.grad for p in unrolled.weights()]
    r = 0.01 / torch.cat([x.view(-1) for x in v]).norm()
    with torch.no_grad():
        for p, vi in zip(params, v):
            p.add_(vi, alpha=r)
    g_plus = torch.autograd.grad(model.loss(xt, yt), model.alphas)
    with torch.no_grad():
        for p, vi in zip(params, v):
            p.sub_(vi, alpha=2 * r)
    g_minus = torch.autograd.grad(model.loss(xt, yt), model.alphas)
    with torch.no_grad():
        for p, vi in zip(params, v):
            p.add_(vi, alpha=r)
    for a, d, gp, gm in zip(model.alphas, dalpha, g_plus, g_minus):
        a.grad = d - lr * (gp - gm) / (2 * r)
    opt_a.step()


def first_order_alpha_step(model, opt_a, xv, yv):
    opt_a.zero_grad()
    model.loss(xv, yv).backward()
    opt_a.step()


def measure(args, second_order):
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = Network(args.init_channels, 10, args.layers)
    opt_w = torch.optim.SGD(model.weights(), 0.025, momentum=0.9, weight_decay=3e-4)
    opt_a = torch.optim.Adam(model.alphas, 3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
    b, s = args.batch_size, args.image_size
    xt, xv = torch.randn(b, 3, s, s), torch.randn(b, 3, s, s)
    yt, yv = torch.randint(0, 10, (b,)), torch.randint(0, 10, (b,))
    times = []
    for _ in range(args.warmup + args.steps):
        t = time.time()
        if second_order:
            second_order_alpha_step(model, opt_w, opt_a, xt, yt, xv, yv, 0.025, 0.9, 3e-4)
        else:
            first_order_alpha_step(model, opt_a, xv, yv)
        opt_w.zero_grad()
        model.loss(xt, yt).backward()
        nn.utils.clip_grad_norm_(model.weights(), 5.0)
        opt_w.step()
        times.append(time.time() - t)
    timed = times[args.warmup:]
    return dict(order='second' if second_order else 'first', seconds_per_step_median=statistics.median(timed),
                seconds_per_step_min=min(timed), steps_timed=len(timed),
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from search_step import add_size_arguments   # the same sizes as ours (no Paddle imported)
    add_size_arguments(p)
    p.add_argument('--steps', type=int, default=10)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--threads', type=int, default=os.cpu_count())
    p.add_argument('--order', choices=['first', 'second'], required=True,
                   help='one order per process, so that peak memory is its own')
    args = p.parse_args()
    result = dict(config=dict(vars(args), torch=torch.__version__), **measure(args, args.order == 'second'))
    print(json.dumps(result, indent=1))


if __name__ == '__main__':
    main()
