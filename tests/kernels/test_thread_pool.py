"""kvloom::parallel_for (kernels/cpu/thread_pool.h): the kernels' own worker pool, from any thread.

The kernels split their work over a pool of spinning threads instead of OpenMP (see the header for
why). These tests check the results wherever the caller runs: the main thread, another thread,
several threads at once (one holds the pool, the others run inline), and a forked child (which has
none of the parent's workers: it must neither wait for them nor compute wrongly).
"""

from __future__ import annotations

import multiprocessing
import threading

import pytest
import torch

from kvloom.kernels.cpu_ops import load_cpu_ops

ops = load_cpu_ops()
pytestmark = pytest.mark.skipif(ops is None, reason="C++ CPU kernels unavailable")


def _case(seed: int, rows: int = 3, k: int = 300, n: int = 2051):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
    return x, w, torch.nn.functional.linear(x, w)


def _check(seed: int) -> None:
    x, w, want = _case(seed)
    for _ in range(20):
        torch.testing.assert_close(ops.linear_small_m(x, w, None), want, rtol=1e-5, atol=1e-3)


def _in_thread(fn, *args):
    """fn(*args) on another thread (where the kernels use the pool); its result, or its exception raised."""
    out: list = []

    def body():
        try:
            out.append(("ok", fn(*args)))
        except BaseException as e:  # re-raised in the calling thread
            out.append(("error", e))

    t = threading.Thread(target=body)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "the kernel hung"
    kind, value = out[0]
    if kind == "error":
        raise value
    return value


def test_results_from_main_and_another_thread():
    _check(0)  # the main thread keeps OpenMP
    _in_thread(_check, 1)


def test_concurrent_callers_share_the_pool():
    # The kernels release the GIL, so these threads really run at once: one holds the workers and
    # the others run their ranges inline; every result stays exact.
    errors: list[BaseException] = []

    def body(seed: int):
        try:
            _check(seed)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=body, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and not errors


def _child(conn, x, w, want) -> None:
    # Only the pool runs in the child (OpenMP, torch's included, is not fork-safe once used).
    got = _in_thread(ops.linear_small_m, x, w, None)
    conn.send(bool(torch.allclose(got, want, rtol=1e-5, atol=1e-3)))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork on this platform")
def test_forked_child_does_not_wait_for_the_parents_workers():
    _in_thread(_check, 3)  # the parent's pool has workers now; the child has none of them
    parent, child = multiprocessing.get_context("fork").Pipe()
    p = multiprocessing.get_context("fork").Process(target=_child, args=(child, *_case(7)))
    p.start()
    p.join(timeout=60)
    if p.is_alive():
        p.kill()
        pytest.fail("the forked child hung in the kernel (it waited for the parent's workers)")
    assert parent.poll() and parent.recv() is True


def test_one_thread_runs_inline():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check(4)
    finally:
        torch.set_num_threads(before)
