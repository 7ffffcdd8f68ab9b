#!/usr/bin/env python3
"""A clusterd worker talking on its message channel (ipc = true), standard library only.

clusterd passes a unix stream socket at the fd named by CLUSTERD_IPC_FD; each message is one
line of JSON, both ways (the same channel Node's process.send uses). This worker says
{"type": "ready"} (readiness with ready = "message"), reports its status every
IPC_INTERVAL_MS (default 1000), prints every message it receives and answers a message that
has "hello" with {"type": "echo", ...}. End of file on the channel means clusterd closed it
(stop_signal = "disconnect"): it exits.
"""

import json
import os
import socket
import sys
import threading


def main():
    fd = os.environ.get("CLUSTERD_IPC_FD")
    if fd is None:
        sys.exit("CLUSTERD_IPC_FD is not set: run under clusterd with ipc = true")
    channel = socket.socket(fileno=int(fd))
    channel.set_inheritable(False)
    lock = threading.Lock()

    def send(message):
        line = (json.dumps(message, separators=(",", ":")) + "\n").encode()
        with lock:
            channel.sendall(line)

    def report(stop):
        interval = int(os.environ.get("IPC_INTERVAL_MS", "1000")) / 1000
        while not stop.wait(interval):
            send({"type": "status", "pid": os.getpid(), "lang": "python"})

    send({"type": "ready"})
    stop = threading.Event()
    threading.Thread(target=report, args=(stop,), daemon=True).start()
    for line in channel.makefile("r", encoding="utf-8"):
        message = json.loads(line)
        print(f"python worker {os.getpid()} received {json.dumps(message)}", flush=True)
        if isinstance(message, dict) and "hello" in message:
            send({"type": "echo", "pid": os.getpid(), "got": message})
    stop.set()
    print(f"python worker {os.getpid()} disconnected; exiting", flush=True)


if __name__ == "__main__":
    main()
