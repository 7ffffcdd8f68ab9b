//! The child side of interception: the seccomp filter that traps `bind` and `listen`, the
//! probe of whether this kernel can do it, and the [`Trap`] a child installs last before
//! `execve`.

use super::*;

/// `AUDIT_ARCH_*` of the architecture clusterd is built for: syscall numbers are per ABI.
#[cfg(target_arch = "x86_64")]
pub(super) const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
pub(super) const AUDIT_ARCH: u32 = 0xC000_00B7;

/// The child end of the socketpair is moved to an fd at least this high before fork, above any
/// fd the child places (0-2 and 3 + up to 64 sockets), so that no `dup2` can overwrite it.
const CHILD_FD_MIN: RawFd = 100;

/// Offsets in `struct seccomp_data` (the low half of `args[0]`: little-endian targets only).
pub(super) const DATA_NR: u32 = 0;
pub(super) const DATA_ARCH: u32 = 4;
pub(super) const DATA_ARG0_LOW: u32 = 16;

/// The calls that take a first look at an inherited socket, trapped on fds 3.. only.
pub(super) const LOOKS: [libc::c_long; 4] = [
    libc::SYS_fcntl,
    libc::SYS_ioctl,
    libc::SYS_getsockopt,
    libc::SYS_getsockname,
];

/// The filter: `SECCOMP_RET_USER_NOTIF` for `bind` and `listen` of the native ABI, and for
/// the [`LOOKS`] at fds `3..3 + inherited`.
pub(super) fn filter(inherited: usize) -> Vec<libc::sock_filter> {
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let jge = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let load = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let ret = libc::BPF_RET | libc::BPF_K;
    let end = 3 + inherited.min(1024) as u32;
    // Jumps are relative to the next instruction: 10 is `notify` from the bind test, 4 is
    // the fd test from the first look.
    vec![
        stmt(load, DATA_ARCH),
        jeq(AUDIT_ARCH, 1, 0),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
        stmt(load, DATA_NR),
        jeq(libc::SYS_bind as u32, 10, 0),
        jeq(libc::SYS_listen as u32, 9, 0),
        jeq(LOOKS[0] as u32, 4, 0),
        jeq(LOOKS[1] as u32, 3, 0),
        jeq(LOOKS[2] as u32, 2, 0),
        jeq(LOOKS[3] as u32, 1, 0),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
        // The fd test: 3 <= fd < end.
        stmt(load, DATA_ARG0_LOW),
        jge(3, 0, 1),
        jge(end, 0, 1),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
        // notify:
        stmt(ret, libc::SECCOMP_RET_USER_NOTIF),
    ]
}

/// Why interception cannot be used here.
#[derive(Debug, thiserror::Error)]
#[error(
    "seccomp user notification is unavailable (intercept = true needs Linux 5.9 or later and \
     a container profile that allows seccomp()): {what} failed"
)]
pub struct Unavailable {
    /// The step that failed.
    what: &'static str,
    /// Its error.
    #[source]
    cause: io::Error,
}

/// Checks that this kernel (and container profile) lets a process install a filter with a
/// notification listener and supports `SECCOMP_IOCTL_NOTIF_ADDFD`. Runs in a throwaway thread:
/// filters and `no_new_privs` are per thread, so clusterd itself stays unfiltered.
pub fn probe() -> Result<(), Unavailable> {
    std::thread::spawn(|| {
        let program = filter(0);
        let prog = libc::sock_fprog {
            len: program.len() as u16,
            filter: program.as_ptr().cast_mut(),
        };
        // SAFETY: plain syscalls on valid memory; they affect only this thread.
        unsafe {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
                return Err(Unavailable {
                    what: "prctl(PR_SET_NO_NEW_PRIVS)",
                    cause: io::Error::last_os_error(),
                });
            }
            let fd = libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
                &prog,
            );
            if fd < 0 {
                return Err(Unavailable {
                    what: "seccomp(SECCOMP_FILTER_FLAG_NEW_LISTENER)",
                    cause: io::Error::last_os_error(),
                });
            }
            let fd = OwnedFd::from_raw_fd(fd as RawFd);
            // No notification has id 0: a kernel with ADDFD says ENOENT.
            let mut addfd: libc::seccomp_notif_addfd = std::mem::zeroed();
            addfd.flags = libc::SECCOMP_ADDFD_FLAG_SETFD as u32;
            addfd.srcfd = fd.as_raw_fd() as u32;
            let rc = libc::ioctl(fd.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_ADDFD, &addfd);
            let cause = io::Error::last_os_error();
            if rc < 0 && cause.raw_os_error() != Some(libc::ENOENT) {
                return Err(Unavailable {
                    what: "ioctl(SECCOMP_IOCTL_NOTIF_ADDFD)",
                    cause,
                });
            }
        }
        Ok(())
    })
    .join()
    .unwrap_or_else(|_| {
        Err(Unavailable {
            what: "probe thread",
            cause: io::Error::other("panicked"),
        })
    })
}

/// What the child of one spawn needs to trap its `bind`/`listen`, prepared before `fork`.
pub struct Trap {
    /// The BPF program (`prog` points into it).
    _program: Vec<libc::sock_filter>,
    prog: libc::sock_fprog,
    /// The child's end of the socketpair, at an fd >= [`CHILD_FD_MIN`].
    child_end: OwnedFd,
    /// The supervisor's end.
    parent_end: OwnedFd,
    /// The `SCM_RIGHTS` control message; the child writes its fd number at `fd_offset`.
    control: Box<[u64; 4]>,
    control_len: usize,
    fd_offset: usize,
    /// One byte of payload (a datagram must carry data for the fd to travel).
    payload: Box<[u8; 1]>,
}

