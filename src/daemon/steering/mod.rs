//! Balanced accept: for every TCP socket of multi-worker apps (`balance = "least-queued"`, the
//! default with `workers` > 1, `"round-robin"`, `"random"` or `"ip-hash"`; and apps with
//! `drain`, intercepted ones by default), instead of one shared listening socket, each worker
//! gets a listening socket of its own (at fd 3 as before: the app sees no difference), all
//! bound by clusterd to the same address with `SO_REUSEPORT`, and clusterd attaches programs
//! that pick, for each new connection, one of the sockets of the workers that are
//! **serving**: the one with the fewest connections waiting to be accepted, ties in turn (a
//! lookup program, [`ebpf`]); in turn (an eBPF reuseport program counting turns in a map); at
//! random (a classic BPF program, `SO_ATTACH_REUSEPORT_CBPF`); or by the client's address.
//! Where the kernel or the process's privileges refuse a program, one log line and the next
//! in that list. With one shared queue the kernel hands each connection to whichever worker
//! waits in `epoll_wait` first, so an app that accepts all it can (Go's `net/http`, for one)
//! may take a burst of keep-alive connections into one worker; here each worker gets its
//! share, and a worker that falls behind (its queue grows) gets fewer.
//!
//! To retire a worker, clusterd takes its socket out of the program: the worker gets no new
//! connections. An app with `drain` (one that cannot drain itself) accepts what is already
//! queued on its socket, answers what it has, and only then gets its stop signal (after
//! `drain`); any other app is steered out right before its stop signal and drains itself.
//! Connections still queued on a worker's socket when it closes are not lost where
//! `net.ipv4.tcp_migrate_req` is 1 (clusterd sets it when it may): closing its socket moves
//! them to the others. Where the kernel cannot steer, or (for apps without `drain`)
//! `tcp_migrate_req` cannot be set, the sockets keep one shared queue ([`plan`]). Unix sockets
//! always do.
//!
//! With `balance = "ip-hash"` the program hashes the client's source address (IPv4, or the
//! four words of IPv6) into one bucket per slot of the app; a bucket's connections go to the
//! serving worker of its slot that has served longest (across a rolling reload, the old worker
//! until it is steered out, then the new one), and only while the slot has no serving
//! worker to the others, picked by the bucket (so only that slot's clients move).
//!
//! The program returns an index into the kernel's array of the group's listening sockets,
//! which is the order in which they started listening; when one closes, the last one takes its
//! place. [`Group`] mirrors exactly that (`Vec::swap_remove`). clusterd itself holds the
//! address with a socket that is bound with `SO_REUSEPORT` but never listens, so that nothing
//! else can take the port between workers, and it is not in the array. [`Steering::socket_for`]
//! works for any such address, whenever it was reserved.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use clusterd_manifest::{AppConfig, Balance, Listen, Manifest, SocketConfig};
use socket2::{Domain, SockAddr, Socket, Type};

use clusterd_core::WorkerId;

mod btf;
mod ebpf;

/// `SO_ATTACH_REUSEPORT_CBPF` (asm-generic/socket.h; the libc crate has it for Android only).
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// The most sockets a program can steer among (each costs two instructions; the kernel's
/// limit is 4096).
const MAX_MEMBERS: usize = 2000;

/// The worker of a socket kept after its worker is gone because it was the last of its group:
/// connections wait in its queue (as in a shared one) until a new worker's socket listens,
/// then it closes and they move there.
const KEEPER: WorkerId = WorkerId(u64::MAX);

/// The per-worker sockets of every steered socket name.
#[derive(Default)]
pub struct Steering {
    groups: BTreeMap<String, Group>,
}

/// One steered address: its workers' sockets, in the kernel's order.
#[derive(Default)]
struct Group {
    members: Vec<Member>,
    /// How connections are spread.
    balance: Balance,
    /// The number of slots of the app (ip-hash buckets).
    slots: usize,
    /// The next `Member::since` handed out.
    clock: u64,
    /// The turn counter of round robin (and least-queued's ties).
    turns: Turns,
    /// Least-queued's lookup program.
    queued: Queued,
}

/// The most serving sockets least-queued looks at: its program grows with them and is
/// verified again at each change of the serving set (about 3 ms at 64 here); a group with more
/// takes turns.
const MAX_QUEUED: usize = 64;

/// The kernel's type information, for where `sk_ack_backlog` lies in `struct sock`.
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// A least-queued group's lookup program.
#[derive(Default)]
enum Queued {
    #[default]
    Untried,
    /// Where `sk_ack_backlog` lies in the kernel's `struct sock`, and the program attached
    /// now (none over [`MAX_QUEUED`] serving sockets).
    Ready {
        backlog: i16,
        attached: Option<ebpf::Lookup>,
    },
    /// The kernel or the process's privileges refused it: connections go in turn.
    Unavailable,
}

/// A round-robin group's turn counter, made on its first program.
#[derive(Default)]
enum Turns {
    #[default]
    Untried,
    Counter(ebpf::Counter),
    /// The kernel refused the map or the program: connections are spread at random.
    Unavailable,
}

