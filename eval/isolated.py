"""Run calls in fresh processes, a few at a time: the runner of :mod:`eval.prequantize`.

Each call gets a process of its own, so its GPU memory, peak and CUDA state are its own, and one of the
``slots`` (a ``CUDA_VISIBLE_DEVICES`` value, or None for no GPU), which it gives back when it ends.
A process is started only for a call. ``ProcessPoolExecutor(max_tasks_per_child=1)``, used before, starts a
replacement worker whenever one exits, also after the last call; with the spawn start method that
worker imports the whole harness (torch, transformers, lm-eval) before it can be told to stop: 4.1 s after
the last call on a 2-core CPU host (reports/bench/prequantize_exit_delay_cpu.json), and the likely reason why ``eval.prequantize`` had not exited 37 s after
its only run on the H100 machine (stop 21, reports/bench/gpu_concurrent_layers_H100_stop21.json).
"""
from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.connection import wait


def run_isolated(function: Callable, argument_lists: list[tuple], slots: list[str | None],
                 context) -> Iterator[tuple[int, object, BaseException | None]]:
    """Yield ``(index, result, error)`` for ``function(*argument_lists[index])``, each call run in a process of
    its own (``context``: a multiprocessing context; ``function`` must be importable), at most ``len(slots)``
    at once, in the order they end. ``error`` is the call's exception (its traceback is printed by the child)
    or a RuntimeError for a process that ended without a result (killed, out of memory); ``result`` is None
    then. Closing the generator early terminates the calls still running."""
    if not slots:
        raise ValueError("run_isolated needs at least one slot")
    waiting = list(enumerate(argument_lists))
    free = list(slots)
    running: dict[int, _Running] = {}  # by process sentinel
    try:
        while waiting or running:
            while waiting and free:
                index, arguments = waiting.pop(0)
                call = _Running.start(context, index, free.pop(0), function, arguments)
                running[call.process.sentinel] = call
            pipes = {call.pipe: call for call in running.values() if not call.pipe.closed}
            ready = wait(list(pipes) + list(running))
            for pipe in (r for r in ready if r in pipes):  # a child may not exit while its result fills the pipe
                pipes[pipe].receive()
            for sentinel in (r for r in ready if r in running):
                call = running.pop(sentinel)
                call.receive()  # what it sent before it ended, if not read yet
                call.process.join()
                free.append(call.slot)
                yield call.index, call.result, call.error()
    finally:
        for call in running.values():
            call.process.terminate()
            call.process.join()
            call.pipe.close()


class _Running:
    """One call's process, the reading end of its pipe, its slot and what it sent."""

    def __init__(self, index: int, process, pipe, slot: str | None):
        self.index, self.process, self.pipe, self.slot = index, process, pipe, slot
        self.outcome: tuple[bool, object] | None = None

    @classmethod
    def start(cls, context, index: int, slot: str | None, function: Callable, arguments: tuple) -> _Running:
        receive, send = context.Pipe(duplex=False)
        process = context.Process(target=_call, args=(send, slot, function, arguments), name=f"isolated-{index}")
        process.start()
        send.close()  # the child holds the only writing end: its exit ends the pipe
        return cls(index, process, receive, slot)

    def receive(self) -> None:
        """Read the outcome once it is there (EOF: the child ended without one)."""
        if self.pipe.closed or not self.pipe.poll():
            return
        try:
            self.outcome = self.pipe.recv()
        except EOFError:
            pass
        self.pipe.close()

    @property
    def result(self):
        return self.outcome[1] if self.outcome and self.outcome[0] else None

    def error(self) -> BaseException | None:
        if self.outcome is None:
            return RuntimeError(f"the process of call {self.index} ended with exit code {self.process.exitcode} "
                                "and no result")
        return None if self.outcome[0] else self.outcome[1]


def _call(send, slot: str | None, function: Callable, arguments: tuple) -> None:
    """In the child: pin the slot's GPU (before CUDA starts), run the call, send ``(True, result)`` or
    ``(False, exception)``."""
    if slot is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = slot
    try:
        outcome = (True, function(*arguments))
    except Exception as err:
        traceback.print_exc(file=sys.stderr)
        outcome = (False, err)
    try:
        send.send(outcome)
    except Exception as err:  # an unpicklable result or exception: its description instead
        send.send((False, RuntimeError(f"{outcome[1]!r} (could not be sent back: {err!r})")))
    finally:
        send.close()
