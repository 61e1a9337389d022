//! peergrid: an embeddable, peer-to-peer, in-memory data grid.
//!
//! An application calls [`Grid::join`] and its process becomes an equal member of a cluster:
//! members find each other by SWIM gossip over UDP, talk gRPC to each other, and (as the data path
//! lands) each holds a share of the partitions of distributed maps, queues and locks.
//!
//! ```no_run
//! # async fn demo() -> peergrid::Result<()> {
//! use peergrid::{Grid, GridConfig};
//!
//! // With the defaults, processes on one machine find each other on ports 5701 and up.
//! let grid = Grid::join(GridConfig::default()).await?;
//! for member in grid.members() {
//!     println!("{} {} local={}", member.id, member.name, member.is_local);
//! }
//! grid.leave().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//!
//! In the order a member starts and data flows:
//!
//! - `config`: [`GridConfig`] and [`SwimConfig`], with defaults, limits and `validate()`.
//! - `grid`: [`Grid`], which binds the sockets, owns every background task, and is the handle the
//!   application holds.
//! - `membership`: SWIM membership with foca. `membership::driver` is the one task that owns
//!   the `Foca` value, the UDP socket and the ordered timer queue (`membership::timers`);
//!   `membership::frame` is the datagram header (magic, version, cluster hash);
//!   `membership::identity` is what foca gossips about a member. The task publishes the live view
//!   into `MembershipState`, read by everything else.
//! - `rpc`: member-to-member gRPC from `proto/peergrid.proto`: `rpc::server` (the service every
//!   member runs) and `rpc::client` (one lazily connected channel per peer, deadlines, and the
//!   mapping of failures onto [`Error`]).
//! - `fault`: [`FaultSwitch`], which cuts gossip and rpc links between chosen members for
//!   failure tests.
//! - `error`: [`Error`] and [`ConfigError`].
//!
//! The partition table, router, replicated stores and the typed map, queue and lock handles build
//! on these (see `DESIGN.md` in the repository).

#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod codec;
mod config;
mod error;
mod fault;
mod grid;
mod map;
mod membership;
mod node;
mod partition;
mod routing;
mod rpc;
mod store;

pub use config::{DEFAULT_PORT, GridConfig, MapConfig, SwimConfig};
pub use error::{ConfigError, Error, Result};
pub use fault::FaultSwitch;
pub use grid::{Grid, PartitionTableView, ReplicaState};
pub use map::Map;
pub use membership::{DatagramStats, Member, MemberId, MembershipEvent, MembershipEvents};

/// Compiles the README's code blocks as doc tests, so the embedding example stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
