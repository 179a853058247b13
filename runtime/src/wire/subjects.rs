//! Every subject, queue group, stream, consumer and bucket name wharf uses,
//! built here and nowhere else (docs/protocol.md describes them).
//!
//! `prefix` is the deployment's subject prefix (`WHARF_PREFIX`, default
//! [`DEFAULT_PREFIX`]); services and functions are single subject tokens.

/// Subject prefix when neither `WHARF_PREFIX` nor
/// [`Client::with_prefix`](crate::Client::with_prefix) sets one.
pub const DEFAULT_PREFIX: &str = "wharf";

/// The queue group every worker of a function joins (ADR-32's default).
pub const QUEUE_GROUP: &str = "q";

/// The KV bucket of `service`'s durable results and idempotency records,
/// one per service so that no service's workers read another's:
/// `wharf_results_<service>`.
pub fn results_bucket(service: &str) -> String {
    format!("wharf_results_{service}")
}

/// KV bucket of transaction leases, one per open transaction.
pub const TXN_BUCKET: &str = "wharf_txn";

/// KV bucket of worker heartbeats, one key per instance.
pub const INSTANCES_BUCKET: &str = "wharf_instances";

/// KV bucket of the acting supervisor's lease.
pub const LEASE_BUCKET: &str = "wharf_supervisor";

/// KV bucket of objects small enough to keep inline.
pub const OBJECTS_BUCKET: &str = "wharf_objects";

/// Object Store bucket of larger objects.
pub const BLOBS_BUCKET: &str = "wharf_blobs";

/// The key of the supervisor lease in [`LEASE_BUCKET`].
pub const LEADER_KEY: &str = "leader";

/// Subject token of an instance's own subjects.
const INSTANCE_TOKEN: &str = "_inst";

/// The token of signature subjects ([`signed_call`]; [`readable`] spells
/// it out too).
const SIG_TOKEN: &str = "_sig";

/// A subscribe permission for `subject` in the workers' queue group only:
/// `<subject> q` (nats-server's form for queue permissions).
pub fn in_queue_group(subject: &str) -> String {
    format!("{subject} {QUEUE_GROUP}")
}

/// The subject of `service.function`: `<prefix>.<service>.<function>`.
pub fn call(prefix: &str, service: &str, function: &str) -> String {
    format!("{prefix}.{service}.{function}")
}

/// The subject of one signature of `service.function`:
/// `<prefix>._sig.<service>.<function>.<sig as 16 hex digits>`. Workers
/// take calls on it beside the plain subject, so a caller reaches only
/// workers built with its signature (rolling upgrades).
pub fn signed_call(prefix: &str, service: &str, function: &str, sig: u64) -> String {
    format!("{prefix}.{SIG_TOKEN}.{service}.{function}.{sig:016x}")
}

/// Where a wharf caller sends [batches](crate::wire::batch) of calls of
/// one function built against signature `sig`:
/// `<prefix>._sig.<service>.<function>.<sig>-batch`, in the queue group.
/// Under the signature subjects' wildcard, so the permissions that let a
/// caller or a worker use one signature subject cover it too.
pub fn batch_call(prefix: &str, service: &str, function: &str, sig: u64) -> String {
    format!("{prefix}.{SIG_TOKEN}.{service}.{function}.{sig:016x}-batch")
}

/// A subject as an error message names it: a signature subject as the
/// function's plain subject and the signature
/// (`wharf.math.add, signature 0123456789abcdef`), any other as it is.
pub fn readable(subject: &str) -> std::borrow::Cow<'_, str> {
    let signed = subject.split_once("._sig.").and_then(|(prefix, rest)| {
        let (call, sig) = rest.rsplit_once('.')?;
        Some(format!("{prefix}.{call}, signature {sig}"))
    });
    match signed {
        Some(text) => text.into(),
        None => subject.into(),
    }
}

/// Every signature of `service.function` (`*` for any function):
/// `<prefix>._sig.<service>.<function>.*`, for permissions.
pub fn signed_calls(prefix: &str, service: &str, function: &str) -> String {
    format!("{prefix}.{SIG_TOKEN}.{service}.{function}.*")
}

