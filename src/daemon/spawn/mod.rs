//! Fork/exec of one worker process.
//!
//! Everything the child needs — C strings for the program, argv, envp and working directory, the
//! plan of which fd goes where — is prepared in the parent. Between `fork` and `execve` the child
//! only makes async-signal-safe system calls through `libc` (no allocation, no locks, no
//! logging), because the parent is a running tokio process. Failures in the child are reported to
//! the parent through a close-on-exec pipe: the parent reads EOF when `execve` succeeded, or the
//! step that failed and its errno. For an intercepted app the last step before `execve` is
//! [`Trap::install_in_child`] (seccomp filter, notification fd sent to the supervisor), then
//! only the restore of the soft descriptor limit.

use std::ffi::{CString, OsStr};
use std::fmt;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use clusterd_manifest::AppConfig;
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::unistd::Pid;

use crate::daemon::intercept::Trap;

pub mod env;

/// What to start: a fully resolved program, its arguments and environment, and its fds.
pub struct SpawnSpec<'a> {
    /// Absolute path of the program (see [`find_program`]).
    pub program: &'a Path,
    /// `argv`, including `argv[0]`.
    pub argv: &'a [String],
    /// The complete environment, except `LISTEN_PID`, which is filled in by the child.
    pub env: &'a [(String, String)],
    /// Working directory.
    pub cwd: &'a Path,
    /// Listening sockets, placed at fds 3, 4, ... in this order.
    pub listen_fds: &'a [RawFd],
    /// The worker's standard input, output and error.
    pub stdio: [&'a OwnedFd; 3],
    /// The `cgroup.procs` of the worker's cgroup, open for writing
    /// (`Containment::prepare_worker`): the child writes `0` to it first thing after `fork`,
    /// so the worker and everything it starts are inside from the beginning. A write that
    /// fails is ignored (the worker runs in its process group only): check afterwards.
    pub cgroup_procs: Option<&'a OwnedFd>,
    /// For `intercept = true`: the seccomp trap the child installs last before `execve`.
    pub trap: Option<&'a Trap>,
    /// For `ipc`: the worker's end of its message channel, placed at the fd right after the
    /// listening sockets (see [`ipc_fd_number`]), without close-on-exec: the worker's own.
    pub ipc: Option<&'a OwnedFd>,
}

/// The fd number a worker with `listen_count` sockets finds its message channel at.
pub fn ipc_fd_number(listen_count: usize) -> RawFd {
    3 + listen_count as RawFd
}

/// Why a worker could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// `argv[0]` was not found as a file, or not in `PATH`.
    #[error("cannot find program {program:?}{}", if program.contains('/') { "" } else { " in PATH" })]
    NotFound {
        /// The program as written in the manifest.
        program: String,
    },
    /// An argument or environment entry contains a NUL byte.
    #[error("argument or environment entry contains a NUL byte: {0:?}")]
    Nul(String),
    /// `pipe2` or `fork` failed in the parent.
    #[error("{what} failed")]
    Os {
        /// The call that failed.
        what: &'static str,
        /// The error.
        #[source]
        cause: io::Error,
    },
    /// A step in the child before `execve`, or `execve` itself, failed.
    #[error("{step} {path}")]
    Child {
        /// The child process, which exits at once with status 127.
        pid: Pid,
        /// What the child was doing.
        step: ChildStep,
        /// The path involved (program or working directory).
        path: String,
        /// The errno, as an error.
        #[source]
        cause: io::Error,
    },
}

impl SpawnError {
    /// Whether trying again later may succeed: the system was short of something (descriptors
    /// `EMFILE`/`ENFILE`, memory `ENOMEM`, processes `EAGAIN`, space `ENOSPC`, a binary being
    /// replaced `ETXTBSY`), or `pipe2`/`fork` failed in clusterd itself. A program that is
    /// missing, not executable or malformed (`ENOENT`, `EACCES`, `ENOEXEC`, ...) or a NUL in
    /// the command stays wrong until the manifest or the disk changes: permanent.
    pub fn is_transient(&self) -> bool {
        match self {
            SpawnError::NotFound { .. } | SpawnError::Nul(_) => false,
            SpawnError::Os { .. } => true,
            SpawnError::Child { cause, .. } => matches!(
                cause.raw_os_error(),
                Some(
                    libc::EMFILE
                        | libc::ENFILE
                        | libc::ENOMEM
                        | libc::EAGAIN
                        | libc::ENOSPC
                        | libc::ETXTBSY
                )
            ),
        }
    }
}

