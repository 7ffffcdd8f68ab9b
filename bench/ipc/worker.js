// The worker of bench/ipc (and bench/memory's message burst): on "go", sends IPC_M messages
// (with Node's backpressure) to the primary, which forwards them to the other workers; then
// prints how many it received from the IPC_N - 1 others ("done" or, after 3 s of silence,
// "partial") and when the last one came.
const N = Number(process.env.IPC_N), M = Number(process.env.IPC_M);
let got = 0, started = 0, last = 0, timer = null;
function finish(what) { console.log(what + ' ' + got + ' ' + last); clearTimeout(timer); }
function idle() { clearTimeout(timer); timer = setTimeout(() => finish('partial'), 3000); }
process.on('message', (msg) => {
  if (msg === 'go') {
    if (started) return;
    started = Date.now();
    console.log('go ' + started);
    let n = 0;
    const pump = () => {
      while (n < M) {
        n++;
        const msg = { type: 'status', pid: process.pid, n };
        // Node's own backpressure: with a full write queue, wait for this write.
        if (process.channel.writeQueueSize >= 65536) return process.send(msg, () => pump());
        process.send(msg);
      }
    };
    pump();
    idle();
    return;
  }
  got++;
  last = Date.now();
  idle();
  if (got === (N - 1) * M) finish('done');
});
process.send('ready');
setInterval(() => {}, 1 << 30);
