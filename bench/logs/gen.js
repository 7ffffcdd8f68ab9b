// bench/logs/gen.js: prints numbered lines at a fixed rate, then stays idle.
// RATE lines per second for SECS seconds, written in batches every 5 ms; each line is
// "w<worker> <n> <padding>" (~80 bytes). The worker id comes from clusterd
// (CLUSTERD_WORKER_ID) or PM2 (NODE_APP_INSTANCE).
'use strict';
const id = process.env.CLUSTERD_WORKER_ID ?? process.env.NODE_APP_INSTANCE ?? '0';
const rate = Number(process.env.RATE || 25000);
const secs = Number(process.env.SECS || 10);
const total = rate * secs;
const pad = 'x'.repeat(64);
const start = Date.now();
let seq = 0;
function tick() {
  const due = Math.min(total, Math.floor(((Date.now() - start) / 1000) * rate));
  let batch = '';
  while (seq < due) {
    seq++;
    batch += `w${id} ${seq} ${pad}\n`;
  }
  if (batch) process.stdout.write(batch);
  if (seq < total) setTimeout(tick, 5);
  else setInterval(() => {}, 1 << 30);
}
tick();
