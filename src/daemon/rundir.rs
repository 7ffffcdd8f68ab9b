//! The run directory: where clusterd keeps its pid file, control socket and notify socket.
//! `[supervisor] run_dir` or `--run-dir` when given; otherwise
//! `$XDG_RUNTIME_DIR/clusterd/<manifest stem>-<hash of its path>`, or `.clusterd/<stem>` beside
//! the manifest when there is no `XDG_RUNTIME_DIR`. The directory is created mode 0700.

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use clusterd_manifest::Manifest;

/// The run directory of one supervisor and the files in it.
#[derive(Debug, Clone)]
pub struct RunDir {
    /// The directory.
    pub path: PathBuf,
}

impl RunDir {
    /// The run directory for `manifest`, with `override_dir` (the `--run-dir` flag) first.
    pub fn for_manifest(manifest: &Manifest, override_dir: Option<&Path>) -> Self {
        resolve(
            &manifest.path,
            manifest.supervisor.run_dir.clone(),
            override_dir,
        )
    }

    /// The run directory of the manifest file at `path`, for the CLI. Only `[supervisor]
    /// run_dir` is read, leniently, so that a manifest being edited (and invalid for now)
    /// still leads to the supervisor running it.
    pub fn for_manifest_file(path: &Path, override_dir: Option<&Path>) -> io::Result<Self> {
        let absolute = std::path::absolute(path)?;
        if override_dir.is_some() {
            return Ok(resolve(&absolute, None, override_dir));
        }
        let text = std::fs::read_to_string(&absolute)?;
        let configured = text
            .parse::<toml::Table>()
            .ok()
            .and_then(|t| {
                t.get("supervisor")?
                    .get("run_dir")?
                    .as_str()
                    .map(PathBuf::from)
            })
            .map(|dir| absolute.parent().unwrap_or(Path::new("/")).join(dir));
        Ok(resolve(&absolute, configured, None))
    }

    /// Creates the directory (mode 0700 for every directory created).
    pub fn create(&self) -> io::Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.path)
    }

    /// `clusterd.pid`.
    pub fn pid_file(&self) -> PathBuf {
        self.path.join("clusterd.pid")
    }

    /// `control.sock`.
    pub fn control_socket(&self) -> PathBuf {
        self.path.join("control.sock")
    }

    /// `notify.sock`.
    pub fn notify_socket(&self) -> PathBuf {
        self.path.join("notify.sock")
    }
}

/// The one rule: `--run-dir`, else `[supervisor] run_dir`, else the default for the manifest.
fn resolve(manifest: &Path, configured: Option<PathBuf>, override_dir: Option<&Path>) -> RunDir {
    let path = override_dir
        .map(Path::to_path_buf)
        .or(configured)
        .unwrap_or_else(|| default_dir(manifest));
    RunDir { path }
}

fn default_dir(manifest_path: &Path) -> PathBuf {
    let stem = manifest_path
        .file_stem()
        .map_or_else(|| "clusterd".into(), |s| s.to_string_lossy().into_owned());
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(runtime) => {
            let hash = fnv1a(manifest_path.as_os_str().as_encoded_bytes());
            PathBuf::from(runtime)
                .join("clusterd")
                .join(format!("{stem}-{:08x}", hash as u32))
        }
        None => manifest_path
            .parent()
            .unwrap_or(Path::new("."))
            .join(".clusterd")
            .join(stem),
    }
}

/// A stable 64-bit FNV-1a hash (std's hasher may change between releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The pid file, removed when dropped.
pub struct PidFile(PathBuf);

impl PidFile {
    /// Writes our pid to `path`.
    pub fn write(path: PathBuf) -> anyhow::Result<Self> {
        std::fs::write(&path, format!("{}\n", std::process::id()))
            .map_err(|e| anyhow::anyhow!("cannot write pid file {}: {e}", path.display()))?;
        Ok(PidFile(path))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