/// Where a caller asks whether an idempotent call still runs:
/// `<prefix>._status.<service>`, payload the call id.
pub fn call_status(prefix: &str, service: &str) -> String {
    format!("{prefix}._status.{service}")
}

/// Where a caller cancels calls of `service`: `<prefix>._cancel.<service>`,
/// payload call ids separated by spaces. Every worker of the service
/// listens; the one holding a call stops it.
pub fn call_cancel(prefix: &str, service: &str) -> String {
    format!("{prefix}._cancel.{service}")
}

/// The subject on which `instance` serves `service.function` to the
/// transactions it owns: `<prefix>._inst.<instance>.<service>.<function>`.
pub fn instance_call(prefix: &str, instance: &str, service: &str, function: &str) -> String {
    format!("{prefix}.{INSTANCE_TOKEN}.{instance}.{service}.{function}")
}

/// Where a transaction owned by `instance` is ended:
/// `<prefix>._inst.<instance>._end`, payload the transaction id.
pub fn transaction_end(prefix: &str, instance: &str) -> String {
    format!("{prefix}.{INSTANCE_TOKEN}.{instance}._end")
}

/// Where a supervisor asks `instance` to drain: `<prefix>._control.<instance>`.
pub fn control(prefix: &str, instance: &str) -> String {
    format!("{prefix}._control.{instance}")
}

/// Where the supervisor publishes its decisions: `<prefix>._events`.
pub fn events(prefix: &str) -> String {
    format!("{prefix}._events")
}

/// Where `wharf down` asks the supervisor to stop: `<prefix>._supervisor.down`.
pub fn supervisor_down(prefix: &str) -> String {
    format!("{prefix}._supervisor.down")
}

/// Where `wharf up --reload` asks the supervisor to read its `wharf.toml`
/// again: `<prefix>._supervisor.reload`.
pub fn supervisor_reload(prefix: &str) -> String {
    format!("{prefix}._supervisor.reload")
}

/// Where a caller that found no worker of `service` announces demand (cold
/// start of a service scaled to zero): `<prefix>._demand.<service>`.
pub fn demand(prefix: &str, service: &str) -> String {
    format!("{prefix}._demand.{service}")
}

/// The wildcard a supervisor hears demand on: `<prefix>._demand.*`.
pub fn demand_any(prefix: &str) -> String {
    format!("{prefix}._demand.*")
}

/// The service a [`demand`] subject names.
pub fn demanded_service(subject: &str) -> Option<&str> {
    subject.rsplit('.').next().filter(|s| !s.is_empty())
}

/// The subject a durable call of `service.function` is published on:
/// `<prefix>.durable.<service>.<function>`.
pub fn durable_call(prefix: &str, service: &str, function: &str) -> String {
    format!("{prefix}.durable.{service}.{function}")
}

/// Where batches of durable calls of `service.function` are published:
/// `<prefix>.durable.<service>.<function>-batch` (no function name has a
/// `-`, so it is never another function's subject).
pub fn durable_batch_call(prefix: &str, service: &str, function: &str) -> String {
    format!("{prefix}.durable.{service}.{function}-batch")
}

/// The pull consumer through which workers take batches of `function`'s
/// durable calls: `<function>-batch`. Workers that take batches create it,
/// and a caller batches durable calls only once it exists.
pub fn durable_batch_consumer(function: &str) -> String {
    format!("{function}-batch")
}

/// The subjects of `service`'s durable calls: `<prefix>.durable.<service>.*`.
pub fn durable_calls(prefix: &str, service: &str) -> String {
    format!("{prefix}.durable.{service}.*")
}

/// The work-queue stream of `service`'s durable calls: `<prefix>_calls_<service>`.
pub fn calls_stream(prefix: &str, service: &str) -> String {
    format!("{}_calls_{service}", stream_token(prefix))
}

/// The pull consumer through which workers take `function`'s durable calls.
pub fn durable_consumer(function: &str) -> String {
    function.to_owned()
}

