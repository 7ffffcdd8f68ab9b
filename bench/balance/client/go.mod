module clusterd/bench/balance/client

go 1.19
