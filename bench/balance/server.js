// A CPU-bound HTTP app for bench/balance: each request spins for BUSY_MS (default 1.5 ms) of
// CPU, then answers with the worker's pid. It listens on the socket it inherited at fd 3
// (clusterd: LISTEN_FDS), on the fd given as `--fd N` (circus), or on PORT (PM2's cluster
// mode shares it).
'use strict';
const http = require('http');

const busyNs = BigInt(Math.round(parseFloat(process.env.BUSY_MS || '1.5') * 1e6));
const server = http.createServer((req, res) => {
  const until = process.hrtime.bigint() + busyNs;
  while (process.hrtime.bigint() < until) {}
  res.end(`${process.pid}\n`);
});
server.keepAliveTimeout = 60000;

if (process.env.LISTEN_FDS) {
  server.listen({ fd: 3 });
} else if (process.argv.includes('--fd')) {
  server.listen({ fd: parseInt(process.argv[process.argv.indexOf('--fd') + 1], 10) });
} else {
  server.listen(parseInt(process.env.PORT || '8000', 10), '127.0.0.1');
}
process.on('SIGTERM', () => {
  server.close(() => process.exit(0));
  server.closeIdleConnections();
});