/// A step between fork and exec that can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ChildStep {
    /// Placing stdio and listening sockets with `dup2`.
    Fds = 1,
    /// `chdir` to the working directory.
    Chdir = 2,
    /// `execve` of the program.
    Exec = 3,
    /// Installing the seccomp trap of `bind`/`listen` and sending its notification fd.
    Intercept = 5,
}

impl fmt::Display for ChildStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChildStep::Fds => "cannot set up file descriptors for",
            ChildStep::Chdir => "cannot change directory to",
            ChildStep::Exec => "cannot execute",
            ChildStep::Intercept => "cannot trap bind()/listen() (seccomp) for",
        })
    }
}

/// Resolves `argv[0]`: a name with a `/` is used as is (relative to `cwd` when relative); a bare
/// name is searched in `path_var` like `execvp` does. Called at every spawn, so a binary replaced
/// on disk (or added to `PATH`) is what the next worker runs.
fn resolve_program(program: &str, cwd: &Path, path_var: Option<&OsStr>) -> Option<PathBuf> {
    if program.contains('/') {
        let path = cwd.join(program);
        return is_executable_file(&path).then_some(path);
    }
    let path_var = path_var.unwrap_or(OsStr::new("/usr/local/bin:/usr/bin:/bin"));
    std::env::split_paths(path_var)
        .map(|dir| cwd.join(dir).join(program))
        .find(|candidate| is_executable_file(candidate))
}

/// The program an app runs: `argv[0]` resolved against the app's `env.PATH` when it sets one,
/// else `inherited_path` (clusterd's own `PATH`). The one rule for `check`, `start` and every
/// spawn.
pub fn find_program(config: &AppConfig, inherited_path: Option<&OsStr>) -> Option<PathBuf> {
    let path = config
        .env
        .get("PATH")
        .map(|p| OsStr::new(p.as_str()))
        .or(inherited_path);
    resolve_program(&config.command[0], &config.cwd, path)
}

fn is_executable_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The soft `RLIMIT_NOFILE` clusterd was started with, restored in each worker.
static WORKER_NOFILE: OnceLock<libc::rlimit> = OnceLock::new();

/// Raises clusterd's soft `RLIMIT_NOFILE` to the hard limit (a supervisor holds a few
/// descriptors per worker), and remembers the original soft limit: workers get it back before
/// `execve`, as they would have without clusterd (a program using `select` relies on 1024).
/// Call once, at start. Returns the soft limit before and after.
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let _ = WORKER_NOFILE.set(libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    });
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok((soft, hard))
}

/// The soft and hard `RLIMIT_NOFILE` workers get, to hand to the next clusterd across an
/// upgrade (whose own limit is the raised one).
pub fn worker_nofile() -> Option<(u64, u64)> {
    WORKER_NOFILE.get().map(|l| (l.rlim_cur, l.rlim_max))
}

/// After an upgrade: the limit workers get is the one the first clusterd was started with.
pub fn set_worker_nofile(soft: u64, hard: u64) {
    let _ = WORKER_NOFILE.set(libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    });
}

/// The C-level form of a [`SpawnSpec`], built before forking.
struct Prepared {
    program: CString,
    cwd: CString,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _env: Vec<CString>,
    /// `LISTEN_PID=` followed by room for the digits the child writes in place.
    listen_pid: Vec<u8>,
    envp_ptrs: Vec<*const libc::c_char>,
    /// The descriptor limit to restore in the child (see [`raise_nofile_limit`]).
    nofile: Option<libc::rlimit>,
}

const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";

fn cstring(bytes: &[u8]) -> Result<CString, SpawnError> {
    CString::new(bytes).map_err(|_| SpawnError::Nul(String::from_utf8_lossy(bytes).into_owned()))
}

