module clusterd/bench/balance/goserver

go 1.19