impl Turns {
    /// The counter, made now if it was not tried yet.
    fn counter(&mut self, name: &str) -> Option<&ebpf::Counter> {
        if matches!(self, Turns::Untried) {
            *self = match ebpf::Counter::new() {
                Ok(counter) => Turns::Counter(counter),
                Err(error) => {
                    fall_back_to_random(name, &error);
                    Turns::Unavailable
                }
            };
        }
        match self {
            Turns::Counter(counter) => Some(counter),
            _ => None,
        }
    }
}

/// One log line: `name`'s round robin is not possible here.
fn fall_back_to_random(name: &str, error: &io::Error) {
    tracing::info!(
        event = "steering_fallback",
        socket = %name,
        "socket {name}: connections spread at random, not in turn (round robin needs an eBPF \
         program, which this kernel or process may not load: {error})"
    );
}

/// One log line: `name`'s least-queued choice is not possible here.
fn fall_back_to_turns(name: &str, error: &io::Error) {
    tracing::info!(
        event = "steering_fallback",
        socket = %name,
        "socket {name}: connections go in turn, not to the worker with the fewest waiting \
         (balance = \"least-queued\" needs a lookup program that reads the kernel's sockets: \
         CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN, and the kernel's BTF: {error})"
    );
}

struct Member {
    worker: WorkerId,
    fd: OwnedFd,
    serving: bool,
    /// The worker's slot.
    slot: usize,
    /// When it last started serving (a counter: lower served longer).
    since: u64,
}

/// How a steered socket spreads its connections: the app's `balance` and number of slots.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// The app's `balance`.
    pub balance: Balance,
    /// Its number of slots (`workers`).
    pub slots: usize,
}

impl Steering {
    /// A new listening socket for `worker` (of `slot`) on steered socket `name` (bound to
    /// `address`, with the manifest's options), not serving yet; returns a duplicate to hand
    /// to the worker.
    pub fn socket_for(
        &mut self,
        name: &str,
        (worker, slot): (WorkerId, usize),
        address: SocketAddr,
        config: &SocketConfig,
        policy: Policy,
    ) -> io::Result<OwnedFd> {
        let group = self.groups.entry(name.to_owned()).or_default();
        group.balance = policy.balance;
        group.slots = policy.slots;
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
            slot,
            since: 0,
        });
        group.attach(name)?;
        if let Some(index) = group.members.iter().position(|m| m.worker == KEEPER) {
            // Its queued connections move to the new socket (`tcp_migrate_req`).
            drop(group.members.swap_remove(index));
            group.attach(name)?;
        }
        Ok(handed)
    }

    /// Puts `worker`'s sockets in (serving) or out of the programs.
    pub fn set_serving(&mut self, worker: WorkerId, serving: bool) {
        for (name, group) in &mut self.groups {
            let mut changed = false;
            for member in group.members.iter_mut().filter(|m| m.worker == worker) {
                if member.serving != serving {
                    changed = true;
                    member.serving = serving;
                    group.clock += 1;
                    member.since = group.clock;
                }
            }
            if changed && let Err(error) = group.attach(name) {
                tracing::error!(
                    event = "steering_failed",
                    socket = %name,
                    "socket {name}: cannot steer connections: {error}"
                );
            }
        }
    }

    /// How the steered socket `name` spreads connections now (what fell back says what it fell
    /// back to); `None` before its first worker's socket.
    pub fn balance_of(&self, name: &str) -> Option<&'static str> {
        let group = self.groups.get(name)?;
        let looking = matches!(
            group.queued,
            Queued::Ready {
                attached: Some(_),
                ..
            }
        );
        Some(match (group.balance, &group.turns) {
            (Balance::LeastQueued | Balance::RoundRobin, Turns::Unavailable) => {
                Balance::Random.name()
            }
            (Balance::LeastQueued, _) if !looking => Balance::RoundRobin.name(),
            // A worker of an app that became `"shared"` by a re-read: the random program.
            (Balance::Shared, _) => Balance::Random.name(),
            (balance, _) => balance.name(),
        })
    }

    /// The socket `name` is gone (a port bound on demand whose app was removed): closes every
    /// per-worker socket of it, the one kept for the next worker too.
    pub fn close(&mut self, name: &str) {
        self.groups.remove(name);
    }

    /// `worker` is gone: closes its sockets (the kernel moves the last one into the hole,
    /// and so does the mirror), but for the last socket of a group, kept as the [`KEEPER`]
    /// until the next worker's socket listens.
    pub fn forget(&mut self, worker: WorkerId) {
        for (name, group) in &mut self.groups {
            let Some(index) = group.members.iter().position(|m| m.worker == worker) else {
                continue;
            };
            if group.members.len() == 1 {
                let member = &mut group.members[index];
                member.worker = KEEPER;
                member.serving = false;
                continue;
            }
            drop(group.members.swap_remove(index));
            if !group.members.is_empty()
                && let Err(error) = group.attach(name)
            {
                tracing::error!(
                    event = "steering_failed",
                    socket = %name,
                    "socket {name}: cannot steer connections: {error}"
                );
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
    /// Its balance when not random, with per member its slot and serving order (absent:
    /// random, as before `balance`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<HandedBalance>,
}

/// A group's balance as it crosses an upgrade.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandedBalance {
    /// The app's `balance`.
    pub balance: Balance,
    /// Its number of slots.
    pub slots: usize,
    /// Per member (in the group's order): its slot and `since`.
    pub members: Vec<(usize, u64)>,
    /// The group's clock.
    pub clock: u64,
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
                balance: (group.balance != Balance::Random).then(|| HandedBalance {
                    balance: group.balance,
                    slots: group.slots,
                    members: group.members.iter().map(|m| (m.slot, m.since)).collect(),
                    clock: group.clock,
                }),
            })
            .collect()
    }

    /// Takes over a group handed over by an upgrade (`fds`: its members' sockets, adopted, in
    /// its order) and attaches its program again, as it was.
    pub fn resume(&mut self, group: HandedGroup, fds: Vec<OwnedFd>) -> io::Result<()> {
        let balance = group.balance.unwrap_or(HandedBalance {
            balance: Balance::Random,
            slots: 0,
            members: Vec::new(),
            clock: 0,
        });
        let mut orders = balance.members.into_iter();
        let members = group
            .members
            .into_iter()
            .zip(fds)
            .map(|((worker, _, serving), fd)| {
                let (slot, since) = orders.next().unwrap_or_default();
                Member {
                    worker,
                    fd,
                    serving,
                    slot,
                    since,
                }
            })
            .collect();
        let mut group_state = Group {
            members,
            balance: balance.balance,
            slots: balance.slots,
            clock: balance.clock,
            turns: Turns::Untried,
            queued: Queued::Untried,
        };
        group_state.attach(&group.name)?;
        self.groups.insert(group.name, group_state);
        Ok(())
    }
}

