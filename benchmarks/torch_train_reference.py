"""The evaluation-training step in eager PyTorch, structured as the official train.py /
train_imagenet.py run it, to compare against benchmarks/train_step.py on the same machine (JSON out).

    pip install torch numpy   # CPU build; not a dependency of this project
    python benchmarks/torch_train_reference.py --init_channels 16 --layers 8 --batch_size 32
    python benchmarks/torch_train_reference.py --init_channels 36 --layers 20 --batch_size 96
    python benchmarks/torch_train_reference.py --network imagenet --init_channels 48 --layers 14 --batch_size 8

Written from the paper and design.md, not from the official source: NetworkCIFAR (or the ImageNet
network) of a named genotype with every BN affine, the auxiliary head (weight 0.4), drop path on
every op but the identity (CIFAR: 0.2; ImageNet: none, label smoothing 0.1), then
loss.backward(), the global-norm clip at 5 and SGD with momentum 0.9.  The parameter count it
prints (auxiliary head excluded) is the same figure as model.count_parameters of ours.
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import genotypes  # noqa: E402  (numpy only, no Paddle)


def relu_conv_bn(c_in, c_out, k, stride, pad):
    return nn.Sequential(nn.ReLU(), nn.Conv2d(c_in, c_out, k, stride, pad, bias=False), nn.BatchNorm2d(c_out))


class FactorizedReduce(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.a = nn.Conv2d(c_in, c_out // 2, 1, 2, bias=False)
        self.b = nn.Conv2d(c_in, c_out - c_out // 2, 1, 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x):
        x = F.relu(x)
        return self.bn(torch.cat([self.a(x), self.b(x[:, :, 1:, 1:])], 1))


def sep(c, k, stride):
    p = k // 2
    return nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, k, stride, p, groups=c, bias=False), nn.Conv2d(c, c, 1, bias=False),
                         nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, k, 1, p, groups=c, bias=False),
                         nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))


def dil(c, k, stride):
    return nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, k, stride, k - 1, 2, groups=c, bias=False),
                         nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))


def primitive(name, c, stride):
    return {'max_pool_3x3': lambda: nn.MaxPool2d(3, stride, 1),
            'avg_pool_3x3': lambda: nn.AvgPool2d(3, stride, 1, count_include_pad=False),
            'skip_connect': lambda: nn.Identity() if stride == 1 else FactorizedReduce(c, c),
            'sep_conv_3x3': lambda: sep(c, 3, stride), 'sep_conv_5x5': lambda: sep(c, 5, stride),
            'dil_conv_3x3': lambda: dil(c, 3, stride), 'dil_conv_5x5': lambda: dil(c, 5, stride)}[name]()


def drop_path(x, p):
    """x / (1 - p) * Bernoulli(1 - p), one draw per sample (the official code's)."""
    keep = 1.0 - p
    mask = torch.empty(x.size(0), 1, 1, 1).bernoulli_(keep)
    return x / keep * mask


class Cell(nn.Module):
    def __init__(self, genotype, c_pp, c_p, c, reduction, reduction_prev):
        super().__init__()
        pairs = genotype.reduce if reduction else genotype.normal
        self.concat = genotype.reduce_concat if reduction else genotype.normal_concat
        self.pre0 = FactorizedReduce(c_pp, c) if reduction_prev else relu_conv_bn(c_pp, c, 1, 1, 0)
        self.pre1 = relu_conv_bn(c_p, c, 1, 1, 0)
        self.inputs = [j for _, j in pairs]
        self.ops = nn.ModuleList(primitive(op, c, 2 if reduction and j < 2 else 1) for op, j in pairs)

    def forward(self, s0, s1, drop_prob):
        states = [self.pre0(s0), self.pre1(s1)]
        for i in range(len(self.ops) // 2):
            node = 0
            for k in (2 * i, 2 * i + 1):
                h = self.ops[k](states[self.inputs[k]])
                if self.training and drop_prob > 0 and not isinstance(self.ops[k], nn.Identity):
                    h = drop_path(h, drop_prob)
                node = node + h
            states.append(node)
        return torch.cat([states[j] for j in self.concat], 1)


class AuxiliaryHead(nn.Module):
    def __init__(self, c, classes, pool_stride):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(), nn.AvgPool2d(5, pool_stride, 0, count_include_pad=False), nn.Conv2d(c, 128, 1, bias=False),
            nn.BatchNorm2d(128), nn.ReLU(), nn.Conv2d(128, 768, 2, bias=False), nn.BatchNorm2d(768), nn.ReLU())
        self.classifier = nn.Linear(768, classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class Network(nn.Module):
    """NetworkCIFAR (imagenet=False) or the ImageNet network of `genotype`; forward: (logits, aux)."""

    def __init__(self, genotype, c, classes, layers, imagenet=False):
        super().__init__()
        if imagenet:
            self.stem0 = nn.Sequential(nn.Conv2d(3, c // 2, 3, 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU(),
                                       nn.Conv2d(c // 2, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c))
            self.stem1 = nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c))
            c_pp, c_p, reduction_prev = c, c, True
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, 3 * c, 3, padding=1, bias=False), nn.BatchNorm2d(3 * c))
            c_pp, c_p, reduction_prev = 3 * c, 3 * c, False
        self.imagenet, self.drop_prob, c_cur, cells = imagenet, 0.0, c, []
        self.aux_at = 2 * layers // 3
        for k in range(layers):
            reduction = k in (layers // 3, 2 * layers // 3)
            c_cur = c_cur * 2 if reduction else c_cur
            cells.append(Cell(genotype, c_pp, c_p, c_cur, reduction, reduction_prev))
            c_pp, c_p, reduction_prev = c_p, len(cells[-1].concat) * c_cur, reduction
            if k == self.aux_at:
                self.auxiliary = AuxiliaryHead(c_p, classes, 2 if imagenet else 3)
        self.cells = nn.ModuleList(cells)
        self.classifier = nn.Linear(c_p, classes)

    def forward(self, x):
        if self.imagenet:
            s0 = self.stem0(x)
            s1 = self.stem1(s0)
        else:
            s0 = s1 = self.stem(x)
        aux = None
        for k, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_prob)
            if k == self.aux_at and self.training:
                aux = self.auxiliary(s1)
        return self.classifier(F.adaptive_avg_pool2d(s1, 1).flatten(1)), aux


def measure(args):
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    imagenet = args.network == 'imagenet'
    size, classes = (224, 1000) if imagenet else (32, 10)
    net = Network(genotypes.by_name(args.arch), args.init_channels, classes, args.layers, imagenet)
    net.drop_prob = 0.0 if imagenet else 0.2
    net.train()
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1 if imagenet else 0.0)
    opt = torch.optim.SGD(net.parameters(), 0.025, momentum=0.9, weight_decay=3e-5 if imagenet else 3e-4)
    x, y = torch.randn(args.batch_size, 3, size, size), torch.randint(0, classes, (args.batch_size,))
    times = []
    for _ in range(args.warmup + args.steps):
        t = time.time()
        opt.zero_grad()
        logits, aux = net(x)
        loss = criterion(logits, y) + 0.4 * criterion(aux, y)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        times.append(time.time() - t)
    median = statistics.median(times[args.warmup:])
    params = sum(p.numel() for name, p in net.named_parameters() if not name.startswith('auxiliary'))
    return dict(seconds_per_step_median=median, images_per_sec=args.batch_size / median,
                first_step_seconds=times[0], parameters_without_auxiliary=params,
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--arch', default='DARTS_V2')
    p.add_argument('--network', choices=['cifar', 'imagenet'], default='cifar')
    p.add_argument('--init_channels', type=int, default=16)
    p.add_argument('--layers', type=int, default=8)
    p.add_argument('--batch_size', type=int, default=32)
    p.add_argument('--steps', type=int, default=10)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--threads', type=int, default=os.cpu_count())
    args = p.parse_args()
    print(json.dumps(dict(config=dict(vars(args), torch=torch.__version__), **measure(args)), indent=1))


if __name__ == '__main__':
    main()
