"""The bilevel DARTS step as static programs, built once per run.

State (persistable, in the scope): flat weights w, momentum v, alphas, Adam moments.
One search step runs these programs in order, each one forward-backward pass:

  second order (xi = lr, the current weight learning rate):
    unrolled_step_program   w'  = w - xi * (mu * v + grad_w L_train(w, alpha) + wd * w)
    unrolled_grad_program   dalpha, dw' = grad_{alpha, w'} L_val(w', alpha)
                            R = 0.01 / ||dw'||,  w+- = w +- R * dw'
    hessian_plus_program    g+ = grad_alpha L_train(w+, alpha)
    alpha_update_program    g- = grad_alpha L_train(w-, alpha)
                            hessian_term = (g+ - g-) / (2R)
                            g_alpha = dalpha - xi * hessian_term
                            alpha = Adam(alpha, g_alpha + arch_wd * alpha)
  first order:
    alpha_update_program    g_alpha = grad_alpha L_val(w, alpha);  alpha = Adam(...)
  both:
    weight_step_program     g = clip_global_norm(grad_w L_train(w, alpha), grad_clip)
                            v = mu * v + g + wd * w;  w = w - lr * v

Data-parallel (cfg.world_size ranks, each with its share of every batch): every quantity
computed from a batch is averaged over the ranks inside the program that computes it, by one
all-reduce (distributed.mean_across_ranks) before it is used: grad_w L_train for w', dalpha and
dw' together (so R = 0.01 / ||mean dw'||), g+, g-, the first-order alpha gradient, and the
weight gradient before the global-norm clip.  Every rank then applies the same update.

Values passed between programs (w', w+-, dalpha, R, g+) are persistable tensors
under 'arch/'.  A gradient is only taken with respect to tensors a program declares
trainable, so grad_w L_train inside w' and dw' inside w+- are constants: no second
derivative is ever built.  BN running statistics are updated by the passes at w, w+
and w- (as the official code does, which runs those on the model itself); the pass
at w' uses its own throw-away statistics ('unrolled/'), as the official code's copy
of the model does.

Guards (guards.py), built only when asked for, read per-epoch values from persistable
tensors that the caller sets (`schedule_values`), so nothing is rebuilt:
  DARTS-      the search network adds AUX_SKIP * skip(h) to every edge
  beta-DARTS  g_alpha += BETA_DECAY * softmax(alpha) / E (the gradient of
              BETA_DECAY * mean_e logsumexp(alpha_e)), per cell type, in both orders
  budget      g_alpha += grad_alpha lambda_k * max(0, E[C_k](alpha) / B_k - 1) per budget k (budget.py;
              lambda_k in BUDGET_WEIGHTS), in both orders; no w in it, so the Hessian term is unchanged
  RobustDARTS hessian_program: grad_alpha L_val(w, alpha_eig) at alphas set in EIG_PREFIX,
              for `hessian_eigenvalue`

Why several programs and not one: Paddle 3.3's PIR interpreter takes time quadratic
in a program's size to prepare its first run, so five small programs start far
faster than one large one.
"""
from dataclasses import dataclass, field

import numpy as np
import paddle

from darts.search import budget
from darts import distributed
from darts.distributed import mean_across_ranks
from model_search import SearchSpace, cross_entropy, network_layout, search_network
from operations import ParamSet, declare
from darts.optim import (MOMENTUM, WEIGHTS, adam_step, clip_by_global_norm, global_norm,
                   sgd_momentum_step, virtual_step)
from darts.tensors import get_tensors, set_tensors
from darts.search.guards import top_eigenvalue

R_SCALE = 0.01
ADAM_EPS = 1e-8
ADAM_T = 'alpha.adam_t'
UNROLLED_BN_PREFIX = 'unrolled/'
AUX_SKIP = 'guard/aux_skip'
BETA_DECAY = 'guard/beta_decay'
BUDGET_WEIGHTS = 'guard/budget_weights'
ARCH_LR = 'guard/arch_lr'
EIG_PREFIX = 'eig/'
# The finite-difference step along a unit direction of the alphas.  The loss is piecewise smooth in
# alpha (ReLU, max pool), so the quotient is the curvature at the scale of the step: at batch 16, C=8,
# 5 cells, steps of 1e-2 to 3e-2 gave |Hu| of 0.19-0.33, while 1e-3 to 1e-5 gave 1.3 to 7, kinks
# crossed inside the step dominating.  A tiny network has few kinks and wants a small step (1e-4).
EIG_STEP = 1e-2


