"""Worker threads and the jobs that run on the event loop's thread while they are quick
(nstap.threads): real threads, real time."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from nstap.threads import QUICK_RUNS, QuickJob, WorkerThread


@pytest.fixture
def worker():
    thread = WorkerThread("nstap-test")
    yield thread
    thread.shutdown(wait=True)


async def test_a_quick_job_runs_on_the_loops_thread_once_it_was_quick_and_in_the_thread_once_it_was_slow(worker: WorkerThread) -> None:
    loop_thread = threading.get_ident()
    ran_on: list[int] = []
    delay = [0.0]

    def read() -> int:
        ran_on.append(threading.get_ident())
        if delay[0]:
            time.sleep(delay[0])
        return len(ran_on)

    job = QuickJob(worker, read, quick=0.002)
    first = job.start()
    assert not first.done()  # its first run: in the thread, nothing known of its cost yet
    assert await first == 1 and ran_on[-1] != loop_thread
    second = job.start()
    assert second.done() and second.result() == 2 and ran_on[-1] == loop_thread  # quick: no trip to the thread
    delay[0] = 0.005
    assert job.start().result() == 3 and ran_on[-1] == loop_thread  # (nothing known yet of this slow run)
    delay[0] = 0.0
    for n in range(QUICK_RUNS):  # one slow run among the latest QUICK_RUNS: in the thread
        future = job.start()
        assert not future.done()
        assert await future == 4 + n and ran_on[-1] != loop_thread
    back = job.start()  # the slow run is no longer among the latest: back on the loop's thread
    assert back.done() and ran_on[-1] == loop_thread
    assert (job.inline, job.threaded) == (3, 1 + QUICK_RUNS)
    assert len(job.took) == QUICK_RUNS  # bounded


async def test_a_quick_job_waits_for_the_threads_other_work_and_runs_after_it_not_beside_it(worker: WorkerThread) -> None:
    loop_thread = threading.get_ident()
    job = QuickJob(worker, lambda: threading.get_ident())
    await job.start()  # known quick from now on
    release = threading.Event()
    order: list[str] = []

    def other() -> None:  # a sweep, a rules read: the job's state is the thread's meanwhile
        release.wait(5)
        order.append("other")

    other_done = worker.submit(other)
    assert not worker.idle
    behind = job.start()
    assert not behind.done()  # not run beside the thread's work
    release.set()
    await other_done
    assert await behind != loop_thread  # in the thread, after it
    assert worker.idle
    assert job.start().result() == loop_thread


async def test_a_failed_quick_run_is_handed_over_as_a_failed_future(worker: WorkerThread) -> None:
    calls = [0]

    def read() -> int:
        calls[0] += 1
        if calls[0] == 2:
            raise OSError("map gone")
        return calls[0]

    job = QuickJob(worker, read)
    assert await job.start() == 1
    failed = job.start()
    assert failed.done() and isinstance(failed.exception(), OSError)  # inline, and not raised at the caller
    assert job.start().result() == 3  # and the next runs go on


async def test_a_worker_thread_is_idle_again_when_a_job_given_to_it_was_cancelled(worker: WorkerThread) -> None:
    release = threading.Event()
    running = worker.submit(release.wait, 5)
    queued = worker.submit(lambda: None)
    queued.cancel()  # (the thread's job is cancelled too: it had not begun)
    assert not worker.idle  # the first one still runs
    release.set()
    await running
    await asyncio.sleep(0)
    assert worker.idle
