"""Run under `python -m paddle.distributed.launch --nproc_per_node 2`, by tests/test_distributed.py:
each rank runs our data-parallel programs on its share of the global batches that the test
process also builds, and saves what the steps left in OUT/rank<R>.npz.

    one step each of: second order (DARTS), first order, PC-DARTS second order, train.py's step
    (auxiliary head, drop path 0.3); after the DARTS step two more and the BN statistics
    averaged, for the check that every rank holds the same state bit for bit.
"""
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
from darts import process  # noqa: E402

process.prepare()   # before paddle is imported, as the commands do

import paddle  # noqa: E402

from darts import distributed, lifecycle  # noqa: E402

import test_architect as ta  # noqa: E402
from test_distributed import SEARCH, train_step_inputs  # noqa: E402
from architect import (build_search_programs, get_tensors, run_search_step, schedule_values,  # noqa: E402
                       scratch_state, set_tensors)



def shard(batch, world):
    return {k: v[world.shard(len(v))] for k, v in batch.items()}


def search_steps(world, exe, cfg, more_steps=0):
    """({name: tensor} after one step, and after `more_steps` more with the BN statistics averaged)."""
    progs = build_search_programs(cfg)
    state, batch = ta.step_inputs(progs, cfg)
    scope = paddle.static.Scope()
    with paddle.static.scope_guard(scope):
        set_tensors(scope, world.place, {**state, **scratch_state(progs.layout, cfg.arch_shapes),
                                         **schedule_values(cfg, ta.AUX_SKIP, ta.BETA_DECAY)})
        run_search_step(exe, progs, shard(batch, world), ta.LR)
        one = ta.step_results(scope, cfg)
        for _ in range(more_steps):
            run_search_step(exe, progs, shard(batch, world), ta.LR)
        world.average_tensors(exe, scope, list(progs.layout.buffers))
        return one, get_tensors(scope, list(state))


def train_step(world, exe):
    progs, state, feed = train_step_inputs()
    scope = paddle.static.Scope()
    with paddle.static.scope_guard(scope):
        set_tensors(scope, world.place, state)
        rows = world.shard(len(feed['y']))
        local = dict(feed, x=feed['x'][rows], y=feed['y'][rows], drop_noise=feed['drop_noise'][:, rows])
        exe.run(progs['train'], feed=local, fetch_list=progs['train_fetch'])
        return get_tensors(scope, list(state))


def main(out):
    paddle.enable_static()
    world = distributed.setup('cpu', on_stall=lifecycle.stop_now)
    exe = paddle.static.Executor(world.place)
    saved = {}
    for kind, cfg in SEARCH.items():
        one, more = search_steps(world, exe, cfg, more_steps=2 if kind == 'darts' else 0)
        saved.update({f'{kind}/{k}': v for k, v in one.items()})
        if kind == 'darts':
            saved.update({f'three_steps/{k}': v for k, v in more.items()})
    saved.update({f'train/{k}': v for k, v in train_step(world, exe).items()})
    np.savez(os.path.join(out, f'rank{world.rank}.npz'), **saved)


if __name__ == '__main__':
    main(sys.argv[1])
