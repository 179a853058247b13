//! Stateful microservices: transactions pinned to the instance that owns
//! them.
//!
//! A caller opens a transaction ([`transaction`]): a lease record in KV
//! `wharf_txn`, keyed by the transaction id, with no owner yet. Its first
//! call travels through the queue group like any other; the instance that
//! takes it claims the transaction by a compare-and-set on the record and
//! names itself in the reply (`Wharf-Txn-Owner`). Every later call goes to
//! that instance's own subject, `<prefix>._inst.<instance>.<service>.<fn>`,
//! where the transaction's state ([`State`]) lives in memory. An instance
//! that gets a call of a transaction another instance owns forwards it
//! there, so two callers racing to claim one transaction share one owner.
//!
//! The owner renews the lease while the transaction is in use and drops
//! both lease and state once it has been idle for the lease's length. A
//! call whose owner is gone fails with
//! [`ErrorKind::TransactionLost`](crate::ErrorKind::TransactionLost); it
//! never runs elsewhere on empty state.
//!
//! `lease` and `state` are shared by both sides; `route` and `transaction`
//! are the caller's, `owner` the serving instance's.

pub(crate) mod lease;
pub(crate) mod owner;
pub(crate) mod route;
pub(crate) mod state;
pub(crate) mod transaction;

pub use owner::QUIESCE_LIMIT;
pub use state::State;
pub use transaction::{transaction, Transaction};