impl Trap {
    /// Builds the filter (for a worker that inherits `inherited` sockets at fds 3..), the
    /// socketpair and the message buffers.
    pub fn new(inherited: usize) -> io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two fds into `fds`.
        if unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fds are new and ours.
        let (parent_end, low_child_end) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let child_end = nix::fcntl::fcntl(
            &low_child_end,
            nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(CHILD_FD_MIN),
        )?;
        // SAFETY: F_DUPFD_CLOEXEC returned a new fd that we own.
        let child_end = unsafe { OwnedFd::from_raw_fd(child_end) };
        drop(low_child_end);

        let program = filter(inherited);
        let prog = libc::sock_fprog {
            len: program.len() as u16,
            filter: program.as_ptr().cast_mut(),
        };
        let mut control = Box::new([0u64; 4]);
        let fd_size = std::mem::size_of::<RawFd>() as u32;
        // SAFETY: CMSG_* only compute sizes and offsets; the header is written inside
        // `control`, which is large enough for one fd (CMSG_SPACE(4) <= 32) and aligned.
        let (control_len, fd_offset) = unsafe {
            let space = libc::CMSG_SPACE(fd_size) as usize;
            assert!(space <= std::mem::size_of_val(&*control));
            let header = control.as_mut_ptr().cast::<libc::cmsghdr>();
            (*header).cmsg_len = libc::CMSG_LEN(fd_size) as _;
            (*header).cmsg_level = libc::SOL_SOCKET;
            (*header).cmsg_type = libc::SCM_RIGHTS;
            let data = libc::CMSG_DATA(header);
            (space, data.offset_from(header.cast::<u8>()) as usize)
        };
        Ok(Trap {
            _program: program,
            prog,
            child_end,
            parent_end,
            control,
            control_len,
            fd_offset,
            payload: Box::new([0]),
        })
    }

    /// The child's side, as the last step before `execve`: no new privileges, the filter, and
    /// the notification fd sent to the supervisor. Returns -1 with `errno` set on failure.
    ///
    /// # Safety
    ///
    /// Only for the child between `fork` and `execve`: it makes async-signal-safe syscalls on
    /// memory prepared before the fork and writes into `self`'s control buffer.
    pub unsafe fn install_in_child(&self) -> libc::c_int {
        // SAFETY: the caller's contract (the child between fork and exec); prctl, seccomp and
        // sendmsg are async-signal-safe and use memory prepared before the fork.
        unsafe {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
                return -1;
            }
            let notify_fd = libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
                &self.prog,
            ) as libc::c_int;
            if notify_fd < 0 {
                return -1;
            }
            let control = self.control.as_ptr().cast::<u8>().cast_mut();
            std::ptr::write_unaligned(control.add(self.fd_offset).cast::<RawFd>(), notify_fd);
            let mut iov = libc::iovec {
                iov_base: self.payload.as_ptr().cast_mut().cast(),
                iov_len: 1,
            };
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.cast();
            msg.msg_controllen = self.control_len as _;
            let sent = libc::sendmsg(self.child_end.as_raw_fd(), &msg, 0);
            // The supervisor holds its copy now (or the spawn fails): ours must not reach the
            // program (it is close-on-exec anyway).
            libc::close(notify_fd);
            if sent < 0 { -1 } else { 0 }
        }
    }

    /// After a successful spawn: the notification fd the child sent.
    pub fn receive(&self) -> io::Result<OwnedFd> {
        let mut payload = [0u8; 1];
        let mut control = [0u64; 4];
        let mut iov = libc::iovec {
            iov_base: payload.as_mut_ptr().cast(),
            iov_len: 1,
        };
        // SAFETY: msghdr points at live buffers; every fd the kernel passes is taken into an
        // OwnedFd before anything is checked.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control) as _;
            let n = libc::recvmsg(
                self.parent_end.as_raw_fd(),
                &mut msg,
                libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
            );
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut received = None;
            let mut header = libc::CMSG_FIRSTHDR(&msg);
            while !header.is_null() {
                if (*header).cmsg_level == libc::SOL_SOCKET
                    && (*header).cmsg_type == libc::SCM_RIGHTS
                {
                    let fd = std::ptr::read_unaligned(libc::CMSG_DATA(header).cast::<RawFd>());
                    received = Some(OwnedFd::from_raw_fd(fd));
                }
                header = libc::CMSG_NXTHDR(&msg, header);
            }
            received.ok_or_else(|| io::Error::other("the worker sent no notification fd"))
        }
    }
}

#[cfg(test)]
mod unavailable_tests {
    use super::*;

    #[test]
    fn unavailable_names_the_step_and_leaves_its_cause_to_the_chain() {
        let error = Unavailable {
            what: "prctl(PR_SET_NO_NEW_PRIVS)",
            cause: io::Error::from_raw_os_error(libc::EPERM),
        };
        let message = error.to_string();
        assert!(
            message.ends_with("prctl(PR_SET_NO_NEW_PRIVS) failed"),
            "{message}"
        );
        assert!(!message.contains("not permitted"), "{message}");
        let chain = crate::error::Chain(&error).to_string();
        assert!(
            chain.starts_with(&format!("{message}: Operation not permitted")),
            "{chain}"
        );
    }
}
