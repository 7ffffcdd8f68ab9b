//! The supervisor, split into decisions and effects.
//!
//! - [`core`]: a pure state machine. `Core::on(now, Event) -> Vec<Action>`, `Core::tick(now)`
//!   and `Core::next_deadline()`; it never touches the OS or the clock, so every transition is
//!   unit-tested without processes (`tests.rs`).
//! - [`driver`]: the event loop, and the only code here that forks, signals, reads `/proc` or
//!   the clock. It turns the world into events and carries out the core's actions.
//! - The core's rooms: [`state`] (apps, slots, workers; every deadline lives in the state that
//!   owns it), [`backoff`] (crash loops vs outside kills), [`rollout`] (rolling reload and its
//!   fail-safe abort), [`reconfigure`] (applying a re-read manifest), [`commands`] (control
//!   requests), [`messages`] (what workers' messages mean, `clusterd send`); [`event`] is the
//!   vocabulary between core and driver; [`status`] the views; [`host`] what clusterd tells
//!   its own manager and orchestrators (ready, summary); [`handover`] the state and
//!   descriptors that cross `clusterd upgrade`'s exec.

mod backoff;
mod commands;
mod core;
mod driver;
mod event;
mod handover;
mod host;
mod messages;
mod reconfigure;
mod rollout;
mod state;
mod status;
#[cfg(test)]
mod tests;

pub use driver::{Parts, run};
pub use handover::{
    Handover, adopt as adopt_fd, check as check_handover, read_fd as read_handover,
};
pub use state::WorkerId;