@dataclass
class SearchConfig:
    init_channels: int = 16
    layers: int = 8
    num_classes: int = 10
    image_size: int = 32
    in_channels: int = 3
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    arch_learning_rate: float = 3e-4
    arch_weight_decay: float = 1e-3
    arch_betas: tuple = (0.5, 0.999)
    second_order: bool = True
    r_scale: float = R_SCALE  # R = r_scale / ||dw'||; the paper's 0.01
    space: SearchSpace = field(default_factory=SearchSpace)
    beta_decay: bool = False      # build beta-DARTS' term (its weight is the tensor BETA_DECAY)
    hessian_eigen: bool = False   # build hessian_program (RobustDARTS' eigenvalue)
    world_size: int = distributed.WORLD   # data-parallel ranks: batch-derived quantities are averaged
    budget: object = None         # budget.Penalty: its gradient is added to g_alpha, in both orders
    arch_lr_annealed: bool = False  # the alphas' Adam lr is the tensor ARCH_LR (set per epoch), not the constant

    @property
    def arch_shapes(self):
        """{name: shape} of the architecture parameters (alphas, and PC-DARTS' betas)."""
        return self.space.arch_shapes()


@dataclass
class SearchPrograms:
    config: SearchConfig
    layout: object
    programs: dict                     # name -> Program, in the order a step runs them
    feeds: dict                        # program name -> names of the data it takes
    fetch: dict = field(default_factory=dict)        # (program name, what) -> Value
    eval_program: paddle.static.Program = None
    hessian_program: paddle.static.Program = None

    @property
    def step_programs(self):
        return list(self.programs.items())


def initial_state(layout, seed, arch_shapes=None):
    """Every persistable tensor the programs use, as numpy, from one seed.

    arch_shapes: {name: shape} of the architecture parameters (default: the paper's two
    alphas); each starts at 1e-3 * N(0, 1), as alphas and PC-DARTS' betas do."""
    arch_shapes = arch_shapes or SearchSpace().arch_shapes()
    rng = np.random.default_rng(seed)
    p = layout.size
    state = {WEIGHTS: layout.initial_weights(rng), MOMENTUM: np.zeros(p, 'float32'),
             ADAM_T: np.zeros(1, 'float32')}
    for name, shape in arch_shapes.items():
        state[name] = (1e-3 * rng.standard_normal(shape)).astype('float32')
        state[name + '.adam_m'] = np.zeros(shape, 'float32')
        state[name + '.adam_v'] = np.zeros(shape, 'float32')
    state.update(layout.initial_buffers())
    return state


def scratch_state(layout, arch_shapes=None):
    """Tensors that only carry values between the programs of one step."""
    arch_shapes = arch_shapes or SearchSpace().arch_shapes()
    p = layout.size
    s = {'arch/w_prime': p, 'arch/w_plus': p, 'arch/w_minus': p, 'arch/r': 1}
    out = {k: np.zeros(n, 'float32') for k, n in s.items()}
    for name, shape in arch_shapes.items():
        for what in ('dalpha', 'g_plus', 'hessian', 'grad'):
            out[f'arch/{what}_{name}'] = np.zeros(shape, 'float32')
    out.update(layout.initial_buffers(UNROLLED_BN_PREFIX))
    return out


def schedule_values(cfg, aux_skip=1.0, beta_decay=0.0, budget_weights=None, arch_lr=None):
    """{tensor: value} of the guards' per-epoch weights that cfg's programs read (budget_weights:
    lambda_k per budget, default the penalty's weight for each; arch_lr: the alphas' learning
    rate this epoch, default cfg.arch_learning_rate)."""
    out = {}
    if cfg.arch_lr_annealed:
        out[ARCH_LR] = np.array([cfg.arch_learning_rate if arch_lr is None else arch_lr], 'float32')
    if cfg.budget is not None:
        if budget_weights is None:
            budget_weights = [cfg.budget.weight] * len(cfg.budget.budgets)
        out[BUDGET_WEIGHTS] = np.array(budget_weights, 'float32')
    if cfg.space.auxiliary_skip:
        out[AUX_SKIP] = np.array([aux_skip], 'float32')
    if cfg.beta_decay:
        out[BETA_DECAY] = np.array([beta_decay], 'float32')
    return out