impl Prepared {
    fn new(spec: &SpawnSpec<'_>) -> Result<Self, SpawnError> {
        let argv: Vec<CString> = spec
            .argv
            .iter()
            .map(|a| cstring(a.as_bytes()))
            .collect::<Result<_, _>>()?;
        let env: Vec<CString> = spec
            .env
            .iter()
            .map(|(k, v)| cstring(format!("{k}={v}").as_bytes()))
            .collect::<Result<_, _>>()?;
        let mut listen_pid = LISTEN_PID_PREFIX.to_vec();
        listen_pid.resize(LISTEN_PID_PREFIX.len() + 21, 0);

        let mut argv_ptrs: Vec<_> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let mut envp_ptrs: Vec<_> = env.iter().map(|e| e.as_ptr()).collect();
        if !spec.listen_fds.is_empty() {
            envp_ptrs.push(listen_pid.as_ptr().cast());
        }
        envp_ptrs.push(std::ptr::null());
        Ok(Prepared {
            program: cstring(spec.program.as_os_str().as_bytes())?,
            cwd: cstring(spec.cwd.as_os_str().as_bytes())?,
            _argv: argv,
            argv_ptrs,
            _env: env,
            listen_pid,
            envp_ptrs,
            nofile: WORKER_NOFILE.get().copied(),
        })
    }
}

/// Forks and execs one worker in its own process group, with `PR_SET_PDEATHSIG` set to SIGKILL
/// so that it cannot outlive the supervisor. Returns its pid once `execve` has succeeded.
///
/// The caller owns reaping: the child's exit (including the exit of a child whose exec failed,
/// with status 127) is collected by the reaper like any other.
pub fn spawn(spec: &SpawnSpec<'_>) -> Result<Pid, SpawnError> {
    let mut prepared = Prepared::new(spec)?;
    let (err_read, err_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| SpawnError::Os {
            what: "pipe2",
            cause: e.into(),
        })?;
    let parent_pid = nix::unistd::getpid().as_raw();
    let stdio = spec.stdio.map(|fd| fd.as_raw_fd());
    let cgroup_procs = spec.cgroup_procs.map(|fd| fd.as_raw_fd());
    let listen_pid_buf = prepared.listen_pid.as_mut_ptr();

    // SAFETY: the child branch calls only async-signal-safe functions on memory prepared before
    // the fork, then execs or `_exit`s; it never returns into Rust code of the parent.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(SpawnError::Os {
            what: "fork",
            cause: io::Error::last_os_error(),
        });
    }
    if pid == 0 {
        // SAFETY: see above; we are the child.
        unsafe {
            child_after_fork(
                &prepared,
                listen_pid_buf,
                parent_pid,
                cgroup_procs,
                stdio,
                err_write.as_raw_fd(),
                spec,
            )
        }
    }
    drop(err_write);
    let pid = Pid::from_raw(pid);
    // Also set the group from the parent, so that it is in place before we might signal it.
    // EACCES means the child has already exec'd (and had set its group itself).
    let _ = nix::unistd::setpgid(pid, pid);

    let mut report = [0u8; 5];
    let n = read_full(&err_read, &mut report);
    match n {
        Ok(0) => Ok(pid),
        Ok(5) => {
            let step = match report[0] {
                1 => ChildStep::Fds,
                2 => ChildStep::Chdir,
                5 => ChildStep::Intercept,
                _ => ChildStep::Exec,
            };
            let errno = i32::from_ne_bytes([report[1], report[2], report[3], report[4]]);
            let path = match step {
                ChildStep::Chdir => spec.cwd.display().to_string(),
                _ => spec.program.display().to_string(),
            };
            Err(SpawnError::Child {
                pid,
                step,
                path,
                cause: io::Error::from_raw_os_error(errno),
            })
        }
        Ok(_) | Err(_) => Err(SpawnError::Child {
            pid,
            step: ChildStep::Exec,
            path: spec.program.display().to_string(),
            cause: io::Error::other("lost the child's exec report"),
        }),
    }
}

