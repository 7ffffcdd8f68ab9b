//! Round robin for a steered group: an eBPF reuseport program (`SO_ATTACH_REUSEPORT_EBPF`)
//! that takes a turn from a counter in a one-element array map (an atomic fetch-and-add, so
//! CPUs taking SYNs at once still take distinct turns) and returns the serving socket whose
//! turn it is. Classic BPF has no state, hence eBPF here; loading it needs `CAP_BPF` (or
//! `kernel.unprivileged_bpf_disabled = 0`), and where the kernel refuses, the group spreads at
//! random instead (the caller's fallback).
//!
//! The program is written out as instructions (a dozen, plus three per target) rather than
//! compiled: like the classic programs beside it, it is rebuilt with the targets as constants
//! whenever the serving set changes, and attached in place of the previous one. The counter
//! outlives the programs (the group keeps its map), so turns continue across changes.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `SO_ATTACH_REUSEPORT_EBPF` (asm-generic/socket.h).
const SO_ATTACH_REUSEPORT_EBPF: libc::c_int = 52;

// bpf(2) commands, map and program types (linux/bpf.h).
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
/// `bpf_map_lookup_elem`, helper 1.
const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
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
const MOV64_X: u8 = 0xbf; // dst = src
const MOV64_K: u8 = 0xb7; // dst = imm
const ADD64_K: u8 = 0x07; // dst += imm
const MOD64_K: u8 = 0x97; // dst %= imm (unsigned)
const LD_IMM64: u8 = 0x18; // dst = imm64 (two slots)
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const JNE_K: u8 = 0x55; // if dst != imm goto pc + 1 + off
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
///     key = 0; r0 = lookup(counter, &key); if r0 == NULL return -1 (the kernel's hash)
///     r1 = fetch_add(*r0, 1) % n
///     if r1 != 0 goto next; return t0; next: ...; return t(n-1)
/// ```
pub(super) fn round_robin(counter: &Counter, targets: &[u32]) -> Vec<Insn> {
    let (r0, r1, r2, fp) = (0, 1, 2, 10);
    let mut code = vec![
        insn(ST_MEM_W, fp, 0, -4, 0),
        insn(MOV64_X, r2, fp, 0, 0),
        insn(ADD64_K, r2, 0, 0, -4),
        insn(LD_IMM64, r1, BPF_PSEUDO_MAP_FD, 0, counter.0.as_raw_fd()),
        insn(0, 0, 0, 0, 0),
        insn(CALL, 0, 0, 0, HELPER_MAP_LOOKUP_ELEM),
        insn(JNE_K, r0, 0, 2, 0),
        insn(MOV64_K, r0, 0, 0, -1),
        insn(EXIT, 0, 0, 0, 0),
        insn(MOV64_K, r1, 0, 0, 1),
        insn(ATOMIC_DW, r0, r1, 0, FETCH_ADD),
        insn(MOD64_K, r1, 0, 0, targets.len() as i32),
    ];
    let (last, others) = targets.split_last().expect("a group has a target");
    for (turn, target) in others.iter().enumerate() {
        code.extend([
            insn(JNE_K, r1, 0, 2, turn as i32),
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

/// Loads `code` as a socket filter program and attaches it to `socket`'s reuseport group,
/// in place of whatever program the group had. The group keeps the program; its fd is closed
/// here.
pub(super) fn attach(socket: BorrowedFd<'_>, code: &[Insn]) -> io::Result<()> {
    let license = c"MIT OR Apache-2.0";
    let attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_SOCKET_FILTER,
        insn_cnt: code.len() as u32,
        insns: code.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
    };
    // SAFETY: the attribute of BPF_PROG_LOAD, whose pointers (the instructions, the license)
    // outlive the call.
    let program = unsafe { bpf(BPF_PROG_LOAD, &attr) }?;
    super::set_socket_option(socket, SO_ATTACH_REUSEPORT_EBPF, &program.as_raw_fd())
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
