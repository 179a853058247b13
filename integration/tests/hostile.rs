//! Hostile input, as a property: 100,000 random and mutated requests
//! (payloads, envelopes, JSON, headers, object locators, durable calls)
//! sent to a real worker process and a real objects-service process. Every
//! request is answered, no process dies or loses its connection, and memory
//! stays bounded. The generator is seeded, so a failure names the seed that
//! reproduces it (`WHARF_HOSTILE_SEED`).

use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;
use std::time::Duration;
use wharf::testing::{eventually, NatsServer};
use wharf_integration::{alive, spawn_svc, spawn_worker, wait_for_workers};

/// Requests in all.
const REQUESTS: usize = 100_000;

/// Durable calls, published straight into the work queue.
const DURABLE: usize = 5_000;

/// Requests in flight at once.
const IN_FLIGHT: usize = 256;

/// A small, fast, seeded generator (xorshift64*): the inputs of a failing
/// run can be made again.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn bytes(&mut self, max: u64) -> Vec<u8> {
        let len = self.below(max + 1);
        (0..len).map(|_| self.next() as u8).collect()
    }

    /// Text of mostly printable characters, sometimes anything.
    fn text(&mut self, max: u64) -> String {
        let len = self.below(max + 1);
        (0..len)
            .map(|_| match self.below(10) {
                0 => char::from_u32(self.below(0x3000) as u32).unwrap_or('?'),
                1 => ['.', '*', '>', ' ', '/', '\\', '"', '\n'][self.below(8) as usize],
                _ => (b'a' + self.below(26) as u8) as char,
            })
            .collect()
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// Functions that answer at once whatever they are sent (none sleeps,
/// hangs, burns CPU or kills its worker).
const FUNCTIONS: &[&str] = &[
    "add",
    "whoami",
    "take",
    "byte_sum",
    "my_deadline",
    // Stateful: transaction ids from the envelope and `Wharf-Txn`.
    "accumulate",
    // An object reference as an argument.
    "blob_stats",
];

/// The codes docs/protocol.md gives error replies.
const CODES: &[u16] = &[400, 404, 409, 410, 422, 500, 503, 504];

const OBJECT_VERBS: &[&str] = &["get", "stat", "delete", "put"];

/// A valid postcard request to `add`, to mutate.
fn valid_add() -> Vec<u8> {
    let envelope = wharf::wire::envelope::Envelope {
        version: wharf::wire::envelope::ENVELOPE_VERSION,
        sig: 0,
        deadline_ms: 0,
        call_id: b"hostile",
        attempt: 1,
        flags: 0,
    };
    let mut bytes = postcard::to_allocvec(&envelope).unwrap();
    bytes.extend(postcard::to_allocvec(&(2i64, 3i64)).unwrap());
    bytes
}

/// One hostile request: subject, headers, payload.
fn request(rng: &mut Rng) -> (String, Option<HeaderMap>, Bytes) {
    let header_names = [
        "Content-Type",
        "Wharf-Sig",
        "Wharf-Deadline",
        "Wharf-Call-Id",
        "Wharf-Attempt",
        "Wharf-Txn",
        "Wharf-Report",
        "Wharf-Spill",
        "Wharf-Spill-Digest",
        "Wharf-Object-Ttl",
        "Wharf-Object-Type",
        "Wharf-Upload",
        "Wharf-Part",
    ];
    let header_values = |rng: &mut Rng| -> String {
        match rng.below(6) {
            0 => "application/json".to_owned(),
            1 => "application/postcard".to_owned(),
            2 => format!("wharf://jetstream/wharf_objects/{}", rng.text(40)),
            3 => "k".repeat(rng.below(6_000) as usize),
            4 => rng.below(u64::MAX).to_string(),
            _ => rng.text(60),
        }
    };
    let mut headers = None;
    if rng.below(2) == 0 {
        let mut map = HeaderMap::new();
        for _ in 0..rng.below(4) {
            let value = header_values(rng);
            // Header values are one line of visible text on the wire.
            let value: String = value.chars().filter(|c| !c.is_control()).collect();
            map.insert(*rng.pick(&header_names), value.as_str());
        }
        headers = Some(map);
    }
    if rng.below(4) == 0 {
        let verb = rng.pick(OBJECT_VERBS);
        let body = match rng.below(4) {
            0 => serde_json::json!({ "uri": rng.text(80) }).to_string().into_bytes(),
            1 => serde_json::json!({
                "uri": format!("wharf://jetstream/{}/{}", rng.pick(&["wharf_objects", "wharf_blobs", "x"]), rng.text(30)),
                "offset": rng.next(),
                "length": rng.next(),
                "digest": rng.text(20),
            })
            .to_string()
            .into_bytes(),
            2 => serde_json::json!({ "uri": "k".repeat(rng.below(6_000) as usize) })
                .to_string()
                .into_bytes(),
            _ => rng.bytes(200),
        };
        return (format!("wharf.objects.{verb}"), headers, body.into());
    }
    if rng.below(8) == 0 {
        return (batch_subject(), None, batch(rng));
    }
    let function = rng.pick(FUNCTIONS);
    let payload = match rng.below(5) {
        0 => rng.bytes(300),
        1 => {
            let mut valid = valid_add();
            for _ in 0..=rng.below(3) {
                let at = rng.below(valid.len() as u64) as usize;
                valid[at] ^= 1 << rng.below(8);
            }
            valid
        }
        2 => {
            let mut valid = valid_add();
            valid.truncate(rng.below(valid.len() as u64) as usize);
            valid
        }
        3 => serde_json::json!({ "a": rng.next(), "b": rng.text(10), "data": rng.bytes(50) })
            .to_string()
            .into_bytes(),
        _ => rng.text(100).into_bytes(),
    };
    (format!("wharf.itest.{function}"), headers, payload.into())
}

/// Where batches of calls of `add` go (docs/protocol.md, "Coalesced calls").
fn batch_subject() -> String {
    wharf::wire::subjects::batch_call("wharf", "itest", "add", wharf_integration::add::SPEC.sig)
}

/// A batch of valid, mutated and random requests, its framing sometimes
/// mutated too.
fn batch(rng: &mut Rng) -> Bytes {
    let requests: Vec<Bytes> = (0..rng.below(40))
        .map(|_| match rng.below(3) {
            0 => valid_add(),
            1 => {
                let mut valid = valid_add();
                let at = rng.below(valid.len() as u64) as usize;
                valid[at] ^= 1 << rng.below(8);
                valid
            }
            _ => rng.bytes(40),
        })
        .map(Bytes::from)
        .collect();
    let mut out = wharf::wire::batch::encode_requests(requests.iter()).to_vec();
    match rng.below(4) {
        0 => {
            let at = rng.below(out.len() as u64) as usize;
            out[at] ^= 1 << rng.below(8);
        }
        1 => out.truncate(rng.below(out.len() as u64 + 1) as usize),
        _ => {}
    }
    out.into()
}

#[tokio::test]
async fn random_and_mutated_requests_are_all_answered_and_nothing_dies() {
    let server = NatsServer::start().unwrap();
    let url = server.url();
    let client = wharf::Client::connect(&url).await.unwrap();
    let worker = spawn_worker(&url);
    let objects = spawn_svc(&["objects"], &[("NATS_URL", url.as_str())]);
    wait_for_workers(&client, 1).await;
    eventually(
        "the objects service to answer",
        Duration::from_secs(30),
        || {
            let nats = client.nats().clone();
            async move {
                nats.request("wharf.objects.stat", "{}".into())
                    .await
                    .map_err(|e| e.to_string())
            }
        },
    )
    .await;
    let connections = server.connections().unwrap();
    let rss_before = wharf::testing::rss_kib(worker.pid()) + wharf::testing::rss_kib(objects.pid());

    let seed: u64 = std::env::var("WHARF_HOSTILE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64 | 1)
        });
    let mut rng = Rng(seed);
    let requests: Vec<_> = (0..REQUESTS).map(|_| request(&mut rng)).collect();
    let nats = client.nats().clone();
    let answers = futures_util::stream::iter(requests)
        .map(|(subject, headers, payload)| {
            let nats = nats.clone();
            async move {
                let mut request = async_nats::Request::new()
                    .payload(payload)
                    .timeout(Some(Duration::from_secs(30)));
                if let Some(headers) = headers {
                    request = request.headers(headers);
                }
                let answer = nats.send_request(subject.clone(), request).await;
                (subject, answer)
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<_>>()
        .await;
    let mut unanswered = Vec::new();
    let mut by_code = std::collections::BTreeMap::<u16, usize>::new();
    let mut batches = 0;
    for (subject, answer) in answers {
        match answer {
            Ok(message) => {
                let code = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Nats-Service-Error-Code"))
                    .and_then(|v| v.as_str().parse().ok())
                    .unwrap_or(200);
                assert!(
                    code == 200 || CODES.contains(&code),
                    "seed {seed}: {subject} was answered {code}, a code the protocol does not give"
                );
                // Nothing a request says makes a worker or the store
                // unavailable: bad input is the caller's error.
                assert_ne!(
                    code,
                    503,
                    "seed {seed}: {subject} was answered 503: {:?}",
                    String::from_utf8_lossy(&message.payload)
                );
                if subject.ends_with("-batch") && message.headers.is_none() {
                    // A batch answered call by call: the answers decode.
                    if let Err(e) = wharf::wire::batch::decode_answers(&message.payload) {
                        panic!("seed {seed}: a batch reply does not decode: {e}");
                    }
                    batches += 1;
                }
                *by_code.entry(code).or_default() += 1;
            }
            Err(e) => unanswered.push(format!("{subject}: {e}")),
        }
    }
    wharf_integration::report!(
        "REPORT hostile seed={seed} requests={REQUESTS} answers by code {by_code:?}, {batches} batches answered call by call"
    );
    assert!(
        unanswered.is_empty(),
        "seed {seed}: {} of {REQUESTS} requests got no answer, e.g. {:?}",
        unanswered.len(),
        &unanswered[..unanswered.len().min(5)]
    );

    // Durable calls too: random payloads and headers, replies named
    // anywhere. Each is run or dead-lettered, none is published outside an
    // inbox, and the work queue empties.
    let js = async_nats::jetstream::new(nats.clone());
    let mut victim = nats.subscribe("victim.>").await.unwrap();
    for i in 0..DURABLE {
        let (_, headers, payload) = request(&mut rng);
        let mut headers = headers.unwrap_or_default();
        headers.insert("Wharf-Call-Id", format!("hostile-{seed}-{i}").as_str());
        let reply = match rng.below(3) {
            0 => format!("victim.{i}"),
            1 => format!("_INBOX.hostile.{i}"),
            _ => rng.text(20).chars().filter(|c| !c.is_control()).collect(),
        };
        headers.insert("Wharf-Reply", reply.as_str());
        let function = rng.pick(FUNCTIONS);
        js.publish_with_headers(format!("wharf.durable.itest.{function}"), headers, payload)
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let queue = js.get_stream("wharf_calls_itest").await.unwrap();
    eventually(
        "every durable call to be run or dead-lettered",
        Duration::from_secs(120),
        || {
            let mut queue = queue.clone();
            async move {
                let left = queue
                    .info()
                    .await
                    .map_err(|e| e.to_string())?
                    .state
                    .messages;
                if left == 0 {
                    Ok(())
                } else {
                    Err(format!("{left} left in the work queue"))
                }
            }
        },
    )
    .await;
    nats.flush().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(200), victim.next())
            .await
            .is_err(),
        "seed {seed}: a worker published a reply outside an inbox"
    );

    assert!(alive(worker.pid()), "seed {seed}: the worker died");
    assert!(
        alive(objects.pid()),
        "seed {seed}: the objects service died"
    );
    assert_eq!(
        server.connections().unwrap(),
        connections,
        "seed {seed}: a process lost its connection"
    );
    // Both still serve.
    assert_eq!(
        wharf_integration::add::call(&client, 2, 3).await.unwrap(),
        5
    );
    let rss_after = wharf::testing::rss_kib(worker.pid()) + wharf::testing::rss_kib(objects.pid());
    assert!(
        rss_after < rss_before + 128 * 1024,
        "seed {seed}: memory grew from {rss_before} KiB to {rss_after} KiB"
    );
}

#[tokio::test]
async fn durable_replies_go_to_a_configured_inbox_prefix_and_nowhere_else() {
    let server = NatsServer::start().unwrap();
    let url = server.url();
    let client = wharf::Client::connect(&url).await.unwrap();
    let _worker = wharf_integration::spawn_worker_with(&url, &[("WHARF_INBOX_PREFIX", "_team")]);
    wait_for_workers(&client, 1).await;
    let nats = client.nats();
    let js = async_nats::jetstream::new(nats.clone());
    let mut team = nats.subscribe("_team.me.>").await.unwrap();
    let mut elsewhere = nats.subscribe("elsewhere.>").await.unwrap();
    nats.flush().await.unwrap();
    for (id, reply) in [
        ("inbox-1", "_team.me.reply"),
        ("inbox-2", "elsewhere.reply"),
    ] {
        let mut headers = HeaderMap::new();
        headers.insert("Content-Type", "application/json");
        headers.insert("Wharf-Call-Id", id);
        headers.insert("Wharf-Reply", reply);
        js.publish_with_headers("wharf.durable.itest.add", headers, "[2, 3]".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let answered = tokio::time::timeout(Duration::from_secs(30), team.next())
        .await
        .expect("a reply on the configured inbox")
        .unwrap();
    assert_eq!(&answered.payload[..], b"5");
    // The other was dead-lettered: its result says so, and nothing went out.
    let results = js.get_key_value("wharf_results_itest").await.unwrap();
    eventually(
        "the dead letter of inbox-2",
        Duration::from_secs(30),
        || {
            let results = results.clone();
            async move {
                match results.get("inbox-2").await {
                    Ok(Some(record)) => Ok(record),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await;
    nats.flush().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(200), elsewhere.next())
            .await
            .is_err(),
        "the worker published outside an inbox"
    );
}
