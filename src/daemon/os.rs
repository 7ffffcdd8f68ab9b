//! The core's plain values (`clusterd_core::Pid`, `clusterd_manifest::Signal`) as the OS's
//! (`nix`), and back: the one place the two meet.

use clusterd_core::Pid;
use clusterd_manifest::Signal;

/// The OS's pid for the core's.
pub fn pid(pid: Pid) -> nix::unistd::Pid {
    nix::unistd::Pid::from_raw(pid.as_raw())
}

/// The core's pid for the OS's.
pub fn core_pid(pid: nix::unistd::Pid) -> Pid {
    Pid::from_raw(pid.as_raw())
}

/// The OS's signal for a signal named in a manifest or by the core (by name, so a platform
/// with other numbers still gets the right one).
pub fn signal(signal: Signal) -> nix::sys::signal::Signal {
    signal
        .as_str()
        .parse()
        .unwrap_or(nix::sys::signal::Signal::SIGKILL)
}

/// The core's signal for the OS's (`None` for one the core does not name).
pub fn core_signal(signal: nix::sys::signal::Signal) -> Option<Signal> {
    Signal::from_name(signal.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_signal_the_manifest_names_is_the_os_signal_of_that_name_and_number() {
        for &named in Signal::ALL {
            let os = signal(named);
            assert_eq!(os.as_str(), named.as_str());
            assert_eq!(os as i32, named.number(), "{named}");
            assert_eq!(core_signal(os), Some(named));
        }
    }
}
