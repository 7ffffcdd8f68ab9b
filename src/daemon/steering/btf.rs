//! The kernel's own type information (BTF, `/sys/kernel/btf/vmlinux`), read for one thing:
//! where a member of a kernel struct lies, so that an eBPF program can load it through a
//! BTF-typed pointer (the verifier checks such a load against the same information). The
//! format is the kernel's `Documentation/bpf/btf.rst`: a header, then the types one after the
//! other (each a 12-byte `btf_type` and data whose size depends on its kind), then the strings.

use std::io;

/// `BTF_KIND_STRUCT`.
const KIND_STRUCT: u32 = 4;

/// The byte offset of `member` in the kernel's `struct name`, from the BTF at `path`.
pub(super) fn member_offset(path: &str, name: &str, member: &str) -> io::Result<u32> {
    let data = std::fs::read(path)?;
    find(&data, name, member).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{path}: no member {member} of struct {name}"),
        )
    })
}

/// [`member_offset`] in `data`; `None` when it is not there or `data` is not BTF.
fn find(data: &[u8], name: &str, member: &str) -> Option<u32> {
    let u16_at = |at: usize| Some(u16::from_le_bytes(data.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?));
    if u16_at(0)? != 0xeb9f {
        return None;
    }
    let header = u32_at(4)? as usize;
    let types = header + u32_at(8)? as usize;
    let types_end = types + u32_at(12)? as usize;
    let strings = header + u32_at(16)? as usize;
    let string = |offset: u32| {
        let start = strings + offset as usize;
        let rest = data.get(start..)?;
        let end = rest.iter().position(|b| *b == 0)?;
        Some(&rest[..end])
    };
    let mut at = types;
    while at < types_end {
        let (name_off, info) = (u32_at(at)?, u32_at(at + 4)?);
        let (vlen, kind, bitfields) = (
            (info & 0xffff) as usize,
            (info >> 24) & 0x1f,
            info >> 31 == 1,
        );
        at += 12;
        if kind == KIND_STRUCT && string(name_off)? == name.as_bytes() {
            for i in 0..vlen {
                let m = at + 12 * i;
                if string(u32_at(m)?)? == member.as_bytes() {
                    let offset = u32_at(m + 8)?;
                    let bits = if bitfields {
                        offset & 0xff_ffff
                    } else {
                        offset
                    };
                    return (bits % 8 == 0).then_some(bits / 8);
                }
            }
        }
        // What follows the `btf_type`, by kind.
        at += match kind {
            1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
            3 => 12,                      // ARRAY
            4 | 5 | 15 | 19 => 12 * vlen, // STRUCT, UNION, DATASEC, ENUM64
            6 | 13 => 8 * vlen,           // ENUM, FUNC_PROTO
            2 | 7..=12 | 16 | 18 => 0,    // PTR, FWD, TYPEDEF, qualifiers, FUNC, FLOAT, TYPE_TAG
            _ => return None,             // a kind newer than this reader
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accept_queue_length_is_found_in_struct_sock_where_the_kernel_has_btf() {
        const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
        if !std::path::Path::new(VMLINUX).exists() {
            eprintln!("SKIPPED: no {VMLINUX}");
            return;
        }
        let backlog = member_offset(VMLINUX, "sock", "sk_ack_backlog").unwrap();
        let max = member_offset(VMLINUX, "sock", "sk_max_ack_backlog").unwrap();
        // Neighbours, both u32, in every kernel since 5.x.
        assert_eq!(max, backlog + 4);
        assert!(member_offset(VMLINUX, "sock", "no_such_member").is_err());
        assert!(find(b"not btf", "sock", "sk_ack_backlog").is_none());
    }
}
