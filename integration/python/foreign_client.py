"""A foreign client of wharf, written from docs/protocol.md alone.

Usage: python3 foreign_client.py <nats-url>
Discovers the `itest` service, calls it with JSON and with a hand-written
postcard request, and prints one JSON line of what it saw.
"""

import asyncio
import json
import sys

import nats


async def main(url: str) -> None:
    nc = await nats.connect(url)
    json_headers = {"Content-Type": "application/json"}

    info = json.loads((await nc.request("$SRV.INFO.itest", b"", timeout=30)).data)
    endpoints = {e["name"]: e for e in info["endpoints"]}

    by_name = await nc.request("wharf.itest.add", b'{"a": 2, "b": 40}', timeout=30, headers=json_headers)
    by_position = await nc.request("wharf.itest.add", b"[1, 2]", timeout=30, headers=json_headers)
    app_error = await nc.request("wharf.itest.take", b'{"count": 99}', timeout=30, headers=json_headers)
    bad_request = await nc.request("wharf.itest.add", b'{"a": "x"}', timeout=30, headers=json_headers)
    mismatch = await nc.request(
        "wharf.itest.add", b"[1, 2]", timeout=30,
        headers={**json_headers, "Wharf-Sig": "0000000000000001"},
    )
    # postcard: the six-byte empty envelope, then zigzag varints 2 and 3.
    postcard = await nc.request("wharf.itest.add", bytes([1, 0, 0, 0, 0, 0, 4, 6]), timeout=30)

    # A durable call: published into the service's work queue, answered on
    # the Wharf-Reply subject, its result also kept in KV wharf_results_itest (one bucket per service).
    js = nc.jetstream()
    inbox = nc.new_inbox()
    replies = await nc.subscribe(inbox)
    call_id = "py-durable-1"
    await js.publish(
        "wharf.durable.itest.add", b"[20, 22]",
        headers={**json_headers, "Wharf-Call-Id": call_id, "Wharf-Reply": inbox,
                 "Nats-Msg-Id": call_id},
    )
    durable = json.loads((await replies.next_msg(timeout=30)).data)
    stored = await (await js.key_value("wharf_results_itest")).get(call_id)
    # code (2 bytes, big endian), codec (1 byte, 1 = JSON), then the body.
    stored_code = int.from_bytes(stored.value[:2], "big")
    stored_body = json.loads(stored.value[3:])

    # A transaction: open its lease, make the first call through the queue
    # group, then follow Wharf-Txn-Owner to the owner's own subject; end it.
    txn = "py-txn-1"
    await js.publish(
        "$KV.wharf_txn." + txn, json.dumps({"owner": None, "lease_s": 30}).encode(),
        headers={"Nats-Expected-Last-Subject-Sequence": "0", "Nats-TTL": "30s"},
    )
    txn_headers = {**json_headers, "Wharf-Txn": txn}
    first = await nc.request("wharf.itest.accumulate", b'{"by": 5, "ms": 0}', timeout=30, headers=txn_headers)
    owner = first.headers["Wharf-Txn-Owner"]
    totals = [json.loads(first.data)[0]]
    for by in (6, 7):
        later = await nc.request(
            "wharf._inst." + owner + ".itest.accumulate",
            json.dumps({"by": by, "ms": 0}).encode(), timeout=30, headers=txn_headers,
        )
        totals.append(json.loads(later.data)[0])
    lease = json.loads((await (await js.key_value("wharf_txn")).get(txn)).value)
    await nc.request("wharf._inst." + owner + "._end", txn.encode(), timeout=30)
    after_end = await nc.request("wharf.itest.accumulate", b'{"by": 1, "ms": 0}', timeout=30, headers=txn_headers)

    # Objects: one put, then a put in parts; a Rust microservice reads both
    # by reference, and the service reads a range back.
    small = bytes((i * 7) % 256 for i in range(100_000))
    small_ref = json.loads((await nc.request("wharf.objects.put", small, timeout=30)).data)
    parts = [bytes((i * 13 + p) % 256 for i in range(600_000)) for p in range(3)]
    upload = "py-upload-1"
    for n, part in enumerate(parts):
        await nc.request("wharf.objects.put", part, timeout=30,
                         headers={"Wharf-Upload": upload, "Wharf-Part": str(n)})
    big_ref = json.loads((await nc.request(
        "wharf.objects.put", b"", timeout=30,
        headers={"Wharf-Upload": upload, "Wharf-Parts": str(len(parts))})).data)
    whole = b"".join(parts)
    read_by_rust = []
    for ref in (small_ref, big_ref):
        reply = await nc.request("wharf.itest.blob_stats", json.dumps({"blob": ref}).encode(),
                                 timeout=30, headers=json_headers)
        read_by_rust.append(json.loads(reply.data))
    ranged = await nc.request("wharf.objects.get", json.dumps(
        {"uri": big_ref["uri"], "offset": 600_000, "length": 1000}).encode(), timeout=30)
    missing = await nc.request("wharf.objects.get", json.dumps(
        {"uri": "wharf://jetstream/wharf_objects/nope"}).encode(), timeout=30)
    elsewhere = await nc.request("wharf.objects.get", json.dumps(
        {"uri": "file:///etc/hostname"}).encode(), timeout=30)

    def failure(msg):
        headers = msg.headers or {}
        return {
            "code": headers.get("Nats-Service-Error-Code"),
            "body": json.loads(msg.data),
        }

    # A streamed result: items on our inbox, two at a time (the credit),
    # granted again on the subject the first item names; the reply without
    # Wharf-Stream-Item ends the stream with the number of items sent.
    stream_inbox = nc.new_inbox()
    stream_sub = await nc.subscribe(stream_inbox)
    await nc.publish(
        "wharf.itest.countdown", b'{"from": 5, "fail_at": null}', reply=stream_inbox,
        headers={**json_headers, "Wharf-Stream-Credit": "2"},
    )
    stream_items, granted, credit_to = [], 2, None
    while True:
        msg = await stream_sub.next_msg(timeout=30)
        index = (msg.headers or {}).get("Wharf-Stream-Item")
        if index is None:
            stream_end = json.loads(msg.data)
            break
        if int(index) != len(stream_items):
            raise RuntimeError(f"stream item {index} came out of order")
        if index == "0":
            credit_to = msg.headers["Wharf-Stream-Credit-To"]
        stream_items.append(json.loads(msg.data))
        if len(stream_items) == granted:
            granted += 2
            await nc.publish(credit_to, str(granted).encode())

    print(json.dumps({
        "stream_items": stream_items,
        "stream_end": stream_end,
        "endpoints": sorted(endpoints),
        "add_sig": endpoints["add"]["metadata"]["wharf.sig"],
        "add_args": endpoints["add"]["metadata"]["wharf.args"],
        "by_name": json.loads(by_name.data),
        "by_position": json.loads(by_position.data),
        "app_error": failure(app_error),
        "bad_request": failure(bad_request),
        "mismatch": failure(mismatch),
        "postcard": list(postcard.data),
        "durable": durable,
        "durable_stored": [stored_code, stored.value[2], stored_body],
        "txn_totals": totals,
        "txn_lease": lease,
        "txn_owner": owner,
        "txn_after_end": failure(after_end),
        "objects_read_by_rust": read_by_rust,
        "objects_expected": [[len(small), sum(small)], [len(whole), sum(whole)]],
        "objects_big_ref": big_ref,
        "objects_range_ok": ranged.data == whole[600_000:601_000],
        "objects_missing": failure(missing),
        "objects_elsewhere": failure(elsewhere),
    }))
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