/// Where a given-up durable call of `service.function` is kept:
/// `<prefix>.dead.<service>.<function>`.
pub fn dead_letter(prefix: &str, service: &str, function: &str) -> String {
    format!("{prefix}.dead.{service}.{function}")
}

/// The subjects of the dead-letter stream: `<prefix>.dead.>`.
pub fn dead_letters(prefix: &str) -> String {
    format!("{prefix}.dead.>")
}

/// The dead-letter stream of a prefix: `<prefix>_dead_letters`.
pub fn dead_letter_stream(prefix: &str) -> String {
    format!("{}_dead_letters", stream_token(prefix))
}

/// The base of a client's durable replies, under its own inbox.
pub fn durable_replies(inbox: &str) -> String {
    format!("{inbox}.durable")
}

/// Every durable reply under `base` ([`durable_replies`]).
pub fn durable_replies_any(base: &str) -> String {
    format!("{base}.*")
}

/// The reply subject of durable call `id` under `base`.
pub fn durable_reply(base: &str, id: &str) -> String {
    concat(&[base, ".", id])
}

/// Where a worker sends the answers of a batch's durable calls, several to
/// a message, when the batch names reply base `base`: `<base>.~batch`
/// (`~` is never in a call id, so this is no call's own reply subject).
pub fn durable_batch_reply(base: &str) -> String {
    concat(&[base, ".", DURABLE_BATCH_REPLY])
}

/// The last token of [`durable_batch_reply`].
pub const DURABLE_BATCH_REPLY: &str = "~batch";

/// The call id a [`durable_reply`] subject names.
pub fn durable_reply_id(subject: &str) -> &str {
    subject.rsplit('.').next().unwrap_or("")
}

/// The subject of the object service's `verb`: `<prefix>.objects.<verb>`.
pub fn objects(prefix: &str, verb: &str) -> String {
    format!("{prefix}.objects.{verb}")
}

/// The KV key of part `part` of an object upload.
pub fn upload_part(upload: &str, part: u64) -> String {
    format!("_upload.{upload}.{part}")
}

/// ADR-32 discovery of every service: `$SRV.<verb>`.
pub fn discovery(verb: &str) -> String {
    format!("$SRV.{verb}")
}

/// ADR-32 discovery of one service: `$SRV.<verb>.<service>`.
pub fn discovery_of(verb: &str, service: &str) -> String {
    format!("$SRV.{verb}.{service}")
}

/// ADR-32 discovery of one instance: `$SRV.<verb>.<service>.<instance>`.
pub fn discovery_at(verb: &str, service: &str, instance: &str) -> String {
    format!("$SRV.{verb}.{service}.{instance}")
}

/// The subject a KV write of `key` goes to (`$KV.<bucket>.<key>`), for
/// writes that need headers `kv::Store` does not set.
pub fn kv_key(bucket: &str, key: &str) -> String {
    concat(&["$KV.", bucket, ".", key])
}

/// The subject of `key` in `service`'s results bucket:
/// `$KV.wharf_results_<service>.<key>`, made once per durable call.
pub fn result_key(service: &str, key: &str) -> String {
    concat(&["$KV.wharf_results_", service, ".", key])
}

/// `parts` joined, in one allocation of the exact size (`format!` guesses
/// the size and grows the string; these subjects are made once per call).
fn concat(parts: &[&str]) -> String {
    let mut joined = String::with_capacity(parts.iter().map(|part| part.len()).sum());
    for part in parts {
        joined.push_str(part);
    }
    joined
}

/// The stream under an Object Store bucket.
pub fn object_store_stream(bucket: &str) -> String {
    format!("OBJ_{bucket}")
}

/// The chunk subjects of one object in an Object Store bucket.
pub fn object_chunks(bucket: &str, object_nuid: &str) -> String {
    format!("$O.{bucket}.C.{object_nuid}")
}

/// The stream under a KV bucket: `KV_<bucket>`.
pub fn kv_stream(bucket: &str) -> String {
    format!("KV_{bucket}")
}

/// Every key of a KV bucket: `$KV.<bucket>.>`.
pub fn kv_keys(bucket: &str) -> String {
    format!("$KV.{bucket}.>")
}

