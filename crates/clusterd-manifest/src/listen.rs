//! Listening addresses: `"host:port"`, `"[v6]:port"`, `"unix:/path"`, and which two of them
//! cannot both be bound.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;

use crate::model::Listen;
use crate::values::resolve;

/// Turns a host and a port into addresses; [`system_resolver`] outside tests.
pub(crate) type Resolver = fn(&str, u16) -> io::Result<Vec<SocketAddr>>;

/// Resolves with the system's resolver (`getaddrinfo`: `/etc/hosts`, then DNS).
pub(crate) fn system_resolver(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    Ok((host, port).to_socket_addrs()?.collect())
}

/// The longest unix socket path `bind` accepts on Linux (`sun_path` minus its NUL).
const MAX_UNIX_PATH: usize = 107;

/// Parses a socket's `listen`: TCP, or `unix:` followed by a path resolved against `dir`.
pub(crate) fn listen(s: &str, dir: &Path, resolver: Resolver) -> Result<Listen, String> {
    let Some(rest) = s.strip_prefix("unix:") else {
        if !s.contains(':') {
            return Err(format!(
                "expected \"host:port\", \"[v6]:port\" or \"unix:/path\", found {s:?}"
            ));
        }
        return tcp(s, resolver).map(Listen::Tcp);
    };
    if rest.is_empty() {
        return Err("expected a path after \"unix:\", like \"unix:run/http.sock\"".to_owned());
    }
    if rest.contains('\0') {
        return Err("a unix socket path must not contain a NUL character".to_owned());
    }
    let path = resolve(dir, Path::new(rest));
    let length = path.as_os_str().len();
    if length > MAX_UNIX_PATH {
        return Err(format!(
            "unix socket path {} is {length} bytes long, the limit is {MAX_UNIX_PATH}",
            path.display()
        ));
    }
    Ok(Listen::Unix(path))
}

/// Parses a TCP `"host:port"` or `"[v6]:port"`; a host name is resolved now, keeping the first
/// address.
pub(crate) fn tcp(s: &str, resolver: Resolver) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!(
            "expected \"host:port\" or \"[v6]:port\", found {s:?}"
        ));
    };
    let Ok(port) = port.parse::<u16>() else {
        return Err(format!(
            "expected a port from 0 to 65535 after the last ':', found {s:?}"
        ));
    };
    if host.is_empty() {
        return Err(format!(
            "missing host in {s:?} (use 127.0.0.1, or 0.0.0.0 for every interface)"
        ));
    }
    if host.starts_with('[') || host.contains(':') {
        return Err(format!(
            "expected an IPv6 address in brackets, like \"[::1]:{port}\", found {s:?}"
        ));
    }
    let addresses = resolver(host, port).map_err(|e| format!("cannot resolve {host:?}: {e}"))?;
    addresses
        .first()
        .copied()
        .ok_or_else(|| format!("{host:?} resolves to no address"))
}

/// Whether two sockets cannot both be bound: the same unix path, or the same TCP port (not 0)
/// on the same address or on the wildcard address of the same family.
pub(crate) fn conflicts(a: &Listen, b: &Listen) -> bool {
    match (a, b) {
        (Listen::Tcp(x), Listen::Tcp(y)) => {
            x.port() != 0
                && x.port() == y.port()
                && (x.ip() == y.ip()
                    || (x.is_ipv4() == y.is_ipv4()
                        && (x.ip().is_unspecified() || y.ip().is_unspecified())))
        }
        (Listen::Unix(p), Listen::Unix(q)) => p == q,
        _ => false,
    }
}

/// How an address is shown in messages.
pub(crate) fn show(listen: &Listen) -> String {
    match listen {
        Listen::Tcp(addr) => addr.to_string(),
        Listen::Unix(path) => format!("unix:{}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn refuse(host: &str, _port: u16) -> io::Result<Vec<SocketAddr>> {
        panic!("{host} should not need a resolver")
    }

    #[test]
    fn literal_addresses_need_no_resolution() {
        let dir = Path::new("/srv");
        assert_eq!(
            listen("127.0.0.1:8000", dir, refuse),
            Ok(Listen::Tcp("127.0.0.1:8000".parse().unwrap()))
        );
        assert_eq!(
            listen("[::1]:0", dir, refuse),
            Ok(Listen::Tcp("[::1]:0".parse().unwrap()))
        );
    }

    #[test]
    fn localhost_resolves_to_loopback_with_the_system_resolver() {
        let Ok(Listen::Tcp(addr)) = listen("localhost:0", Path::new("/"), system_resolver) else {
            panic!("localhost did not resolve");
        };
        assert!(addr.ip().is_loopback(), "{addr}");
        assert_eq!(addr.port(), 0);
    }

    #[test]
    fn malformed_tcp_addresses() {
        let dir = Path::new("/srv");
        for (bad, says) in [
            ("8000", "expected \"host:port\""),
            (":8000", "missing host"),
            ("localhost:http", "expected a port"),
            ("localhost:70000", "expected a port"),
            ("::1:8000", "in brackets"),
            ("[::1]", "expected a port"),
            ("[::x]:80", "in brackets"),
            ("", "expected \"host:port\""),
        ] {
            let err = listen(bad, dir, refuse).unwrap_err();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    #[test]
    fn unix_paths_resolve_against_the_directory() {
        let dir = Path::new("/srv/app");
        assert_eq!(
            listen("unix:run/http.sock", dir, refuse),
            Ok(Listen::Unix(PathBuf::from("/srv/app/run/http.sock")))
        );
        assert_eq!(
            listen("unix:/run/x.sock", dir, refuse),
            Ok(Listen::Unix(PathBuf::from("/run/x.sock")))
        );
        assert!(
            listen("unix:", dir, refuse)
                .unwrap_err()
                .contains("expected a path")
        );
        let long = format!("unix:{}", "x".repeat(200));
        assert!(
            listen(&long, dir, refuse)
                .unwrap_err()
                .contains("the limit is 107")
        );
    }

    #[test]
    fn conflicting_addresses() {
        let tcp = |s: &str| Listen::Tcp(s.parse().unwrap());
        assert!(conflicts(&tcp("127.0.0.1:80"), &tcp("127.0.0.1:80")));
        assert!(conflicts(&tcp("0.0.0.0:80"), &tcp("127.0.0.1:80")));
        assert!(conflicts(&tcp("[::1]:80"), &tcp("[::]:80")));
        assert!(!conflicts(&tcp("127.0.0.1:0"), &tcp("127.0.0.1:0")));
        assert!(!conflicts(&tcp("127.0.0.1:80"), &tcp("127.0.0.2:80")));
        assert!(!conflicts(&tcp("127.0.0.1:80"), &tcp("127.0.0.1:81")));
        let unix = |s: &str| Listen::Unix(PathBuf::from(s));
        assert!(conflicts(&unix("/a"), &unix("/a")));
        assert!(!conflicts(&unix("/a"), &unix("/b")));
        assert!(!conflicts(&unix("/a"), &tcp("127.0.0.1:80")));
    }
}
