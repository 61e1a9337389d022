//! What security costs: remote get with no secret, with the cluster secret (rpc credential and
//! signed gossip), and with the secret plus mutual TLS, in one run.
//!
//! ```sh
//! cargo run --release --example auth_bench            # full run
//! cargo run --release --example auth_bench -- quick   # a few seconds (CI smoke test)
//! ```
//!
//! Three two-member clusters in this process over real loopback sockets, 100-byte values. Each
//! round measures every cluster in turn (sequential gets, then 64 concurrent tasks) and the
//! report gives the median over rounds and the ratio to the open cluster. Nothing asserts on
//! time.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use peergrid::{Grid, GridConfig, Map, Secret, TlsConfig};
use support::median;
use tokio::time::Instant;

/// Adjusts the configuration of member 0 or 1 of a cluster.
type Tune = dyn Fn(&mut GridConfig, usize);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let quick = std::env::args().any(|a| a == "quick");
    let (rounds, sequential, concurrent_for) = if quick {
        (1, 300, Duration::from_millis(300))
    } else {
        (7, 4000, Duration::from_secs(2))
    };
    let dir = std::env::temp_dir().join(format!("peergrid-auth-bench-{}", std::process::id()));
    let pki = write_pki(&dir)?;
    let secret = Secret::new("an example secret of enough length");
    let setups: Vec<(&str, Box<Tune>)> = vec![
        ("no secret (open)", Box::new(|_, _| {})),
        (
            "cluster secret",
            Box::new({
                let secret = secret.clone();
                move |c, _| c.security.secret = Some(secret.clone())
            }),
        ),
        (
            "cluster secret + mutual TLS",
            Box::new(move |c, member| {
                c.security.secret = Some(secret.clone());
                c.security.tls = Some(pki[member].clone());
            }),
        ),
    ];
    let mut clusters = Vec::new();
    for (label, tune) in &setups {
        clusters.push((*label, Pair::start(tune.as_ref()).await?));
    }

    let mut p50 = vec![Vec::new(); clusters.len()];
    let mut tput = vec![Vec::new(); clusters.len()];
    for _ in 0..rounds {
        for (i, (_, pair)) in clusters.iter().enumerate() {
            p50[i].push(pair.sequential_p50(sequential).await?);
            tput[i].push(pair.concurrent(64, concurrent_for).await?);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "peergrid security overhead: remote get, 2 members per cluster, loopback, 100-byte values"
    );
    println!("median of {rounds} interleaved round(s)\n");
    println!("| cluster | remote get p50 µs | ratio | ops/s, 64 tasks | ratio |");
    println!("|---|---:|---:|---:|---:|");
    let (base_p50, base_tput) = (median(&p50[0]), median(&tput[0]));
    for (i, (label, _)) in clusters.iter().enumerate() {
        let (p, t) = (median(&p50[i]), median(&tput[i]));
        println!(
            "| {label} | {p:.1} | {:.2} | {t:.0} | {:.2} |",
            p / base_p50,
            t / base_tput
        );
    }
    println!("\n(ratio: against the open cluster; p50 above 1 and ops/s below 1 are the cost)");
    Ok(())
}

/// Two members and the keys the second one owns.
struct Pair {
    _members: (Grid, Grid),
    map: Map<String, Bytes>,
    remote: Arc<Vec<String>>,
}

impl Pair {
    async fn start(tune: &Tune) -> Result<Pair, peergrid::Error> {
        let name = format!("auth-bench-{}-{}", std::process::id(), rand_suffix());
        let mut config = GridConfig {
            cluster_name: name.clone(),
            ..GridConfig::ephemeral()
        };
        tune(&mut config, 0);
        let a = Grid::join(config).await?;
        let mut config = GridConfig {
            cluster_name: name,
            seeds: vec![a.local_member().gossip_addr],
            ..GridConfig::ephemeral()
        };
        tune(&mut config, 1);
        let b = Grid::join(config).await?;
        a.wait_safe(Duration::from_secs(60)).await?;
        b.wait_safe(Duration::from_secs(60)).await?;
        let map: Map<String, Bytes> = a.map("bench");
        let idb = b.local_member().id;
        let remote: Vec<String> = (0..20_000)
            .map(|i| format!("key:{i}"))
            .filter(|k| map.owner(k).ok().flatten() == Some(idb))
            .take(2000)
            .collect();
        let value = Bytes::from_static(&[7; 100]);
        map.put_all(remote.iter().map(|k| (k.clone(), value.clone())))
            .await?;
        Ok(Pair {
            _members: (a, b),
            map,
            remote: Arc::new(remote),
        })
    }

    async fn sequential_p50(&self, ops: usize) -> Result<f64, peergrid::Error> {
        let mut latencies = Vec::with_capacity(ops);
        for i in 0..ops {
            let t = Instant::now();
            self.map.get(&self.remote[i % self.remote.len()]).await?;
            latencies.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok(median(&latencies))
    }

    async fn concurrent(&self, tasks: usize, duration: Duration) -> Result<f64, peergrid::Error> {
        support::gets_per_sec(tasks, duration, &self.map, &self.remote).await
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A CA and two member certificates for 127.0.0.1, written to `dir`.
fn write_pki(dir: &Path) -> Result<Vec<TlsConfig>, Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate()?)?;
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca.pem())?;
    let mut out = Vec::new();
    for member in 0..2 {
        let key = rcgen::KeyPair::generate()?;
        let cert =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])?.signed_by(&key, &ca)?;
        let path = |ext: &str| -> PathBuf { dir.join(format!("member{member}.{ext}")) };
        std::fs::write(path("pem"), cert.pem())?;
        std::fs::write(path("key"), key.serialize_pem())?;
        out.push(TlsConfig {
            cert: path("pem"),
            key: path("key"),
            ca: ca_path.clone(),
            ..TlsConfig::default()
        });
    }
    Ok(out)
}
