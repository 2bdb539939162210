"""Search under a budget: the cost of a cell in the network it will be trained in, the
expected cost under the architecture weights, a penalty on it, and a derived cell that fits.

Costs are those of the *target* network (train.py's NetworkCIFAR, or train_imagenet.py's
network for 224 px data), not of the search network:
    params  trainable parameters, auxiliary head excluded (model.count_parameters)
    madds   multiply-adds of one image (model.count_multiply_adds)
A cell's cost is the fixed part (stem, cell preprocessing, classifier) plus, over every
cell k of the target network, the cost of each chosen op o on its edge e:
    C(genotype) = C_fixed + sum_k sum_{(o, e) in cell k} c_k(e, o).
c_k(e, o) is measured by building op o alone at cell k's width, input size and edge stride
and counting its program (so a registered op of the user's gets its cost with no extra
code); cells of one type share their alphas, so the table kept is per type:
    cost_t(e, o) = sum_{k of type t} c_k(e, o).

Expected cost (ProxylessNAS / FBNet: the cost under the relaxed architecture):
    E[C](alpha) = C_fixed + sum_t sum_e s_e * sum_{o != none} p_e(o) * cost_t(e, o)
    p_e = softmax(alpha_e) over the ops derivation can pick (all but the zero op): derivation
          never picks `none`, so weight put on it must not lower the cost the search sees;
    s_e = 2 / (i + 2) for the i + 2 edges into node i: derivation keeps 2 of them, so s_e is
          the expected share an edge has of them under uniform selection; with PC-DARTS' edge
          normalisation s_e = 2 * softmax(beta_i)_e, which derivation's ranking follows.
Penalty added to the architecture loss, per budget B with weight lambda_t:
    lambda_t * max(0, E[C] / B - 1)
a hinge, zero inside the budget; lambda_t is lambda during an epoch that starts with the derived
cell over budget B, else 0 (`epoch_weights`).  It depends
on alpha (and beta) alone: its exact gradient adds to the alpha gradient in both orders.
"""
import math
import re
from dataclasses import asdict, dataclass

import numpy as np

from darts.errors import UserError
from darts.search.guards import SKIP
from darts import kernels
from darts.numeric import softmax
import genotypes

KINDS = ('params', 'madds')
SUFFIX = {'': 1, 'K': 1e3, 'M': 1e6, 'G': 1e9}


class BudgetError(UserError):
    """A budget or target network the search cannot use."""


def parse(texts):
    """{'params': 3.3e6, ...} from ['params=3.3M', 'madds=600M'] or ['params=3.3M,madds=600M'] (K, M, G
    suffixes): one budget, of one kind or both."""
    out = {}
    for text in (part for t in texts or [] for part in t.split(',')):
        kind, sep, number = text.partition('=')
        kind = kind.strip()
        if not sep or kind not in KINDS:
            raise BudgetError(f'--budget {text!r}: expected KIND=NUMBER with KIND one of {", ".join(KINDS)} '
                              f'(e.g. params=3.3M, madds=600M)')
        match = re.fullmatch(r'([+-]?[0-9]*\.?[0-9]+(?:E[+-]?[0-9]+)?)([KMG]?)', number.strip().upper())
        if not match:
            raise BudgetError(f'--budget {text!r}: {number.strip()!r} is not a number (suffixes: K, M, G)')
        limit = float(match.group(1)) * SUFFIX[match.group(2)]
        if not limit > 0 or not math.isfinite(limit):
            raise BudgetError(f'--budget {text!r}: the limit must be a positive number')
        if kind in out:
            raise BudgetError(f'--budget {kind} is given twice')
        out[kind] = limit
    return out


def human(n):
    """3349342 -> '3.35M'."""
    for unit, scale in (('G', 1e9), ('M', 1e6), ('K', 1e3)):
        if abs(n) >= scale:
            return f'{n / scale:.3g}{unit}'
    return f'{n:.0f}'


