//! bk-cmdb compatibility: envelopes, error codes and messages, the search filter, time
//! formats, and the mapping between REST records and EventSubscription specs.
//!
//! Pure functions over data: no I/O, so everything here is unit-tested without a cluster.

pub mod codes;
pub mod envelope;
pub mod input;
pub mod search;
pub mod subscription_record;
pub mod time;

pub use codes::{ApiError, ErrorCode, Lang};
