//! The eBPF programs of a steered group, written out as instructions rather than compiled:
//! like the classic programs beside them, they are rebuilt with the serving sockets as
//! constants whenever the serving set changes, and attached in place of the previous ones.
//!
//! - **Round robin** ([`round_robin`]): a reuseport program (`SO_ATTACH_REUSEPORT_EBPF`) that
//!   takes a turn from a counter in a one-element array map (an atomic fetch-and-add, so CPUs
//!   taking SYNs at once still take distinct turns) and returns the serving socket whose turn
//!   it is. The counter outlives the programs (the group keeps its map). Loading it needs
//!   `CAP_BPF` (or `kernel.unprivileged_bpf_disabled = 0`).
//! - **Least queued** ([`least_queued`]): a lookup program (`BPF_PROG_TYPE_SK_LOOKUP`, attached
//!   to clusterd's network namespace by a link that lives as long as clusterd holds it) that
//!   runs before the reuseport program, looks at each serving socket's accept queue (its
//!   `sk_ack_backlog`, read through a BTF-typed pointer at the offset the kernel's own type
//!   information gives, [`super::btf`]) and assigns the connection to the socket with the
//!   fewest waiting, ties in turn. It needs `CAP_BPF`, `CAP_PERFMON` (to read a kernel
//!   structure), `CAP_NET_ADMIN` (to attach) and a kernel with BTF (Linux 5.9 or later).
//!
//! Where the kernel refuses one, the caller falls back: least queued to round robin, round
//! robin to the classic random program. Connections a closing socket hands to the others
//! (`tcp_migrate_req`) are placed by the reuseport program alone.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `SO_ATTACH_REUSEPORT_EBPF` (asm-generic/socket.h).
const SO_ATTACH_REUSEPORT_EBPF: libc::c_int = 52;

// bpf(2) commands, map and program types (linux/bpf.h).
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SK_LOOKUP: u32 = 30;
/// The attach type of lookup programs.
const BPF_SK_LOOKUP: u32 = 36;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_SOCKMAP: u32 = 15;
const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
/// Helpers: `bpf_map_lookup_elem`, `bpf_sk_release`, `bpf_skc_to_tcp_sock`.
const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
const HELPER_SK_RELEASE: i32 = 86;
const HELPER_SKC_TO_TCP_SOCK: i32 = 137;
const HELPER_SK_ASSIGN: i32 = 124;
/// `bpf_sk_assign`'s flag: the socket given, not another of its reuseport group.
const BPF_SK_LOOKUP_F_NO_REUSEPORT: i32 = 2;
/// A lookup program's verdict: go on (with the socket assigned, if any).
const SK_PASS: i32 = 1;
// Offsets in a lookup program's context (`struct bpf_sk_lookup`).
const CTX_FAMILY: i16 = 8;
const CTX_PROTOCOL: i16 = 12;
const CTX_LOCAL_IP4: i16 = 40;
const CTX_LOCAL_IP6: i16 = 44;
const CTX_LOCAL_PORT: i16 = 60;
/// `src_reg` of a 64-bit immediate load that names a map by its fd.
const BPF_PSEUDO_MAP_FD: u8 = 1;

