//! The supervisor's effects side: [`driver`] is the event loop, and the only code here that
//! forks, signals, reads `/proc` or the clock. It turns the world into the core's events and
//! carries out its actions (the decisions are the `clusterd-core` crate); [`handover`] is the
//! state and descriptors that cross `clusterd upgrade`'s exec.

mod driver;
mod handover;

pub use driver::{Parts, run};
pub use handover::{
    Handover, adopt as adopt_fd, check as check_handover, read_fd as read_handover,
};
