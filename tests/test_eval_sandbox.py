"""The evaluation sandbox (llama/eval/execution.py + guard.py): each hostile program is
contained, counts as failed, changes nothing on the host, and the harness goes on."""

import os
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from llama.eval.execution import Limits, probe, run_program

FAST = Limits(timeout=1.0, memory_mb=1024)
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")


def test_passing_and_failing_programs():
    assert run_program("assert 1 + 1 == 2\n", FAST).passed
    failed = run_program("assert 1 + 1 == 3, 'wrong sum'\n", FAST)
    assert not failed.passed and failed.result == "failed: AssertionError: wrong sum"
    syntax = run_program("def f(:\n", FAST)
    assert not syntax.passed and "SyntaxError" in syntax.result


def test_infinite_loop_times_out():
    start = time.monotonic()
    outcome = run_program("while True:\n    pass\n", FAST)
    assert (outcome.passed, outcome.result) == (False, "timed out")
    assert time.monotonic() - start < FAST.timeout + 3


def test_huge_allocation_fails_without_taking_memory():
    outcome = run_program("x = bytearray(100 * 2**30)\n", FAST)
    assert (outcome.passed, outcome.result) == (False, "failed: MemoryError: ")


@pytest.mark.parametrize("code", ["import sys\nsys.exit(0)\n", "raise SystemExit\n",
                                  "exit()\n", "import os\nos._exit(0)\n"])
def test_exiting_early_is_a_failure(code):
    outcome = run_program(code + "assert False\n", FAST)
    assert not outcome.passed and outcome.result.startswith("failed")


def test_files_outside_the_temporary_folder_are_left_alone(tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "inner.txt").write_text("inner")
    new = tmp_path / "new.txt"
    attacks = [
        f"open({str(new)!r}, 'w').write('x')",
        f"import pathlib\npathlib.Path({str(new)!r}).write_text('x')",
        f"import os\nos.close(os.open({str(new)!r}, os.O_WRONLY | os.O_CREAT))",
        f"open({str(keep)!r}, 'a').write('more')",
        f"import os\nos.remove({str(keep)!r})",
        f"import os\nos.unlink({str(keep)!r})",
        f"import os\nos.rename({str(keep)!r}, {str(new)!r})",
        f"import shutil\nshutil.rmtree({str(folder)!r})",
        f"import shutil\nshutil.move({str(keep)!r}, {str(new)!r})",
        f"import os\nos.chmod({str(keep)!r}, 0)",
        f"import os\nos.mkdir({str(tmp_path / 'made')!r})",
        "import subprocess\nsubprocess.run(['rm', '-rf', %r])" % str(folder),
        "import os\nos.system('touch %s')" % new,
    ]
    for code in attacks:
        outcome = run_program(code + "\n", FAST)
        assert not outcome.passed and "PermissionError" in outcome.result, (code, outcome)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "keep.txt"]
    assert keep.read_text() == "precious" and (folder / "inner.txt").read_text() == "inner"
    assert os.stat(keep).st_mode & 0o777 != 0


def test_files_inside_the_temporary_folder_may_be_written():
    code = ("import os, tempfile\nopen('a.txt', 'w').write('x')\nos.remove('a.txt')\n"
            "with tempfile.TemporaryDirectory() as d:\n    open(os.path.join(d, 'b'), 'w')\n")
    assert run_program(code, FAST).passed


def test_no_network_to_the_host():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
        outcome = run_program(code, FAST)
    finally:
        server.close()
    assert not outcome.passed
    assert "OSError" in outcome.result or "PermissionError" in outcome.result


def test_guarded_fork_and_ctypes_are_refused():
    for code in ["import os\nos.fork()\n", "import ctypes\n", "import posix\nposix.fork()\n",
                 "import multiprocessing\nmultiprocessing.Process(target=print).start()\n"]:
        outcome = run_program(code, FAST)
        assert not outcome.passed and "Error" in outcome.result, (code, outcome)


def processes_named(name: str) -> int:
    """Live processes (zombies, already dead and awaiting their reaper, not counted)."""
    count = 0
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == name:
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                count += state != "Z"
        except (OSError, IndexError):
            pass  # the process ended while we looked
    return count


@linux_only
def test_fork_storm_that_evades_the_guard_is_killed_with_its_group():
    """A program that takes ctypes back and forks 5 times over (32 processes, small enough
    for any machine), each then sleeping: all of them die when the program times out."""
    name = "storm" + uuid.uuid4().hex[:8]  # comm names hold 15 characters
    code = ("import sys, time\ndel sys.modules['ctypes'], sys.modules['_ctypes']\n"
            "import ctypes\nlibc = ctypes.CDLL(None)\n"
            f"libc.prctl(15, {name.encode()!r}, 0, 0, 0)\n"  # PR_SET_NAME
            "for _ in range(5):\n    libc.fork()\ntime.sleep(60)\n")
    seen = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(processes_named(name))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        outcome = run_program(code, FAST)
    finally:
        stop.set()
        watcher.join()
    assert (outcome.passed, outcome.result) == (False, "timed out")
    assert max(seen) > 1  # the storm happened
    deadline = time.monotonic() + 5  # SIGKILL takes effect asynchronously
    while processes_named(name) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_named(name) == 0


def test_the_harness_goes_on_after_hostile_programs():
    programs = {"loop": "while True: pass\n", "exit": "import os\nos._exit(0)\n",
                "alloc": "x = ' ' * (50 * 2**30)\n", "ok": "assert True\n"}
    with ThreadPoolExecutor(max_workers=2) as pool:  # as run.py scores them
        outcomes = dict(zip(programs, pool.map(lambda p: run_program(p, FAST),
                                               programs.values())))
    assert {k: o.passed for k, o in outcomes.items()} == {
        "loop": False, "exit": False, "alloc": False, "ok": True}


def test_probe_reports_what_is_enforced():
    measures = probe(FAST)
    assert measures["limits"]["RLIMIT_AS"] == 1024 << 20
    assert measures["network"] in ("network namespace", "user+network namespace",
                                   "socket module disabled")
    if sys.platform.startswith("linux"):
        assert measures["limits"]["RLIMIT_FSIZE"] == FAST.file_size_mb << 20


def test_installed_packages_only_when_asked_for():
    code = "import pytest\n"  # installed beside this Python, not in the standard library
    assert not run_program(code, FAST).passed
    assert run_program(code, Limits(timeout=5.0, site_packages=True)).passed


def test_limits_are_checked():
    with pytest.raises(ValueError, match="positive"):
        Limits(timeout=0)
