//! `peergrid node`: a standalone member.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::Args;
use peergrid::{Grid, GridConfig, MembershipEvent};

/// Settings of `peergrid node`. Each overrides the file and the environment.
#[derive(Args, Debug)]
pub(crate) struct NodeArgs {
    /// A TOML file of settings (keys: the PEERGRID_* variables in lower case without the
    /// prefix; tables [maps.NAME], [queues.NAME], [locks.NAME]).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The cluster's name; members of other clusters are ignored.
    #[arg(long)]
    cluster_name: Option<String>,
    /// This member's name (default: its gossip address).
    #[arg(long)]
    name: Option<String>,
    /// The host to bind gossip (UDP) and rpc (TCP) to. Beyond loopback a cluster secret
    /// (PEERGRID_SECRET) is required.
    #[arg(long, value_name = "IP")]
    bind: Option<IpAddr>,
    /// The first port to try for gossip and rpc (the next free one is taken; 0: ephemeral).
    #[arg(long)]
    port: Option<u16>,
    /// Members to contact to join, comma-separated (an empty value starts a new cluster).
    #[arg(long, value_name = "ADDR,ADDR")]
    seeds: Option<String>,
    /// Partitions in the cluster (every member must agree).
    #[arg(long, value_name = "N")]
    partitions: Option<u32>,
    /// Backup copies of each partition.
    #[arg(long, value_name = "N")]
    backups: Option<u8>,
    /// Where to serve /metrics (Prometheus text) and /health over HTTP.
    #[arg(long, value_name = "ADDR")]
    metrics_bind: Option<SocketAddr>,
}

/// The member's configuration: defaults, then the file, then the environment, then the flags.
pub(crate) fn config(
    args: &NodeArgs,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<GridConfig, String> {
    let mut config = GridConfig::default();
    if let Some(path) = &args.config {
        let shown = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
        config = crate::file::apply(config, &shown, &text)?;
    }
    config = config.with_env_vars(env).map_err(|e| e.to_string())?;
    if let Some(name) = &args.cluster_name {
        config.cluster_name = name.clone();
    }
    if let Some(name) = &args.name {
        config.member_name = Some(name.clone());
    }
    if let Some(ip) = args.bind {
        config.gossip_bind.set_ip(ip);
        config.rpc_bind.set_ip(ip);
    }
    if let Some(port) = args.port {
        config.gossip_bind.set_port(port);
        config.rpc_bind.set_port(port);
    }
    if let Some(seeds) = &args.seeds {
        config.seeds = seeds
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse()
                    .map_err(|_| format!("--seeds: {s:?} is not an address (host:port)"))
            })
            .collect::<Result<_, _>>()?;
    }
    if let Some(n) = args.partitions {
        config.partition_count = n;
    }
    if let Some(n) = args.backups {
        config.backup_count = n;
    }
    if let Some(addr) = args.metrics_bind {
        config.metrics_bind = Some(addr);
    }
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

/// Runs the member until Ctrl-C or SIGTERM, then leaves.
pub(crate) async fn run(args: NodeArgs) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PEERGRID_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("peergrid=info,warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    // PEERGRID_LOG is the log filter, not a member setting.
    let env = peergrid::peergrid_env_vars()
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|(name, _)| name != "PEERGRID_LOG");
    let config = config(&args, env)?;
    let grid = Grid::join(config).await.map_err(|e| e.to_string())?;
    let me = grid.local_member();
    println!(
        "member {} ({}) of cluster {:?}: gossip {} rpc {}{}",
        me.name,
        me.id,
        grid.config().cluster_name,
        me.gossip_addr,
        me.rpc_addr,
        grid.metrics_addr()
            .map_or(String::new(), |a| format!(", metrics http://{a}/metrics")),
    );
    println!("members: {}", grid.members().len());
    let mut events = grid.membership_events();
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            event = events.recv() => match event {
                Some(MembershipEvent::Up(m)) => {
                    println!("up: {} ({}) at {}; members: {}", m.name, m.id, m.gossip_addr, grid.members().len());
                }
                Some(MembershipEvent::Down(m)) => {
                    println!("down: {} ({}); members: {}", m.name, m.id, grid.members().len());
                }
                Some(MembershipEvent::Left(m)) => {
                    println!("left: {} ({}); members: {}", m.name, m.id, grid.members().len());
                }
                Some(_) => {}
                None => break,
            },
        }
    }
    println!("leaving: handing partitions over (signal again to stop at once)");
    tokio::select! {
        left = grid.leave() => left.map_err(|e| e.to_string())?,
        _ = shutdown_signal() => return Err("stopped before the handoff finished".to_string()),
    }
    println!("left");
    Ok(())
}

/// Ctrl-C, or SIGTERM on Unix.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        node: NodeArgs,
    }

    #[test]
    fn flags_override_the_environment_which_overrides_the_file() {
        let dir = std::env::temp_dir().join(format!("peergrid-node-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("node.toml");
        std::fs::write(
            &file,
            "cluster_name = \"from-file\"\nbackups = 2\npartitions = 32\nmember_name = \"file\"\n",
        )
        .unwrap();
        let args = Wrapper::parse_from([
            "node",
            "--config",
            file.to_str().unwrap(),
            "--backups",
            "0",
            "--port",
            "0",
            "--seeds",
            "",
        ])
        .node;
        let env = [("PEERGRID_MEMBER_NAME".to_string(), "env".to_string())];
        let config = config(&args, env).unwrap();
        assert_eq!(config.cluster_name, "from-file");
        assert_eq!(config.member_name.as_deref(), Some("env"));
        assert_eq!(config.partition_count, 32);
        assert_eq!(config.backup_count, 0);
        assert_eq!(config.gossip_bind.port(), 0);
        assert!(config.seeds.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_public_bind_without_a_secret_is_refused() {
        let args = Wrapper::parse_from(["node", "--bind", "10.1.2.3"]).node;
        let err = config(&args, []).unwrap_err();
        assert!(err.contains("secret"), "{err}");
    }
}
