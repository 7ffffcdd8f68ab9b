"""Tests of server.py as clusterd runs it: a real listening socket at fd 3, LISTEN_PID set to
the worker's own pid, a real notify socket, real signals.

    python3 -m unittest discover -s examples/python -v

Each test starts server.py through a tiny launcher (the same trick clusterd plays): the test
binds the socket, passes it to the launcher, which moves it to fd 3, sets LISTEN_FDS and
LISTEN_PID to its own pid and execs the server. Every wait has a deadline; every process is
killed on failure.
"""

import fcntl
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "server.py")
DEADLINE = 20.0

# Runs argv[2:] with fd argv[1] moved to fd 3, as clusterd passes sockets.
LAUNCHER = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.set_inheritable(3, True)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""

CLEAN_ENV = {
    key: value
    for key, value in os.environ.items()
    if not key.startswith(("LISTEN_", "CLUSTERD_", "WATCHDOG_")) and key not in ("NOTIFY_SOCKET", "PORT")
}


class Worker:
    """A running server.py; its stderr lines are collected by a thread."""

    def __init__(self, listener=None, env=None):
        full_env = dict(CLEAN_ENV, **(env or {}))
        if listener is None:
            argv = [sys.executable, SERVER]
            pass_fds = ()
        else:
            argv = [sys.executable, "-c", LAUNCHER, str(listener.fileno()), sys.executable, SERVER]
            pass_fds = (listener.fileno(),)
        self.proc = subprocess.Popen(
            argv, env=full_env, pass_fds=pass_fds, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.put(line.rstrip("\n"))

    def log_line(self, needle):
        end = time.monotonic() + DEADLINE
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no log line with {needle!r} within {DEADLINE} s") from None
            if needle in line:
                return line

    def listening_on(self):
        line = self.log_line("listening on ")
        return re.search(r"listening on (\S+)", line).group(1)

    def signal(self, signum):
        self.proc.send_signal(signum)

    def wait(self):
        return self.proc.wait(timeout=DEADLINE)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=DEADLINE)
        self.proc.stderr.close()


class Client:
    """A keep-alive HTTP/1.1 connection over a raw socket."""

    def __init__(self, sock):
        sock.settimeout(DEADLINE)
        self.sock = sock
        self.reader = sock.makefile("rb")

    @classmethod
    def tcp(cls, address):
        host, port = address.rsplit(":", 1)
        return cls(socket.create_connection((host, int(port)), timeout=DEADLINE))

    @classmethod
    def unix(cls, path):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(DEADLINE)
        sock.connect(path)
        return cls(sock)

    def send(self, path):
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: worker\r\n\r\n".encode())

    def read_response(self):
        status = int(self.reader.readline().split()[1])
        headers = {}
        while True:
            line = self.reader.readline().decode().strip()
            if not line:
                break
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
        body = self.reader.read(int(headers["content-length"])).decode()
        return status, headers, body

    def get(self, path):
        self.send(path)
        return self.read_response()

    def closed_by_server(self):
        return self.reader.read(1) == b""

    def close(self):
        self.reader.close()
        self.sock.close()


def recv_state(notify):
    """The next datagram that is not a watchdog heartbeat."""
    while True:
        state = notify.recv(4096)
        if state != b"WATCHDOG=1":
            return state


class ServerTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)

    def start(self, listener=None, env=None):
        worker = Worker(listener, env)
        self.addCleanup(worker.kill)
        return worker

    def client(self, client):
        self.addCleanup(client.close)
        return client

    def notify_socket(self, abstract=False):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        if abstract:
            name = f"clusterd-python-example-{os.getpid()}-{time.monotonic_ns()}"
            sock.bind("\0" + name)
            address = "@" + name
        else:
            address = os.path.join(self.tmp.name, "notify.sock")
            sock.bind(address)
        sock.settimeout(DEADLINE)
        return sock, address

    def tcp_listener(self):
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        return listener, "127.0.0.1:%d" % listener.getsockname()[1]

    def test_serves_inherited_socket_notifies_and_drains_on_sigterm(self):
        listener, address = self.tcp_listener()
        notify, notify_path = self.notify_socket()
        worker = self.start(
            listener,
            {
                "NOTIFY_SOCKET": notify_path,
                "WATCHDOG_USEC": "200000",
                "CLUSTERD_APP": "web",
                "CLUSTERD_WORKER_ID": "1",
                "CLUSTERD_GENERATION": "4",
            },
        )
        pid = worker.proc.pid
        self.assertEqual(worker.listening_on(), address)
        self.assertEqual(notify.recv(4096), b"READY=1\nSTATUS=serving")
        self.assertEqual(notify.recv(4096), b"WATCHDOG=1")
        self.assertEqual(notify.recv(4096), b"WATCHDOG=1")

        idle = self.client(Client.tcp(address))
        status, headers, body = idle.get("/")
        self.assertEqual((status, body), (200, f"hello from web[1] pid {pid} generation 4\n"))
        self.assertEqual(headers["content-type"], "text/plain; charset=utf-8")
        status, headers, body = idle.get("/whoami")
        self.assertEqual(body, '{"app":"web","slot":1,"pid":%d,"generation":4}' % pid)
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual(idle.get("/nope")[0], 404)

        busy = self.client(Client.tcp(address))
        busy.send("/sleep/500")
        # A barrier: the server accepts connections in order, so once this later connection is
        # answered the sleep request's connection was accepted, with its request waiting.
        self.assertEqual(self.client(Client.tcp(address)).get("/")[0], 200)

        worker.signal(signal.SIGTERM)
        self.assertTrue(idle.closed_by_server(), "idle keep-alive connection closed")
        status, headers, body = busy.read_response()
        self.assertEqual((status, body), (200, "slept 500 ms\n"))
        self.assertEqual(headers.get("connection"), "close")
        self.assertTrue(busy.closed_by_server())
        self.assertEqual(worker.wait(), 0)
        self.assertEqual(recv_state(notify), b"STOPPING=1")
        worker.log_line("exiting: all connections closed")

    def test_workers_sharing_a_socket_all_stop(self):
        # Every worker is woken for each connection but only one accepts it: a worker blocked
        # in accept() would never see SIGTERM.
        listener, address = self.tcp_listener()
        workers = [self.start(listener, {"CLUSTERD_WORKER_ID": str(slot)}) for slot in range(3)]
        for worker in workers:
            self.assertEqual(worker.listening_on(), address)
        # The race (woken, but another worker accepted first) is too narrow to provoke on
        # demand, so check what prevents the hang: the shared socket is non-blocking now.
        flags = fcntl.fcntl(listener.fileno(), fcntl.F_GETFL)
        self.assertTrue(flags & os.O_NONBLOCK, "workers accept without blocking")
        answered = set()
        for _ in range(30):
            status, _, body = self.client(Client.tcp(address)).get("/")
            self.assertEqual(status, 200)
            answered.add(body)
        self.assertGreater(len(answered), 1, "connections spread over the workers")
        for worker in workers:
            worker.signal(signal.SIGTERM)
        for worker in workers:
            self.assertEqual(worker.wait(), 0)

    def test_abstract_notify_socket_and_inherited_unix_socket(self):
        path = os.path.join(self.tmp.name, "web.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(path)
        listener.listen()
        notify, notify_address = self.notify_socket(abstract=True)
        worker = self.start(listener, {"NOTIFY_SOCKET": notify_address})
        self.assertEqual(worker.listening_on(), f"unix:{path}")
        self.assertEqual(notify.recv(4096), b"READY=1\nSTATUS=serving")
        status, _, body = self.client(Client.unix(path)).get("/")
        self.assertEqual((status, body), (200, f"hello from python[0] pid {worker.proc.pid} generation 0\n"))
        worker.signal(signal.SIGINT)
        self.assertEqual(notify.recv(4096), b"STOPPING=1")
        self.assertEqual(worker.wait(), 0)

    def test_binds_port_when_nothing_is_inherited(self):
        listener, address = self.tcp_listener()
        # LISTEN_PID names another process: the variables leaked, so they do not count.
        worker = self.start(env={"LISTEN_FDS": "1", "LISTEN_PID": "1", "PORT": "0"})
        line = worker.log_line("listening on ")
        bound = re.search(r"listening on (127\.0\.0\.1:\d+) \(bound by server\.py\)", line).group(1)
        self.assertNotEqual(bound, address)
        status, _, body = self.client(Client.tcp(bound)).get("/sleep/10")
        self.assertEqual((status, body), (200, "slept 10 ms\n"))
        worker.signal(signal.SIGTERM)
        self.assertEqual(worker.wait(), 0)

    def test_bad_settings_exit_2(self):
        worker = self.start(env={"CLUSTERD_WORKER_ID": "two"})
        self.assertEqual(worker.wait(), 2)
        worker.log_line("CLUSTERD_WORKER_ID='two' is not a non-negative integer")

        datagram = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(datagram.close)
        datagram.bind(("127.0.0.1", 0))
        worker = self.start(datagram)
        self.assertEqual(worker.wait(), 2)
        worker.log_line("fd 3 is not a listening stream socket")


if __name__ == "__main__":
    unittest.main()
