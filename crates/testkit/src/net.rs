//! Loopback addresses and ports. Every cluster takes two /16 blocks of 127.0.0.0/8 — one for pod
//! IPs, one for ClusterIPs — so clusters running at once (tests in parallel) never collide, and
//! all traffic stays on loopback.

use std::collections::{BTreeSet, HashSet};
use std::net::{Ipv4Addr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use rand::Rng;

use crate::error::{Error, Result};

/// Second octets handed out in this process.
static OCTETS: Mutex<BTreeSet<u8>> = Mutex::new(BTreeSet::new());
/// Ports handed out in this process (a bound-and-released port could otherwise come twice).
static PORTS: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A cluster's two /16 blocks: `127.<pods>.0.0/16` and `127.<pods + 1>.0.0/16`.
#[derive(Debug)]
pub(crate) struct Subnets {
    pods: u8,
    next_pod: AtomicU32,
}

impl Subnets {
    /// Reserves two adjacent free blocks, avoiding 127.0.0.0/16 (where the rest of the test
    /// suite listens) and blocks in which any process listens right now.
    pub(crate) fn reserve() -> Result<Subnets> {
        let busy: HashSet<u8> = listening_ips().iter().map(|ip| ip.octets()[1]).collect();
        let mut used = OCTETS.lock().unwrap_or_else(|e| e.into_inner());
        let mut rng = rand::thread_rng();
        for _ in 0..1000 {
            let pods = rng.gen_range(10u8..=250) & !1;
            let free = |octet: u8| !used.contains(&octet) && !busy.contains(&octet);
            if free(pods) && free(pods + 1) {
                used.insert(pods);
                used.insert(pods + 1);
                return Ok(Subnets {
                    pods,
                    next_pod: AtomicU32::new(0),
                });
            }
        }
        Err(Error::io(
            "cannot find two free /16 blocks in 127.0.0.0/8",
            std::io::Error::other("all taken"),
        ))
    }

    /// The ClusterIP range, for `--service-cluster-ip-range`.
    pub(crate) fn service_cidr(&self) -> String {
        format!("127.{}.0.0/16", self.pods + 1)
    }

    /// A new pod IP, never handed out before by this cluster and not listened on by anyone.
    pub(crate) fn next_pod_ip(&self) -> Option<Ipv4Addr> {
        let busy = listening_ips();
        loop {
            let n = self.next_pod.fetch_add(1, Ordering::Relaxed);
            // 127.P.x.y with y in 1..=254: skip network/broadcast-looking addresses.
            let (x, y) = (n / 254, n % 254 + 1);
            let x = u8::try_from(x).ok()?;
            let ip = Ipv4Addr::new(127, self.pods, x, y as u8);
            if !busy.contains(&ip) {
                return Some(ip);
            }
        }
    }
}

impl Drop for Subnets {
    fn drop(&mut self) {
        let mut used = OCTETS.lock().unwrap_or_else(|e| e.into_inner());
        used.remove(&self.pods);
        used.remove(&(self.pods + 1));
    }
}

/// A free TCP port on 127.0.0.1, not handed out before in this process.
pub(crate) fn free_port() -> Result<u16> {
    let mut handed = PORTS.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..100 {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|listener| listener.local_addr())
            .map_err(|e| Error::io("cannot find a free port on 127.0.0.1", e))?
            .port();
        if handed.insert(port) {
            return Ok(port);
        }
    }
    Err(Error::io(
        "cannot find a free port on 127.0.0.1",
        std::io::Error::other("the kernel keeps handing out ports already used"),
    ))
}

/// IPv4 addresses with a listening TCP socket on this machine (from /proc/net/tcp).
pub(crate) fn listening_ips() -> HashSet<Ipv4Addr> {
    listening_sockets().into_iter().map(|(ip, _)| ip).collect()
}

/// IPv4 (address, port) pairs with a listening TCP socket on this machine.
pub(crate) fn listening_sockets() -> Vec<(Ipv4Addr, u16)> {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return Vec::new();
    };
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            if state != "0A" {
                return None;
            }
            let (ip, port) = local.split_once(':')?;
            // The kernel prints the address's network-order bytes as a host-order u32.
            let ip = Ipv4Addr::from(u32::from_str_radix(ip, 16).ok()?.to_ne_bytes());
            Some((ip, u16::from_str_radix(port, 16).ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_are_distinct_and_loopback() {
        let a = Subnets::reserve().unwrap();
        let b = Subnets::reserve().unwrap();
        assert_ne!(a.pods, b.pods);
        assert!(a.service_cidr().starts_with("127."));
        let ip = a.next_pod_ip().unwrap();
        assert!(ip.is_loopback());
        assert_ne!(ip, a.next_pod_ip().unwrap());
    }

    #[test]
    fn sees_its_own_listener() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(listening_sockets().contains(&(Ipv4Addr::LOCALHOST, port)));
    }
}
