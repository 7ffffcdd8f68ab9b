// A closed-loop HTTP load generator for bench/balance: C connections, each sending one
// request at a time (keep-alive, or a new connection per request with -close). Unlike wrk it
// measures only after a warm-up, when every connection has been accepted and answered: a
// server that accepts one connection per turn of its event loop (Node) takes a second or more
// to accept 64 connections under load, and wrk counts those first requests in its p99.
//
// It prints one line: how the connections (keep-alive) or requests (close) fell on the
// servers (the pids the responses name), p50/p99/p99.9 latency in ms, requests per second and
// errors.
package main

import (
	"bufio"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sort"
	"strings"
	"sync"
	"time"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:8000", "server address")
	conns := flag.Int("c", 64, "connections")
	warmup := flag.Duration("warmup", 3*time.Second, "time before measuring")
	duration := flag.Duration("d", 10*time.Second, "time measured")
	closeEach := flag.Bool("close", false, "a new connection per request (Connection: close)")
	flag.Parse()

	request := "GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
	if *closeEach {
		request = "GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
	}
	begin := time.Now().Add(*warmup)
	end := begin.Add(*duration)

	var mu sync.Mutex
	var latencies []time.Duration
	perServer := map[string]int{}
	errors := 0
	var wg sync.WaitGroup
	for i := 0; i < *conns; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var local []time.Duration
			servedBy := map[string]int{}
			lastServer := ""
			failed := 0
			var conn net.Conn
			var reader *bufio.Reader
			for {
				start := time.Now()
				if start.After(end) {
					break
				}
				if conn == nil {
					c, err := net.Dial("tcp", *addr)
					if err != nil {
						failed++
						time.Sleep(10 * time.Millisecond)
						continue
					}
					conn, reader = c, bufio.NewReader(c)
				}
				server, err := roundTrip(conn, reader, request)
				if err != nil || *closeEach {
					conn.Close()
					conn = nil
				}
				if err != nil {
					if start.After(begin) {
						failed++
					}
					continue
				}
				lastServer = server
				if start.After(begin) {
					local = append(local, time.Since(start))
					if *closeEach {
						servedBy[server]++
					}
				}
			}
			if conn != nil {
				conn.Close()
			}
			if !*closeEach && lastServer != "" {
				servedBy[lastServer]++
			}
			mu.Lock()
			latencies = append(latencies, local...)
			for s, n := range servedBy {
				perServer[s] += n
			}
			errors += failed
			mu.Unlock()
		}()
	}
	wg.Wait()
	if len(latencies) == 0 {
		fmt.Fprintln(os.Stderr, "no request answered")
		os.Exit(1)
	}
	sort.Slice(latencies, func(a, b int) bool { return latencies[a] < latencies[b] })
	at := func(q float64) string {
		return fmt.Sprintf("%.1f", float64(latencies[int(q*float64(len(latencies)-1))])/1e6)
	}
	var shares []int
	for _, n := range perServer {
		shares = append(shares, n)
	}
	sort.Sort(sort.Reverse(sort.IntSlice(shares)))
	split := make([]string, len(shares))
	for i, n := range shares {
		split[i] = fmt.Sprint(n)
	}
	fmt.Printf("split=%s p50=%s p99=%s p999=%s rps=%.0f errors=%d\n", strings.Join(split, "/"),
		at(0.5), at(0.99), at(0.999), float64(len(latencies))/duration.Seconds(), errors)
}

// roundTrip sends one request and reads its response; the body names the server.
func roundTrip(conn net.Conn, reader *bufio.Reader, request string) (string, error) {
	if _, err := io.WriteString(conn, request); err != nil {
		return "", err
	}
	response, err := http.ReadResponse(reader, nil)
	if err != nil {
		return "", err
	}
	body, err := io.ReadAll(response.Body)
	response.Body.Close()
	if err != nil {
		return "", err
	}
	if response.StatusCode != http.StatusOK {
		return "", fmt.Errorf("status %d", response.StatusCode)
	}
	return strings.TrimSpace(string(body)), nil
}
