// A socket.io chat server, as socket.io's own chat example, under clusterd: the listening
// socket is fd 3 (clusterd's), and the one line for clustering is the adapter, which
// broadcasts over clusterd's worker channel (`ipc_broadcast = true`).
const http = require("node:http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/cluster-adapter");

const server = http.createServer((req, res) => {
  res.writeHead(200, { "content-type": "text/plain" });
  res.end(`socket.io chat, worker ${process.pid}\n`);
});
const io = new Server(server);
io.adapter(createAdapter());

io.on("connection", (socket) => {
  // Tells the client which worker holds its session.
  socket.emit("welcome", { worker: process.pid });
  socket.on("chat", (text) => {
    io.emit("chat", { from: socket.id, worker: process.pid, text });
  });
});

server.listen({ fd: 3 });
process.on("SIGTERM", () => {
  io.close();
  server.close(() => process.exit(0));
});
