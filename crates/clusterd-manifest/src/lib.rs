//! clusterd's manifest: TOML in, a validated [`Manifest`] out, or every problem at once with
//! its file, line, column and key.

#![warn(missing_docs)]

mod model;

pub use model::*;

use std::path::Path;

/// Reads, parses and validates the manifest at `path`.
pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
    let _ = path;
    todo!("implemented by the manifest work")
}

/// Why a manifest was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Placeholder.
    #[error("todo")]
    Todo,
}