impl Group {
    /// Attaches the program for the current members (through any of them: it is the group's).
    /// `name` is the socket's, for the log.
    fn attach(&mut self, name: &str) -> io::Result<()> {
        if self.members.is_empty() {
            return Ok(());
        }
        if matches!(self.balance, Balance::LeastQueued | Balance::RoundRobin) {
            let targets = self.targets();
            if let Some(counter) = self.turns.counter(name) {
                let code = ebpf::round_robin(counter, &targets);
                match ebpf::attach(self.members[0].fd.as_fd(), &code) {
                    Ok(()) => {
                        if self.balance == Balance::LeastQueued {
                            self.attach_lookup(name, &targets);
                        }
                        return Ok(());
                    }
                    Err(error) => {
                        fall_back_to_random(name, &error);
                        self.turns = Turns::Unavailable;
                        self.queued = Queued::Unavailable;
                    }
                }
            }
        }
        let mut code = match self.balance {
            // `Shared`: a worker of an app that became `"shared"` by a re-read, on a socket
            // still steered.
            Balance::LeastQueued | Balance::RoundRobin | Balance::Random | Balance::Shared => {
                program(&self.targets())
            }
            Balance::IpHash => ip_hash_program(&self.buckets()),
        };
        let prog = libc::sock_fprog {
            len: code.len() as u16,
            filter: code.as_mut_ptr(),
        };
        set_socket_option(self.members[0].fd.as_fd(), SO_ATTACH_REUSEPORT_CBPF, &prog)
    }
}

impl Group {
    /// Least-queued: a lookup program over the sockets of `targets`, in place of the one
    /// before (none over [`MAX_QUEUED`] targets: the round robin already attached decides).
    /// Where the kernel refuses, one log line, and round robin from then on.
    fn attach_lookup(&mut self, name: &str, targets: &[u32]) {
        let Turns::Counter(counter) = &self.turns else {
            return;
        };
        if matches!(self.queued, Queued::Untried) {
            let offset = btf::member_offset(VMLINUX_BTF, "sock", "sk_ack_backlog");
            self.queued = match offset.and_then(|o| i16::try_from(o).map_err(io::Error::other)) {
                Ok(backlog) => Queued::Ready {
                    backlog,
                    attached: None,
                },
                Err(error) => {
                    fall_back_to_turns(name, &error);
                    Queued::Unavailable
                }
            };
        }
        let Queued::Ready { backlog, attached } = &mut self.queued else {
            return;
        };
        if targets.len() > MAX_QUEUED {
            *attached = None;
            return;
        }
        let fds: Vec<BorrowedFd<'_>> = targets
            .iter()
            .map(|i| self.members[*i as usize].fd.as_fd())
            .collect();
        let address = socket2::SockRef::from(&self.members[0].fd)
            .local_addr()
            .and_then(|a| {
                a.as_socket()
                    .ok_or_else(|| io::Error::other("not an IP socket"))
            });
        let lookup = address.and_then(|address| {
            let sockets = ebpf::SockMap::new(&fds)?;
            let code = ebpf::least_queued(counter, &sockets, *backlog, address, fds.len());
            ebpf::Lookup::attach(&code)
        });
        match lookup {
            Ok(lookup) => *attached = Some(lookup),
            Err(error) => {
                fall_back_to_turns(name, &error);
                self.queued = Queued::Unavailable;
            }
        }
    }
}

