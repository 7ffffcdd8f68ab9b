//! Draining apps that cannot drain themselves (intercepted apps with `drain`): instead of one
//! shared listening socket, each worker gets a listening socket of its own, all bound by
//! clusterd to the same address with `SO_REUSEPORT`, and clusterd attaches a classic BPF
//! program to the group (`SO_ATTACH_REUSEPORT_CBPF`) that spreads new connections at random
//! over the sockets of the workers that are **serving**. To retire a worker, clusterd takes its
//! socket out of the program: the worker gets no new connections, accepts what is already
//! queued on its socket, answers what it has, and only then gets its stop signal (after
//! `drain`). A worker that dies with connections still queued loses nothing where
//! `net.ipv4.tcp_migrate_req` is 1 (clusterd sets it when it may): closing its socket moves
//! them to the others.
//!
//! The program returns an index into the kernel's array of the group's listening sockets,
//! which is the order in which they started listening; when one closes, the last one takes its
//! place. [`Group`] mirrors exactly that (`Vec::swap_remove`). clusterd itself holds the
//! address with a socket that is bound with `SO_REUSEPORT` but never listens, so that nothing
//! else can take the port between workers, and it is not in the array.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use clusterd_manifest::{Listen, Manifest, SocketConfig};
use socket2::{Domain, SockAddr, Socket, Type};

use clusterd_core::WorkerId;

/// `SO_ATTACH_REUSEPORT_CBPF` (asm-generic/socket.h; the libc crate has it for Android only).
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// The most sockets a program can steer among (each costs two instructions; the kernel's
/// limit is 4096).
const MAX_MEMBERS: usize = 2000;

/// The per-worker sockets of every steered socket name.
#[derive(Default)]
pub struct Steering {
    groups: BTreeMap<String, Group>,
}

/// One steered address: its workers' sockets, in the kernel's order.
#[derive(Default)]
struct Group {
    members: Vec<Member>,
}

struct Member {
    worker: WorkerId,
    fd: OwnedFd,
    serving: bool,
}

impl Steering {
    /// A new listening socket for `worker` on steered socket `name` (bound to `address`, with
    /// the manifest's options), not serving yet; returns a duplicate to hand to the worker.
    pub fn socket_for(
        &mut self,
        name: &str,
        worker: WorkerId,
        address: SocketAddr,
        config: &SocketConfig,
    ) -> io::Result<OwnedFd> {
        let group = self.groups.entry(name.to_owned()).or_default();
        if group.members.len() >= MAX_MEMBERS {
            return Err(io::Error::other(format!(
                "at most {MAX_MEMBERS} workers per steered socket"
            )));
        }
        let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        crate::daemon::sockets::apply_tcp_options(&socket, config)?;
        socket.bind(&SockAddr::from(address))?;
        socket.listen(i32::try_from(config.backlog).unwrap_or(i32::MAX))?;
        socket.set_nonblocking(true)?;
        let fd: OwnedFd = socket.into();
        let handed = fd.try_clone()?;
        group.members.push(Member {
            worker,
            fd,
            serving: false,
        });
        group.attach()?;
        Ok(handed)
    }

    /// Puts `worker`'s sockets in (serving) or out of the programs.
    pub fn set_serving(&mut self, worker: WorkerId, serving: bool) {
        for (name, group) in &mut self.groups {
            let mut changed = false;
            for member in group.members.iter_mut().filter(|m| m.worker == worker) {
                changed |= member.serving != serving;
                member.serving = serving;
            }
            if changed && let Err(error) = group.attach() {
                tracing::error!("socket {name}: cannot steer connections: {error}");
            }
        }
    }

    /// `worker` is gone: closes its sockets (the kernel moves the last one into the hole,
    /// and so does the mirror).
    pub fn forget(&mut self, worker: WorkerId) {
        for (name, group) in &mut self.groups {
            let Some(index) = group.members.iter().position(|m| m.worker == worker) else {
                continue;
            };
            drop(group.members.swap_remove(index));
            if !group.members.is_empty()
                && let Err(error) = group.attach()
            {
                tracing::error!("socket {name}: cannot steer connections: {error}");
            }
        }
    }
}

