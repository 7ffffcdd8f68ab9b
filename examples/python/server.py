#!/usr/bin/env python3
"""A clusterd worker in Python 3, standard library only.

The same HTTP routes as the Rust `hello` example, served on the listening socket clusterd
passes at fd 3:

    GET /            hello from <app>[<slot>] pid <pid> generation <generation>
    GET /whoami      {"app":..,"slot":..,"pid":..,"generation":..}
    GET /sleep/<ms>  answers after <ms> milliseconds (at most 60000)

Socket: fd 3 (TCP or unix) when LISTEN_FDS is set and LISTEN_PID is this process's pid
(systemd's socket-activation convention, which clusterd follows); otherwise it binds
127.0.0.1:$PORT (default 8000) so that `python3 server.py` works alone.

Readiness: once serving it sends `READY=1` to NOTIFY_SOCKET itself (a unix datagram; a leading
`@` means the abstract namespace), `WATCHDOG=1` at half of WATCHDOG_USEC when set, and
`STOPPING=1` when it stops.

SIGTERM or SIGINT: stop accepting, close idle keep-alive connections, answer in-flight requests
with `Connection: close`, wait for them, exit 0 (1 if that takes longer than 30 s).
"""

import json
import os
import re
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DRAIN_TIMEOUT = 30.0
LINGER = 1.0  # seconds; see the drain in main()
MAX_SLEEP_MS = 60_000
FIRST_LISTEN_FD = 3

# Who this worker is; filled in by main() from CLUSTERD_APP, CLUSTERD_WORKER_ID and
# CLUSTERD_GENERATION (defaults when run outside clusterd).
ME = {"app": "python", "slot": 0, "pid": os.getpid(), "generation": 0}


def env_int(name, default):
    value = os.environ.get(name)
    if value is None:
        return default
    if not value.isdigit():
        raise ValueError(f"{name}={value!r} is not a non-negative integer")
    return int(value)


def log(message):
    print(f"python {ME['app']}[{ME['slot']}] pid {ME['pid']}: {message}", file=sys.stderr, flush=True)