@dataclass(frozen=True)
class Target:
    """The network the cell will be trained in."""
    network: str          # 'cifar' (train.py) or 'imagenet' (train_imagenet.py)
    channels: int
    layers: int
    image_size: int
    in_channels: int = 3
    num_classes: int = 10

    @classmethod
    def default(cls, image_size, in_channels, num_classes, network='auto', channels=None, layers=None):
        """CIFAR: 20 cells, C=36; 224 px data and up: the ImageNet network, C=48, 14 cells."""
        if network == 'auto':
            network = 'imagenet' if image_size >= 224 else 'cifar'
        big = network == 'imagenet'
        return cls(network, channels or (48 if big else 36), layers or (14 if big else 20), image_size,
                   in_channels, num_classes)

    def builder(self):
        import model
        return model.network_imagenet if self.network == 'imagenet' else model.network_cifar

    def kwargs(self, genotype):
        return dict(genotype=genotype, c=self.channels, num_classes=self.num_classes, layers=self.layers)

    def describe(self):
        return (f'{"ImageNet" if self.network == "imagenet" else "CIFAR"} network, C={self.channels}, '
                f'{self.layers} cells, {self.image_size} px')

    def cells(self):
        """[(width, input size, reduction)] per cell: the size its ops read (both inputs are
        preprocessed to s1's size); every stride-2 op halves a size rounding up."""
        from operations import reduction_layers, stem_reductions
        halvings = 3 if self.network == 'imagenet' else stem_reductions(self.image_size)
        h, c, out = self.image_size, self.channels, []
        for _ in range(halvings):
            h = -(-h // 2)
        for k in range(self.layers):
            reduction = k in reduction_layers(self.layers)
            c *= 2 if reduction else 1
            out.append((c, h, reduction))
            h = -(-h // 2) if reduction else h
        return out

    def check(self):
        if self.channels < 2 or self.layers < 2:
            raise BudgetError(f'--target_channels must be at least 2 and --target_layers at least 2 '
                              f'(got {self.channels}, {self.layers})')
        if self.image_size < (32 if self.network == 'imagenet' else 16):
            raise BudgetError(f'--target_image_size {self.image_size} is too small for the {self.network} network')
        return self


def op_cost(op, c, h, stride):
    """(parameters, multiply-adds) of op alone on a [1, c, h, h] input at this stride, counted
    from its built program (Paddle's conv ops, so the shapes can be read)."""
    import paddle
    from model import program_multiply_adds
    from operations import Layout, Source, lookup
    program = paddle.static.Program()
    with kernels.paddle_kernels():
        def build(ps):
            x = paddle.static.data('x', [1, c, h, h], 'float32')
            lookup(op).edge(ps, 'op', Source(x), c, stride, affine=True)
        layout = Layout.record(build, program)
    return layout.size, program_multiply_adds(program)


def network_cost(target, genotype):
    """{'params', 'madds'} of the target network built with genotype (the real counts)."""
    import model
    build, kw = target.builder(), target.kwargs(genotype)
    layout = model.layout_of(build, target.image_size, target.in_channels, auxiliary=True, **kw)
    return dict(params=model.count_parameters(layout),
                madds=model.count_multiply_adds(build, target.image_size, target.in_channels, **kw))


@dataclass
class CostTable:
    """cost[kind][type]: [E, |ops|] (the op's cost summed over the cells of that type), and
    fixed[kind]; ops in the search space's order (zero ops cost 0 and are never chosen)."""
    ops: tuple
    nodes: int
    fixed: dict
    cost: dict
    zero: tuple = ()   # indices of zero ops (`none`)

    @property
    def choosable(self):
        return [k for k in range(len(self.ops)) if k not in self.zero]

    def genotype_cost(self, genotype):
        """{kind: C(genotype)} from the table (equals network_cost for a genotype of the space)."""
        from model_search import edge_index
        out = {}
        for kind in KINDS:
            total = self.fixed[kind]
            for t, pairs in (('normal', genotype.normal), ('reduce', genotype.reduce)):
                for k, (op, j) in enumerate(pairs):
                    total += self.cost[kind][t][edge_index(k // 2, j), self.ops.index(op)]
            out[kind] = int(round(total))
        return out

    def edge_shares(self, beta=None):
        """s_e: 2 / (i + 2) per edge into node i, or 2 * softmax(beta_i)_e."""
        from model_search import normalized_betas_numpy
        if beta is not None:
            return 2.0 * normalized_betas_numpy(beta, self.nodes)
        return np.concatenate([np.full(i + 2, 2.0 / (i + 2)) for i in range(self.nodes)])

    def expected(self, arch):
        """{kind: E[C](alpha)} (numpy, float64) of {name: array} architecture parameters."""
        out = {}
        cols = self.choosable
        for kind in KINDS:
            total = float(self.fixed[kind])
            for t in ('normal', 'reduce'):
                p = softmax(np.asarray(arch['alpha_' + t])[:, cols])
                s = self.edge_shares(arch.get('beta_' + t))
                total += float((s[:, None] * p * self.cost[kind][t][:, cols]).sum())
            out[kind] = total
        return out

    def cheapest(self):
        """{kind: the lowest C of any cell}: per node the 2 edges whose cheapest op costs least."""
        out = {}
        cols = self.choosable
        for kind in KINDS:
            total = self.fixed[kind]
            for t in ('normal', 'reduce'):
                per_edge = self.cost[kind][t][:, cols].min(1)
                start = 0
                for i in range(self.nodes):
                    total += np.sort(per_edge[start:start + i + 2])[:2].sum()
                    start += i + 2
            out[kind] = int(round(total))
        return out


def cost_table(target, space):
    """The CostTable of space's ops in the target network (each distinct (op, width, size,
    stride) built once), its fixed part from one real count of the whole network."""
    from model_search import edge_index
    from operations import lookup
    target.check()
    ops = tuple(space.ops)
    e = genotypes.num_edges(space.nodes)
    cost = {kind: {t: np.zeros((e, len(ops))) for t in ('normal', 'reduce')} for kind in KINDS}
    cache = {}
    for c, h, reduction in target.cells():
        t = 'reduce' if reduction else 'normal'
        for i in range(space.nodes):
            for j in range(i + 2):
                stride = 2 if reduction and j < 2 else 1
                size = h if j < 2 or not reduction else -(-h // 2)
                for o, op in enumerate(ops):
                    if lookup(op).zero:
                        continue
                    key = (op, c, size, stride)
                    if key not in cache:
                        cache[key] = op_cost(op, c, size, stride)
                    for kind, value in zip(KINDS, cache[key]):
                        cost[kind][t][edge_index(i, j), o] += value
    zero = tuple(o for o, op in enumerate(ops) if lookup(op).zero)
    table = CostTable(ops, space.nodes, {kind: 0 for kind in KINDS}, cost, zero)
    probe = probe_genotype(space)
    real, ops_only = network_cost(target, probe), table.genotype_cost(probe)
    table.fixed = {kind: real[kind] - ops_only[kind] for kind in KINDS}
    return table


def probe_genotype(space):
    """A genotype of the space (each node: its first two inputs, the first choosable op)."""
    from operations import lookup
    op = next(o for o in space.ops if not lookup(o).zero)
    pairs = [(op, j) for i in range(space.nodes) for j in (0, 1)]
    concat = list(range(2, 2 + space.nodes))
    return genotypes.Genotype(pairs, concat, list(pairs), concat)


def draw_within(table, kind, window, rng, ops, nodes, exclude=(), max_draws=20000):
    """(genotype, cost, draws): the first cell drawn uniformly from the space (genotypes.random_genotype
    with rng) whose cost of this kind lies in window = (low, high) and is not in exclude; rejection
    sampling, so the cell is uniform over the space's cells inside the window.  None when
    max_draws cells gave none."""
    low, high = window
    for draws in range(1, max_draws + 1):
        g = genotypes.random_genotype(rng, ops, nodes)
        if g in exclude:
            continue
        cost = table.genotype_cost(g)[kind]
        if low <= cost <= high:
            return g, cost, draws
    return None


def check_feasible(table, budgets):
    """A budget below the cheapest possible network: one line naming that cost."""
    low = table.cheapest()
    for kind, limit in budgets.items():
        if low[kind] > limit:
            raise BudgetError(f'--budget {kind}={human(limit)} cannot be met: the cheapest cell of this search '
                              f'space gives {human(low[kind])} {kind} ({low[kind]:,}) in the target network')


def fit(genotype, weights, table, budgets, max_skip=None):
    """(genotype, fits): the derived genotype with pairs replaced greedily until every budget
    holds.  A move replaces one pair (op, j) of a node by (op', j') (j' not the node's other
    input, op' never a zero op) that raises no budgeted cost and lowers a violated one; the move
    taken is the one losing the least edge weight W[e, o] per unit of cost saved (each saving
    relative to its budget).  weights: {'normal', 'reduce'}: W of edge_weights_numpy.
    max_skip (--max_skip): no move brings the normal cell above that many skip_connect pairs
    (skips cost nothing, so a tight budget would otherwise buy its savings with them)."""
    from model_search import edge_index
    cells = {'normal': list(genotype.normal), 'reduce': list(genotype.reduce)}
    ops, cols = table.ops, table.choosable

    def costs():
        g = genotype._replace(normal=cells['normal'], reduce=cells['reduce'])
        return g, table.genotype_cost(g)

    g, now = costs()
    while True:
        over = [k for k in budgets if now[k] > budgets[k]]
        if not over:
            return g, True
        best = None
        for t, pairs in cells.items():
            for k, (op, j) in enumerate(pairs):
                i = k // 2
                other = pairs[k ^ 1][1]
                e, o = edge_index(i, j), ops.index(op)
                for j2 in range(i + 2):
                    if j2 == other:
                        continue
                    e2 = edge_index(i, j2)
                    for o2 in cols:
                        if t == 'normal' and adds_a_skip(pairs, op, ops[o2], max_skip):
                            continue
                        saved = {kind: table.cost[kind][t][e, o] - table.cost[kind][t][e2, o2] for kind in budgets}
                        if any(v < 0 for v in saved.values()):
                            continue
                        gain = sum(saved[kind] / budgets[kind] for kind in over)
                        if gain <= 0:
                            continue
                        score = (weights[t][e, o] - weights[t][e2, o2]) / gain
                        if best is None or score < best[0]:
                            best = (score, t, k, (ops[o2], j2))
        if best is None:
            return g, False
        _, t, k, pair = best
        cells[t][k] = pair
        g, now = costs()


def adds_a_skip(pairs, op, new_op, max_skip):
    """Whether replacing a pair's op by new_op takes the cell's skip_connect count above max_skip."""
    skips = sum(o == SKIP for o, _ in pairs)
    return max_skip is not None and new_op == SKIP and op != SKIP and skips >= max_skip


@dataclass(frozen=True)
class Penalty:
    """What the search programs need: the tables, the budgets and the weight lambda."""
    table: CostTable
    budgets: dict
    weight: float = 1.0


def expected_cost_value(table, arch, kind):
    """E[C] as a Paddle value of the alpha (and beta) values in arch ({name: Value})."""
    import paddle
    import paddle.nn.functional as F
    from model_search import normalized_betas
    cols = paddle.to_tensor(table.choosable)
    total = float(table.fixed[kind])
    for t in ('normal', 'reduce'):
        p = F.softmax(paddle.gather(arch['alpha_' + t], cols, axis=1), axis=-1)
        cost = paddle.to_tensor(table.cost[kind][t][:, table.choosable].astype('float32'))
        if 'beta_' + t in arch:
            s = 2.0 * normalized_betas(arch['beta_' + t], table.nodes)
        else:
            s = paddle.to_tensor(table.edge_shares().astype('float32'))
        total = total + paddle.sum(paddle.unsqueeze(s, 1) * p * cost)
    return total


def penalty_value(penalty, arch, weights=None):
    """sum over budgets k of lambda_k * max(0, E[C_k] / B_k - 1), a Paddle value; weights: a
    Value holding lambda_k per budget, in penalty.budgets' order (default: penalty.weight each)."""
    import paddle.nn.functional as F
    total = 0.0
    for k, (kind, limit) in enumerate(penalty.budgets.items()):
        term = F.relu(expected_cost_value(penalty.table, arch, kind) / limit - 1.0)
        total = total + (penalty.weight * term if weights is None else weights[k] * term)
    return total


def penalty_numpy(penalty, arch, weights=None):
    """penalty_value from CostTable.expected (float64)."""
    e = penalty.table.expected(arch)
    weights = [penalty.weight] * len(penalty.budgets) if weights is None else weights
    return sum(w * max(0.0, e[k] / b - 1.0) for w, (k, b) in zip(weights, penalty.budgets.items()))


def epoch_weights(penalty, derived_cost):
    """lambda_k for the coming epoch: lambda while the cell derived now exceeds budget k, else 0.

    E[C] under near-uniform alphas sits far from the cost of the cell derivation picks (on the
    README example 44-47K expected against 15.6K derived), so a penalty on E[C] alone goes on
    pushing after the derived cell fits, until it holds only parameter-free ops; gated by the
    derived cell, it pushes only while that cell is over."""
    return [penalty.weight if derived_cost[k] > b else 0.0 for k, b in penalty.budgets.items()]


def add_arguments(p):
    """The flags of a search under a budget."""
    b = p.add_argument_group('search under a budget (darts/search/budget.py; costs are the target network\'s, the '
                             'one train.py or train_imagenet.py will train)')
    b.add_argument('--budget', action='append', default=None, metavar='KIND=N',
                   help='params=3.3M, madds=600M or both, params=3.3M,madds=600M (K, M, G suffixes): a penalty on the '
                        'expected cost in the alpha loss, and genotype.json the derived cell made to fit '
                        '(genotype_unbudgeted.json: the plain one); default: no budget')
    b.add_argument('--budget_weight', type=float, default=1.0, metavar='LAMBDA',
                   help='lambda of the penalty lambda * max(0, E[cost] / budget - 1) per budget, on in the epochs '
                        'that start with the derived cell over that budget')
    b.add_argument('--target_network', choices=['auto', 'cifar', 'imagenet'], default='auto',
                   help='auto: the ImageNet network (train_imagenet.py) for 224 px and up, '
                        'else NetworkCIFAR (train.py)')
    b.add_argument('--target_channels', type=int, default=None,
                   help='C of the target network (default: CIFAR 36, ImageNet 48)')
    b.add_argument('--target_layers', type=int, default=None, help='its cells (default: CIFAR 20, ImageNet 14)')
    b.add_argument('--target_image_size', type=int, default=None, help='its input size (default: the data\'s)')


def penalty_for(target, space, budgets, weight):
    """The target network's cost table and the penalty; a target the networks cannot be built
    at, or a budget no cell of the space can meet, is one line."""
    try:   # cost_table checks the target first: a BudgetError is one line as it is
        table = cost_table(target, space)
    except (ValueError, AssertionError, RuntimeError) as e:   # a target the networks cannot be built at
        raise UserError(f'--target_*: the {target.describe()} cannot be built: '
                        f'{str(e).splitlines()[0] if str(e) else type(e).__name__}') from None
    check_feasible(table, budgets)
    return Penalty(table, budgets, weight)


def fit_epoch(penalty, target, genotype, weights, arch, max_skip, lambdas):
    """(the derived cell made to fit the budgets, the epoch record's budget entries);
    weights: {'normal', 'reduce'} edge weights, lambdas: the epoch's penalty weights."""
    table, budgets = penalty.table, penalty.budgets
    fitted, fits = fit(genotype, weights, table, budgets, max_skip)
    changed = sum(a != b for a, b in zip(genotype.normal + genotype.reduce, fitted.normal + fitted.reduce))
    entries = dict(budget=dict(budgets=budgets, target=asdict(target), expected=table.expected(arch),
                               unbudgeted=table.genotype_cost(genotype), cost=table.genotype_cost(fitted), fits=fits,
                               pairs_replaced=int(changed), penalty=penalty_numpy(penalty, arch), weights=lambdas),
                   genotype_unbudgeted=genotypes.to_dict(genotype), genotype_budgeted=genotypes.to_dict(fitted))
    return fitted, entries


def describe_costs(costs):
    return ', '.join(f'{human(costs[k])} {k}' for k in KINDS if k in costs)


def describe_budgets(budgets):
    return ', '.join(f'{k} <= {human(v)}' for k, v in budgets.items())


def epoch_line(b):
    """An epoch record's budget figures, one log line."""
    text = (f'budget ({describe_budgets(b["budgets"])}): derived cell {describe_costs(b["unbudgeted"])}; '
            f'expected {describe_costs(b["expected"])}; penalty {b["penalty"]:.4f}, '
            f'{"on" if any(b.get("weights") or []) else "off"} this epoch')
    if b['pairs_replaced']:
        text += f'; fitted cell {describe_costs(b["cost"])} ({b["pairs_replaced"]} ops replaced)'
    if not b['fits']:
        text += '; no replacement of ops fits every budget at once'
    return text
