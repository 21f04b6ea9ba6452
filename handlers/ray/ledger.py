"""What the ingresses must know after a replica dies, kept in the GCS's key-value store: Ray's own store,
which outlives any replica, and which every ingress of the application reads.

- Which requests a replica has started generating. A replica writes its batch's request ids before it
  generates and deletes them after; when a replica dies, the ingress resends a request only if the store
  has no entry for it, since only then did it surely not run. The marker a replica streams
  ("generating") cannot say this: a replica can start a batch and die before the marker reaches the
  ingress (measured: 100 ms after a batch started, none had arrived).
- Which requests were being generated when their replica died (by fingerprint: their content, without
  the seed the ingress chose), so that any ingress refuses them at once: a query of death would stop
  every replica it is sent to. One entry per request a dead replica held; replicas rarely die.

One GCS write per request before its batch, and one delete after it.
"""

from ray.experimental import internal_kv

STARTED = "diffusers-started"
SUSPECTS = "diffusers-suspects"


def mark_started(request_ids: list[str]) -> None:
    for request_id in request_ids:
        internal_kv._internal_kv_put(request_id, b"1", namespace=STARTED)


def forget(request_ids: list[str]) -> None:
    for request_id in request_ids:
        internal_kv._internal_kv_del(request_id, namespace=STARTED)


def was_started(request_id: str) -> bool:
    return bool(internal_kv._internal_kv_exists(request_id, namespace=STARTED))


def add_suspect(fingerprint: str) -> None:
    internal_kv._internal_kv_put(fingerprint, b"1", namespace=SUSPECTS)


def is_suspect(fingerprint: str) -> bool:
    return bool(internal_kv._internal_kv_exists(fingerprint, namespace=SUSPECTS))
