"""A client of ordo in Python, with nats-py: receive stock, place an order under a command id (so
that sending it again is safe), send it again, and read the order back from the read API once
the view holds the order's event. Prints one JSON line of what it saw.

    pip install nats-py
    NATS_URL=nats://127.0.0.1:4222 ORDO_API=http://127.0.0.1:8080 python3 ordo_client.py

NATS_URL names the NATS server (with `ordo up`'s own: `nats --context ordo context info` shows
it); ORDO_API the read API, ORDO_HTTP_TOKEN its token when it asks for one. The JSON Schemas of
every request and reply are in contracts/ (and in `nats micro info ordo`).
"""

import asyncio
import json
import os
import urllib.error
import urllib.request
import uuid

import nats


async def command(nc, subject, body, command_id=None):
    """Sends one command and returns its reply. With a command id (the Nats-Msg-Id header), a
    command sent again returns the first outcome and appends nothing."""
    headers = {"Nats-Msg-Id": command_id} if command_id else None
    message = await nc.request(subject, json.dumps(body).encode(), timeout=10, headers=headers)
    return json.loads(message.data)


def read(path):
    """GETs a path of the read API; returns the status and the JSON body."""
    request = urllib.request.Request(os.environ.get("ORDO_API", "http://127.0.0.1:8080") + path)
    token = os.environ.get("ORDO_HTTP_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        body = error.read()
        try:
            return error.code, json.loads(body)
        except ValueError:
            return error.code, {"error": {"code": "not_json", "message": body.decode(errors="replace")}}


async def main():
    nc = await nats.connect(os.environ.get("NATS_URL", "nats://127.0.0.1:4222"))
    try:
        run = uuid.uuid4().hex[:8]
        sku, order_id = f"py-{run}", f"py-order-{run}"

        received = await command(nc, "ordo.cmd.stock.receive", {"sku": sku, "qty": 5})
        assert received["ok"], received

        order = {
            "order_id": order_id,
            "customer_id": "py-customer",
            "lines": [{"sku": sku, "qty": 2, "unit_price_cents": 500}],
        }
        placed = await command(nc, "ordo.cmd.order.place", order, command_id=f"place-{run}")
        assert placed["ok"], placed
        # The same command id again (as after a lost reply): the same outcome, nothing appended.
        again = await command(nc, "ordo.cmd.order.place", order, command_id=f"place-{run}")
        assert again == placed, (again, placed)

        # A refusal names its code and says why.
        refused = await command(nc, "ordo.cmd.order.ship", {"order_id": "no.such"})
        assert not refused["ok"] and refused["error"]["code"] == "invalid_command", refused

        # Read our own write: the read waits until the view holds the event's sequence.
        status, view = read(f"/orders/{order_id}?min_seq={placed['seq']}")
        assert status == 200, (status, view)
        print(json.dumps({
            "order_id": view["order_id"],
            "total_cents": view["total_cents"],
            "seq": placed["seq"],
            "repeat_was_the_same": again == placed,
            "refusal": refused["error"]["code"],
        }))
    finally:
        await nc.close()


if __name__ == "__main__":
    asyncio.run(main())
