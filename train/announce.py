"""Tell a running daemon about a new checkpoint over MQTT (`<prefix>/checkpoints`).

Uses the [mqtt] section of config.toml (host, port, prefix, username, password, tls). A broker
that cannot be reached costs one warning, never the training run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from pathlib import Path

from model.checkpoint import CheckpointMeta

log = logging.getLogger(__name__)

TIMEOUT_S = 5.0


def announce_checkpoint(mqtt: dict, path: Path, meta: CheckpointMeta) -> bool:
    """Publish {"path", "model_id", "step", "val_loss"} on <prefix>/checkpoints. True if sent."""
    payload = json.dumps({"path": str(Path(path).resolve()), "model_id": meta.model_id,
                          "step": meta.step, "val_loss": meta.val_loss})
    topic = f"{mqtt.get('prefix', 'rwkv-music')}/checkpoints"
    try:
        asyncio.run(asyncio.wait_for(_publish(mqtt, topic, payload), TIMEOUT_S))
        return True
    except Exception as err:  # noqa: BLE001 - any broker problem is only worth a warning here
        log.warning("could not announce the checkpoint on MQTT %s:%s (%s)",
                    mqtt.get("host", "127.0.0.1"), mqtt.get("port", 1883), err)
        return False


async def _publish(mqtt: dict, topic: str, payload: str) -> None:
    import aiomqtt

    tls = None
    if mqtt.get("tls"):
        tls = ssl.create_default_context(cafile=mqtt.get("ca_file") or None)
    async with aiomqtt.Client(
        hostname=mqtt.get("host", "127.0.0.1"), port=int(mqtt.get("port", 1883)),
        username=mqtt.get("username") or None, password=mqtt.get("password") or None,
        tls_context=tls, identifier=None,
    ) as client:
        await client.publish(topic, payload, qos=1)