/// One steered socket's per-worker sockets as they cross an upgrade's exec, in the kernel's
/// order (the program attached to the group stays with the sockets).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandedGroup {
    /// The socket's name.
    pub name: String,
    /// Its members: worker, socket, serving.
    pub members: Vec<(WorkerId, RawFd, bool)>,
}

impl Steering {
    /// What an upgrade hands over (the sockets stay open here).
    pub fn handover(&self) -> Vec<HandedGroup> {
        self.groups
            .iter()
            .map(|(name, group)| HandedGroup {
                name: name.clone(),
                members: group
                    .members
                    .iter()
                    .map(|m| (m.worker, m.fd.as_raw_fd(), m.serving))
                    .collect(),
            })
            .collect()
    }

    /// Takes over a group handed over by an upgrade (`fds`: its members' sockets, adopted, in
    /// its order) and attaches its program again, as it was.
    pub fn resume(&mut self, group: HandedGroup, fds: Vec<OwnedFd>) -> io::Result<()> {
        let members = group
            .members
            .into_iter()
            .zip(fds)
            .map(|((worker, _, serving), fd)| Member {
                worker,
                fd,
                serving,
            })
            .collect();
        let group_state = Group { members };
        group_state.attach()?;
        self.groups.insert(group.name, group_state);
        Ok(())
    }
}

