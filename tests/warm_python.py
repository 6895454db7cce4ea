"""A stand-in for `python` that runs each command in a child forked from one warm interpreter.

    python tests/warm_python.py serve SOCKET          the server: imports torch and fusedvq once, then forks a
                                                      child per command
    python tests/warm_python.py run SOCKET ARGS...    the client, in place of `python ARGS...`

A script of many short Python steps (bench/gpu_check.sh's dry run, tests/test_gpu_check.py) pays torch's import
(2 to 3 s of a core) once instead of at every step. The child takes the client's arguments (`-c CODE`, `-m
MODULE`, `-` for a script on stdin, or a script path, each with its arguments), working directory,
environment and stdin, stdout and stderr, and runs the command as `python` would (sys.argv, sys.path[0],
__main__); the client exits with the command's status and passes TERM, INT and HUP on to it (so `timeout`
ends the command). A command the child cannot parse is an error, status 2, as python's.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import socket
import struct
import sys
import traceback

_INT = struct.Struct("!i")


def serve(path: str) -> None:
    import torch  # noqa: F401  (what the children share)

    import fusedvq  # noqa: F401

    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(16)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the children are reaped by the kernel
    while True:
        conn, _ = server.accept()
        if os.fork() == 0:
            server.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _child(conn)  # never returns
        conn.close()


def _read(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            return data
        data += chunk
    return data


def _child(conn: socket.socket) -> None:
    header, fds, _, _ = socket.recv_fds(conn, _INT.size, 3)
    argv, cwd, env = json.loads(_read(conn, _INT.unpack(header)[0]))
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    conn.sendall(_INT.pack(os.getpid()))
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    try:
        _run(argv)
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 0 if done.code is None else 1
        if not isinstance(done.code, (int, type(None))):
            print(done.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - reported as python reports it
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    conn.sendall(_INT.pack(code))
    os._exit(code)


def _run(argv: list) -> None:
    """argv as `python ARGV` runs it."""
    if not argv:
        raise SystemExit("warm_python: an interactive interpreter is not served")
    first, rest = argv[0], argv[1:]
    if first == "-c" and rest:
        sys.argv, sys.path[0] = ["-c", *rest[1:]], ""
        exec(compile(rest[0], "<string>", "exec"), {"__name__": "__main__"})
    elif first == "-m" and rest:
        sys.argv, sys.path[0] = [rest[0], *rest[1:]], os.getcwd()
        runpy.run_module(rest[0], run_name="__main__", alter_sys=True)
    elif first == "-":
        sys.argv, sys.path[0] = ["-", *rest], ""
        exec(compile(sys.stdin.read(), "<stdin>", "exec"), {"__name__": "__main__"})
    elif not first.startswith("-"):
        sys.argv, sys.path[0] = [first, *rest], os.path.dirname(os.path.abspath(first))
        runpy.run_path(first, run_name="__main__")
    else:
        print(f"warm_python: option {first} is not served", file=sys.stderr)
        raise SystemExit(2)


def run(path: str, argv: list) -> int:
    conn = socket.socket(socket.AF_UNIX)
    conn.connect(path)
    request = json.dumps([argv, os.getcwd(), dict(os.environ)]).encode()
    socket.send_fds(conn, [_INT.pack(len(request))], [0, 1, 2])
    conn.sendall(request)
    pid = _INT.unpack(_read(conn, _INT.size))[0]
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda number, frame: os.kill(pid, number))
    status = _read(conn, _INT.size)
    return _INT.unpack(status)[0] if len(status) == _INT.size else 1  # (no status: the command was killed)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    sys.exit(run(sys.argv[2], sys.argv[3:]))
