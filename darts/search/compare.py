"""Comparing groups of cells retrained over several seeds: each cell's mean and spread, the
noise floor, and whether one group retrains better than another.

Each cell c of a group is retrained K times (seeds s..s+K-1); y_cr is retrain r's validation
top-1.  The model behind the figures is one-way random effects:

    y_cr = mu_c + e_cr,   e_cr ~ (0, sigma_w^2)      (retrain noise: the same cell, another seed)
    mu_c  ~ (mu_group, sigma_b^2)                     (cells of one group differ by sigma_b)

    sigma_w^2 = mean over cells of the sample variance of y_c.   (pooled; needs K >= 2)
    s_m^2     = variance of the cell means ybar_c about their group's mean, pooled over groups
              = sigma_b^2 + sigma_w^2 / K                        (what a cell mean scatters by)
    sigma_b^2 = max(0, s_m^2 - sigma_w^2 / K)

The smallest difference between two groups of n1 and n2 cells that a one-sided test at level
alpha finds with probability `power` (normal approximation):

    d_min = (z_{1-alpha} + z_{power}) * s_m * sqrt(1/n1 + 1/n2)

More retrain seeds shrink only the sigma_w^2 / K part of s_m; more cells shrink all of it.
Groups are compared on their cell means by a one-sided Mann-Whitney U test (scipy).
"""
import math

import numpy as np

ALPHA, POWER = 0.05, 0.8


def cell_spread(values):
    """(mean, sample standard deviation) of one cell's retrains (sd 0 for a single retrain)."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def noise_floor(groups, alpha=ALPHA, power=POWER):
    """The figures above from {group: [[y_c1, ..., y_cK] per cell]} (every cell K retrains):
    dict(retrain_seeds=K, within_sd, cell_mean_sd, between_sd, z) in the units of y; within_sd
    and between_sd are None with K = 1 (retrain noise cannot be told from cell differences), and
    cell_mean_sd is None when no group has two cells."""
    cells = [np.asarray(c, np.float64) for g in groups.values() for c in g]
    k = min(len(c) for c in cells)
    within = float(np.sqrt(np.mean([c.var(ddof=1) for c in cells]))) if k > 1 else None
    squares, dof = 0.0, 0
    for g in groups.values():
        means = np.array([np.mean(c) for c in g])
        if len(means) > 1:
            squares += float(((means - means.mean()) ** 2).sum())
            dof += len(means) - 1
    cell_mean_sd = math.sqrt(squares / dof) if dof else None
    between = None
    if within is not None and cell_mean_sd is not None:
        between = math.sqrt(max(0.0, cell_mean_sd ** 2 - within ** 2 / k))
    return dict(retrain_seeds=k, within_sd=within, cell_mean_sd=cell_mean_sd, between_sd=between,
                z=z_sum(alpha, power), alpha=alpha, power=power)


def z_sum(alpha=ALPHA, power=POWER):
    """z_{1-alpha} + z_{power}: 1.645 + 0.842 = 2.486 at the defaults."""
    from scipy.stats import norm
    return float(norm.ppf(1 - alpha) + norm.ppf(power))


def detectable(noise, n1, n2):
    """d_min for groups of n1 and n2 cells (None without an estimate of the cell-mean spread)."""
    if noise['cell_mean_sd'] is None:
        return None
    return noise['z'] * noise['cell_mean_sd'] * math.sqrt(1 / n1 + 1 / n2)


def rank_test(better, other):
    """(p, share of pairs won) of the one-sided Mann-Whitney U test 'better retrains higher'."""
    from scipy.stats import mannwhitneyu
    test = mannwhitneyu(better, other, alternative='greater')
    return float(test.pvalue), float(test.statistic) / (len(better) * len(other))


def min_p(n1, n2):
    """The smallest p a one-sided rank test of n1 against n2 values can give: 1 / C(n1 + n2, n1)."""
    return 1 / math.comb(n1 + n2, n1)


def noise_line(noise, n1, n2, unit=100, sign='points'):
    """The noise floor in one line, for a comparison of n1 against n2 cells."""
    k = noise['retrain_seeds']
    d = detectable(noise, n1, n2)
    reach = (f'the smallest difference {n1} against {n2} cells can detect is {unit * d:.2f} {sign} (one-sided '
             f'alpha {noise["alpha"]:g}, power {noise["power"]:g})' if d is not None
             else f'{n1} against {n2} cells: too few cells per group to estimate what can be detected')
    if noise['within_sd'] is None:
        return (f'noise floor: one retrain per cell, so retrain noise cannot be told from differences between '
                f'cells (--retrain_seeds 2 or more); {reach}')
    within, between = unit * noise['within_sd'], noise['between_sd']
    spread = 'n/a (one cell per group)' if between is None else f'{unit * between:.2f} {sign}'
    verdict = ''
    if between is not None:
        verdict = ('; retrain noise is below the spread between cells' if noise['within_sd'] < between else
                   '; retrain noise is as large as the spread between cells: at this retrain budget cells '
                   'cannot be told apart')
    return (f'noise floor: the same cell over {k} seeds varies by {within:.2f} {sign} (sd), cells differ by '
            f'{spread}{verdict}; {reach}')
