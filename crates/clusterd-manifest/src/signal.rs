//! Signals as values, and their names as people write them: `"SIGTERM"`, `"TERM"`, `"term"`
//! or `"15"`. Plain data with no system call behind it, so the manifest and the supervisor's
//! decisions can name signals without depending on the OS; clusterd's daemon turns one into
//! the OS's signal by name.

use std::fmt;

macro_rules! signals {
    ($($name:ident = $number:literal,)*) => {
        /// A standard POSIX signal, numbered as on Linux (x86, ARM, RISC-V: clusterd's
        /// platforms; the daemon converts by name and its tests check the numbers).
        #[allow(clippy::upper_case_acronyms, missing_docs)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(i32)]
        pub enum Signal {
            $($name = $number,)*
        }

        impl Signal {
            /// Every signal, in number order.
            pub const ALL: &[Signal] = &[$(Signal::$name,)*];

            /// Its name, with the `SIG` prefix.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Signal::$name => stringify!($name),)*
                }
            }
        }
    };
}

signals! {
    SIGHUP = 1,
    SIGINT = 2,
    SIGQUIT = 3,
    SIGILL = 4,
    SIGTRAP = 5,
    SIGABRT = 6,
    SIGBUS = 7,
    SIGFPE = 8,
    SIGKILL = 9,
    SIGUSR1 = 10,
    SIGSEGV = 11,
    SIGUSR2 = 12,
    SIGPIPE = 13,
    SIGALRM = 14,
    SIGTERM = 15,
    SIGSTKFLT = 16,
    SIGCHLD = 17,
    SIGCONT = 18,
    SIGSTOP = 19,
    SIGTSTP = 20,
    SIGTTIN = 21,
    SIGTTOU = 22,
    SIGURG = 23,
    SIGXCPU = 24,
    SIGXFSZ = 25,
    SIGVTALRM = 26,
    SIGPROF = 27,
    SIGWINCH = 28,
    SIGIO = 29,
    SIGPWR = 30,
    SIGSYS = 31,
}

impl Signal {
    /// Its number.
    pub const fn number(self) -> i32 {
        self as i32
    }

    /// The signal numbered `number`, if it is one of [`Signal::ALL`].
    pub fn from_number(number: i32) -> Option<Signal> {
        Signal::ALL.iter().copied().find(|s| s.number() == number)
    }

    /// The signal named exactly `name` (`"SIGTERM"`).
    pub fn from_name(name: &str) -> Option<Signal> {
        Signal::ALL.iter().copied().find(|s| s.as_str() == name)
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parses a signal given by name, with or without the `SIG` prefix and in any case, or by
/// number. Returns `None` for anything else (including `0` and real-time signals).
pub fn parse_signal(s: &str) -> Option<Signal> {
    if let Ok(number) = s.parse::<i32>() {
        return Signal::from_number(number);
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    Signal::from_name(&name)
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
