"""Run generated test programs, each in its own sandboxed process (see guard.py for what
the child enforces); run.py runs several at a time, each from its own thread.

Each program runs in a fresh Python interpreter started with `-I` (no environment
variables, user site or current folder on its path) and, unless Limits.site_packages,
`-S` (standard library only): never a fork of this process, which
may hold torch, CUDA and threads. The child leads its own process group, so whatever it
forked is killed with it when it ends or runs past its time.
"""

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional

GUARD = str(Path(__file__).with_name("guard.py"))
# Wall-clock allowance on top of the program's time limit for starting the interpreter
# and setting up the guard (slow on a loaded machine); the program itself is stopped by
# the child's own timer at the limit.
STARTUP_ALLOWANCE_S = 10.0


@dataclass(frozen=True)
class Limits:
    timeout: float = 3.0  # seconds of wall-clock time for the program
    memory_mb: int = 4096  # address space (RLIMIT_AS)
    max_processes: int = 512  # processes of this user (RLIMIT_NPROC; not held for root)
    file_size_mb: int = 64  # largest file the program may write
    # False: the program sees the standard library only (python -S), which is all the
    # benchmarks' tests need, and starts in two thirds of the time. True: also the
    # packages installed beside this Python (numpy, ...), as in OpenAI's harness.
    site_packages: bool = False

    def __post_init__(self):
        if not self.timeout > 0 or min(self.memory_mb, self.max_processes,
                                       self.file_size_mb) < 1:
            raise ValueError(f"sandbox limits must be positive, got {self}")


@dataclass(frozen=True)
class Outcome:
    passed: bool
    result: str  # "passed", "timed out" or "failed: <why>"
    measures: Optional[dict] = None  # what the child enforced (None if it never reported)


def child_env(folder: str) -> Dict[str, str]:
    """A minimal environment: nothing of the parent's but PATH."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": folder, "TMPDIR": folder,
            "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1"}


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already


def read_report(stream, token: str) -> Optional[dict]:
    """The child's report, read without blocking: a process that escaped the group could
    still hold the pipe open, and must not hang the harness."""
    os.set_blocking(stream.fileno(), False)
    try:
        data = stream.read() or b""
    except OSError:
        data = b""
    for line in data.decode(errors="replace").splitlines():
        try:
            report = json.loads(line)
        except ValueError:
            continue
        if isinstance(report, dict) and report.get("token") == token:
            return report
    return None


def outcome_of(report: Optional[dict], returncode: Optional[int], timed_out: bool) -> Outcome:
    if report is not None and report.get("status") == "passed":
        return Outcome(True, "passed", report["measures"])
    if report is not None:
        return Outcome(False, f"failed: {report.get('error', '')}", report["measures"])
    if timed_out or returncode in (-signal.SIGALRM, -signal.SIGXCPU):
        return Outcome(False, "timed out")
    return Outcome(False, f"failed: the program ended the process (exit status {returncode})")


def run_program(program: str, limits: Limits = Limits()) -> Outcome:
    """Run one test program to completion in the sandbox; passed if it returned."""
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="codellama-eval-") as folder:
        Path(folder, "program.py").write_text(program, encoding="utf-8")
        flags = ["-I"] if limits.site_packages else ["-I", "-S"]
        proc = subprocess.Popen(
            [sys.executable, *flags, GUARD, json.dumps(asdict(limits))], cwd=folder,
            env=child_env(folder), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, start_new_session=True)
        timed_out = False
        try:
            proc.stdin.write((token + "\n").encode())
            proc.stdin.close()
            proc.wait(timeout=limits.timeout + STARTUP_ALLOWANCE_S)
        except subprocess.TimeoutExpired:
            timed_out = True
        except BrokenPipeError:
            pass  # the child died before reading its token
        finally:
            kill_group(proc.pid)  # what it forked, whether or not it is still running
            proc.kill()
            proc.wait()
        report = read_report(proc.stdout, token)
        proc.stdout.close()
    return outcome_of(report, proc.returncode, timed_out)


def probe(limits: Limits = Limits()) -> dict:
    """What the sandbox enforces on this machine (the measures of an empty program)."""
    outcome = run_program("pass\n", limits)
    if not outcome.passed:
        raise RuntimeError(f"the evaluation sandbox cannot run an empty program here: "
                           f"{outcome.result}")
    return outcome.measures
