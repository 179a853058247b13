//! Stateful calls: served by the instance that owns their transaction
//! (claimed on the first call), forwarded to it from any other instance.

use super::dispatch::read_request;
use super::endpoint::Endpoint;
use crate::boxed::out_of_line;
use crate::error::ErrorKind;
use crate::handler::Fault;
use crate::txn::lease::lost;
use crate::txn::owner::Admitted;
use crate::wire::codec::Codec;
use crate::wire::reply::name_owner;
use crate::wire::request::CallMeta;
use crate::wire::subjects;
use std::time::{Duration, SystemTime};

impl Endpoint {
    /// A call of a stateful function: runs here when this instance owns
    /// (or now claims) its transaction, goes to the owner otherwise.
    pub(crate) async fn run_stateful(
        &self,
        reply: async_nats::Subject,
        message: async_nats::Message,
        direct: bool,
        started: SystemTime,
    ) {
        let spec = self.registration.spec;
        let (codec, mut meta, mut args) = match read_request(&message) {
            Ok(parts) => parts,
            Err((codec, fault)) => {
                return out_of_line(|| self.respond_fault(reply.into(), codec, fault, started))
                    .await
            }
        };
        let owned = self
            .shared
            .owned
            .as_ref()
            .expect("a worker serving stateful functions owns transactions");
        let txn = match std::str::from_utf8(&meta.txn) {
            Ok("") => None,
            Ok(txn) => Some(txn),
            Err(_) => Some("<not UTF-8>"),
        };
        // A transaction owned here is the common case and needs no await;
        // claims, forwards and faults are boxed, so their large futures do
        // not make every call's future large.
        let admitted = match txn.and_then(|id| owned.local(id)) {
            Some(in_use) => Ok(Admitted::Here(in_use)),
            None => out_of_line(|| owned.admit(spec, txn)).await,
        };
        let in_use = match admitted {
            Ok(Admitted::Here(in_use)) if meta.spill.is_some() => {
                let spilled = meta.spill.take().expect("checked");
                match out_of_line(|| self.unspill(&spilled)).await {
                    Ok(bytes) => args = bytes,
                    Err(fault) => {
                        return out_of_line(|| {
                            self.respond_fault(reply.into(), codec, fault, started)
                        })
                        .await
                    }
                }
                in_use
            }
            Ok(Admitted::Here(in_use)) => in_use,
            Ok(Admitted::Forward(owner)) => {
                return out_of_line(|| self.forward(reply, message, &owner, codec, &meta, started))
                    .await
            }
            Err(error) => {
                return out_of_line(|| {
                    self.respond_fault(reply.into(), codec, error.into(), started)
                })
                .await
            }
        };
        drop(message);
        let outcome = self
            .execute(codec, &meta, args, started, Some(in_use.0.clone()))
            .await;
        drop(in_use);
        if let Ok(body) = &outcome {
            if body.len() > self.shared.spill_at {
                let body = body.clone();
                let owner = (!direct).then_some(owned.instance.as_str());
                return out_of_line(|| {
                    self.respond_spilled(reply.into(), codec, &meta, body, started, owner)
                })
                .await;
            }
        }
        // Through the queue group the caller does not know the owner yet:
        // name it, so the transaction's next calls come straight here.
        let (code, mut headers, body) = match outcome {
            Ok(body) => (None, self.reply_headers(codec, &meta), body),
            Err(fault) => {
                let (code, headers, body) = fault.answer(codec);
                (Some((code, fault)), headers, body)
            }
        };
        if !direct {
            name_owner(&mut headers, &owned.instance);
        }
        let nats = &self.shared.nats;
        // An empty header block still costs both sides a parse.
        let _ = if headers.is_empty() {
            nats.publish(reply, body).await
        } else {
            nats.publish_with_headers(reply, headers, body).await
        };
        match &code {
            Some((_, fault)) => self.record(started, Some(fault)),
            None => self.record(started, None),
        }
    }

    /// Passes a call of a transaction owned by another instance to that
    /// instance and relays its answer; when the owner is gone the call
    /// fails with 410 rather than run here on empty state.
    pub(crate) async fn forward(
        &self,
        reply: async_nats::Subject,
        message: async_nats::Message,
        owner: &str,
        codec: Codec,
        meta: &CallMeta,
        started: SystemTime,
    ) {
        let spec = self.registration.spec;
        let subject = subjects::instance_call(&self.shared.prefix, owner, spec.service, spec.name);
        let timeout = meta
            .deadline_ms
            .map(|deadline| {
                Duration::from_millis(deadline.saturating_sub(crate::context::unix_ms()))
            })
            .unwrap_or_else(|| spec.timeout());
        let txn = String::from_utf8_lossy(&meta.txn).into_owned();
        let mut request = async_nats::Request::new()
            .payload(message.payload)
            .timeout(Some(timeout));
        if let Some(headers) = message.headers {
            request = request.headers(headers);
        }
        match self.shared.nats.send_request(subject, request).await {
            Ok(answer) => {
                let mut headers = answer.headers.unwrap_or_default();
                name_owner(&mut headers, owner);
                let _ = self
                    .shared
                    .nats
                    .publish_with_headers(reply, headers, answer.payload)
                    .await;
            }
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                let error = lost(&txn, owner);
                self.respond_fault(reply.into(), codec, error.into(), started)
                    .await;
            }
            // Timed out: the caller's own deadline has passed too.
            Err(e) if e.kind() == async_nats::RequestErrorKind::TimedOut => {}
            Err(e) => {
                let fault = Fault::new(
                    ErrorKind::Unavailable,
                    format!("cannot reach instance `{owner}`, which owns transaction `{txn}`: {e}; retry"),
                );
                self.respond_fault(reply.into(), codec, fault, started)
                    .await;
            }
        }
    }
}