/// `setsockopt(socket, SOL_SOCKET, option, value)`, for a `value` whose pointers (a classic
/// program's instructions) outlive the call.
fn set_socket_option<T>(socket: BorrowedFd<'_>, option: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: a valid socket, and a value of the size given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Group {
    /// The members' indexes new connections may go to: the serving ones, or when no worker
    /// serves (all starting, or the last one draining) every one rather than none (a starting
    /// worker accepts once it is up).
    fn targets(&self) -> Vec<u32> {
        let serving: Vec<u32> = (0..self.members.len() as u32)
            .filter(|i| self.members[*i as usize].serving)
            .collect();
        if serving.is_empty() {
            (0..self.members.len() as u32).collect()
        } else {
            serving
        }
    }

    /// Per ip-hash bucket (one per slot), the member index it goes to: the slot's serving
    /// worker that has served longest; for a slot with none, one of the targets, picked by the
    /// bucket.
    fn buckets(&self) -> Vec<u32> {
        let targets = self.targets();
        let slots = self
            .slots
            .max(self.members.iter().map(|m| m.slot + 1).max().unwrap_or(1));
        (0..slots)
            .map(|slot| {
                (0..self.members.len())
                    .filter(|i| self.members[*i].serving && self.members[*i].slot == slot)
                    .min_by_key(|i| self.members[*i].since)
                    .map_or(targets[slot % targets.len()], |i| i as u32)
            })
            .collect()
    }
}

/// The instruction `code` with jumps `jt`/`jf` and constant `k`.
fn op(code: u32, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

/// `SKF_NET_OFF + offset`: a load from the packet's IP header.
fn net(offset: i32) -> u32 {
    (libc::SKF_NET_OFF + offset) as u32
}

/// A program that hashes the client's address into one of `buckets` and returns that
/// bucket's member index: `A` = the IPv4 source address, or the xor of the IPv6 source
/// address's four words; `A = (A * 0x9E3779B1) >> 16; A %= buckets`; then as [`program`].
fn ip_hash_program(buckets: &[u32]) -> Vec<libc::sock_filter> {
    use libc::{BPF_ABS, BPF_ALU, BPF_B, BPF_JA, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_W, BPF_X};
    let load = |offset| op(BPF_LD | BPF_W | BPF_ABS, 0, 0, net(offset));
    let xor_x = op(BPF_ALU | libc::BPF_XOR | BPF_X, 0, 0, 0);
    let tax = op(libc::BPF_MISC | libc::BPF_TAX, 0, 0, 0);
    let ipv6 = [
        load(8),
        tax,
        load(12),
        xor_x,
        tax,
        load(16),
        xor_x,
        tax,
        load(20),
        xor_x,
    ];
    let mut code = vec![
        // The version, in the first byte's high nibble.
        op(BPF_LD | BPF_B | BPF_ABS, 0, 0, net(0)),
        op(BPF_ALU | libc::BPF_RSH | BPF_K, 0, 0, 4),
        op(BPF_JMP | BPF_JEQ | BPF_K, 2, 0, 6),
        load(12),
        op(BPF_JMP | BPF_JA, 0, 0, ipv6.len() as u32),
    ];
    code.extend(ipv6);
    code.extend([
        op(BPF_ALU | libc::BPF_MUL | BPF_K, 0, 0, 0x9E37_79B1),
        op(BPF_ALU | libc::BPF_RSH | BPF_K, 0, 0, 16),
    ]);
    code.extend(pick(buckets));
    code
}

/// A program returning one of `targets` (indexes into the group) at random:
/// `A = random; A %= n; if A == 0 return t0; if A == 1 return t1; ...; return t(n-1)`.
fn program(targets: &[u32]) -> Vec<libc::sock_filter> {
    let mut code = vec![op(
        libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
        0,
        0,
        (libc::SKF_AD_OFF + libc::SKF_AD_RANDOM) as u32,
    )];
    code.extend(pick(targets));
    code
}

/// `A %= n; if A == 0 return t0; if A == 1 return t1; ...; return t(n-1)` for the `n`
/// `targets`.
fn pick(targets: &[u32]) -> Vec<libc::sock_filter> {
    let n = targets.len() as u32;
    let mut code = vec![op(libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K, 0, 0, n)];
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

/// The TCP sockets every app of which is steered (`balance` not `"shared"`): their workers
/// each get a listening socket of their own, and clusterd's socket only reserves the address.
pub fn steered(manifest: &Manifest) -> BTreeSet<String> {
    users_all(manifest, |app| app.balance.is_steered())
}

/// The TCP sockets used by apps, every one of which passes `test`.
fn users_all(manifest: &Manifest, test: impl Fn(&AppConfig) -> bool) -> BTreeSet<String> {
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
            users.peek().is_some() && users.all(&test)
        })
        .map(|(name, _)| name.clone())
        .collect()
}

/// The sockets to bind steered: [`steered`], where this host can. Without reuseport programs
/// every one keeps one shared queue; without `tcp_migrate_req` so do those of apps that drain
/// themselves (their sockets close with connections queued), while apps with `drain` stay
/// steered (their drain needs it). One log line says what fell back and why.
pub fn plan(manifest: &Manifest) -> BTreeSet<String> {
    let wanted = steered(manifest);
    if wanted.is_empty() {
        return wanted;
    }
    let drained = users_all(manifest, |app| app.drain.is_some());
    decide(wanted, &drained, probe(), enable_migration)
}

/// Whether one more socket, bound after start (a port bound on demand), can be steered here:
/// as [`plan`] decides for the sockets of the manifest (`drained`: its app has `drain`).
pub fn available(drained: bool) -> bool {
    probe().is_ok() && (drained || enable_migration())
}