/// Every subject of an Object Store bucket: `$O.<bucket>.>`.
pub fn object_store_subjects(bucket: &str) -> String {
    format!("$O.{bucket}.>")
}

/// The JetStream API's account information request: `$JS.API.INFO`.
pub const JS_API_INFO: &str = "$JS.API.INFO";

/// Flow-control replies of JetStream push consumers (KV watchers):
/// `$JS.FC.>`.
pub const JS_FLOW_CONTROL: &str = "$JS.FC.>";

/// A JetStream API request about `stream`: `$JS.API.<verb>.<stream>`, for
/// verbs such as `STREAM.INFO`, `STREAM.CREATE` or `CONSUMER.CREATE`
/// (`*` for any verb of one word after `CONSUMER.`).
pub fn js_api(verb: &str, stream: &str) -> String {
    format!("$JS.API.{verb}.{stream}")
}

/// Every JetStream API request under [`js_api`]`(verb, stream)`, its
/// consumers' names included: `$JS.API.<verb>.<stream>.>`.
pub fn js_api_any(verb: &str, stream: &str) -> String {
    format!("$JS.API.{verb}.{stream}.>")
}

/// A JetStream API request about one consumer of `stream`:
/// `$JS.API.<verb>.<stream>.*`.
pub fn js_api_consumer(verb: &str, stream: &str) -> String {
    format!("$JS.API.{verb}.{stream}.*")
}

/// A direct get from `stream`: `$JS.API.DIRECT.GET.<stream>`.
pub fn js_direct_get(stream: &str) -> String {
    js_api("DIRECT.GET", stream)
}

/// Acknowledgements of messages delivered from `stream`:
/// `$JS.ACK.<stream>.>`.
pub fn js_ack(stream: &str) -> String {
    format!("$JS.ACK.{stream}.>")
}

/// Every inbox under `inbox_prefix`: `<inbox_prefix>.>`.
pub fn inboxes(inbox_prefix: &str) -> String {
    format!("{inbox_prefix}.>")
}

/// The inbox prefix of the connections of NATS user `user`:
/// `_INBOX.<user>`, so that permissions can give each user its own inboxes
/// (and durable replies, which must go to an `_INBOX.`, still may).
pub fn user_inbox_prefix(user: &str) -> String {
    format!("{DEFAULT_INBOX_PREFIX}.{user}")
}

/// Whether `subject` is an inbox under `inbox_prefix`.
pub fn is_inbox(subject: &str, inbox_prefix: &str) -> bool {
    subject
        .strip_prefix(inbox_prefix)
        .is_some_and(|rest| rest.starts_with('.'))
}

/// Where a local-mode worker announces that it serves, once.
pub fn worker_ready(token: &str) -> String {
    format!("_WHARF.ready.{token}")
}

/// Whether `id` is usable as one subject token and one KV key: 1 to 128
/// bytes of `A-Z a-z 0-9 - _` (call ids, instance ids).
pub fn valid_id(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
}

/// Whether `id` is a well-formed transaction id: 1 to 64 characters of
/// `A-Z a-z 0-9 _ -` (one NATS subject token and one KV key).
pub fn valid_txn_id(id: &str) -> bool {
    id.len() <= 64 && valid_id(id.as_bytes())
}

/// The longest object URI wharf accepts.
pub const MAX_URI: usize = 1024;

/// The inbox prefix NATS clients use unless configured otherwise.
pub const DEFAULT_INBOX_PREFIX: &str = "_INBOX";

/// Whether `subject` may be where a durable call's reply goes: an inbox
/// (`_INBOX.…`, or `<inbox_prefix>.…` where the deployment configures one)
/// of printable tokens, so a request cannot make a worker publish onto any
/// other subject.
pub fn valid_reply(subject: &str, inbox_prefix: &str) -> bool {
    subject.len() <= 256
        && (is_inbox(subject, DEFAULT_INBOX_PREFIX) || is_inbox(subject, inbox_prefix))
        && subject.split('.').all(|token| {
            !token.is_empty()
                && token
                    .chars()
                    .all(|c| c.is_ascii_graphic() && c != '*' && c != '>')
        })
}

