// The worker half of the Node clustering guide's IPC example, as written for the cluster
// module: each worker reports its status to the master with process.send(), and logs what
// the master broadcasts from the other workers. It runs unmodified under clusterd
// (ipc.toml: clusterd is the master, ipc_broadcast = true forwards each worker's messages to
// the others) and under Node's own cluster module (bench/ipc forks it with
// cluster.setupPrimary({ exec })).
//
//   clusterd start examples/node/ipc.toml
//   clusterd send -f examples/node/ipc.toml web '{"hello":1}'
//
// IPC_INTERVAL_MS (default 1000) sets how often a worker reports.

const peers = new Set();

process.on('message', (msg) => {
  if (msg && msg.type === 'status') {
    peers.add(msg.pid);
  }
  console.log(`worker ${process.pid} received ${JSON.stringify(msg)}`);
});

// The master closing the channel is the guide's graceful stop (worker.disconnect()):
// clusterd does it with stop_signal = "disconnect".
process.on('disconnect', () => {
  console.log(`worker ${process.pid} disconnected; exiting`);
  process.exit(0);
});

function report() {
  process.send({ type: 'status', pid: process.pid, peers: peers.size });
}

report();
setInterval(report, Number(process.env.IPC_INTERVAL_MS || 1000));
// PM2's wait_ready, and clusterd's ready = "message".
process.send('ready');