/// [`plan`] given what the host can do (`migration` is asked only when needed).
fn decide(
    wanted: BTreeSet<String>,
    drained: &BTreeSet<String>,
    programs: io::Result<()>,
    migration: impl FnOnce() -> bool,
) -> BTreeSet<String> {
    let names = |set: &BTreeSet<String>| set.iter().cloned().collect::<Vec<_>>().join(", ");
    if let Err(error) = programs {
        tracing::warn!(
            "sockets {}: one shared accept queue (balance = \"shared\"): this kernel cannot \
             steer connections (SO_ATTACH_REUSEPORT_CBPF: {error})",
            names(&wanted)
        );
        return BTreeSet::new();
    }
    if migration() {
        return wanted;
    }
    let (kept, fallback): (BTreeSet<String>, BTreeSet<String>) =
        wanted.into_iter().partition(|name| drained.contains(name));
    if !fallback.is_empty() {
        tracing::warn!(
            "sockets {}: one shared accept queue (balance = \"shared\"): \
             net.ipv4.tcp_migrate_req cannot be set, and without it the connections queued on a \
             retiring worker's own socket would be lost",
            names(&fallback)
        );
    }
    if !kept.is_empty() {
        tracing::warn!(
            "cannot set net.ipv4.tcp_migrate_req: a worker that dies with connections queued on \
             its own socket loses them (sockets {}, steered for drain)",
            names(&kept)
        );
    }
    kept
}

/// Whether this kernel takes a reuseport program: one listening socket on a free loopback
/// port with [`program`] attached.
fn probe() -> io::Result<()> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_reuse_port(true)?;
    socket.bind(&SockAddr::from(SocketAddr::from(([127, 0, 0, 1], 0))))?;
    socket.listen(1)?;
    let fd: OwnedFd = socket.into();
    let mut probe = Group {
        members: vec![Member {
            worker: WorkerId(0),
            fd,
            serving: true,
            slot: 0,
            since: 0,
        }],
        balance: Balance::Random,
        ..Group::default()
    };
    probe.attach("probe")
}

