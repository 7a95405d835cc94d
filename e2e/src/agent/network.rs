//! Pod networking: each pod (without `hostNetwork`) gets a network namespace of its own, with
//! one end of a veth pair as `eth0` and an address on the node's bridge, which routes between
//! pods and to the host. What a CNI plugin and kube-proxy do, reduced to what tests need:
//!
//! - addresses come from the node's pod CIDR (a /24), the bridge holds the first one as the
//!   pods' gateway; nothing is forwarded or masqueraded off the machine;
//! - the `kubernetes` Service: inside each pod namespace the agent listens on the Service's
//!   ClusterIP (10.96.0.1, which the API server's certificate names) and relays to the API
//!   server on the host's loopback, so in-cluster clients work unchanged and the host gets no
//!   new address;
//! - a pod's link can be cut and restored ([`set_cut`]): frames are dropped on the bridge
//!   port, connections stay open, as in a network partition.
//!
//! Names are derived from the bridge and the address's last octet, so the agent, `e2e/cluster
//! down` and tests find them without shared state: namespace `<bridge>-<n>`, host-side veth
//! `<bridge>v<n>`. The `ip` commands take milliseconds: the agent runs them in place.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Mutex;

use std::process::Command;

/// The `kubernetes` Service's ClusterIP as pods see it (the first address of the API server's
/// `--service-cluster-ip-range`).
pub const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("--pod-cidr {0:?} is not an IPv4 /24 such as 10.244.0.0/24")]
    Cidr(String),
    #[error("no free pod address left in {0}")]
    Exhausted(String),
    #[error("`{args}` failed: {message}")]
    Ip { args: String, message: String },
    #[error("the kubernetes Service relay in {netns}: {source}")]
    Relay {
        netns: String,
        source: std::io::Error,
    },
}

/// The node's pod network: its bridge, address range and the addresses in use.
pub struct PodNetwork {
    bridge: String,
    prefix: [u8; 3],
    /// Addresses in use, and the last one handed out: the next pod takes the next free one
    /// after it, so an address just released (whose namespace the kernel may still be
    /// tearing down) is the last to be reused.
    used: Mutex<(BTreeSet<u8>, u8)>,
    /// Where the API server listens on the host (the relay's target).
    api_server: SocketAddr,
}

/// One pod's attachment; [`PodNetwork::detach`] removes it.
pub struct PodLink {
    pub ip: Ipv4Addr,
    pub netns: String,
    relay: tokio::task::JoinHandle<()>,
}

/// Where `ip netns add` puts a namespace: what `setns(2)` opens.
fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// The host-side end of the pod with address `ip` on `bridge`.
pub fn host_veth(bridge: &str, ip: Ipv4Addr) -> String {
    format!("{bridge}v{}", ip.octets()[3])
}

/// Cuts (`true`) or restores the link of the pod with address `ip`: its bridge port stops
/// forwarding in both directions, without closing a connection or changing a link state.
pub fn set_cut(ip: Ipv4Addr, cut: bool) -> Result<(), NetworkError> {
    // STP port states: 0 disabled, 3 forwarding. The bridge runs without STP, so they are ours.
    let state = if cut { "0" } else { "3" };
    let veth = host_veth(&bridge_of(ip)?, ip);
    run("bridge", &["link", "set", "dev", &veth, "state", state]).map(drop)
}

/// The bridge of the pod with address `ip`: the device the host routes it through.
pub fn bridge_of(ip: Ipv4Addr) -> Result<String, NetworkError> {
    let route = run("ip", &["-o", "route", "get", &ip.to_string()])?;
    Ok(route
        .split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)
        .unwrap_or_default()
        .to_owned())
}

/// The network namespace of the pod with address `ip` on `bridge`.
pub fn netns_of(bridge: &str, ip: Ipv4Addr) -> PathBuf {
    netns_path(&netns_name(bridge, ip.octets()[3]))
}

