//! clusterd's manifest: TOML in, a validated [`Manifest`] out, or every problem at once with
//! its file, line, column and key.
//!
//! ```no_run
//! # use std::path::Path;
//! match clusterd_manifest::load(Path::new("supervisor.toml")) {
//!     Ok(manifest) => println!("{} app(s)", manifest.apps.len()),
//!     // One problem per line:
//!     // supervisor.toml:12:11: apps.web.workers: expected a positive integer or "auto", found -3
//!     Err(err) => eprintln!("{err}"),
//! }
//! ```
//!
//! # Layout
//!
//! - `model`: the validated types the supervisor runs from (defaults applied, paths absolute).
//! - `error`: [`ManifestError`] and [`Problem`], and line/column from byte offsets.
//! - `doc`: walking the spanned TOML document and collecting problems instead of stopping.
//! - `values`: conversions of single values (durations, integers, names, paths, modes...).
//! - `listen`: socket addresses, host resolution, and which addresses conflict.
//! - `schema`: the tables and keys of the manifest, defaults and cross-checks.
//! - `signal`: [`parse_signal`], shared with the CLI.
//!
//! Parsing is two-phase: `toml` parses the text into a document that keeps every value's byte
//! span (a syntax error stops there, as nothing after it can be trusted), then `schema` walks
//! it by hand so that every unknown key, wrong type and bad value is reported in one go.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod doc;
mod error;
mod interpolate;
mod listen;
mod model;
mod schema;
mod signal;
#[cfg(test)]
mod tests;
mod values;

pub use error::{ManifestError, Problem};
pub use model::*;
pub use signal::{Signal, parse_signal};

use std::io::{self, Read};
use std::path::Path;

use toml::de::DeTable;

use crate::listen::Resolver;

/// The largest manifest accepted, so that `check /dev/zero` fails instead of eating memory.
const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// Reads, parses and validates the manifest at `path`.
pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
    let read_error = |source| ManifestError::Read {
        path: path.to_owned(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_MANIFEST_BYTES + 1).read_to_end(&mut bytes))
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(read_error(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "larger than {} KiB, not a manifest",
                MAX_MANIFEST_BYTES / 1024
            ),
        )));
    }
    match String::from_utf8(bytes) {
        Ok(text) => parse(&text, path),
        Err(e) => {
            // Place the error after the valid prefix, which is all that can be shown.
            let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            let text = String::from_utf8_lossy(valid);
            Err(ManifestError::Invalid {
                path: path.to_owned(),
                problems: vec![Problem::at(
                    &text,
                    text.len(),
                    "syntax".to_owned(),
                    "invalid UTF-8: a manifest must be UTF-8 text".to_owned(),
                )],
            })
        }
    }
}

/// Parses and validates manifest `text`. `path` names the file in messages, and its directory
/// is what relative paths in the manifest are resolved against; the file is not read.
/// `${VAR}` and `${VAR:-default}` in string values are taken from clusterd's environment
/// (see the `interpolate` module).
pub fn parse(text: &str, path: &Path) -> Result<Manifest, ManifestError> {
    parse_with(text, path, listen::system_resolver, &|name| {
        std::env::var(name).ok()
    })
}

/// [`parse`], resolving host names with `resolver` and variables with `lookup`.
fn parse_with(
    text: &str,
    path: &Path,
    resolver: Resolver,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Manifest, ManifestError> {
    let absolute = std::path::absolute(path).map_err(|source| ManifestError::Read {
        path: path.to_owned(),
        source,
    })?;
    let dir = absolute.parent().unwrap_or(&absolute).to_path_buf();
    let invalid = |problems| ManifestError::Invalid {
        path: path.to_owned(),
        problems,
    };
    let mut doc = DeTable::parse(text).map_err(|e| {
        let offset = e.span().map_or(0, |span| span.start);
        invalid(vec![Problem::at(
            text,
            offset,
            "syntax".to_owned(),
            e.message().to_owned(),
        )])
    })?;
    let origin = schema::Origin {
        path: absolute,
        dir,
        resolver,
    };
    let mut problems = Vec::new();
    interpolate::table(
        doc.get_mut(),
        &doc::KeyPath::root(),
        text,
        lookup,
        &mut problems,
    );
    match schema::manifest(&doc, text, &origin) {
        Ok(manifest) if problems.is_empty() => Ok(manifest),
        Ok(_) => Err(invalid(problems)),
        Err(mut more) => {
            more.extend(problems);
            more.sort_by_key(|p| (p.line, p.column));
            Err(invalid(more))
        }
    }
}
