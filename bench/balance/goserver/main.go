// A CPU-bound HTTP app in Go for bench/balance, like server.js: each request spins for
// BUSY_MS (default 1.5 ms) of CPU, then answers with the process's pid. Unlike Node it accepts
// every connection it can at once (net/http's accept loop), so with one shared accept queue a
// burst of connections can land on whichever worker wakes first. It listens on the socket it
// inherited at fd 3 (LISTEN_FDS), on the fd given as `--fd N` (circus), or on PORT.
package main

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"time"
)

func main() {
	busy := 1.5
	if v, err := strconv.ParseFloat(os.Getenv("BUSY_MS"), 64); err == nil {
		busy = v
	}
	spin := time.Duration(busy * float64(time.Millisecond))
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		until := time.Now().Add(spin)
		for time.Now().Before(until) {
		}
		fmt.Fprintf(w, "%d\n", os.Getpid())
	})
	fd := -1
	if os.Getenv("LISTEN_FDS") != "" {
		fd = 3
	}
	for i, arg := range os.Args {
		if arg == "--fd" && i+1 < len(os.Args) {
			fd, _ = strconv.Atoi(os.Args[i+1])
		}
	}
	var listener net.Listener
	var err error
	if fd >= 0 {
		listener, err = net.FileListener(os.NewFile(uintptr(fd), "listener"))
	} else {
		port := os.Getenv("PORT")
		if port == "" {
			port = "8000"
		}
		listener, err = net.Listen("tcp", "127.0.0.1:"+port)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Fprintln(os.Stderr, http.Serve(listener, handler))
	os.Exit(1)
}
