//! Real network splits between processes: every member process runs in a network namespace of
//! its own, and the members of this test process share one. Each namespace has one veth link to
//! a bridge in a hub namespace, with a loopback-range address (127.77.0.0/24, routed like any
//! other address inside these private namespaces; nothing is reachable from the host's own
//! network). A split installs, in each namespace, policy rules that silently drop packets from
//! the addresses on the other side, the way Jepsen's iptables DROP rules do: a peer's
//! datagrams and TCP segments vanish, nothing is refused.
//!
//! Needs root and the `ip` command (iproute2); [`Namespaces::create`] says why when it cannot
//! be used, and the harness then falls back to the in-process fault switch.

use std::net::Ipv4Addr;
use std::process::Command;

/// The policy-rule priority of the drop rules (below the local table, moved to 1000).
const DROP_PREF: &str = "10";
const LOCAL_PREF: &str = "1000";

/// The namespaces of one run, deleted on drop.
pub struct Namespaces {
    prefix: String,
    hub: String,
    /// Index 0 is this process's namespace; the others hold member processes.
    spaces: Vec<Space>,
    /// Drop rules in place: (namespace index, source address dropped).
    cuts: Vec<(usize, Ipv4Addr)>,
}

struct Space {
    name: String,
    ip: Ipv4Addr,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("`ip` cannot run: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Namespaces left behind by runs whose process died without cleaning up.
fn remove_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix("pgj") else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or_default();
        if !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

impl Namespaces {
    /// The hub and this process's namespace; an error says why namespaces cannot be used here.
    pub fn create() -> Result<Namespaces, String> {
        remove_stale();
        let prefix = format!(
            "pgj{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_micros())
                .unwrap_or_default()
        );
        let hub = format!("{prefix}-hub");
        let mut net = Namespaces {
            prefix,
            hub: hub.clone(),
            spaces: Vec::new(),
            cuts: Vec::new(),
        };
        ip(&["netns", "add", &hub])?;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        net.add_space()?;
        Ok(net)
    }

    /// A new namespace linked to the hub; its index.
    pub fn add_space(&mut self) -> Result<usize, String> {
        let index = self.spaces.len();
        let name = format!("{}-{index}", self.prefix);
        let address = Ipv4Addr::new(127, 77, 0, 10 + index as u8);
        let port = format!("h{index}");
        ip(&["netns", "add", &name])?;
        // The namespace exists from here: record it so that drop deletes it.
        self.spaces.push(Space {
            name: name.clone(),
            ip: address,
        });
        let n = name.as_str();
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", n, "link", "add", "pg0", "type", "veth", "peer", "name", &port, "netns",
            &self.hub,
        ])?;
        ip(&["-n", &self.hub, "link", "set", &port, "master", "br0"])?;
        ip(&["-n", &self.hub, "link", "set", &port, "up"])?;
        // 127.0.0.0/8 is local to `lo` by default, and the kernel drops loopback-range
        // addresses on other links: narrow the first, allow the second.
        for key in ["all", "pg0"] {
            ip(&[
                "netns",
                "exec",
                n,
                "sysctl",
                "-qw",
                &format!("net.ipv4.conf.{key}.route_localnet=1"),
            ])?;
        }
        ip(&[
            "-n",
            n,
            "route",
            "del",
            "local",
            "127.0.0.0/8",
            "dev",
            "lo",
            "table",
            "local",
        ])?;
        ip(&[
            "-n",
            n,
            "addr",
            "add",
            &format!("{address}/24"),
            "dev",
            "pg0",
        ])?;
        ip(&["-n", n, "link", "set", "pg0", "up"])?;
        // Drop rules must come before the local table, which takes priority 0 by default.
        ip(&[
            "-n", n, "rule", "add", "pref", LOCAL_PREF, "lookup", "local",
        ])?;
        ip(&["-n", n, "rule", "del", "pref", "0"])?;
        Ok(index)
    }

    /// The name of namespace `index` (for `ip netns exec`).
    pub fn name(&self, index: usize) -> &str {
        &self.spaces[index].name
    }

    /// The address members in namespace `index` bind.
    pub fn address(&self, index: usize) -> Ipv4Addr {
        self.spaces[index].ip
    }

    /// Cuts every link between the namespaces in `a` and those in `b`, both ways.
    pub fn cut(&mut self, a: &[usize], b: &[usize]) {
        for &x in a {
            for &y in b {
                for (at, from) in [(x, y), (y, x)] {
                    let source = self.spaces[from].ip;
                    if self.cuts.contains(&(at, source)) {
                        continue;
                    }
                    self.drop_rule("add", at, source)
                        .expect("a drop rule installs");
                    self.cuts.push((at, source));
                }
            }
        }
    }

    /// Removes every cut.
    pub fn heal(&mut self) {
        for (at, source) in std::mem::take(&mut self.cuts) {
            self.drop_rule("del", at, source)
                .expect("a drop rule is removed");
        }
    }

    /// Adds or deletes (`action`) the rule in namespace `at` that drops packets from `source`.
    fn drop_rule(&self, action: &str, at: usize, source: Ipv4Addr) -> Result<(), String> {
        let source = source.to_string();
        let space = &self.spaces[at].name;
        ip(&[
            "-n",
            space,
            "rule",
            action,
            "pref",
            DROP_PREF,
            "from",
            &source,
            "blackhole",
        ])
    }
}

/// Moves the calling thread into the named namespace.
pub fn enter(name: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(format!("/run/netns/{name}"))?;
    // SAFETY: setns on a descriptor this function owns; it changes only the calling thread's
    // network namespace.
    let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for space in &self.spaces {
            let _ = ip(&["netns", "del", &space.name]);
        }
        let _ = ip(&["netns", "del", &self.hub]);
    }
}