fn netns_name(bridge: &str, n: u8) -> String {
    format!("{bridge}-{n}")
}

/// Runs an iproute2 command (quick: the agent runs it in place); its standard output.
fn run(program: &str, args: &[&str]) -> Result<String, NetworkError> {
    let out = Command::new(program).args(args).output();
    let failed = |message: String| NetworkError::Ip {
        args: format!("{program} {}", args.join(" ")),
        message,
    };
    match out {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
        Ok(o) => Err(failed(String::from_utf8_lossy(&o.stderr).trim().to_owned())),
        Err(e) => Err(failed(format!("cannot run it: {e}"))),
    }
}

fn ip(args: &[&str]) -> Result<(), NetworkError> {
    run("ip", args).map(drop)
}

fn parse_cidr(cidr: &str) -> Option<[u8; 3]> {
    let (addr, len) = cidr.split_once('/')?;
    let addr: Ipv4Addr = addr.parse().ok()?;
    let [a, b, c, d] = addr.octets();
    (len == "24" && d == 0).then_some([a, b, c])
}

impl PodNetwork {
    pub fn new(
        bridge: &str,
        cidr: &str,
        api_server: SocketAddr,
    ) -> Result<PodNetwork, NetworkError> {
        let prefix = parse_cidr(cidr).ok_or_else(|| NetworkError::Cidr(cidr.into()))?;
        Ok(PodNetwork {
            bridge: bridge.into(),
            prefix,
            used: Mutex::default(),
            api_server,
        })
    }

    fn addr(&self, n: u8) -> Ipv4Addr {
        let [a, b, c] = self.prefix;
        Ipv4Addr::new(a, b, c, n)
    }

    fn gateway(&self) -> Ipv4Addr {
        self.addr(1)
    }

    /// Creates the bridge (or takes the existing one) and removes what an earlier agent left:
    /// its pods' processes are gone, so are their namespaces.
    pub fn set_up(&self) -> Result<(), NetworkError> {
        let br = self.bridge.as_str();
        if ip(&["link", "show", "dev", br]).is_err() {
            ip(&["link", "add", br, "type", "bridge"])?;
        }
        // A bridge left to itself takes the lowest MAC address of its ports, so it changes when
        // a pod comes or goes, and the other pods' cached gateway address then points nowhere
        // until their ARP entry expires (half a minute without a packet through). One chosen,
        // locally administered, it keeps.
        let [a, b, c] = self.prefix;
        let mac = format!("02:{a:02x}:{b:02x}:{c:02x}:00:01");
        ip(&["link", "set", "dev", br, "address", &mac])?;
        let gw = format!("{}/24", self.gateway());
        // `replace`: idempotent across agent restarts.
        ip(&["addr", "replace", &gw, "dev", br])?;
        ip(&["link", "set", br, "up"])?;
        for n in 2..=254 {
            let netns = self.netns_name(n);
            if netns_path(&netns).exists() {
                ip(&["netns", "del", &netns])?;
            }
        }
        Ok(())
    }

    fn netns_name(&self, n: u8) -> String {
        netns_name(&self.bridge, n)
    }

    /// The namespace of the pod with address `ip`.
    pub fn netns_of(&self, ip: Ipv4Addr) -> PathBuf {
        netns_of(&self.bridge, ip)
    }

    /// Gives a pod its namespace, address and the `kubernetes` Service.
    pub fn attach(&self) -> Result<PodLink, NetworkError> {
        let n = {
            let mut guard = self.used.lock().unwrap_or_else(|p| p.into_inner());
            let (used, last) = &mut *guard;
            let n = (*last + 1..=254)
                .chain(2..=*last)
                .find(|n| *n >= 2 && !used.contains(n))
                .ok_or_else(|| NetworkError::Exhausted(format!("{}", self.addr(0))))?;
            used.insert(n);
            *last = n;
            n
        };
        match self.plumb(n) {
            Ok(link) => Ok(link),
            Err(e) => {
                let _ = ip(&["netns", "del", &self.netns_name(n)]);
                self.release(n);
                Err(e)
            }
        }
    }

