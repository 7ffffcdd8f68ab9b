//! A log file written by one writer thread (see [`crate::daemon::logs::pipes`]): opened lazily (append,
//! created mode 0640 with its directory), rotated by size, reopened on request (SIGUSR1, for an
//! external logrotate that moved it).
//!
//! Rotation, when the next line would take the file past `max_size`: `NAME.<keep>` is
//! removed, `NAME.<i>` becomes `NAME.<i+1>` from the oldest down, `NAME` becomes `NAME.1`, and
//! a new `NAME` is started. So `NAME.1` is always the newest rotated file and at most `keep`
//! of them exist (`keep = 0`: the file simply starts over). A single line larger than
//! `max_size` still goes into a file of its own, whole.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::pipes::Target;

/// One log file and its rotation settings.
#[derive(Debug)]
pub struct LogFile {
    path: PathBuf,
    max_size: Option<u64>,
    keep: usize,
    file: Option<File>,
    /// Bytes in the open file.
    size: u64,
    /// Set after a failed write or open, so that a full disk is reported once, not per line.
    failing: bool,
}

impl LogFile {
    /// A file at `path`, not opened yet.
    pub fn new(path: PathBuf, max_size: Option<u64>, keep: usize) -> Self {
        LogFile {
            path,
            max_size,
            keep,
            file: None,
            size: 0,
            failing: false,
        }
    }

    /// Opens the file (and creates its directory) if it is not open.
    fn open(&mut self) -> io::Result<&mut File> {
        if self.file.is_none() {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let file = OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o640)
                .custom_flags(libc::O_CLOEXEC)
                .open(&self.path)?;
            self.size = file.metadata()?.len();
            self.file = Some(file);
        }
        Ok(self.file.as_mut().expect("opened above"))
    }

    /// Moves the files one step down the rotation and starts a new one.
    fn rotate(&mut self) -> io::Result<()> {
        self.file = None;
        self.size = 0;
        if self.keep == 0 {
            return ignore_missing(std::fs::remove_file(&self.path));
        }
        ignore_missing(std::fs::remove_file(rotated_name(&self.path, self.keep)))?;
        for i in (1..self.keep).rev() {
            ignore_missing(std::fs::rename(
                rotated_name(&self.path, i),
                rotated_name(&self.path, i + 1),
            ))?;
        }
        ignore_missing(std::fs::rename(&self.path, rotated_name(&self.path, 1)))
    }

    /// Writes `lines` (whole lines: the writer hands over a batch of them), rotating between
    /// two lines wherever the next one would take the file past `max_size`, so a rotated file
    /// is as full as its lines allow whatever the batches were.
    fn write(&mut self, mut lines: &[u8]) -> io::Result<()> {
        // Open first: the size of an existing file counts.
        self.open()?;
        while !lines.is_empty() {
            let take = match self.max_size {
                Some(max) if self.size + lines.len() as u64 > max => {
                    let room = usize::try_from(max.saturating_sub(self.size)).unwrap_or(usize::MAX);
                    match lines[..room.min(lines.len())]
                        .iter()
                        .rposition(|&b| b == b'\n')
                    {
                        Some(end) => end + 1,
                        None if self.size > 0 => {
                            self.rotate()?;
                            continue;
                        }
                        // A line longer than `max_size` goes whole into a file of its own.
                        None => lines
                            .iter()
                            .position(|&b| b == b'\n')
                            .map_or(lines.len(), |end| end + 1),
                    }
                }
                _ => lines.len(),
            };
            self.open()?.write_all(&lines[..take])?;
            self.size += take as u64;
            lines = &lines[take..];
        }
        Ok(())
    }
}

