//! The one error convention: an error's `Display` says what failed, its cause is its
//! `#[source]` (never repeated in the message), and whoever prints an error prints the chain.

use std::error::Error;
use std::fmt;

/// `error` and its causes, as `what failed: why: deeper why` (anyhow's `{:#}`).
pub struct Chain<'a>(pub &'a dyn Error);

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(error) = cause {
            write!(f, ": {error}")?;
            cause = error.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open {0}")]
    struct Open(&'static str, #[source] std::io::Error);

    #[test]
    fn the_chain_names_every_cause_once() {
        let error = Open("x.log", std::io::Error::other("disk full"));
        assert_eq!(error.to_string(), "cannot open x.log");
        assert_eq!(Chain(&error).to_string(), "cannot open x.log: disk full");
    }
}