    fn plumb(&self, n: u8) -> Result<PodLink, NetworkError> {
        let (netns, pod_ip) = (self.netns_name(n), self.addr(n));
        let veth = host_veth(&self.bridge, pod_ip);
        // What an earlier pod of this address may have left: its namespace's name, or a link
        // that something still held when the namespace went.
        if netns_path(&netns).exists() {
            ip(&["netns", "del", &netns])?;
        }
        if ip(&["link", "show", "dev", &veth]).is_ok() {
            ip(&["link", "del", &veth])?;
        }
        ip(&["netns", "add", &netns])?;
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ])?;
        ip(&["link", "set", &veth, "master", &self.bridge, "up"])?;
        let addr = format!("{pod_ip}/24");
        let service = format!("{SERVICE_IP}/32");
        let gw = self.gateway().to_string();
        for args in [
            vec!["addr", "add", &addr, "dev", "eth0"],
            vec!["link", "set", "eth0", "up"],
            vec!["link", "set", "lo", "up"],
            vec!["addr", "add", &service, "dev", "lo"],
            vec!["route", "add", "default", "via", &gw],
        ] {
            let mut full = vec!["-n", netns.as_str()];
            full.extend(args);
            ip(&full)?;
        }
        let relay = self.relay(&netns)?;
        Ok(PodLink {
            ip: pod_ip,
            netns,
            relay,
        })
    }

    /// Listens on the Service address inside the pod's namespace and relays each connection
    /// to the API server: the listening socket belongs to the namespace it was made in, the
    /// agent's own connections to the host's.
    fn relay(&self, netns: &str) -> Result<tokio::task::JoinHandle<()>, NetworkError> {
        let failed = |source| NetworkError::Relay {
            netns: netns.into(),
            source,
        };
        let path = netns_path(netns);
        let port = self.api_server.port();
        // setns(CLONE_NEWNET) changes only the calling thread: a short-lived thread of its own.
        let listener = std::thread::spawn(move || -> std::io::Result<std::net::TcpListener> {
            let ns = std::fs::File::open(&path)?;
            use std::os::fd::AsRawFd;
            // SAFETY: setns on a valid namespace file descriptor, for this thread only.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let l = std::net::TcpListener::bind((SERVICE_IP, port))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .join()
        .map_err(|_| failed(std::io::Error::other("the setns thread panicked")))?
        .map_err(failed)?;
        let listener = tokio::net::TcpListener::from_std(listener).map_err(failed)?;
        let target = self.api_server;
        Ok(tokio::spawn(async move {
            // The connections go with the relay: aborting it drops the set, which aborts them.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                connections.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                while connections.try_join_next().is_some() {}
            }
        }))
    }

    /// Removes a pod's namespace (its veth pair goes with it) and frees the address. Its
    /// processes must be gone: a namespace a process still holds outlives `ip netns del`.
    pub fn detach(&self, link: PodLink) {
        link.relay.abort();
        if let Err(e) = ip(&["netns", "del", &link.netns]) {
            tracing::warn!(error = %e, "removing the pod's network namespace");
        }
        self.release(link.ip.octets()[3]);
    }

    fn release(&self, n: u8) {
        self.used
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .remove(&n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_and_names() {
        assert_eq!(parse_cidr("10.244.3.0/24"), Some([10, 244, 3]));
        assert_eq!(parse_cidr("10.244.3.0/16"), None);
        assert_eq!(parse_cidr("10.244.3.7/24"), None);
        assert_eq!(parse_cidr("nonsense"), None);
        assert_eq!(
            host_veth("pgsnap3", Ipv4Addr::new(10, 244, 3, 17)),
            "pgsnap3v17"
        );
    }
}
