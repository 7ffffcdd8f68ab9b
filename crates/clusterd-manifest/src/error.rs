//! The errors [`load`](crate::load) and [`parse`](crate::parse) return: [`ManifestError`], and
//! the [`Problem`]s it lists, each placed at a line and column computed from a byte offset.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Why a manifest was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read (missing, unreadable, a directory, too large), or its path
    /// could not be made absolute.
    #[error("cannot read manifest {}", .path.display())]
    Read {
        /// The manifest's path, as given.
        path: PathBuf,
        /// What the operating system said.
        source: io::Error,
    },
    /// The file was read but is not a valid manifest. Displays one problem per line, each as
    /// `FILE:LINE:COLUMN: KEY: MESSAGE`, sorted by position.
    #[error("{}", Listing { path, problems })]
    Invalid {
        /// The manifest's path, as given.
        path: PathBuf,
        /// Every problem found, sorted by line and column; never empty.
        problems: Vec<Problem>,
    },
}

/// One thing wrong with a manifest, with where it is.
///
/// Displays as `LINE:COLUMN: KEY: MESSAGE`; [`ManifestError::Invalid`] puts the file name in
/// front, giving e.g.
/// `supervisor.toml:12:11: apps.web.workers: expected a positive integer or "auto", found -3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, counted in characters.
    pub column: usize,
    /// The dotted key the problem is about, e.g. `apps.web.workers` (`syntax` for a TOML syntax
    /// error).
    pub key: String,
    /// What is wrong, and what was expected.
    pub message: String,
}

impl Problem {
    /// A problem at byte `offset` of `text` (clamped to the text).
    pub(crate) fn at(text: &str, offset: usize, key: String, message: String) -> Self {
        let (line, column) = position(text, offset);
        Problem {
            line,
            column,
            key,
            message,
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}: {}",
            self.line, self.column, self.key, self.message
        )
    }
}

/// The 1-based line and column (in characters) of byte `offset` in `text`.
pub(crate) fn position(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Renders the problems of [`ManifestError::Invalid`], one per line, each prefixed by the file.
struct Listing<'a> {
    path: &'a PathBuf,
    problems: &'a [Problem],
}

impl fmt::Display for Listing<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}:{problem}", self.path.display())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_and_count_characters() {
        let text = "a = 1\nbé = \"x\"\n";
        assert_eq!(position(text, 0), (1, 1));
        assert_eq!(position(text, 4), (1, 5));
        assert_eq!(position(text, 6), (2, 1));
        // 'é' is two bytes but one column.
        let quote = text.find('"').unwrap();
        assert_eq!(position(text, quote), (2, 6));
        // Past the end, and inside a multi-byte character, are clamped.
        assert_eq!(position(text, 1000), (3, 1));
        assert_eq!(position(text, 8), (2, 2));
    }

    #[test]
    fn invalid_lists_every_problem_with_the_file() {
        let text = "x = 1\n  y = 2\n";
        let err = ManifestError::Invalid {
            path: PathBuf::from("dir/supervisor.toml"),
            problems: vec![
                Problem::at(text, 0, "x".into(), "first".into()),
                Problem::at(text, 8, "y".into(), "second".into()),
            ],
        };
        assert_eq!(
            err.to_string(),
            "dir/supervisor.toml:1:1: x: first\ndir/supervisor.toml:2:3: y: second"
        );
    }

    #[test]
    fn read_error_names_the_file_and_the_cause() {
        let err = ManifestError::Read {
            path: PathBuf::from("gone.toml"),
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        assert_eq!(err.to_string(), "cannot read manifest gone.toml");
        let cause = std::error::Error::source(&err).expect("the cause");
        assert_eq!(
            cause.to_string(),
            io::Error::from(io::ErrorKind::NotFound).to_string()
        );
    }
}
