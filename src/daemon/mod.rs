//! The supervisor's effects side: everything that touches the OS. [`boot`] brings a
//! supervisor up (new or upgraded), [`driver`] is its event loop, which turns the world into
//! the core's events (`clusterd-core`) and carries out its actions; the rooms around it are
//! the processes ([`spawn`], [`reaper`], [`containment`], [`procstat`]), the sockets
//! ([`sockets`], [`intercept`] and [`steering`]), the channels to workers ([`notify`]:
//! sd_notify from workers; [`ipc`]: message channels), to clusterd's own manager
//! ([`manager`]: sd_notify to systemd) and to operators ([`control`], [`metrics`], [`logs`]),
//! [`watch`], files whose changes reload an app, and [`handover`], what crosses `clusterd
//! upgrade`'s exec.

pub mod boot;
pub mod containment;
pub mod control;
pub mod driver;
pub mod handover;
pub mod intercept;
pub mod ipc;
pub mod logs;
pub mod manager;
pub mod memory;
pub mod metrics;
pub mod notify;
pub mod os;
pub mod procstat;
pub mod reaper;
pub mod rundir;
pub mod signals;
pub mod sockets;
pub mod spawn;
pub mod steering;
pub mod watch;

pub use driver::{Parts, run};
pub use handover::{
    Handover, adopt as adopt_fd, check as check_handover, read_fd as read_handover,
};
