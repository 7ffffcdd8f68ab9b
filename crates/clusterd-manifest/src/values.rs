//! Conversions of single TOML values into typed settings: durations, bounded integers, names,
//! paths, signals, choices, booleans and unix modes. Each returns the value or why it was rejected, and
//! knows nothing about where the value sits in the document.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::signal::Signal;
use toml::de::{DeInteger, DeValue};

use crate::doc::{Bad, Value};
use crate::model::LogTarget;
use crate::signal::parse_signal;

/// The longest duration accepted anywhere (so that adding it to an `Instant` cannot overflow).
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// The value of a TOML integer, if it fits an `i64`.
fn integer_value(integer: &DeInteger<'_>) -> Option<i64> {
    i64::from_str_radix(integer.as_str(), integer.radix()).ok()
}

/// An integer in `min..=max`.
pub(crate) fn integer_in(value: &Value<'_>, min: i64, max: i64) -> Result<i64, Bad> {
    match value.get_ref() {
        DeValue::Integer(integer) => match integer_value(integer) {
            Some(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(Bad::expected(format!("an integer from {min} to {max}"))),
        },
        _ => Err(Bad::expected(format!("an integer from {min} to {max}"))),
    }
}

/// `true` or `false`.
pub(crate) fn boolean(value: &Value<'_>) -> Result<bool, Bad> {
    match value.get_ref() {
        DeValue::Boolean(b) => Ok(*b),
        _ => Err(Bad::expected("true or false")),
    }
}

/// Any string.
pub(crate) fn string<'v>(value: &'v Value<'_>) -> Result<&'v str, Bad> {
    match value.get_ref() {
        DeValue::String(s) => Ok(s),
        _ => Err(Bad::expected("a string")),
    }
}

/// A string with no NUL byte (it ends up in a C string: argv, environment, paths).
pub(crate) fn c_string<'v>(value: &'v Value<'_>) -> Result<&'v str, Bad> {
    let s = string(value)?;
    if s.contains('\0') {
        return Err(Bad::Message("must not contain a NUL character".to_owned()));
    }
    Ok(s)
}

/// Whether `name` is made of `[A-Za-z0-9_.-]` only, and not empty.
pub(crate) fn is_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// The characters a name is made of, for messages.
pub(crate) const NAME_CHARS: &str = "letters, digits, '_', '.' and '-'";

/// A string that [`is_name`].
pub(crate) fn name(value: &Value<'_>) -> Result<String, Bad> {
    match value.get_ref() {
        DeValue::String(s) if is_name(s) => Ok(s.to_string()),
        _ => Err(Bad::expected(format!("a name made of {NAME_CHARS}"))),
    }
}

/// A duration string like `"10s"`, `"250ms"`, `"1m30s"` or `"1.5s"`, at most a year.
pub(crate) fn duration(value: &Value<'_>) -> Result<Duration, Bad> {
    let expected = || Bad::expected("a duration like \"10s\" or \"250ms\"");
    let DeValue::String(s) = value.get_ref() else {
        return Err(expected());
    };
    let parsed = humantime::parse_duration(s).map_err(|_| expected())?;
    if parsed > MAX_DURATION {
        return Err(Bad::expected("a duration of at most 365 days"));
    }
    Ok(parsed)
}

/// A size in bytes: `"300M"`, `"1.5G"`, `"512KiB"`, or an integer of bytes. Units are
/// powers of 1024 (`"300M"` = 300 MiB, as PM2's `max_memory_restart` reads it).
pub(crate) fn size(value: &Value<'_>) -> Result<u64, Bad> {
    let expected = || Bad::expected("a size like \"300M\" or \"1G\"");
    let bytes = match value.get_ref() {
        DeValue::String(s) => parse_size::Config::new()
            .with_binary()
            .parse_size(s.as_ref())
            .map_err(|_| expected())?,
        DeValue::Integer(integer) => integer_value(integer)
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(expected)?,
        _ => return Err(expected()),
    };
    if bytes == 0 {
        return Err(Bad::expected("a size greater than zero"));
    }
    Ok(bytes)
}

/// A [`duration`] greater than zero.
pub(crate) fn positive_duration(value: &Value<'_>) -> Result<Duration, Bad> {
    match duration(value)? {
        Duration::ZERO => Err(Bad::expected("a duration greater than zero")),
        positive => Ok(positive),
    }
}

/// A path, made absolute against `dir` when relative, without `.` components.
pub(crate) fn path(value: &Value<'_>, dir: &Path) -> Result<PathBuf, Bad> {
    let s = c_string(value)?;
    if s.is_empty() {
        return Err(Bad::expected("a non-empty path"));
    }
    Ok(resolve(dir, Path::new(s)))
}

/// `path` made absolute against the absolute `dir`, lexically (the file need not exist).
pub(crate) fn resolve(dir: &Path, path: &Path) -> PathBuf {
    let joined = dir.join(path);
    // `absolute` only fails on an empty path or a missing working directory; `joined` is
    // absolute and non-empty, so it merely drops `.` components here.
    std::path::absolute(&joined).unwrap_or(joined)
}

/// A signal: a name with or without `SIG`, or a number, as a string or an integer.
pub(crate) fn signal(value: &Value<'_>) -> Result<Signal, Bad> {
    let parsed = match value.get_ref() {
        DeValue::String(s) => parse_signal(s),
        DeValue::Integer(integer) => integer_value(integer)
            .and_then(|n| i32::try_from(n).ok())
            .and_then(Signal::from_number),
        _ => None,
    };
    parsed.ok_or_else(|| Bad::expected("a signal name like \"SIGTERM\" or \"TERM\", or a number"))
}

/// One of the strings of `choices`, mapped to its value.
pub(crate) fn choice<T: Copy>(value: &Value<'_>, choices: &[(&str, T)]) -> Result<T, Bad> {
    let found = match value.get_ref() {
        DeValue::String(s) => choices.iter().find(|(name, _)| name == s),
        _ => None,
    };
    if let Some((_, chosen)) = found {
        return Ok(*chosen);
    }
    let names: Vec<String> = choices
        .iter()
        .map(|(name, _)| format!("{name:?}"))
        .collect();
    Err(Bad::expected(format!("one of {}", names.join(", "))))
}

/// `log`: `"stdout"`, or a path: a directory when written with a trailing `/` or when it is an
/// existing directory, else a file. Relative paths resolve against `dir`.
pub(crate) fn log_target(value: &Value<'_>, dir: &Path) -> Result<LogTarget, Bad> {
    let s = c_string(value)
        .map_err(|_| Bad::expected("\"stdout\", a directory (\"logs/\") or a file path"))?;
    if s == "stdout" {
        return Ok(LogTarget::Stdout);
    }
    let resolved = path(value, dir)?;
    if s.ends_with('/') || resolved.is_dir() {
        Ok(LogTarget::Dir(resolved))
    } else {
        Ok(LogTarget::File(resolved))
    }
}

/// The largest number of workers an app may ask for.
pub(crate) const MAX_WORKERS: i64 = 4096;

/// `workers`: an integer in `1..=MAX_WORKERS` (also as a string of digits, as
/// `"${WORKERS:-4}"` gives), or `"auto"` for the number of CPUs.
pub(crate) fn workers(value: &Value<'_>) -> Result<usize, Bad> {
    let expected = || Bad::expected("a positive integer or \"auto\"");
    let count = match value.get_ref() {
        DeValue::String(s) if s == "auto" => {
            return std::thread::available_parallelism()
                .map(|n| n.get().min(MAX_WORKERS as usize))
                .map_err(|e| Bad::Message(format!("cannot count the CPUs for \"auto\": {e}")));
        }
        DeValue::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse::<i64>().ok()
        }
        DeValue::Integer(integer) => integer_value(integer),
        _ => None,
    };
    match count {
        Some(n) if n > MAX_WORKERS => Err(Bad::expected(format!("at most {MAX_WORKERS} workers"))),
        // In 1..=MAX_WORKERS, so it fits any usize.
        Some(n) if n >= 1 => Ok(n as usize),
        _ => Err(expected()),
    }
}

