//! clusterd's decisions, as a pure state machine: `Core::on(now, Event) -> Vec<Action>`,
//! `Core::tick(now)` and `Core::next_deadline()`. It never touches the OS or the clock (its
//! dependencies are the manifest and protocol crates and serde, and the compiler keeps it so):
//! clusterd's daemon turns the world into [`Event`]s and carries out the [`Action`]s, and
//! every transition is unit-tested here without processes (`tests.rs` has a simulator).
//!
//! The rooms: [`state`] (apps, slots, workers; every deadline lives in the state that owns
//! it), [`backoff`] (crash loops vs outside kills), [`rollout`] (rolling reload and its
//! fail-safe abort), [`reconfigure`] (applying a re-read manifest), [`commands`] (control
//! requests), [`messages`] (what workers' messages mean, `clusterd send`); [`event`] is the
//! vocabulary between core and daemon; [`status`] the views; [`host`] what clusterd tells its
//! own manager and orchestrators (ready, summary); [`process`] the few facts of the OS the
//! core reasons about (pids, exit statuses, signals to clusterd, usage); [`time`] how its
//! instants are written across `clusterd upgrade` (with [`Snapshot`]).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod backoff;
pub mod commands;
mod core;
pub mod event;
pub mod host;
pub mod messages;
pub mod process;
pub mod reconfigure;
pub mod rollout;
pub mod state;
pub mod status;
#[cfg(test)]
mod tests;
pub mod time;

pub use crate::core::{Core, Role, Snapshot};
pub use event::{Action, Event, Exit, Level, Notice, Observation, ReplyTo, SpawnFailure, What};
pub use process::{ExitStatus, Pid, SupervisorSignal, Usage};
pub use state::WorkerId;