def notify(state):
    """Sends one sd_notify datagram to NOTIFY_SOCKET; does nothing when it is unset."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(1.0)
            sock.sendto(state.encode(), address)
    except OSError as err:
        log(f"sending {state!r} to NOTIFY_SOCKET={os.environ['NOTIFY_SOCKET']}: {err}")


def inherited_sockets():
    """How many sockets clusterd passed to this very process (0 outside clusterd)."""
    count = os.environ.get("LISTEN_FDS")
    if count is None or os.environ.get("LISTEN_PID") != str(os.getpid()):
        return 0
    return env_int("LISTEN_FDS", 0)


class Server(ThreadingHTTPServer):
    """Serves on a given listening socket and tracks connections to drain them on stop."""

    # Wait for request threads on server_close(), so in-flight requests finish.
    daemon_threads = False
    block_on_close = True

    def __init__(self, listener):
        super().__init__(listener.getsockname(), Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = listener
        self.address_family = listener.family
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.idle = set()  # connections waiting for their next request

    def wait_for_request(self, conn):
        """Marks a connection idle before it reads its next request. False when stopping and
        no request has arrived: the connection should close instead."""
        with self.lock:
            if self.stopping.is_set() and not request_pending(conn):
                return False
            self.idle.add(conn)
            return True

    def got_request(self, conn):
        """Marks a connection busy: it is serving a request."""
        with self.lock:
            self.idle.discard(conn)

    def close_idle_connections(self):
        """Closes the connections waiting for a request, except those whose request arrived."""
        with self.lock:
            for conn in list(self.idle):
                if request_pending(conn):
                    continue
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self.idle.discard(conn)


def request_pending(conn):
    """Whether bytes from the client are waiting to be read on this connection."""
    try:
        return bool(conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:  # BlockingIOError (nothing yet) or a dead connection
        return False


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    server_version = "clusterd-python-example"

    def setup(self):
        # Connections are served by blocking reads and writes in their own thread.
        self.request.setblocking(True)
        super().setup()

    def handle_one_request(self):
        # Idle until the request line arrives; close instead of waiting once stopping.
        if not self.server.wait_for_request(self.connection):
            self.close_connection = True
            return
        try:
            self.raw_requestline = self.rfile.readline(65537)
        except OSError:
            self.raw_requestline = b""
        self.server.got_request(self.connection)
        if not self.raw_requestline:
            self.close_connection = True
            return
        if len(self.raw_requestline) > 65536:
            self.send_error(414)
            return
        if not self.parse_request():
            return
        method = getattr(self, "do_" + self.command, None)
        if method is None:
            self.send_text(404, "not found\n")
        else:
            method()
        self.wfile.flush()

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/":
            body = f"hello from {ME['app']}[{ME['slot']}] pid {ME['pid']} generation {ME['generation']}\n"
            self.send_text(200, body)
        elif path == "/whoami":
            self.send_body(200, "application/json", json.dumps(ME, separators=(",", ":")))
        elif match := re.fullmatch(r"/sleep/(\d+)", path):
            ms = min(int(match.group(1)), MAX_SLEEP_MS)
            time.sleep(ms / 1000)
            self.send_text(200, f"slept {ms} ms\n")
        else:
            self.send_text(404, "not found\n")

    def send_text(self, status, text):
        self.send_body(status, "text/plain; charset=utf-8", text)

    def send_body(self, status, content_type, text):
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.server.stopping.is_set():
            # Tells a keep-alive client to reconnect (to another worker) for its next request.
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass  # no access log


def take_listener():
    """The inherited fd 3, or 127.0.0.1:$PORT bound here (errors: OSError, ValueError).

    The listener is made non-blocking: other workers accept from the same socket, so a
    connection that woke this process may be gone by the time it calls accept(), and a
    blocking accept() would then hang (and with it the reaction to SIGTERM). socketserver
    treats the resulting BlockingIOError as "nothing to accept"."""
    if inherited_sockets() > 0:
        listener = socket.socket(fileno=FIRST_LISTEN_FD)
        listening = listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if listener.type != socket.SOCK_STREAM or not listening:
            raise ValueError(f"fd {FIRST_LISTEN_FD} is not a listening stream socket")
        listener.set_inheritable(False)
        origin = f"inherited fd {FIRST_LISTEN_FD}"
    else:
        listener = socket.create_server(("127.0.0.1", env_int("PORT", 8000)))
        origin = "bound by server.py"
    listener.setblocking(False)
    return listener, origin


def describe(listener):
    name = listener.getsockname()
    if listener.family == socket.AF_UNIX:
        return f"unix:{name}"
    if listener.family == socket.AF_INET6:
        return f"[{name[0]}]:{name[1]}"
    return f"{name[0]}:{name[1]}"


def main():
    try:
        ME["app"] = os.environ.get("CLUSTERD_APP", ME["app"])
        ME["slot"] = env_int("CLUSTERD_WORKER_ID", 0)
        ME["generation"] = env_int("CLUSTERD_GENERATION", 0)
        watchdog_usec = env_int("WATCHDOG_USEC", 0)
        listener, origin = take_listener()
    except (OSError, ValueError) as err:
        log(str(err))
        return 2
    server = Server(listener)
    stop_reason = []

    def on_signal(signum, _frame):
        if server.stopping.is_set():
            return
        stop_reason.append(signal.Signals(signum).name)
        server.stopping.set()
        # shutdown() waits for serve_forever() to return: call it from another thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    log(f"listening on {describe(listener)} ({origin}), generation {ME['generation']}")
    notify("READY=1\nSTATUS=serving")
    if watchdog_usec > 0:

        def heartbeat():
            while not server.stopping.wait(watchdog_usec / 2e6):
                notify("WATCHDOG=1")

        threading.Thread(target=heartbeat, daemon=True).start()

    server.serve_forever(poll_interval=0.1)
    # No more accepts: serve_forever returned and the listener is closed below.
    log(f"received {stop_reason[0] if stop_reason else 'a stop request'}: stopping, draining connections")
    notify("STOPPING=1")
    server.socket.close()
    # Linger: a keep-alive client that sends another request now gets it answered with
    # `Connection: close` and reconnects to another worker; only the connections still idle
    # after LINGER are closed (closing them at once races with their next request).
    deadline = time.monotonic() + LINGER
    while time.monotonic() < deadline:
        with server.lock:
            if not server.idle:
                break
        time.sleep(0.01)
    server.close_idle_connections()
    drained = threading.Thread(target=server.server_close, daemon=True)
    drained.start()
    drained.join(DRAIN_TIMEOUT)
    if drained.is_alive():
        log(f"exiting: connections still open after {DRAIN_TIMEOUT:.0f} s")
        return 1
    log("exiting: all connections closed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
