"""Seeing a search collapse coming, and guarding against it.

Diagnostics (every epoch, in history.jsonl and the log):
  skips and parameter-free operations in the derived normal and reduction cells, and
  the mean entropy of softmax(alpha) per cell type, H = mean_e -sum_o p_eo log p_eo
  (log |ops| when uniform, 0 when every edge has decided);
  optionally the dominant (largest) eigenvalue of the Hessian of L_val with respect to
  the alphas (RobustDARTS, Zela et al. ICLR 2020), from finite-difference Hessian-vector
  products (`top_eigenvalue`).

Guards (each opt-in; train_search.py's flags):
  --max_skip N        P-DARTS (Chen et al. ICCV 2019): `limit_skips`
  --auxiliary_skip    DARTS- (Chu et al. ICLR 2021): `auxiliary_skip_coefficient`; the
                      network side is model_search (SearchSpace.auxiliary_skip)
  --beta_decay LAMBDA beta-DARTS (Ye et al. CVPR 2022): `beta_decay_weight`; the
                      gradient is added in architect.py's alpha update
  --early_stop RULE   DARTS+ (Liang et al. 2019): `EarlyStop`
"""
import os

import numpy as np

import genotypes
from darts import files
from darts.numeric import softmax

SKIP = 'skip_connect'


def mean_entropy(alpha):
    """mean over edges of -sum_o p log p, p = softmax(alpha_e)."""
    p = softmax(alpha)
    return float(np.mean(-(p * np.log(np.maximum(p, 1e-300))).sum(axis=-1)))


def cell_counts(genotype):
    """{normal,reduce}_{skips,param_free}: skip connections and parameter-free operations
    (Op.parametric False: pools, identity) among each derived cell's operations."""
    from operations import lookup
    out = {}
    for kind, pairs in (('normal', genotype.normal), ('reduce', genotype.reduce)):
        out[kind + '_skips'] = sum(op == SKIP for op, _ in pairs)
        out[kind + '_param_free'] = sum(not lookup(op).parametric for op, _ in pairs)
    return out


def distance_from_uniform(alpha):
    """mean over edges of the total variation 0.5 * sum_o |p_eo - 1/K|, p = softmax(alpha_e): the
    share of an edge's weight that has moved between ops (0 at the start, at most 1 - 1/K)."""
    p = softmax(alpha)
    return float(np.mean(0.5 * np.abs(p - 1.0 / p.shape[-1]).sum(axis=-1)))


# Below this mean distance from uniform (both cell types), the derived cell is reported as still
# close to its random start: the README's 2-epoch demo at the paper's arch lr ended at 0.004,
# 10-epoch searches at 10x that arch lr at 0.05-0.10 (digits, 16 px).
MOVED_MIN = 0.02


def diagnostics(arch, genotype):
    """The per-epoch collapse figures of a search (see the module docstring)."""
    d = cell_counts(genotype)
    for kind in ('normal', 'reduce'):
        d['entropy_' + kind] = round(mean_entropy(arch['alpha_' + kind]), 6)
        d['moved_' + kind] = round(distance_from_uniform(arch['alpha_' + kind]), 6)
    return d