/// A value from a request as an error may show it: whole when short, its
/// start and length when long.
pub fn shown(value: &str) -> String {
    const SHOWN: usize = 64;
    if value.chars().count() <= SHOWN {
        value.to_owned()
    } else {
        let start: String = value.chars().take(SHOWN).collect();
        format!("{start}… ({} characters)", value.chars().count())
    }
}

/// Whether `prefix` can start every subject: dot-separated tokens of
/// printable characters without spaces or wildcards.
pub fn valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.split('.').all(|token| {
            !token.is_empty()
                && token
                    .chars()
                    .all(|c| c.is_ascii_graphic() && c != '*' && c != '>')
        })
}

/// A subject prefix as one stream-name token.
fn stream_token(prefix: &str) -> String {
    prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_key_is_the_key_in_its_services_results_bucket() {
        assert_eq!(
            result_key("shop", "c-1"),
            kv_key(&results_bucket("shop"), "c-1")
        );
        assert_eq!(result_key("shop", "c-1"), "$KV.wharf_results_shop.c-1");
        assert_eq!(
            durable_reply("_INBOX.a.durable", "c-1"),
            "_INBOX.a.durable.c-1"
        );
        assert_eq!(
            durable_batch_reply("_INBOX.a.durable"),
            "_INBOX.a.durable.~batch"
        );
    }

    #[test]
    fn signature_subjects_read_as_the_function_and_its_signature() {
        let signed = signed_call("wharf", "math", "add", 0xab);
        assert_eq!(signed, "wharf._sig.math.add.00000000000000ab");
        assert_eq!(
            readable(&signed),
            "wharf.math.add, signature 00000000000000ab"
        );
        assert_eq!(readable("wharf.math.add"), "wharf.math.add");
    }

    #[test]
    fn names() {
        assert_eq!(call("wharf", "math", "add"), "wharf.math.add");
        assert_eq!(calls_stream("wharf", "math"), "wharf_calls_math");
        assert_eq!(calls_stream("a.b", "math"), "a_b_calls_math");
        assert_eq!(
            durable_call("wharf", "math", "add"),
            "wharf.durable.math.add"
        );
        assert_eq!(dead_letter_stream("wharf"), "wharf_dead_letters");
        assert_eq!(
            instance_call("w", "i1", "math", "add"),
            "w._inst.i1.math.add"
        );
        assert_eq!(demanded_service(&demand("w", "math")), Some("math"));
        assert_eq!(
            durable_reply_id(&durable_reply("_INBOX.x.durable", "id7")),
            "id7"
        );
    }

    #[test]
    fn ids_and_prefixes() {
        assert!(valid_id(b"AbC123_-x"));
        assert!(!valid_id(b""));
        assert!(!valid_id(b"a.b"));
        assert!(!valid_id(b"a b"));
        assert!(valid_txn_id("abcXYZ019_-"));
        assert!(!valid_txn_id("*"));
        assert!(!valid_txn_id(&"a".repeat(65)));
        assert!(valid_prefix("wharf"));
        assert!(valid_prefix("team.a"));
        assert!(!valid_prefix("a..b"));
        assert!(!valid_prefix("a b"));
        assert!(!valid_prefix("a.*"));
        assert!(!valid_prefix(""));
        assert!(valid_reply("_INBOX.abc.durable.id1", "_INBOX"));
        assert!(valid_reply("_team.abc.durable.id1", "_team"));
        assert!(!valid_reply("_teamx.abc", "_team"));
        assert!(!valid_reply("wharf._supervisor.down", "_INBOX"));
        assert!(!valid_reply("_INBOX.a b", "_INBOX"));
        assert!(!valid_reply("_INBOX.>", "_INBOX"));
        assert!(!valid_reply(
            &format!("_INBOX.{}", "a".repeat(300)),
            "_INBOX"
        ));
        assert_eq!(shown("short"), "short");
        assert!(shown(&"k".repeat(5000)).ends_with("(5000 characters)"));
    }
}