fn read_full(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    let mut file = std::fs::File::from(fd.try_clone()?);
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The child's side of [`spawn`]. Async-signal-safe calls only; never returns.
unsafe fn child_after_fork(
    prepared: &Prepared,
    listen_pid_buf: *mut u8,
    parent_pid: libc::pid_t,
    cgroup_procs: Option<RawFd>,
    stdio: [RawFd; 3],
    err_fd: RawFd,
    spec: &SpawnSpec<'_>,
) -> ! {
    // Field reads only: nothing here allocates.
    let (listen_fds, trap) = (spec.listen_fds, spec.trap);
    let ipc = spec.ipc.map(|fd| fd.as_raw_fd());
    // SAFETY: this is the child between fork and exec (the caller's contract): only raw async-
    // signal-safe syscalls on descriptors and memory prepared before the fork.
    unsafe {
        // First of all, before this process can start anything: join the worker's cgroup.
        // A failed join is not fatal: the worker is then contained by its process group, and
        // the supervisor finds out and says so (`Containment::check_joined`).
        if let Some(fd) = cgroup_procs {
            libc::write(fd, b"0".as_ptr().cast(), 1);
        }

        let first_free = ipc_fd_number(listen_fds.len()) + ipc.is_some() as libc::c_int;
        // The error pipe first: moved above the target range like every other descriptor, so
        // that no dup2 below can replace it, whatever number it had.
        let report_fd = libc::fcntl(err_fd, libc::F_DUPFD_CLOEXEC, first_free);
        if report_fd < 0 {
            report_failure(err_fd, ChildStep::Fds);
        }
        let fail = |step: ChildStep| -> ! { report_failure(report_fd, step) };

        // A clean signal state: empty mask, default dispositions (Rust ignores SIGPIPE, and
        // ignored signals survive exec).
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        for sig in 1..32 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }

        libc::setpgid(0, 0);
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        if libc::getppid() != parent_pid {
            // The supervisor died between fork and prctl.
            libc::_exit(1);
        }

        // Move every source fd above the target range first, so that no dup2 below can
        // overwrite a source that is still needed.
        let mut moved_stdio = [0; 3];
        for (i, fd) in stdio.iter().enumerate() {
            moved_stdio[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, first_free);
            if moved_stdio[i] < 0 {
                fail(ChildStep::Fds);
            }
        }
        const MAX_LISTEN: usize = 64;
        let mut moved_listen = [0; MAX_LISTEN];
        if listen_fds.len() > MAX_LISTEN {
            *libc::__errno_location() = libc::EMFILE;
            fail(ChildStep::Fds);
        }
        for (i, fd) in listen_fds.iter().enumerate() {
            moved_listen[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, first_free);
            if moved_listen[i] < 0 {
                fail(ChildStep::Fds);
            }
        }
        let mut moved_ipc = -1;
        if let Some(fd) = ipc {
            moved_ipc = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, first_free);
            if moved_ipc < 0 {
                fail(ChildStep::Fds);
            }
        }
        // dup2 clears close-on-exec on the target.
        for (target, fd) in moved_stdio.iter().enumerate() {
            if libc::dup2(*fd, target as libc::c_int) < 0 {
                fail(ChildStep::Fds);
            }
        }
        for (i, fd) in moved_listen[..listen_fds.len()].iter().enumerate() {
            if libc::dup2(*fd, 3 + i as libc::c_int) < 0 {
                fail(ChildStep::Fds);
            }
        }
        if ipc.is_some() && libc::dup2(moved_ipc, ipc_fd_number(listen_fds.len())) < 0 {
            fail(ChildStep::Fds);
        }
        // Anything else — including fds our own parent leaked to us without CLOEXEC — must not
        // reach the worker. CLOSE_RANGE_CLOEXEC keeps the error pipe usable until exec. Older
        // kernels lack it; everything this process opens is close-on-exec anyway.
        libc::syscall(
            libc::SYS_close_range,
            first_free as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );

        if libc::chdir(prepared.cwd.as_ptr()) < 0 {
            fail(ChildStep::Chdir);
        }

        // LISTEN_PID is our own pid, which only the child knows: write its digits in place.
        let mut pid = libc::getpid() as u64;
        let mut digits = [0u8; 20];
        let mut n = 0;
        loop {
            digits[n] = b'0' + (pid % 10) as u8;
            n += 1;
            pid /= 10;
            if pid == 0 {
                break;
            }
        }
        let start = LISTEN_PID_PREFIX.len();
        for i in 0..n {
            *listen_pid_buf.add(start + i) = digits[n - 1 - i];
        }
        *listen_pid_buf.add(start + n) = 0;

        // Last: from here on the worker's bind() and listen() wait for the supervisor.
        if let Some(trap) = trap
            && trap.install_in_child() < 0
        {
            fail(ChildStep::Intercept);
        }
        // After the trap: its notification fd is opened while this child still holds every
        // descriptor clusterd had (close-on-exec, closed only by the exec), which may be more
        // than the worker's soft limit allows.
        if let Some(limit) = &prepared.nofile {
            // Best effort: the worker runs with the raised limit if this fails.
            libc::setrlimit(libc::RLIMIT_NOFILE, limit);
        }

        libc::execve(
            prepared.program.as_ptr(),
            prepared.argv_ptrs.as_ptr(),
            prepared.envp_ptrs.as_ptr(),
        );
        fail(ChildStep::Exec)
    }
}