def build_search_programs(cfg: SearchConfig) -> SearchPrograms:
    """Build every program of a search step, and the eval program, once: the alpha step's programs
    (second or first order), the weight step, evaluation and (RobustDARTS) the Hessian's."""
    build = _ProgramBuilder(cfg)
    if cfg.second_order:
        build.second_order_alpha_step()
    else:
        build.first_order_alpha_step()
    build.weight_step()
    return SearchPrograms(cfg, build.layout, build.programs, build.feeds, build.fetch, build.eval_program(),
                          build.hessian_program() if cfg.hessian_eigen else None)


class _ProgramBuilder:
    """The pieces the search programs are made of: the network's loss at a weight vector, the
    architecture parameters, persistable results, the budget penalty's gradient and Adam."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.space = cfg.space.check(cfg.init_channels)
        self.layout = network_layout(cfg.init_channels, cfg.num_classes, cfg.layers, cfg.image_size,
                                     cfg.in_channels, self.space)
        self.p, self.world = self.layout.size, cfg.world_size
        self.shapes = cfg.arch_shapes
        self.names = list(self.shapes)
        self.programs, self.feeds, self.fetch = {}, {}, {}

    def new_program(self, name, feed_names):
        self.programs[name] = paddle.static.Program()
        self.feeds[name] = feed_names
        return paddle.static.program_guard(self.programs[name], paddle.static.Program())

    def data(self, kind):
        size = self.cfg.image_size
        if kind.endswith('x'):
            return paddle.static.data(kind, [-1, self.cfg.in_channels, size, size], 'float32')
        if kind.endswith('y'):
            return paddle.static.data(kind, [-1], 'int64')
        return paddle.static.data(kind, [1], 'float32')

    def loss_at(self, flat, alphas, x, y, bn_stats='update', bn_prefix=''):
        """(L(w, alpha) on (x, y), logits): the search network over the flat weight vector w."""
        cfg = self.cfg
        ps = ParamSet(self.layout, flat, bn_stats, bn_prefix)
        arch = dict(zip(self.names, alphas))
        if self.space.auxiliary_skip:
            arch['aux_skip'] = declare(AUX_SKIP, [1])
        logits = search_network(ps, x, arch, cfg.init_channels, cfg.num_classes, cfg.layers, self.space)
        return cross_entropy(logits, y), logits

    def alphas(self, trainable):
        """The architecture parameters, in arch_shapes order."""
        return [declare(n, self.shapes[n], trainable) for n in self.names]

    def store(self, value, name, shape):
        paddle.assign(value, output=declare(name, shape))

    def penalty_gradients(self, a):
        """grad_alpha of the budget penalty (None without a budget).  Built before the program's
        loss and its backward pass: Paddle's second backward pass would otherwise walk into the
        first one's ops and fail on them."""
        cfg = self.cfg
        if cfg.budget is None:
            return None
        weights = declare(BUDGET_WEIGHTS, [len(cfg.budget.budgets)])
        return paddle.static.gradients(budget.penalty_value(cfg.budget, dict(zip(self.names, a)), weights), a)

    def adam_update(self, alpha_grad, penalty_grad=None):
        """alpha <- Adam(alpha, alpha_grad [+ penalty_grad] [+ beta-DARTS' term]); the gradient is also
        kept for inspection."""
        cfg, shapes, names = self.cfg, self.shapes, self.names
        if penalty_grad is not None:
            alpha_grad = [gi if gp is None else gi + gp for gi, gp in zip(alpha_grad, penalty_grad)]
        a = self.alphas(False)
        t = declare(ADAM_T, [1])
        t_new = t + 1.0
        lr = declare(ARCH_LR, [1]) if cfg.arch_lr_annealed else cfg.arch_learning_rate
        if cfg.beta_decay:
            lam = declare(BETA_DECAY, [1])
            alpha_grad = [gi + lam * paddle.nn.functional.softmax(ai, axis=-1) / shapes[name][0]
                          if name.startswith('alpha_') else gi for ai, gi, name in zip(a, alpha_grad, names)]
        for ai, gi, name in zip(a, alpha_grad, names):
            m, v = declare(name + '.adam_m', shapes[name]), declare(name + '.adam_v', shapes[name])
            a_new, m_new, v_new = adam_step(ai, gi, m, v, t_new, lr, cfg.arch_betas, ADAM_EPS, cfg.arch_weight_decay)
            self.store(gi, f'arch/grad_{name}', shapes[name])
            paddle.assign(m_new, output=m)
            paddle.assign(v_new, output=v)
            paddle.assign(a_new, output=ai)
        paddle.assign(t_new, output=t)

    def second_order_alpha_step(self):
        """Four programs: w' (unrolled_step); dalpha, dw' and w+- (unrolled_grad); grad_alpha L_train
        at w+ (hessian_plus); at w-, the finite difference and Adam (alpha_update)."""
        cfg, p, world, shapes, names = self.cfg, self.p, self.world, self.shapes, self.names
        data, store = self.data, self.store
        with self.new_program('unrolled_step', ['train_x', 'train_y', 'lr']):
            w, lr = declare(WEIGHTS, [p], trainable=True), data('lr')
            loss, _ = self.loss_at(w, self.alphas(False), data('train_x'), data('train_y'))
            (g,) = mean_across_ranks(paddle.static.gradients(loss, [w]), world)
            store(virtual_step(w, g, declare(MOMENTUM, [p]), lr, cfg.momentum, cfg.weight_decay),
                  'arch/w_prime', [p])

        with self.new_program('unrolled_grad', ['val_x', 'val_y']):
            w_prime, a = declare('arch/w_prime', [p], trainable=True), self.alphas(True)
            loss, _ = self.loss_at(w_prime, a, data('val_x'), data('val_y'), bn_prefix=UNROLLED_BN_PREFIX)
            *dalpha, dw = mean_across_ranks(paddle.static.gradients(loss, a + [w_prime]), world)
            r = cfg.r_scale / global_norm([dw])
            w = declare(WEIGHTS, [p])
            store(w + r * dw, 'arch/w_plus', [p])
            store(w - r * dw, 'arch/w_minus', [p])
            store(r, 'arch/r', [1])
            for d, name in zip(dalpha, names):
                store(d, f'arch/dalpha_{name}', shapes[name])
            self.fetch['unrolled_grad', 'val_loss'] = loss

        with self.new_program('hessian_plus', ['train_x', 'train_y']):
            a = self.alphas(True)
            loss, _ = self.loss_at(declare('arch/w_plus', [p]), a, data('train_x'), data('train_y'))
            for g, name in zip(mean_across_ranks(paddle.static.gradients(loss, a), world), names):
                store(g, f'arch/g_plus_{name}', shapes[name])

        with self.new_program('alpha_update', ['train_x', 'train_y', 'lr']):
            a, lr = self.alphas(True), data('lr')
            penalty_grad = self.penalty_gradients(a)
            loss, _ = self.loss_at(declare('arch/w_minus', [p]), a, data('train_x'), data('train_y'))
            g_minus = mean_across_ranks(paddle.static.gradients(loss, a), world)
            r = declare('arch/r', [1])
            alpha_grad = []
            for gm, name in zip(g_minus, names):
                hessian = (declare(f'arch/g_plus_{name}', shapes[name]) - gm) / (2.0 * r)
                store(hessian, f'arch/hessian_{name}', shapes[name])
                alpha_grad.append(declare(f'arch/dalpha_{name}', shapes[name]) - lr * hessian)
            self.adam_update(alpha_grad, penalty_grad)

    def first_order_alpha_step(self):
        """One program: grad_alpha L_val(w, alpha) and Adam (alpha_update)."""
        with self.new_program('alpha_update', ['val_x', 'val_y']):
            a = self.alphas(True)
            penalty_grad = self.penalty_gradients(a)
            loss, _ = self.loss_at(declare(WEIGHTS, [self.p]), a, self.data('val_x'), self.data('val_y'))
            self.adam_update(mean_across_ranks(paddle.static.gradients(loss, a), self.world), penalty_grad)
            self.fetch['alpha_update', 'val_loss'] = loss

    def weight_step(self):
        """SGD with momentum on L_train(w, alpha), the gradient clipped by its global norm."""
        cfg, p = self.cfg, self.p
        with self.new_program('weight_step', ['train_x', 'train_y', 'lr']):
            w, v, lr = declare(WEIGHTS, [p], trainable=True), declare(MOMENTUM, [p]), self.data('lr')
            loss, logits = self.loss_at(w, self.alphas(False), self.data('train_x'), self.data('train_y'))
            g = clip_by_global_norm(mean_across_ranks(paddle.static.gradients(loss, [w]), self.world)[0],
                                    cfg.grad_clip)
            w_new, v_new = sgd_momentum_step(w, g, v, lr, cfg.momentum, cfg.weight_decay)
            paddle.assign(v_new, output=v)
            paddle.assign(w_new, output=w)
            self.fetch['weight_step', 'train_loss'] = loss
            self.fetch['weight_step', 'train_logits'] = logits

    def eval_program(self):
        """L(w, alpha) and logits with BN's running statistics."""
        program = paddle.static.Program()
        with paddle.static.program_guard(program, paddle.static.Program()):
            loss, logits = self.loss_at(declare(WEIGHTS, [self.p]), self.alphas(False), self.data('x'),
                                        self.data('y'), bn_stats='running')
            self.fetch['eval', 'loss'], self.fetch['eval', 'logits'] = loss, logits
        return program

    def hessian_program(self):
        """grad_alpha L_val at the alphas EIG_PREFIX + name (set per direction; PC-DARTS' betas as
        they are): the Hessian-vector products of RobustDARTS' eigenvalue."""
        program = paddle.static.Program()
        with paddle.static.program_guard(program, paddle.static.Program()):
            at = [declare(EIG_PREFIX + n, self.shapes[n], True) if n.startswith('alpha_')
                  else declare(n, self.shapes[n]) for n in self.names]
            loss, _ = self.loss_at(declare(WEIGHTS, [self.p]), at, self.data('x'), self.data('y'),
                                   bn_prefix=UNROLLED_BN_PREFIX)
            wrt = [a for a, n in zip(at, self.names) if n.startswith('alpha_')]
            self.fetch['hessian', 'grads'] = paddle.static.gradients(loss, wrt)
        return program


