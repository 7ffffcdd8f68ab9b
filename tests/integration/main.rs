//! Integration tests: the built `clusterd` binary against real worker processes.
//! One test binary (so the suite links once), one module per area.

mod check;
mod commands;
mod control;
mod core;
mod examples;
mod faults;
mod host;
mod intercept;
mod intercept_ports;
mod ipc;
mod kv;
mod limits;
mod logs;
mod matrix;
mod monit;
mod node_kv;
mod promises;
mod reload;
mod socketio;
mod upgrade;
mod util;
mod watch;
