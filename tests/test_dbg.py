import pytest_twisted
from tests.harness import base_config, token
from tests.wsclient import connect

@pytest_twisted.ensureDeferred
async def test_dbg(tmp_path, agentd, logged):
    gateway = agentd(base_config(tmp_path))
    client = await connect(gateway.ws_url(token=token()))
    await client.recv()
    client.send({"type": "prompt", "id": "warm", "text": "warm up"})
    print(await client.recv_until("done"))
    client.send({"type": "prompt", "id": "t1", "text": "x", "options": {"repeat": 5, "delta_bytes": 100}})
    try:
        print(await client.recv_until("done"))
    finally:
        from twisted.logger import formatEvent
        for e in logged:
            if e.get("log_namespace","").startswith("agentd") : print("LOG", formatEvent(e)[:300])