def _cell_sets(d):
    """A genotype dict as per-node sets of (op, input): the order of a node's two pairs is not the cell."""
    return [[frozenset(map(tuple, d[k][2 * i:2 * i + 2])) for i in range(len(d[k]) // 2)] for k in ('normal', 'reduce')]


def same_cells(a, b):
    """Whether two genotype dicts are the same cells (each node's pairs in any order)."""
    return _cell_sets(a) == _cell_sets(b)


def stable_epochs(history):
    """How many of the last epochs derived the same cell as the last one (1: it changed in the last)."""
    last, n = _cell_sets(history[-1]['genotype']), 0
    for record in reversed(history):
        if _cell_sets(record['genotype']) != last:
            break
        n += 1
    return n


def how_far(history):
    """The end-of-search line: how far the alphas moved and how long the derived cell has been
    stable; and a warning when the alphas barely moved.  (Not how many pairs the cell shares with
    the one its random initial alphas derive: near uniform, the argmax of 1e-3 noise flips with
    any step, so that count is low even for alphas that have hardly moved.)"""
    last = history[-1]
    moved = (last['moved_normal'] + last['moved_reduce']) / 2
    k = stable_epochs(history)
    text = (f'the alphas moved {moved:.3f} from uniform (mean share of an edge\'s weight moved between ops; '
            f'normal {last["moved_normal"]:.3f}, reduce {last["moved_reduce"]:.3f}); the derived cell '
            + (f'has not changed for its last {k} epochs' if k > 1 else 'changed in the last epoch'))
    if moved < MOVED_MIN:
        text += (f'\nwarning: the architecture weights have barely moved from their random start (below '
                 f'{MOVED_MIN}): this genotype says little about the data; search longer or with a larger '
                 f'--arch_learning_rate')
    return text


def describe(d, num_ops):
    """One log line of the diagnostics."""
    text = (f"collapse watch: normal cell {d['normal_skips']} skip / {d['normal_param_free']} parameter-free, "
            f"reduction cell {d['reduce_skips']} / {d['reduce_param_free']}; alpha entropy normal "
            f"{d['entropy_normal']:.3f} reduce {d['entropy_reduce']:.3f} (uniform {np.log(num_ops):.3f})")
    if 'moved_normal' in d:
        text += f"; moved from uniform {d['moved_normal']:.3f} / {d['moved_reduce']:.3f}"
    if 'hessian_eigenvalue' in d:
        text += f"; Hessian eigenvalue {d['hessian_eigenvalue']:.4g} ({d['hessian_seconds']:.1f}s)"
    return text


def limit_skips(weights, max_skip, steps, ops):
    """P-DARTS' skip limit on one cell's edge weights W [E, |ops|].

    Derive the cell (genotypes.derive_cell); while it holds more than max_skip skip
    connections, set W[e, skip] = 0 on the kept skip edge e with the smallest skip weight
    (ties: the later edge) and derive again, so that edge's next-best non-`none` op, or
    another edge of its node, takes its place.  Returns (gene, the edges zeroed).
    """
    ops = list(ops)
    w = np.array(weights, np.float64)
    if SKIP not in ops:
        return genotypes.derive_cell(w, steps, ops), []
    col, zeroed = ops.index(SKIP), []
    starts = np.cumsum([0] + [i + 2 for i in range(steps)])
    while True:
        gene = genotypes.derive_cell(w, steps, ops)
        kept = [starts[k // 2] + j for k, (op, j) in enumerate(gene) if op == SKIP]
        if len(kept) <= max_skip:
            return gene, zeroed
        weakest = min(kept, key=lambda e: (w[e, col], -e))
        w[weakest, col] = 0.0
        zeroed.append(int(weakest))


def auxiliary_skip_coefficient(epoch, epochs):
    """DARTS-: the auxiliary skip's weight, (E - epoch) / E at the start of epoch (from 0):
    1 in the first epoch, falling linearly to 1/E in the last."""
    return (epochs - epoch) / epochs


def beta_decay_weight(lam, epoch, epochs):
    """beta-DARTS' lambda at epoch (from 0): LAMBDA * epoch / epochs, rising linearly from 0,
    as the official code's 50 * epoch / 100 over 100 epochs.

    The regularisation is L_beta = sum over cell types of mean_e logsumexp_o(alpha_e);
    d L_beta / d alpha_eo = softmax(alpha_e)_o / E."""
    return lam * epoch / epochs


def ranking(alpha, ops):
    """Per edge, the parametric ops ordered by alpha (strongest first): DARTS+'s ranking."""
    from operations import lookup
    learnable = [k for k, op in enumerate(ops) if lookup(op).parametric]
    a = np.asarray(alpha)[:, learnable]
    return [[ops[learnable[k]] for k in np.argsort(-row, kind='stable')] for row in a]


class EarlyStop:
    """DARTS+ early stopping, from a rule 'skip:N' or 'stable:K'.

    skip:N    stop once the derived normal cell has N or more skip connections; the
              chosen epoch is the one before (the last that had fewer), or the first
              epoch if it already has them.
    stable:K  stop once the ranking of the parametric ops' alphas on every edge of both
              cells (`ranking`) has not changed for K epochs with architecture steps; the
              chosen epoch is that one.
    """

    FILE = 'early_stop.json'                     # in the run folder once a search stopped
    OVERRIDDEN = 'early_stop_overridden.json'    # the same, once it was continued (--continue_stopped)

    def __init__(self, rule):
        kind, _, value = str(rule).partition(':')
        if kind not in ('skip', 'stable') or not value.isdigit() or int(value) < 1:
            raise ValueError(f"--early_stop {rule!r}: expected skip:N or stable:K with N, K >= 1")
        self.rule, self.kind, self.value = rule, kind, int(value)

    def check(self, history, ops):
        """history: the epoch records so far, the current epoch last.  None, or
        dict(rule, stopped_at, chosen_epoch, reason)."""
        now = history[-1]
        if self.kind == 'skip':
            if now['normal_skips'] < self.value:
                return None
            chosen = now['epoch'] - 1 if len(history) > 1 else now['epoch']
            reason = f"the normal cell has {now['normal_skips']} skip connections (limit {self.value})"
        else:
            rows = [r for r in history if r.get('arch_updates', True)]
            if len(rows) < self.value + 1:
                return None
            ranks = [(ranking(r['alpha_normal'], ops), ranking(r['alpha_reduce'], ops)) for r in rows[-self.value - 1:]]
            if any(r != ranks[-1] for r in ranks):
                return None
            chosen = now['epoch']
            reason = f'the ranking of the parametric operations has not changed for {self.value} epochs'
        return dict(rule=self.rule, stopped_at=now['epoch'], chosen_epoch=chosen, reason=reason)


    @classmethod
    def resume(cls, run, rule, continue_stopped):
        """(the rule a search in `run` (a runfolder.Run) applies, or None; the record of its early stop
        if it stopped and is not to go on, else None).

        A stopped search is over unless continue_stopped: then its early_stop.json becomes
        early_stop_overridden.json, and a search continued once keeps the rule off for good."""
        # read before looking for OVERRIDDEN: the writer
        stopped = files.read_json(run.file(cls.FILE), missing_ok=True)
        continued = os.path.isfile(run.file(cls.OVERRIDDEN))  # of a data-parallel job may rename it meanwhile
        if stopped is not None:
            if not continue_stopped:
                return None, stopped
            continued = True
            if run.writer:
                os.replace(run.file(cls.FILE), run.file(cls.OVERRIDDEN))
        if continued:
            if rule:
                run.log(f'--early_stop {rule} is off: this search was continued after it stopped')
            return None, None
        return (cls(rule) if rule else None), None

    def save(self, run, stop, collapsed_genotype):
        """early_stop.json: why and where the search stopped, and (when the chosen epoch is the one
        before) the genotype it would have written instead."""
        run.write_json(self.FILE, dict(stop, collapsed_genotype=collapsed_genotype))


def top_eigenvalue(hessian_vector, dim, iterations=20, seed=0):
    """The largest eigenvalue (and its unit eigenvector) of the symmetric part of an operator
    given as v -> Hv, from `iterations` products: the Krylov space of power iteration
    (v, Hv, H^2 v, ... from a seeded random v), orthonormalised as it grows (Arnoldi), and the
    largest eigenvalue of (M + M^T) / 2, M = Q^T H Q (Rayleigh-Ritz).  For a symmetric H this is
    Lanczos, and it converges far faster than power iteration's Rayleigh quotient; the
    symmetric part is what a finite-difference H of a ReLU network (not exactly symmetric)
    has real eigenvalues for.  With iterations = dim it is exact."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(dim)
    basis, products = [q / np.linalg.norm(q)], []
    for k in range(min(iterations, dim)):
        products.append(np.asarray(hessian_vector(basis[-1]), np.float64))
        if k == min(iterations, dim) - 1:
            break
        b = np.array(basis)
        w = products[-1] - b.T @ (b @ products[-1])
        w = w - b.T @ (b @ w)          # twice: orthogonal to float64 precision
        norm = float(np.linalg.norm(w))
        if norm < 1e-12 * max(1.0, float(np.linalg.norm(products[-1]))):
            break                       # the space is invariant: its eigenvalues are exact
        basis.append(w / norm)
    q = np.array(basis[:len(products)]).T                       # [dim, k]
    m = q.T @ np.array(products).T
    values, vectors = np.linalg.eigh((m + m.T) / 2)
    v = q @ vectors[:, -1]
    return float(values[-1]), v / np.linalg.norm(v)


def add_arguments(p):
    """The flags of the collapse guards and diagnostics (all off by default)."""
    g = p.add_argument_group('collapse guards and diagnostics (all off by default; see docs/collapse.md)')
    g.add_argument('--max_skip', type=int, default=None, metavar='N',
                   help='P-DARTS: the derived normal cell keeps at most N skip connections (paper: 2); '
                        'genotype.json is the limited cell, genotype_raw.json the unlimited one')
    g.add_argument('--auxiliary_skip', action='store_true',
                   help='DARTS-: an extra skip on every edge, outside the softmax, weighted 1 -> 0 over the epochs')
    g.add_argument('--beta_decay', type=float, default=None, metavar='LAMBDA',
                   help='beta-DARTS: add lambda_t * mean_e logsumexp(alpha_e) per cell to the alpha loss, '
                        'lambda_t = LAMBDA * epoch / epochs (paper: 50)')
    g.add_argument('--early_stop', default=None, metavar='RULE',
                   help='DARTS+: skip:N stops once the normal cell has N skips and keeps the epoch before; '
                        'stable:K stops once the ranking of the parametric ops has not changed for K epochs')
    g.add_argument('--continue_stopped', action='store_true',
                   help='with --resume: go on searching after an early stop (the rule is then off)')
    g.add_argument('--hessian_eigen_step', type=float, default=1e-2, metavar='E',
                   help='the finite-difference step of --hessian_eigen_every (the curvature at this scale)')
    g.add_argument('--hessian_eigen_every', type=int, default=0, metavar='N',
                   help='RobustDARTS: every N epochs, the dominant eigenvalue of the Hessian of L_val w.r.t. '
                        'alpha (Lanczos on finite-difference Hessian-vector products: 40 passes on one search-val '
                        'batch; 0: never)')


def check_arguments(p, args):
    """The guards' flags in range (p.error: one line)."""
    for name in ('max_skip', 'beta_decay', 'hessian_eigen_every'):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            p.error(f'--{name} must be at least 0')
    if not args.hessian_eigen_step > 0:
        p.error('--hessian_eigen_step must be above 0')
    if args.early_stop is not None:
        try:
            EarlyStop(args.early_stop)
        except ValueError as e:
            p.error(str(e))
