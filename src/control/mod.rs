//! The control socket: [`server`] runs inside the supervisor, [`client`] is the CLI side
//! (`clusterd status`, `reload`, `restart`, `scale`, `signal`, `stop`, `logs`), and [`render`] turns a
//! status snapshot into the table people read.

pub mod client;
pub mod render;
pub mod server;
