//! Where a transaction's calls go: what the call path knows of a
//! transaction (its id and, once a reply has named it, its owner), without
//! the client the transaction was opened through.

use crate::spec::FnSpec;
use crate::wire::subjects;
use async_nats::Subject;
use std::sync::{Arc, Mutex};

/// A transaction as the call path routes it.
#[derive(Debug)]
pub(crate) struct TxnRoute {
    id: String,
    /// The owning instance once a reply has named it.
    owner: Mutex<Option<Owner>>,
}

/// The owner, and its subject per function (built once, not per call).
#[derive(Debug)]
struct Owner {
    instance: Arc<str>,
    /// By the address of the function's spec.
    subjects: Vec<(usize, Subject)>,
}

impl TxnRoute {
    /// A transaction whose owner is not known yet.
    pub(crate) fn new(id: &str) -> TxnRoute {
        TxnRoute {
            id: id.to_owned(),
            owner: Mutex::new(None),
        }
    }

    /// The transaction id, as sent in `Wharf-Txn`.
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// The owning instance, once a call has found it.
    pub(crate) fn owner(&self) -> Option<String> {
        let owner = self.owner.lock().unwrap();
        owner.as_ref().map(|o| o.instance.to_string())
    }

    /// The owner and its subject for `spec`, once the owner is known.
    pub(crate) fn route(&self, prefix: &str, spec: &'static FnSpec) -> Option<(Arc<str>, Subject)> {
        let mut owner = self.owner.lock().unwrap();
        let owner = owner.as_mut()?;
        let key = spec as *const FnSpec as usize;
        let subject = match owner.subjects.iter().find(|(k, _)| *k == key) {
            Some((_, subject)) => subject.clone(),
            None => {
                let subject = Subject::from(subjects::instance_call(
                    prefix,
                    &owner.instance,
                    spec.service,
                    spec.name,
                ));
                owner.subjects.push((key, subject.clone()));
                subject
            }
        };
        Some((owner.instance.clone(), subject))
    }

    /// Remembers the owner a reply named.
    pub(crate) fn set_owner(&self, instance: &str) {
        let mut owner = self.owner.lock().unwrap();
        if owner.as_ref().map(|o| &*o.instance) != Some(instance) {
            *owner = Some(Owner {
                instance: Arc::from(instance),
                subjects: Vec::new(),
            });
        }
    }
}