/// A unix socket file's mode: an octal string (`"0660"`, `"660"`, `"0o660"`) or an octal
/// integer (`0o660`), at most `0o777`. Decimal integers are refused: `660` would silently mean
/// `0o1224`.
pub(crate) fn mode(value: &Value<'_>) -> Result<u32, Bad> {
    let expected = || Bad::expected("an octal mode like \"0660\" or 0o660, at most 0o777");
    let parsed = match value.get_ref() {
        DeValue::String(s) => {
            let digits = s.strip_prefix("0o").unwrap_or(s);
            if digits.is_empty() || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
                return Err(expected());
            }
            u32::from_str_radix(digits, 8).ok()
        }
        DeValue::Integer(integer) if integer.radix() == 8 => {
            u32::from_str_radix(integer.as_str(), 8).ok()
        }
        DeValue::Integer(_) => {
            return Err(Bad::expected(
                "an octal mode like \"0660\" or 0o660 (a decimal integer is ambiguous)",
            ));
        }
        _ => return Err(expected()),
    };
    parsed.filter(|m| *m <= 0o777).ok_or_else(expected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use toml::de::DeTable;

    /// Runs `convert` on the value of `v = {toml}`.
    fn with<T>(
        toml: &str,
        convert: impl FnOnce(&Value<'_>) -> Result<T, Bad>,
    ) -> Result<T, String> {
        let text = format!("v = {toml}");
        let doc = DeTable::parse(&text).unwrap();
        convert(doc.get_ref().get("v").unwrap()).map_err(|bad| match bad {
            Bad::Expected(what) => format!("expected {what}"),
            Bad::Message(message) => message,
        })
    }

    #[test]
    fn durations() {
        assert_eq!(with("\"10s\"", duration), Ok(Duration::from_secs(10)));
        assert_eq!(with("\"250ms\"", duration), Ok(Duration::from_millis(250)));
        assert_eq!(with("\"1m30s\"", duration), Ok(Duration::from_secs(90)));
        assert_eq!(with("\"1.5s\"", duration), Ok(Duration::from_millis(1500)));
        assert_eq!(with("\"0s\"", duration), Ok(Duration::ZERO));
        for bad in [
            "\"10\"", "10", "\"-5s\"", "\"soon\"", "\"\"", "1.5", "[\"1s\"]",
        ] {
            assert_eq!(
                with(bad, duration),
                Err("expected a duration like \"10s\" or \"250ms\"".to_owned()),
                "{bad}"
            );
        }
        assert_eq!(
            with("\"1000d\"", duration),
            Err("expected a duration of at most 365 days".to_owned())
        );
        assert!(with("\"0s\"", positive_duration).is_err());
        assert_eq!(
            with("\"1ms\"", positive_duration),
            Ok(Duration::from_millis(1))
        );
    }

    #[test]
    fn integers_in_range() {
        assert_eq!(with("1", |v| integer_in(v, 1, 65535)), Ok(1));
        assert_eq!(with("0xFFFF", |v| integer_in(v, 1, 65535)), Ok(65535));
        assert_eq!(with("1_024", |v| integer_in(v, 1, 65535)), Ok(1024));
        for bad in ["0", "65536", "-1", "\"5\"", "1.0", "99999999999999999999"] {
            assert!(with(bad, |v| integer_in(v, 1, 65535)).is_err(), "{bad}");
        }
    }

    #[test]
    fn workers_counts_and_auto() {
        assert_eq!(with("4", workers), Ok(4));
        assert_eq!(with("4096", workers), Ok(4096));
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert_eq!(with("\"auto\"", workers), Ok(cpus));
        let positive = "expected a positive integer or \"auto\"".to_owned();
        for bad in [
            "0",
            "-3",
            "\"four\"",
            "\"AUTO\"",
            "2.0",
            "true",
            "99999999999999999999",
        ] {
            assert_eq!(with(bad, workers), Err(positive.clone()), "{bad}");
        }
        assert_eq!(
            with("4097", workers),
            Err("expected at most 4096 workers".to_owned())
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(with("\"300M\"", size), Ok(300 << 20));
        assert_eq!(with("\"1.5G\"", size), Ok(3 << 29));
        assert_eq!(with("\"512KiB\"", size), Ok(512 << 10));
        assert_eq!(with("4096", size), Ok(4096));
        assert!(with("\"lots\"", size).is_err());
        assert!(with("0", size).is_err());
    }

    #[test]
    fn modes() {
        assert_eq!(with("\"0660\"", mode), Ok(0o660));
        assert_eq!(with("\"600\"", mode), Ok(0o600));
        assert_eq!(with("\"0o777\"", mode), Ok(0o777));
        assert_eq!(with("0o640", mode), Ok(0o640));
        for bad in [
            "\"0999\"", "\"1777\"", "\"\"", "\"rw\"", "660", "0o1000", "true",
        ] {
            assert!(with(bad, mode).is_err(), "{bad}");
        }
    }

    #[test]
    fn signals() {
        assert_eq!(with("\"SIGTERM\"", signal), Ok(Signal::SIGTERM));
        assert_eq!(with("\"INT\"", signal), Ok(Signal::SIGINT));
        assert_eq!(with("\"15\"", signal), Ok(Signal::SIGTERM));
        assert_eq!(with("3", signal), Ok(Signal::SIGQUIT));
        for bad in ["\"SIGFOO\"", "0", "4294967311", "true", "\"\""] {
            assert!(with(bad, signal).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_and_paths() {
        assert!(is_name("web-1.v2_x"));
        assert!(!is_name(""));
        assert!(!is_name("a:b"));
        assert!(!is_name("a b"));
        assert!(!is_name("é"));
        let dir = Path::new("/srv/app");
        assert_eq!(
            with("\"run\"", |v| path(v, dir)),
            Ok(PathBuf::from("/srv/app/run"))
        );
        assert_eq!(
            with("\"./run/\"", |v| path(v, dir)),
            Ok(PathBuf::from("/srv/app/run"))
        );
        assert_eq!(
            with("\"../x\"", |v| path(v, dir)),
            Ok(PathBuf::from("/srv/app/../x"))
        );
        assert_eq!(
            with("\"/var/run\"", |v| path(v, dir)),
            Ok(PathBuf::from("/var/run"))
        );
        assert!(with("\"\"", |v| path(v, dir)).is_err());
        assert!(with("\"a\\u0000b\"", |v| path(v, dir)).is_err());
    }

    #[test]
    fn sizes_take_binary_units() {
        assert_eq!(with("\"10M\"", size), Ok(10 << 20));
        assert_eq!(with("\"512KiB\"", size), Ok(512 << 10));
        assert_eq!(with("\"1G\"", size), Ok(1 << 30));
        assert_eq!(with("4096", size), Ok(4096));
        assert!(with("\"0\"", size).is_err());
        assert!(with("\"10X\"", size).is_err());
        assert!(with("-1", size).is_err());
    }

    #[test]
    fn choices_list_the_allowed_strings() {
        let choices = [("always", 1), ("never", 2)];
        assert_eq!(with("\"never\"", |v| choice(v, &choices)), Ok(2));
        assert_eq!(
            with("\"sometimes\"", |v| choice(v, &choices)),
            Err("expected one of \"always\", \"never\"".to_owned())
        );
    }
}
