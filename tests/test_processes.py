"""The child-process launcher shared by `libra dispatch` and `libra tune`, and the stop-signal handlers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from conftest import ROOT
from pipeline.dispatch.processes import cores, start_process
from detection.signals import StopRequest, handling_stop_signals


def test_a_child_gets_its_threads_cores_environment_and_ignored_signals(tmp_path):
    cpu = min(os.sched_getaffinity(0))
    report = ("import os, signal; print(os.environ['OMP_NUM_THREADS'], os.environ['PYTHONUNBUFFERED'], "
              "os.environ['LIBRA_X'], sorted(os.sched_getaffinity(0)), signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN)")
    with (tmp_path / "out.log").open("wb") as out:
        child = start_process([sys.executable, "-c", report], threads=3, cpus=(cpu,), env={"LIBRA_X": "x"},
                              output=out, ignored_signals=(signal.SIGUSR2,))
        assert child.wait() == 0
    assert (tmp_path / "out.log").read_text().split() == ["3", "1", "x", f"[{cpu}]", "True"]
    assert 1 <= cores() <= (os.cpu_count() or 1)


def test_stop_handlers_are_installed_for_the_block_and_restored_after_it():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    stop = StopRequest()
    with handling_stop_signals(stop):
        assert signal.getsignal(signal.SIGTERM) is stop and signal.getsignal(signal.SIGINT) is stop
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM, "the first signal is a request, not an end"
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_second_stop_signal_ends_the_process_at_once():
    code = ("import os, signal, time\nfrom detection.signals import StopRequest, handling_stop_signals\n"
            "with handling_stop_signals(StopRequest()):\n"
            "    os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), signal.SIGINT); time.sleep(30)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60)
    assert proc.returncode == -signal.SIGINT