impl Target for LogFile {
    /// A file has no `PIPE_BUF` concern (one writer per file): larger writes, but never more
    /// than the rotation size, so that a file stays within it.
    fn batch_bytes(&self) -> usize {
        let max = self
            .max_size
            .map_or(usize::MAX, |m| usize::try_from(m).unwrap_or(usize::MAX));
        (64 * 1024).min(max).max(1)
    }

    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        let result = self.write(line);
        match &result {
            Ok(()) => self.failing = false,
            Err(error) if !self.failing => {
                self.failing = true;
                // Not through the log: the log may be this very file.
                eprintln!(
                    "clusterd: cannot write log file {}: {error} (lines are dropped and counted until it works again)",
                    self.path.display()
                );
            }
            Err(_) => {}
        }
        if result.is_err() {
            // Try a fresh descriptor next time (the directory may have been recreated).
            self.file = None;
        }
        result
    }

    fn reopen(&mut self) {
        self.file = None;
        // Open now, so that the new file exists even before the next line.
        let _ = self.open();
    }
}

/// `NAME.<i>`.
pub fn rotated_name(path: &Path, i: usize) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(format!(".{i}"));
    PathBuf::from(name)
}

fn ignore_missing(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_default()
    }

    #[test]
    fn rotated_names_append_the_index() {
        assert_eq!(
            rotated_name(Path::new("/var/log/web.log"), 3),
            PathBuf::from("/var/log/web.log.3")
        );
    }

    #[test]
    fn rotation_keeps_the_newest_files_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/web.log");
        let mut file = LogFile::new(path.clone(), Some(10), 2);
        for i in 0..5 {
            // 9 bytes each: every line starts a new file.
            file.write_line(format!("line {i:03}\n").as_bytes())
                .unwrap();
        }
        assert_eq!(read(&path), "line 004\n");
        assert_eq!(read(&rotated_name(&path, 1)), "line 003\n");
        assert_eq!(read(&rotated_name(&path, 2)), "line 002\n");
        assert!(!rotated_name(&path, 3).exists());
    }

    #[test]
    fn lines_fill_a_file_up_to_the_size_and_an_existing_file_counts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web.log");
        std::fs::write(&path, "old\n").unwrap();
        let mut file = LogFile::new(path.clone(), Some(12), 1);
        file.write_line(b"abcd\n").unwrap(); // 9 bytes
        file.write_line(b"efgh\n").unwrap(); // would be 14: rotate
        assert_eq!(read(&rotated_name(&path, 1)), "old\nabcd\n");
        assert_eq!(read(&path), "efgh\n");
    }

    #[test]
    fn a_batch_that_crosses_the_size_is_split_between_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web.log");
        let mut file = LogFile::new(path.clone(), Some(12), 2);
        file.write_line(b"ab\n").unwrap(); // 3 bytes
        // 3 + 15 > 12: the lines that fit complete the file, the rest starts the next one.
        file.write_line(b"cd\nef\ngh\nij\nkl\n").unwrap();
        assert_eq!(read(&rotated_name(&path, 1)), "ab\ncd\nef\ngh\n");
        assert_eq!(read(&path), "ij\nkl\n");
        // A batch longer than two whole files.
        file.write_line(b"mn\nop\nqr\nst\nuv\nwx\nyz\n").unwrap();
        assert_eq!(read(&rotated_name(&path, 2)), "ij\nkl\nmn\nop\n");
        assert_eq!(read(&rotated_name(&path, 1)), "qr\nst\nuv\nwx\n");
        assert_eq!(read(&path), "yz\n");
    }

    #[test]
    fn keep_zero_starts_over_and_an_oversized_line_is_kept_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web.log");
        let mut file = LogFile::new(path.clone(), Some(4), 0);
        file.write_line(b"0123456789\n").unwrap();
        file.write_line(b"ab\n").unwrap();
        assert_eq!(read(&path), "ab\n");
        assert!(!rotated_name(&path, 1).exists());
    }

    #[test]
    fn reopen_starts_a_new_file_after_a_move() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web.log");
        let moved = dir.path().join("web.log.moved");
        let mut file = LogFile::new(path.clone(), None, 5);
        file.write_line(b"one\n").unwrap();
        std::fs::rename(&path, &moved).unwrap();
        file.write_line(b"two\n").unwrap();
        file.reopen();
        assert!(path.exists());
        file.write_line(b"three\n").unwrap();
        assert_eq!(read(&moved), "one\ntwo\n");
        assert_eq!(read(&path), "three\n");
    }
}