impl Group {
    /// Attaches the program for the current members (through any of them: it is the group's).
    fn attach(&self) -> io::Result<()> {
        let Some(first) = self.members.first() else {
            return Ok(());
        };
        let serving: Vec<u32> = (0..self.members.len() as u32)
            .filter(|i| self.members[*i as usize].serving)
            .collect();
        // No worker serving (all starting, or the last one draining): queue at every socket
        // rather than nowhere; a starting worker accepts once it is up.
        let targets = if serving.is_empty() {
            (0..self.members.len() as u32).collect()
        } else {
            serving
        };
        let mut code = program(&targets);
        let prog = libc::sock_fprog {
            len: code.len() as u16,
            filter: code.as_mut_ptr(),
        };
        // SAFETY: a valid socket and a program that outlives the call, of the size given.
        let rc = unsafe {
            libc::setsockopt(
                first.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_ATTACH_REUSEPORT_CBPF,
                (&prog as *const libc::sock_fprog).cast(),
                std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// A program returning one of `targets` (indexes into the group) at random:
/// `A = random; A %= n; if A == 0 return t0; if A == 1 return t1; ...; return t(n-1)`.
fn program(targets: &[u32]) -> Vec<libc::sock_filter> {
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let n = targets.len() as u32;
    let mut code = vec![
        op(
            libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
            0,
            0,
            (libc::SKF_AD_OFF + libc::SKF_AD_RANDOM) as u32,
        ),
        op(libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K, 0, 0, n),
    ];
    for (i, target) in targets.iter().enumerate().take(targets.len() - 1) {
        code.push(op(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            0,
            1,
            i as u32,
        ));
        code.push(op(libc::BPF_RET | libc::BPF_K, 0, 0, *target));
    }
    code.push(op(
        libc::BPF_RET | libc::BPF_K,
        0,
        0,
        targets[targets.len() - 1],
    ));
    code
}

/// The TCP sockets every app of which has `drain` (intercepted): their workers each get a
/// listening socket of their own, and clusterd's socket only reserves the address.
pub fn steered(manifest: &Manifest) -> BTreeSet<String> {
    manifest
        .sockets
        .iter()
        .filter(|(_, config)| matches!(config.listen, Listen::Tcp(_)))
        .filter(|(name, _)| {
            let mut users = manifest
                .apps
                .values()
                .filter(|app| app.sockets.contains(name))
                .peekable();
            users.peek().is_some() && users.all(|app| app.drain.is_some())
        })
        .map(|(name, _)| name.clone())
        .collect()
}

/// Lets a closing listener hand its queued connections to the others of its group
/// (`net.ipv4.tcp_migrate_req`, Linux 5.14). Best effort: false when it cannot be set. The
/// setting is the host's (or the network namespace's): when clusterd changes it, it says so
/// in the log, with the value it had.
pub fn enable_migration() -> bool {
    enable_migration_at(std::path::Path::new("/proc/sys/net/ipv4/tcp_migrate_req"))
}

fn enable_migration_at(path: &std::path::Path) -> bool {
    let before = std::fs::read_to_string(path).map(|v| v.trim().to_owned());
    match before.as_deref() {
        Ok("1") => true,
        Ok(old) if std::fs::write(path, "1").is_ok() => {
            tracing::info!(
                "set net.ipv4.tcp_migrate_req = 1 (it was {old}): connections queued on a \
                 closing worker's own socket move to the others; this is a setting of the \
                 network namespace, and it stays after clusterd"
            );
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_migrate_req_is_written_only_when_it_is_not_1() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tcp_migrate_req");
        std::fs::write(&path, "1\n").unwrap();
        let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
        assert!(enable_migration_at(&path));
        assert_eq!(
            std::fs::metadata(&path).unwrap().modified().unwrap(),
            modified
        );
        std::fs::write(&path, "0\n").unwrap();
        assert!(enable_migration_at(&path));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1");
        assert!(!enable_migration_at(&dir.path().join("missing")));
    }

    #[test]
    fn the_program_picks_only_among_its_targets() {
        let code = program(&[0, 2, 5]);
        // load, mod, two (jeq, ret) pairs, final ret.
        assert_eq!(code.len(), 2 + 2 * 2 + 1);
        assert_eq!(code[1].k, 3);
        let rets: Vec<u32> = code
            .iter()
            .filter(|i| i.code as u32 == libc::BPF_RET | libc::BPF_K)
            .map(|i| i.k)
            .collect();
        assert_eq!(rets, [0, 2, 5]);
        assert_eq!(program(&[7]).len(), 3);
    }

    /// Accepts on `listener` until `count` connections arrived or nothing more comes.
    fn accepted(listener: &std::net::TcpListener) -> usize {
        let mut n = 0;
        while listener.accept().is_ok() {
            n += 1;
        }
        n
    }

    #[test]
    fn connections_go_only_to_serving_sockets_and_a_forgotten_socket_leaves_the_group() {
        let reserve = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = reserve.local_addr().unwrap();
        drop(reserve);
        let config = SocketConfig {
            listen: clusterd_manifest::Listen::Tcp(address),
            backlog: 128,
            mode: None,
            tcp_nodelay: false,
            keepalive: clusterd_manifest::Keepalive::Off,
            reuseport: false,
        };
        let mut steering = Steering::default();
        let (a, b, c) = (WorkerId(1), WorkerId(2), WorkerId(3));
        let fds: Vec<std::net::TcpListener> = [a, b, c]
            .iter()
            .map(|w| {
                steering
                    .socket_for("http", *w, address, &config)
                    .unwrap()
                    .into()
            })
            .collect();
        steering.set_serving(a, true);
        steering.set_serving(c, true);
        let mut clients = Vec::new();
        for _ in 0..60 {
            clients.push(std::net::TcpStream::connect(address).unwrap());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        let counts: Vec<usize> = fds.iter().map(accepted).collect();
        assert_eq!(
            counts[1], 0,
            "the socket out of the program got connections: {counts:?}"
        );
        assert_eq!(counts[0] + counts[2], 60);
        assert!(counts[0] > 5 && counts[2] > 5, "spread: {counts:?}");
        // a goes: c moves into its index; the mirror must follow, and b stays out.
        drop(fds);
        steering.forget(a);
        let fds: Vec<std::net::TcpListener> = steering.groups["http"]
            .members
            .iter()
            .map(|m| m.fd.try_clone().unwrap().into())
            .collect();
        for _ in 0..20 {
            clients.push(std::net::TcpStream::connect(address).unwrap());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        let workers: Vec<WorkerId> = steering.groups["http"]
            .members
            .iter()
            .map(|m| m.worker)
            .collect();
        assert_eq!(workers, [c, b]);
        let counts: Vec<usize> = fds.iter().map(accepted).collect();
        assert_eq!(counts, [20, 0]);
    }
}
