//! clusterd's own `tracing` lines (warnings from containment, sockets, upgrade...) into its
//! [`Logs`]: each event is kept as app `clusterd` and written where clusterd's typed events
//! go, with its fields. The text reads `LEVEL message key=value...`, as `tracing` prints it;
//! JSON has the message and each field as a key of its own (`event`, `app`, `slot`, `pid`...
//! where the call names them), as a typed event's line has.

use std::fmt::{self, Write};

use serde_json::Value;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::Context;

use super::Logs;

/// The layer of the supervisor's subscriber ([`Logs::subscriber`]).
pub struct EventLayer {
    logs: Logs,
}

impl EventLayer {
    /// Logs into `logs`.
    pub fn new(logs: Logs) -> Self {
        EventLayer { logs }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for EventLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let mut line = Line::default();
        event.record(&mut line);
        let level = event.metadata().level().as_str();
        let mut message = format!("{level} {}", line.message);
        for (key, value) in &line.fields {
            match value {
                Value::String(text) => {
                    let _ = write!(message, " {key}={text}");
                }
                other => {
                    let _ = write!(message, " {key}={other}");
                }
            }
        }
        self.logs
            .log(message.as_bytes(), line.fields.into_iter().collect());
    }
}

/// An event's message and fields (in the call's order, for the text).
#[derive(Default)]
struct Line {
    message: String,
    fields: Vec<(String, Value)>,
}

impl Line {
    fn field(&mut self, field: &Field, value: Value) {
        self.fields.push((field.name().to_owned(), value));
    }
}

impl Visit for Line {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.field(field, Value::from(value));
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, Value::from(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, Value::from(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.field(field, Value::from(value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            self.field(field, Value::from(format!("{value:?}")));
        }
    }
}