def count_ops(program):
    return len(program.global_block().ops)


def run_search_step(exe, progs, batch, lr, update_arch=True):
    """One alpha step then one weight step.  batch: train_x, train_y, val_x, val_y arrays.

    update_arch=False (the warm-up epochs): the weight step only.
    Returns (train_loss, train_logits, val_loss); val_loss is L_val at w' (second order)
    or at w (first order), before the step's updates, and None without an alpha step.
    """
    feed_values = dict(batch, lr=np.array([lr], 'float32'))
    out = {}
    for name, program in progs.step_programs:
        if not update_arch and name != 'weight_step':
            continue
        wanted = [(k, v) for k, v in progs.fetch.items() if k[0] == name]
        results = exe.run(program, feed={k: feed_values[k] for k in progs.feeds[name]},
                          fetch_list=[v for _, v in wanted])
        out.update({k[1]: r for (k, _), r in zip(wanted, results)})
    val_loss = float(out['val_loss']) if 'val_loss' in out else None
    return float(out['train_loss']), out['train_logits'], val_loss


def hessian_eigenvalue(exe, scope, place, progs, x, y, iterations=20, seed=0, step=EIG_STEP):
    """RobustDARTS' dominant (largest) eigenvalue of the Hessian of L_val(w, .) at the current
    alphas (normal and reduce together), on the batch (x, y): Lanczos (guards.top_eigenvalue)
    on H v ~ (grad L_val(alpha + e v) - grad L_val(alpha - e v)) / (2 e), e = step, so
    2 * iterations forward-backward passes.  Returns (eigenvalue, unit eigenvector as {name: array})."""
    names = [n for n in progs.config.arch_shapes if n.startswith('alpha_')]
    base = get_tensors(scope, names)
    sizes = [base[n].size for n in names]

    def unflatten(vec):
        return {n: p.reshape(base[n].shape) for n, p in zip(names, np.split(vec, np.cumsum(sizes)[:-1]))}

    def grad_at(vec):
        set_tensors(scope, place, {EIG_PREFIX + n: base[n] + d for n, d in unflatten(vec).items()})
        grads = exe.run(progs.hessian_program, feed={'x': x, 'y': y}, fetch_list=progs.fetch['hessian', 'grads'])
        return np.concatenate([np.asarray(g, np.float64).reshape(-1) for g in grads])

    def hessian_vector(v):
        return (grad_at(step * v) - grad_at(-step * v)) / (2 * step)
    value, v = top_eigenvalue(hessian_vector, sum(sizes), iterations, seed)
    return value, unflatten(v)


def evaluate_batch(exe, progs, x, y):
    loss, logits = exe.run(progs.eval_program, feed={'x': x, 'y': y},
                           fetch_list=[progs.fetch['eval', 'loss'], progs.fetch['eval', 'logits']])
    return float(loss), logits