/// The TCP sockets of `sockets` (name, fd) that clusterd only reserves (bound, never
/// listening): the steered ones, whether bound so at start, on a re-read or by the clusterd
/// that handed them over in an upgrade.
pub fn reserved<'a>(sockets: impl Iterator<Item = (&'a String, RawFd)>) -> BTreeSet<String> {
    sockets
        .filter(|(_, fd)| {
            // SAFETY: the fd is one of clusterd's sockets, open for the duration of this call.
            let fd = unsafe { BorrowedFd::borrow_raw(*fd) };
            let socket = socket2::SockRef::from(&fd);
            let tcp = matches!(socket.domain(), Ok(d) if d == Domain::IPV4 || d == Domain::IPV6);
            tcp && socket.is_listener().is_ok_and(|listening| !listening)
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

    /// A free loopback address and a plain socket config for it.
    fn free_loopback() -> (SocketAddr, SocketConfig) {
        free_address(std::net::Ipv4Addr::LOCALHOST.into())
    }

    /// A free port on `ip` and a plain socket config for it.
    fn free_address(ip: std::net::IpAddr) -> (SocketAddr, SocketConfig) {
        let reserve = std::net::TcpListener::bind(SocketAddr::new(ip, 0)).unwrap();
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
        (address, config)
    }

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
    fn without_programs_all_fall_back_and_without_migration_only_drained_sockets_stay() {
        let set = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<BTreeSet<_>>();
        let wanted = set(&["api", "web"]);
        let drained = set(&["web"]);
        let never = || -> bool { panic!("migration asked without programs") };
        let no_programs = Err(io::Error::from_raw_os_error(libc::EINVAL));
        assert!(decide(wanted.clone(), &drained, no_programs, never).is_empty());
        assert_eq!(decide(wanted.clone(), &drained, Ok(()), || true), wanted);
        assert_eq!(decide(wanted, &drained, Ok(()), || false), drained);
    }

    #[test]
    fn this_kernel_takes_reuseport_programs_and_reserved_sockets_are_told_apart() {
        probe().expect("SO_ATTACH_REUSEPORT_CBPF");
        let reserving = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        reserving.set_reuse_port(true).unwrap();
        let any: SocketAddr = ([127, 0, 0, 1], 0).into();
        reserving.bind(&any.into()).unwrap();
        let listening = std::net::TcpListener::bind(any).unwrap();
        let unix = tempfile::tempdir().unwrap();
        let unix = std::os::unix::net::UnixListener::bind(unix.path().join("s")).unwrap();
        let names = ["reserved", "listening", "unix"].map(String::from);
        let fds = [
            reserving.as_raw_fd(),
            listening.as_raw_fd(),
            unix.as_raw_fd(),
        ];
        let found = reserved(names.iter().zip(fds));
        assert_eq!(found, BTreeSet::from(["reserved".to_owned()]));
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

    /// Runs a reuseport `program` on a packet whose IP header is `header` (the loads, ALU
    /// operations, jumps and returns the programs here use).
    fn run(program: &[libc::sock_filter], header: &[u8]) -> u32 {
        let (mut pc, mut a, mut x) = (0, 0u32, 0u32);
        let at = |k: u32, size: usize| {
            let offset = (k as i32 - libc::SKF_NET_OFF) as usize;
            header[offset..offset + size]
                .iter()
                .fold(0u32, |acc, b| (acc << 8) | u32::from(*b))
        };
        use libc::*;
        loop {
            let i = program[pc];
            pc += 1;
            match u32::from(i.code) {
                c if c == BPF_LD | BPF_W | BPF_ABS => a = at(i.k, 4),
                c if c == BPF_LD | BPF_B | BPF_ABS => a = at(i.k, 1),
                c if c == BPF_MISC | BPF_TAX => x = a,
                c if c == BPF_ALU | BPF_XOR | BPF_X => a ^= x,
                c if c == BPF_ALU | BPF_MUL | BPF_K => a = a.wrapping_mul(i.k),
                c if c == BPF_ALU | BPF_RSH | BPF_K => a >>= i.k,
                c if c == BPF_ALU | BPF_MOD | BPF_K => a %= i.k,
                c if c == BPF_JMP | BPF_JA => pc += i.k as usize,
                c if c == BPF_JMP | BPF_JEQ | BPF_K => {
                    pc += usize::from(if a == i.k { i.jt } else { i.jf });
                }
                c if c == BPF_RET | BPF_K => return i.k,
                c => panic!("instruction {c:#x}"),
            }
        }
    }

    /// An IPv4 header from `source`.
    fn ipv4(source: [u8; 4]) -> Vec<u8> {
        let mut header = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
        header.extend(source);
        header.extend([127, 0, 0, 1]);
        header
    }

    /// An IPv6 header from `source`.
    fn ipv6(source: std::net::Ipv6Addr) -> Vec<u8> {
        let mut header = vec![0x60, 0, 0, 0, 0, 20, 6, 64];
        header.extend(source.octets());
        header.extend(std::net::Ipv6Addr::LOCALHOST.octets());
        header
    }

    #[test]
    fn ip_hash_sends_an_address_always_to_the_same_bucket_and_spreads_addresses() {
        let program = ip_hash_program(&[10, 11]);
        let mut per_target = [0; 2];
        // The integration test's clients: 127.0.0.2 to 127.0.0.17.
        for last in 2..=17u8 {
            let header = ipv4([127, 0, 0, last]);
            let target = run(&program, &header);
            assert!(target == 10 || target == 11, "{target}");
            assert_eq!(run(&program, &header), target);
            per_target[target as usize - 10] += 1;
        }
        assert!(per_target.iter().all(|n| *n >= 4), "{per_target:?}");
        // IPv6: all four words count.
        let mut seen = BTreeSet::new();
        for i in 0..64u16 {
            let address = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, i, 0, 0, 0, 1);
            let target = run(&ip_hash_program(&[0, 1, 2, 3]), &ipv6(address));
            assert_eq!(run(&ip_hash_program(&[0, 1, 2, 3]), &ipv6(address)), target);
            seen.insert(target);
        }
        assert_eq!(seen.len(), 4, "{seen:?}");
        let low = |word| std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, word);
        let targets: BTreeSet<u32> = (0..64)
            .map(|w| run(&ip_hash_program(&[0, 1]), &ipv6(low(w))))
            .collect();
        assert_eq!(targets.len(), 2);
    }

    /// A group of members `(slot, serving, since)` (no sockets needed for the buckets: the
    /// fds are /dev/null).
    fn group(slots: usize, members: &[(usize, bool, u64)]) -> Group {
        Group {
            members: members
                .iter()
                .enumerate()
                .map(|(i, (slot, serving, since))| Member {
                    worker: WorkerId(i as u64),
                    fd: std::fs::File::open("/dev/null").unwrap().into(),
                    serving: *serving,
                    slot: *slot,
                    since: *since,
                })
                .collect(),
            balance: Balance::IpHash,
            slots,
            clock: 10,
            turns: Turns::Untried,
            queued: Queued::Untried,
        }
    }

    #[test]
    fn a_bucket_stays_with_its_slot_across_a_reload_and_only_a_down_slot_moves() {
        // Slots 0 and 1 serving.
        assert_eq!(group(2, &[(0, true, 1), (1, true, 2)]).buckets(), [0, 1]);
        // Slot 0's new worker (index 2) is up and serving too: the old one keeps the bucket...
        let reloading = group(2, &[(0, true, 1), (1, true, 2), (0, true, 3)]);
        assert_eq!(reloading.buckets(), [0, 1]);
        // ...until it is steered out to drain: then the new one takes it.
        let draining = group(2, &[(0, false, 4), (1, true, 2), (0, true, 3)]);
        assert_eq!(draining.buckets(), [2, 1]);
        // Slot 1 is down (its worker starting again, not serving): only its bucket moves.
        let down = group(3, &[(0, true, 1), (1, false, 5), (2, true, 2)]);
        let buckets = down.buckets();
        assert_eq!((buckets[0], buckets[2]), (0, 2));
        assert!(buckets[1] == 0 || buckets[1] == 2, "{buckets:?}");
        // Nobody serving: every socket rather than none.
        assert_eq!(group(2, &[(0, false, 0), (1, false, 0)]).buckets(), [0, 1]);
    }

    #[test]
    fn the_kernel_runs_ip_hash_a_client_address_always_reaches_the_same_socket() {
        let (address, config) = free_loopback();
        let policy = Policy {
            balance: Balance::IpHash,
            slots: 2,
        };
        let mut steering = Steering::default();
        let listeners: Vec<std::net::TcpListener> = [0, 1]
            .iter()
            .map(|slot| {
                let worker = WorkerId(*slot as u64 + 1);
                let fd = steering
                    .socket_for("http", (worker, *slot), address, &config, policy)
                    .unwrap();
                steering.set_serving(worker, true);
                fd.into()
            })
            .collect();
        let mut reached: BTreeMap<std::net::IpAddr, BTreeSet<usize>> = BTreeMap::new();
        let mut clients = Vec::new();
        for _ in 0..3 {
            for last in 2..=17u8 {
                let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
                let source: SocketAddr = ([127, 0, 0, last], 0).into();
                socket.bind(&source.into()).unwrap();
                socket.connect(&address.into()).unwrap();
                clients.push(socket);
                // The handshake is complete on connect's return: the connection is queued.
                let (index, peer) = (0..2)
                    .find_map(|i| Some((i, listeners[i].accept().ok()?.1)))
                    .expect("queued on one of the sockets");
                reached.entry(peer.ip()).or_default().insert(index);
            }
        }
        assert_eq!(reached.len(), 16);
        assert!(reached.values().all(|s| s.len() == 1), "{reached:?}");
        let on_first = reached.values().filter(|s| s.contains(&0)).count();
        assert!(on_first > 0 && on_first < 16, "{reached:?}");
    }

    #[test]
    fn the_last_socket_keeps_its_connections_until_a_new_worker_listens() {
        if !enable_migration() {
            eprintln!("SKIPPED: net.ipv4.tcp_migrate_req cannot be set here");
            return;
        }
        let (address, config) = free_loopback();
        let policy = Policy {
            balance: Balance::Random,
            slots: 1,
        };
        let mut steering = Steering::default();
        let (old, new) = (WorkerId(1), WorkerId(2));
        let handed = steering
            .socket_for("http", (old, 0), address, &config, policy)
            .unwrap();
        steering.set_serving(old, true);
        // The worker dies: its copy closes, clusterd's stays as the keeper.
        drop(handed);
        steering.forget(old);
        let mut client = std::net::TcpStream::connect(address).expect("queued, not refused");
        std::io::Write::write_all(&mut client, b"x").unwrap();
        let fresh: std::net::TcpListener = steering
            .socket_for("http", (new, 0), address, &config, policy)
            .unwrap()
            .into();
        let members: Vec<WorkerId> = steering.groups["http"]
            .members
            .iter()
            .map(|m| m.worker)
            .collect();
        assert_eq!(members, [new]);
        // The connection that waited moved to the new worker's socket.
        fresh.set_nonblocking(false).unwrap();
        let (mut accepted, _) = fresh.accept().expect("the migrated connection");
        let mut byte = [0];
        std::io::Read::read_exact(&mut accepted, &mut byte).unwrap();
        assert_eq!(&byte, b"x");
    }

    /// Steering group `http` on a free loopback address with the sockets of three workers
    /// (slots 0 to 2, none serving yet) under `balance`: the steering, the address, the workers
    /// and their sockets.
    fn three_workers(balance: Balance) -> ThreeWorkers {
        three_workers_on(free_loopback(), balance)
    }

    /// What [`three_workers`] makes: the steering, the address, the workers, their sockets.
    type ThreeWorkers = (
        Steering,
        SocketAddr,
        [WorkerId; 3],
        Vec<std::net::TcpListener>,
    );

    /// [`three_workers`] on `(address, config)`.
    fn three_workers_on(
        (address, config): (SocketAddr, SocketConfig),
        balance: Balance,
    ) -> ThreeWorkers {
        let mut steering = Steering::default();
        let policy = Policy { balance, slots: 3 };
        let workers = [WorkerId(1), WorkerId(2), WorkerId(3)];
        let fds = workers
            .iter()
            .enumerate()
            .map(|(slot, w)| {
                let fd = steering.socket_for("http", (*w, slot), address, &config, policy);
                fd.expect("a steered socket").into()
            })
            .collect();
        (steering, address, workers, fds)
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
    fn round_robin_gives_each_serving_socket_its_turn() {
        let (mut steering, address, workers, fds) = three_workers(Balance::RoundRobin);
        if steering.balance_of("http") != Some("round-robin") {
            eprintln!("SKIPPED: this process may not load the round-robin program");
            return;
        }
        steering.set_serving(workers[0], true);
        steering.set_serving(workers[2], true);
        let _first = connect(address, 61);
        let counts: Vec<usize> = fds.iter().map(accepted).collect();
        assert!(
            counts == [31, 0, 30] || counts == [30, 0, 31],
            "not in turn: {counts:?}"
        );
        // All three serve now: the next 30 go ten to each.
        steering.set_serving(workers[1], true);
        let _second = connect(address, 30);
        let counts: Vec<usize> = fds.iter().map(accepted).collect();
        assert_eq!(counts, [10, 10, 10]);
    }

    /// Takes `capabilities` out of this thread's effective set (a test thread's own:
    /// capabilities are per thread), as for clusterd run without them.
    fn drop_capabilities(capabilities: &[u32]) {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: libc::c_int,
        }
        #[repr(C)]
        #[derive(Default, Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        // _LINUX_CAPABILITY_VERSION_3: two words of each set.
        let mut header = Header {
            version: 0x2008_0522,
            pid: 0,
        };
        let mut data = [Data::default(); 2];
        // SAFETY: capget/capset with a version 3 header and two data words, as they expect.
        unsafe {
            assert_eq!(
                libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()),
                0
            );
            for capability in capabilities {
                data[*capability as usize / 32].effective &= !(1 << (capability % 32));
            }
            assert_eq!(libc::syscall(libc::SYS_capset, &header, data.as_ptr()), 0);
        }
    }

    /// `CAP_SYS_ADMIN`, `CAP_PERFMON`, `CAP_BPF` (linux/capability.h).
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;

    /// Connects `n` clients to `address` and lets the kernel queue them.
    fn connect(address: SocketAddr, n: usize) -> Vec<std::net::TcpStream> {
        let clients = (0..n)
            .map(|_| std::net::TcpStream::connect(address).unwrap())
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(100));
        clients
    }

    #[test]
    fn least_queued_sends_each_connection_to_the_serving_socket_with_the_fewest_waiting() {
        let (mut steering, address, workers, fds) = three_workers(Balance::LeastQueued);
        steering.set_serving(workers[0], true);
        steering.set_serving(workers[2], true);
        if steering.balance_of("http") != Some("least-queued") {
            eprintln!("SKIPPED: this process may not attach lookup programs");
            return;
        }
        // The queues grow together...
        let _first = connect(address, 10);
        assert_eq!(accepted(&fds[0]), 5);
        // ...and with the first one emptied, the next five all go there (the third still has
        // the five of before).
        let _second = connect(address, 5);
        let counts: Vec<usize> = fds.iter().map(accepted).collect();
        assert_eq!(counts, [5, 0, 5]);
        // A worker that stops serving gets nothing, however empty its queue.
        steering.set_serving(workers[0], false);
        let _third = connect(address, 4);
        let counts: Vec<usize> = fds.iter().map(accepted).collect();
        assert_eq!(counts, [0, 0, 4]);
    }

    /// On a thread without `capabilities`: what a group of `balance` with two of three
    /// workers serving says it does, and how 60 connections fell on the three.
    fn without(capabilities: &'static [u32], balance: Balance) -> (String, Vec<usize>) {
        std::thread::spawn(move || {
            drop_capabilities(capabilities);
            let (mut steering, address, workers, fds) = three_workers(balance);
            steering.set_serving(workers[0], true);
            steering.set_serving(workers[1], true);
            let shown = steering.balance_of("http").unwrap_or_default().to_owned();
            let _clients = connect(address, 60);
            (shown, fds.iter().map(accepted).collect())
        })
        .join()
        .unwrap()
    }

    #[test]
    fn least_queued_takes_the_connections_to_its_address_whatever_the_family() {
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
        let (v4, v6): (IpAddr, IpAddr) = (Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into());
        let (any4, any6) = (Ipv4Addr::UNSPECIFIED.into(), Ipv6Addr::UNSPECIFIED.into());
        if std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_err() {
            eprintln!("SKIPPED: no IPv6 loopback");
            return;
        }
        // (bound to, connected to); `::` is dual-stack here.
        for (bound, to) in [(v4, v4), (v6, v6), (any4, v4), (any6, v6), (any6, v4)] {
            let (mut steering, address, workers, fds) =
                three_workers_on(free_address(bound), Balance::LeastQueued);
            steering.set_serving(workers[0], true);
            steering.set_serving(workers[1], true);
            if steering.balance_of("http") != Some("least-queued") {
                eprintln!("SKIPPED: this process may not attach lookup programs");
                return;
            }
            let to = SocketAddr::new(to, address.port());
            // Two each; the first socket emptied; the next two both go there (in turn, one
            // would go to the second).
            let _first = connect(to, 4);
            assert_eq!(accepted(&fds[0]), 2, "{bound} <- {to}");
            let _second = connect(to, 2);
            let counts: Vec<usize> = fds.iter().map(accepted).collect();
            assert_eq!(counts, [2, 2, 0], "{bound} <- {to}");
        }
    }

    #[test]
    fn without_perfmon_least_queued_takes_turns() {
        let (shown, counts) = without(&[CAP_PERFMON, CAP_SYS_ADMIN], Balance::LeastQueued);
        match shown.as_str() {
            "round-robin" => assert_eq!(counts, [30, 30, 0]),
            // Without the turns too (kernel.unprivileged_bpf_disabled with no CAP_BPF?).
            "random" => assert_eq!(counts[0] + counts[1], 60, "{counts:?}"),
            other => panic!("least-queued without CAP_PERFMON: {other}"),
        }
    }

    #[test]
    fn without_the_right_to_load_ebpf_round_robin_spreads_at_random() {
        let (shown, counts) = without(&[CAP_BPF, CAP_SYS_ADMIN], Balance::RoundRobin);
        assert_eq!(counts[0] + counts[1], 60, "{counts:?}");
        match shown.as_str() {
            // kernel.unprivileged_bpf_disabled = 0: anyone may load it.
            "round-robin" => assert_eq!(counts, [30, 30, 0]),
            "random" => assert!(counts[0] > 5 && counts[1] > 5, "{counts:?}"),
            other => panic!("round robin without CAP_BPF: {other}"),
        }
    }

    #[test]
    fn connections_go_only_to_serving_sockets_and_a_forgotten_socket_leaves_the_group() {
        let (mut steering, address, [a, b, c], fds) = three_workers(Balance::Random);
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
