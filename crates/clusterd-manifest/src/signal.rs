//! Signal names as people write them: `"SIGTERM"`, `"TERM"`, `"term"` or `"15"`.

use nix::sys::signal::Signal;

/// Parses a signal given by name, with or without the `SIG` prefix and in any case, or by
/// number. Returns `None` for anything else (including `0` and real-time signals).
pub fn parse_signal(s: &str) -> Option<Signal> {
    if let Ok(number) = s.parse::<i32>() {
        return Signal::try_from(number).ok();
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_and_without_prefix_and_numbers() {
        assert_eq!(parse_signal("SIGTERM"), Some(Signal::SIGTERM));
        assert_eq!(parse_signal("TERM"), Some(Signal::SIGTERM));
        assert_eq!(parse_signal("sigint"), Some(Signal::SIGINT));
        assert_eq!(parse_signal("Quit"), Some(Signal::SIGQUIT));
        assert_eq!(parse_signal("15"), Some(Signal::SIGTERM));
        assert_eq!(parse_signal("9"), Some(Signal::SIGKILL));
        assert_eq!(parse_signal("USR2"), Some(Signal::SIGUSR2));
    }

    #[test]
    fn rejects_unknown_names_and_numbers() {
        for bad in [
            "",
            "SIG",
            "SIGFOO",
            "FOO",
            "0",
            "-15",
            "999",
            " TERM",
            "SIGSIGTERM",
        ] {
            assert_eq!(parse_signal(bad), None, "{bad:?}");
        }
    }
}
