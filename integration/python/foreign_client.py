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

    info = json.loads((await nc.request("$SRV.INFO.itest", b"", timeout=5)).data)
    endpoints = {e["name"]: e for e in info["endpoints"]}

    by_name = await nc.request("wharf.itest.add", b'{"a": 2, "b": 40}', timeout=5, headers=json_headers)
    by_position = await nc.request("wharf.itest.add", b"[1, 2]", timeout=5, headers=json_headers)
    app_error = await nc.request("wharf.itest.take", b'{"count": 99}', timeout=5, headers=json_headers)
    bad_request = await nc.request("wharf.itest.add", b'{"a": "x"}', timeout=5, headers=json_headers)
    mismatch = await nc.request(
        "wharf.itest.add", b"[1, 2]", timeout=5,
        headers={**json_headers, "Wharf-Sig": "0000000000000001"},
    )
    # postcard: the six-byte empty envelope, then zigzag varints 2 and 3.
    postcard = await nc.request("wharf.itest.add", bytes([1, 0, 0, 0, 0, 0, 4, 6]), timeout=5)

    # A durable call: published into the service's work queue, answered on
    # the Wharf-Reply subject, its result also kept in KV wharf_results.
    js = nc.jetstream()
    inbox = nc.new_inbox()
    replies = await nc.subscribe(inbox)
    call_id = "py-durable-1"
    await js.publish(
        "wharf.durable.itest.add", b"[20, 22]",
        headers={**json_headers, "Wharf-Call-Id": call_id, "Wharf-Reply": inbox,
                 "Nats-Msg-Id": call_id},
    )
    durable = json.loads((await replies.next_msg(timeout=10)).data)
    stored = await (await js.key_value("wharf_results")).get(call_id)
    # code (2 bytes, big endian), codec (1 byte, 1 = JSON), then the body.
    stored_code = int.from_bytes(stored.value[:2], "big")
    stored_body = json.loads(stored.value[3:])

    def failure(msg):
        headers = msg.headers or {}
        return {
            "code": headers.get("Nats-Service-Error-Code"),
            "body": json.loads(msg.data),
        }

    print(json.dumps({
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
    }))
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