/// Reports `step` and the current errno through the error pipe and exits with status 127.
/// Async-signal-safe.
unsafe fn report_failure(err_fd: RawFd, step: ChildStep) -> ! {
    // SAFETY: the caller is the child between fork and exec; only async-signal-safe calls (errno,
    // write, _exit) on the pipe it owns.
    unsafe {
        let errno = *libc::__errno_location();
        let mut report = [step as u8, 0, 0, 0, 0];
        report[1..].copy_from_slice(&errno.to_ne_bytes());
        libc::write(err_fd, report.as_ptr().cast(), report.len());
        libc::_exit(127)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_bare_names_in_path_and_relative_paths_against_cwd() {
        let cwd = Path::new("/");
        assert_eq!(
            resolve_program("sh", cwd, Some(OsStr::new("/nonexistent:/bin"))),
            Some(PathBuf::from("/bin/sh"))
        );
        assert_eq!(resolve_program("no-such-program-here", cwd, None), None);
        assert_eq!(
            resolve_program("bin/sh", cwd, None),
            Some(PathBuf::from("/bin/sh"))
        );
        // A directory is not a program.
        assert_eq!(resolve_program("/bin", cwd, None), None);
    }

    #[test]
    fn shortages_are_transient_and_mistakes_permanent() {
        let child = |errno| SpawnError::Child {
            pid: Pid::from_raw(1),
            step: ChildStep::Exec,
            path: "/x".into(),
            cause: io::Error::from_raw_os_error(errno),
        };
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOMEM,
            libc::EAGAIN,
            libc::ENOSPC,
        ] {
            assert!(child(errno).is_transient(), "errno {errno}");
        }
        for errno in [libc::ENOENT, libc::EACCES, libc::ENOEXEC, libc::ENOTDIR] {
            assert!(!child(errno).is_transient(), "errno {errno}");
        }
        let os = |what| SpawnError::Os {
            what,
            cause: io::Error::from_raw_os_error(libc::EMFILE),
        };
        assert!(os("pipe2").is_transient() && os("fork").is_transient());
        assert!(
            !SpawnError::NotFound {
                program: "x".into()
            }
            .is_transient()
        );
        assert!(!SpawnError::Nul("a\0b".into()).is_transient());
    }

    fn wait(pid: Pid) -> nix::sys::wait::WaitStatus {
        nix::sys::wait::waitpid(pid, None).expect("waitpid")
    }

    #[test]
    fn an_exec_failure_is_reported_even_with_many_sockets_over_the_error_pipe() {
        // 60 "sockets" at fds 3..63: the target range covers the low numbers the error pipe
        // is likely to get, which must not be overwritten before the report is written.
        let null = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let listen = vec![null.as_raw_fd(); 60];
        let spec = SpawnSpec {
            program: Path::new("/nonexistent/program"),
            argv: &["program".to_owned()],
            env: &[],
            cwd: Path::new("/"),
            listen_fds: &listen,
            stdio: [&null, &null, &null],
            cgroup_procs: None,
            trap: None,
            ipc: None,
        };
        match spawn(&spec) {
            Err(SpawnError::Child {
                pid, step, cause, ..
            }) => {
                assert_eq!(step, ChildStep::Exec);
                assert_eq!(cause.raw_os_error(), Some(libc::ENOENT));
                assert_eq!(wait(pid), nix::sys::wait::WaitStatus::Exited(pid, 127));
            }
            Ok(pid) => {
                wait(pid);
                panic!("a failed exec was reported as a success");
            }
            Err(other) => panic!("unexpected error {other}"),
        }
        let true_spec = SpawnSpec {
            program: Path::new("/bin/true"),
            argv: &["true".to_owned()],
            ..spec
        };
        let pid = spawn(&true_spec).expect("spawn /bin/true");
        assert_eq!(wait(pid), nix::sys::wait::WaitStatus::Exited(pid, 0));
    }
}