/// The attribute of `BPF_MAP_CREATE` (the leading fields of `union bpf_attr`; the kernel
/// takes a shorter attribute as zero-filled).
#[repr(C)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// The attribute of `BPF_MAP_UPDATE_ELEM`.
#[repr(C)]
struct MapUpdate {
    map_fd: u32,
    pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// The attribute of `BPF_LINK_CREATE` (its leading fields).
#[repr(C)]
struct LinkCreate {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// The attribute of `BPF_PROG_LOAD` (its leading fields).
#[repr(C)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// One eBPF instruction (`struct bpf_insn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub(super) struct Insn {
    code: u8,
    /// `dst_reg` in the low nibble, `src_reg` in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

// Opcodes (class | size/op | source), linux/bpf_common.h and linux/bpf.h.
const ST_MEM_W: u8 = 0x62; // *(u32 *)(dst + off) = imm
const STX_MEM_W: u8 = 0x63; // *(u32 *)(dst + off) = src
const LDX_MEM_W: u8 = 0x61; // dst = *(u32 *)(src + off)
const STX_MEM_DW: u8 = 0x7b; // *(u64 *)(dst + off) = src
const LDX_MEM_DW: u8 = 0x79; // dst = *(u64 *)(src + off)
const MOV64_X: u8 = 0xbf; // dst = src
const MOV64_K: u8 = 0xb7; // dst = imm
const MOV32_K: u8 = 0xb4; // dst = (u32) imm
const ADD64_K: u8 = 0x07; // dst += imm
const ADD64_X: u8 = 0x0f; // dst += src
const SUB64_X: u8 = 0x1f; // dst -= src
const AND64_X: u8 = 0x5f; // dst &= src
const XOR64_X: u8 = 0xaf; // dst ^= src
const ARSH64_K: u8 = 0xc7; // dst >>= imm (arithmetic)
const MOD64_K: u8 = 0x97; // dst %= imm (unsigned)
const LD_IMM64: u8 = 0x18; // dst = imm64 (two slots)
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const JNE_K: u8 = 0x55; // if dst != imm goto pc + 1 + off
const JEQ_K: u8 = 0x15; // if dst == imm goto pc + 1 + off
const JLT_K: u8 = 0xa5; // if dst < imm (unsigned) goto pc + 1 + off
const ATOMIC_DW: u8 = 0xdb; // BPF_STX | BPF_ATOMIC | BPF_DW
/// `BPF_ADD | BPF_FETCH`: `src = atomic_fetch_add((u64 *)(dst + off), src)` (Linux 5.12).
const FETCH_ADD: i32 = 0x01;

/// A group's turn counter: an array map of one `u64`.
pub(super) struct Counter(OwnedFd);

impl Counter {
    /// A new counter, at 0. Fails where this process may not create BPF maps.
    pub(super) fn new() -> io::Result<Counter> {
        let attr = MapCreate {
            map_type: BPF_MAP_TYPE_ARRAY,
            key_size: 4,
            value_size: 8,
            max_entries: 1,
            map_flags: 0,
        };
        // SAFETY: the attribute of BPF_MAP_CREATE, with no pointers.
        unsafe { bpf(BPF_MAP_CREATE, &attr) }.map(Counter)
    }
}

/// The program that hands new connections to `targets` (indexes into the group's sockets)
/// in turn, counting turns in `counter`:
///
/// ```text
///     turn = fetch_add(counter, 1) % n
///     return targets[turn]
/// ```
pub(super) fn round_robin(counter: &Counter, targets: &[u32]) -> Vec<Insn> {
    let r1 = 1;
    let mut code = turn(counter);
    code.push(insn(MOD64_K, r1, 0, 0, targets.len() as i32));
    code.extend(table(r1, targets));
    code
}

/// The lookup program of a group bound to `address` that hands each new connection to the
/// serving socket with the fewest connections waiting to be accepted (a listening socket's
/// `sk_ack_backlog`, at offset `backlog` of the kernel's `struct sock`), ties broken in turn.
/// `sockets` holds the `n` serving sockets at keys `0..n`. It runs for every TCP connection
/// the network namespace receives ([`Lookup`]), so it first leaves alone those not addressed
/// to the group:
///
/// ```text
///     if protocol != TCP or local_port != port or (family, local_ip) != address: return PASS
///     start = fetch_add(counter, 1) % n; best = start; fewest = u32::MAX
///     for i in 0..n (unrolled):
///         key = (start + i) % n
///         sk = lookup(sockets, key); if sk == NULL: next
///         tp = skc_to_tcp_sock(sk)
///         if tp != NULL:
///             d = tp->sk_ack_backlog - fewest; less = d >> 63 (all ones when fewer)
///             fewest += d & less; best ^= (best ^ key) & less
///         release(sk)
///     sk = lookup(sockets, best); assign(ctx, sk, NO_REUSEPORT); release(sk); return PASS
/// ```
///
/// The minimum is kept without branches, so that the verifier sees one state after each
/// socket whichever way its comparison went (with a branch, the states it explores would double
/// with each socket). Where no socket could be assigned, the connection goes on to the group's
/// reuseport program.
pub(super) fn least_queued(
    counter: &Counter,
    sockets: &SockMap,
    backlog: i16,
    address: SocketAddr,
    n: usize,
) -> Vec<Insn> {
    let (r0, r1, r2, r3, r6, r7, r8, r9, fp) = (0, 1, 2, 3, 6, 7, 8, 9, 10);
    let n = n as i32;
    // Jumps to the final `return PASS`, patched once its place is known.
    let mut to_pass = Vec::new();
    let mut code = vec![insn(STX_MEM_DW, fp, r1, -16, 0)];
    let mut unless = |code: &mut Vec<Insn>, field: i16, value: i32| {
        code.push(insn(LDX_MEM_W, r2, r1, field, 0));
        to_pass.push(code.len());
        code.push(insn(JNE_K, r2, 0, 0, value));
    };
    unless(&mut code, CTX_PROTOCOL, libc::IPPROTO_TCP);
    unless(&mut code, CTX_LOCAL_PORT, i32::from(address.port()));
    match address.ip() {
        IpAddr::V4(ip) => {
            unless(&mut code, CTX_FAMILY, libc::AF_INET);
            if !ip.is_unspecified() {
                unless(
                    &mut code,
                    CTX_LOCAL_IP4,
                    u32::from_ne_bytes(ip.octets()) as i32,
                );
            }
        }
        // `::` takes IPv4 too unless it is v6-only (then the assignment fails: PASS).
        IpAddr::V6(ip) if !ip.is_unspecified() => {
            unless(&mut code, CTX_FAMILY, libc::AF_INET6);
            for (i, word) in ip.octets().chunks(4).enumerate() {
                let word = u32::from_ne_bytes(word.try_into().expect("4 bytes")) as i32;
                unless(&mut code, CTX_LOCAL_IP6 + 4 * i as i16, word);
            }
        }
        IpAddr::V6(_) => {}
    }
    code.extend(turn(counter));
    code.extend([
        insn(MOD64_K, r1, 0, 0, n),
        insn(MOV64_X, r9, r1, 0, 0),
        insn(MOV64_X, r7, r1, 0, 0),
        insn(MOV32_K, r6, 0, 0, -1),
    ]);
    for i in 0..n {
        code.extend([
            // key = (start + i) % n, kept at fp - 4 for the lookup and for `best`.
            insn(MOV64_X, r1, r9, 0, 0),
            insn(ADD64_K, r1, 0, 0, i),
            insn(JLT_K, r1, 0, 1, n),
            insn(ADD64_K, r1, 0, 0, -n),
            insn(STX_MEM_W, fp, r1, -4, 0),
        ]);
        code.extend(lookup_key_at_fp_4(&sockets.0));
        code.extend([
            insn(JEQ_K, r0, 0, 16, 0), // to the next socket
            insn(MOV64_X, r8, r0, 0, 0),
            insn(MOV64_X, r1, r0, 0, 0),
            insn(CALL, 0, 0, 0, HELPER_SKC_TO_TCP_SOCK),
            insn(JEQ_K, r0, 0, 10, 0), // to the release
            insn(LDX_MEM_W, r2, r0, backlog, 0),
            insn(SUB64_X, r2, r6, 0, 0),
            insn(MOV64_X, r3, r2, 0, 0),
            insn(ARSH64_K, r3, 0, 0, 63),
            insn(AND64_X, r2, r3, 0, 0),
            insn(ADD64_X, r6, r2, 0, 0),
            insn(LDX_MEM_W, r2, fp, -4, 0),
            insn(XOR64_X, r2, r7, 0, 0),
            insn(AND64_X, r2, r3, 0, 0),
            insn(XOR64_X, r7, r2, 0, 0),
            // The release.
            insn(MOV64_X, r1, r8, 0, 0),
            insn(CALL, 0, 0, 0, HELPER_SK_RELEASE),
        ]);
    }
    code.extend([insn(STX_MEM_W, fp, r7, -4, 0)]);
    code.extend(lookup_key_at_fp_4(&sockets.0));
    code.extend([
        insn(JEQ_K, r0, 0, 7, 0), // to PASS
        insn(MOV64_X, r8, r0, 0, 0),
        insn(LDX_MEM_DW, r1, fp, -16, 0),
        insn(MOV64_X, r2, r8, 0, 0),
        insn(MOV64_K, r3, 0, 0, BPF_SK_LOOKUP_F_NO_REUSEPORT),
        insn(CALL, 0, 0, 0, HELPER_SK_ASSIGN),
        insn(MOV64_X, r1, r8, 0, 0),
        insn(CALL, 0, 0, 0, HELPER_SK_RELEASE),
    ]);
    let pass = code.len();
    for at in to_pass {
        code[at].off = (pass - at - 1) as i16;
    }
    code.extend([insn(MOV64_K, r0, 0, 0, SK_PASS), insn(EXIT, 0, 0, 0, 0)]);
    code
}

/// A lookup program attached to this network namespace (`BPF_SK_LOOKUP`) for as long as this
/// is held (dropping it detaches the program).
pub(super) struct Lookup(#[allow(dead_code)] OwnedFd);

impl Lookup {
    /// Loads `code` as a lookup program and attaches it to clusterd's network namespace.
    pub(super) fn attach(code: &[Insn]) -> io::Result<Lookup> {
        let program = load(BPF_PROG_TYPE_SK_LOOKUP, BPF_SK_LOOKUP, code)?;
        let netns = std::fs::File::open("/proc/self/ns/net")?;
        let attr = LinkCreate {
            prog_fd: program.as_raw_fd() as u32,
            target_fd: netns.as_raw_fd() as u32,
            attach_type: BPF_SK_LOOKUP,
            flags: 0,
        };
        // SAFETY: the attribute of BPF_LINK_CREATE, with no pointers.
        unsafe { bpf(BPF_LINK_CREATE, &attr) }.map(Lookup)
    }
}

/// The start of both programs: `r1 = fetch_add(counter, 1)`, or return -1 (the kernel's own
/// hash) if the counter's lookup failed (it cannot: the verifier wants the check).
fn turn(counter: &Counter) -> Vec<Insn> {
    let (r0, r1, fp) = (0, 1, 10);
    let mut code = vec![insn(ST_MEM_W, fp, 0, -4, 0)];
    code.extend(lookup_key_at_fp_4(&counter.0));
    code.extend([
        insn(JNE_K, r0, 0, 2, 0),
        insn(MOV64_K, r0, 0, 0, -1),
        insn(EXIT, 0, 0, 0, 0),
        insn(MOV64_K, r1, 0, 0, 1),
        insn(ATOMIC_DW, r0, r1, 0, FETCH_ADD),
    ]);
    code
}

/// `r0 = bpf_map_lookup_elem(map, fp - 4)`: the key is stored at `fp - 4` before.
fn lookup_key_at_fp_4(map: &OwnedFd) -> [Insn; 5] {
    let (r1, r2, fp) = (1, 2, 10);
    [
        insn(MOV64_X, r2, fp, 0, 0),
        insn(ADD64_K, r2, 0, 0, -4),
        insn(LD_IMM64, r1, BPF_PSEUDO_MAP_FD, 0, map.as_raw_fd()),
        insn(0, 0, 0, 0, 0),
        insn(CALL, 0, 0, 0, HELPER_MAP_LOOKUP_ELEM),
    ]
}

/// The end of both programs: `return targets[reg]`, as
/// `if reg != 0 goto next; return t0; next: ...; return t(n-1)`.
fn table(reg: u8, targets: &[u32]) -> Vec<Insn> {
    let r0 = 0;
    let (last, others) = targets.split_last().expect("a group has a target");
    let mut code = Vec::with_capacity(3 * targets.len());
    for (key, target) in others.iter().enumerate() {
        code.extend([
            insn(JNE_K, reg, 0, 2, key as i32),
            insn(MOV64_K, r0, 0, 0, *target as i32),
            insn(EXIT, 0, 0, 0, 0),
        ]);
    }
    code.extend([
        insn(MOV64_K, r0, 0, 0, *last as i32),
        insn(EXIT, 0, 0, 0, 0),
    ]);
    code
}

/// The serving sockets of a group, for [`least_queued`] to look at: a `SOCKMAP` with each at
/// its key.
pub(super) struct SockMap(OwnedFd);

impl SockMap {
    /// A map of `sockets`, at keys 0, 1, ...
    pub(super) fn new(sockets: &[BorrowedFd<'_>]) -> io::Result<SockMap> {
        let attr = MapCreate {
            map_type: BPF_MAP_TYPE_SOCKMAP,
            key_size: 4,
            value_size: 4,
            max_entries: sockets.len() as u32,
            map_flags: 0,
        };
        // SAFETY: the attribute of BPF_MAP_CREATE, with no pointers.
        let map = SockMap(unsafe { bpf(BPF_MAP_CREATE, &attr) }?);
        for (key, socket) in sockets.iter().enumerate() {
            let (key, fd) = (key as u32, socket.as_raw_fd() as u32);
            let attr = MapUpdate {
                map_fd: map.0.as_raw_fd() as u32,
                pad: 0,
                key: &key as *const u32 as u64,
                value: &fd as *const u32 as u64,
                flags: 0,
            };
            // SAFETY: the attribute of BPF_MAP_UPDATE_ELEM, pointing at a key and a value
            // that outlive the call. It returns 0, not an fd: nothing to own.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_MAP_UPDATE_ELEM,
                    &attr as *const MapUpdate,
                    std::mem::size_of::<MapUpdate>(),
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(map)
    }
}

/// Loads `code` as a socket filter program and attaches it to `socket`'s reuseport group,
/// in place of whatever program the group had. The group keeps the program; its fd is closed
/// here.
pub(super) fn attach(socket: BorrowedFd<'_>, code: &[Insn]) -> io::Result<()> {
    let program = load(BPF_PROG_TYPE_SOCKET_FILTER, 0, code)?;
    super::set_socket_option(socket, SO_ATTACH_REUSEPORT_EBPF, &program.as_raw_fd())
}

/// Loads `code` as a program of `prog_type` (for `attach_type`); where the kernel refuses it,
/// the error ends with the verifier's reason.
fn load(prog_type: u32, attach_type: u32, code: &[Insn]) -> io::Result<OwnedFd> {
    load_logged(prog_type, attach_type, code, None).or_else(|error| {
        // Again with the verifier's log, for its reason.
        let mut log = vec![0u8; 64 * 1024];
        let again = load_logged(prog_type, attach_type, code, Some(&mut log));
        again.map_err(|_| {
            let log = String::from_utf8_lossy(&log);
            let reason = log
                .trim_end_matches('\0')
                .lines()
                .rev()
                .find(|l| !l.is_empty() && !l.starts_with("processed "));
            let reason = reason.map(|l| format!(": {l}")).unwrap_or_default();
            io::Error::new(error.kind(), format!("{error}{reason}"))
        })
    })
}

/// [`load`], with the verifier writing its log in `log`.
fn load_logged(
    prog_type: u32,
    attach_type: u32,
    code: &[Insn],
    log: Option<&mut Vec<u8>>,
) -> io::Result<OwnedFd> {
    // The programs written here are offered under MIT or GPL: the kernel lets only programs
    // with a GPL-compatible license read its own structures (`sk_ack_backlog`).
    let license = c"Dual MIT/GPL";
    let (log_level, log_size, log_buf) = match log {
        Some(log) => (1, log.len() as u32, log.as_mut_ptr() as u64),
        None => (0, 0, 0),
    };
    let attr = ProgLoad {
        prog_type,
        insn_cnt: code.len() as u32,
        insns: code.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level,
        log_size,
        log_buf,
        kern_version: 0,
        prog_flags: 0,
        prog_name: [0; 16],
        prog_ifindex: 0,
        expected_attach_type: attach_type,
    };
    // SAFETY: the attribute of BPF_PROG_LOAD, whose pointers (the instructions, the license,
    // the log) outlive the call.
    unsafe { bpf(BPF_PROG_LOAD, &attr) }
}

/// `bpf(cmd, attr)` for a command that returns a new fd.
///
/// # Safety
/// `attr` must be the attribute `cmd` takes, and whatever it points to valid for the call.
unsafe fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<OwnedFd> {
    // SAFETY: as the caller promises; the size given is the attribute's.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd the kernel just returned, owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_turns_through_its_targets_only() {
        let Ok(counter) = Counter::new() else {
            eprintln!("SKIPPED: this process may not create BPF maps");
            return;
        };
        let code = round_robin(&counter, &[0, 2, 5]);
        // 12 instructions, then (jne, mov, exit) per target but the last, then (mov, exit).
        assert_eq!(code.len(), 12 + 3 * 2 + 2);
        assert_eq!(code[11], insn(MOD64_K, 1, 0, 0, 3));
        let returned: Vec<i32> = code
            .windows(2)
            .filter(|w| w[0].code == MOV64_K && w[0].regs == 0 && w[1].code == EXIT)
            .map(|w| w[0].imm)
            .collect();
        assert_eq!(returned, [-1, 0, 2, 5]);
        assert_eq!(round_robin(&counter, &[7]).len(), 12 + 2);
    }
}
