//! The `peergrid` command: runs a standalone member (`peergrid node`), shows a running
//! cluster (`peergrid status`), and does ad-hoc map work (`peergrid map get|put|remove|size`).
//!
//! - `node`: the member's settings from defaults, a TOML file (`--config`), `PEERGRID_*`
//!   environment variables and flags, in that order; runs until Ctrl-C or SIGTERM, then leaves
//!   gracefully.
//! - `status`, `map`: a [`peergrid::Client`] that calls a member's rpc address; the cluster
//!   secret and TLS files come from the same `PEERGRID_*` variables a member reads.

mod file;
mod node;
mod tools;

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// peergrid: an embeddable, peer-to-peer, in-memory data grid.
#[derive(Parser, Debug)]
#[command(name = "peergrid", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs a standalone member until Ctrl-C or SIGTERM, then leaves gracefully.
    Node(node::NodeArgs),
    /// Shows a running cluster: members, partitions, safety and per-map figures.
    Status(ClientArgs),
    /// Ad-hoc work on a map (keys and values as UTF-8 strings).
    Map {
        #[command(subcommand)]
        command: MapCommand,
    },
}

#[derive(Subcommand, Debug)]
enum MapCommand {
    /// Prints the value of KEY, or `(nil)`.
    Get {
        /// The map.
        name: String,
        /// The key.
        key: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Stores VALUE under KEY; prints the value it replaced, or `(nil)`.
    Put {
        /// The map.
        name: String,
        /// The key.
        key: String,
        /// The value.
        value: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Removes KEY; prints the value it had, or `(nil)`.
    Remove {
        /// The map.
        name: String,
        /// The key.
        key: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Prints the number of entries in the map.
    Size {
        /// The map.
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// How the client commands find the cluster.
#[derive(Args, Debug, Clone)]
pub(crate) struct ClientArgs {
    /// A member's rpc address (with default settings, the same host:port as its gossip
    /// address); repeat to give more to try in order.
    #[arg(long = "seed", value_name = "ADDR", default_value = "127.0.0.1:5701")]
    pub(crate) seeds: Vec<SocketAddr>,
    /// The cluster's name (default: PEERGRID_CLUSTER_NAME, else `peergrid`).
    #[arg(long)]
    pub(crate) cluster_name: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Node(args) => node::run(args).await,
            Command::Status(client) => tools::status(&client).await,
            Command::Map { command } => match command {
                MapCommand::Get { name, key, client } => tools::get(&client, &name, &key).await,
                MapCommand::Put {
                    name,
                    key,
                    value,
                    client,
                } => tools::put(&client, &name, &key, &value).await,
                MapCommand::Remove { name, key, client } => {
                    tools::remove(&client, &name, &key).await
                }
                MapCommand::Size { name, client } => tools::size(&client, &name).await,
            },
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}
