"""Send webhook deliveries: a thread in every worker claims due (event, hook) rows one at a time under a
lease, POSTs the signed event, and records the answer; failures come back with exponential back-off.

Only one sender holds a delivery at a time (``FOR UPDATE SKIP LOCKED`` on Postgres, and a guarded
UPDATE of the lease on every backend), and a delivered row is never sent again, so a receiver gets each
event id once per hook unless a worker dies between the receiver's 2xx and our commit; receivers should
still treat ``Tuneserve-Event-Id`` as an idempotency key.
"""

import ipaddress
import logging
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlsplit

import httpx
from sqlalchemy import delete, or_, select, update

from shared.config import Settings, get_settings
from shared.db import changed, session_scope
from shared.orm import Webhook, WebhookDelivery, WebhookEvent, utcnow
from shared.webhooks import EVENT_ID_HEADER, SIGNATURE_HEADER, DeliveryStatus, sign

log = logging.getLogger(__name__)

# Enough of a receiver's answer to free the connection; the rest is never read (a hostile receiver
# cannot make a worker hold a large body).
RESPONSE_READ_BYTES = 64 * 1024
ERROR_CHARS = 500
SENDERS = 4  # deliveries in flight per worker: one slow receiver does not hold up every other hook
PRUNE_SECONDS = 3600.0


@dataclass(frozen=True)
class Claimed:
    id: int
    lease: str
    attempts: int
    url: str
    secret: str
    event_id: str
    body: str


class Refused(Exception):
    """The URL resolves to an address deliveries may not go to."""


def backoff_seconds(*, attempts: int, settings: Settings) -> float:
    """Wait after the ``attempts``-th failure: doubling from WEBHOOK_BACKOFF_SECONDS, capped, with jitter
    (half to all of it) so receivers that come back are not hit by every retry at once."""
    delay = min(settings.webhook_backoff_max_seconds, settings.webhook_backoff_seconds * 2 ** (attempts - 1))
    return float(delay * random.uniform(0.5, 1.0))


def lease_seconds(settings: Settings) -> float:
    # Longer than any one send: connect, write and read each get the timeout.
    return 4 * settings.webhook_timeout_seconds + 30


def claim(*, settings: Settings) -> Claimed | None:
    """Take the most overdue pending delivery no other sender holds, or None."""
    now = utcnow()
    due = (WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now,
           or_(WebhookDelivery.lease_until.is_(None), WebhookDelivery.lease_until < now))
    lease = str(uuid.uuid4())
    with session_scope() as session:
        query = select(WebhookDelivery.id).where(*due).order_by(WebhookDelivery.next_attempt_at).limit(1)
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        delivery_id = session.scalar(query)
        if delivery_id is None:
            return None
        taken = changed(session, update(WebhookDelivery).where(WebhookDelivery.id == delivery_id, *due).values(
            lease_until=now + timedelta(seconds=lease_seconds(settings)), leased_by=lease)) == 1
        if not taken:  # SQLite: another sender took it between our read and our update
            return None
        row = session.execute(
            select(WebhookDelivery.attempts, Webhook.url, Webhook.secret, WebhookEvent.id, WebhookEvent.body)
            .join(Webhook, Webhook.id == WebhookDelivery.hook_id)
            .join(WebhookEvent, WebhookEvent.id == WebhookDelivery.event_id)
            .where(WebhookDelivery.id == delivery_id)).one()
    return Claimed(id=delivery_id, lease=lease, attempts=row[0], url=row[1], secret=row[2], event_id=row[3],
                   body=row[4])


def _allowed(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def resolve(url: str, *, allow_private: bool) -> str:
    """The address to connect to, resolved now (not when the hook was made) and checked: loopback,
    private, link-local and other non-global addresses are refused unless ``allow_private``."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise Refused(f"cannot resolve {host}: {exc.strerror}") from exc
    addresses = [str(info[4][0]) for info in infos]
    if not allow_private:
        blocked = [a for a in addresses if not _allowed(a)]
        if blocked:  # any one is enough: the connection could land on it
            raise Refused(f"{host} resolves to {blocked[0]}, a private, loopback or link-local address; set "
                          "TUNESERVE_WEBHOOK_ALLOW_PRIVATE=true to deliver there")
    return addresses[0]


def post(*, url: str, secret: str, event_id: str, body: str, settings: Settings) -> int:
    """POST the signed body to the address ``url`` resolves to now; returns the HTTP status."""
    address = resolve(url, allow_private=settings.webhook_allow_private)
    target = httpx.URL(url)
    raw = body.encode()
    headers = {"Content-Type": "application/json", "User-Agent": "tuneserve-webhooks",
               "Host": target.netloc.decode("ascii"), EVENT_ID_HEADER: event_id,
               SIGNATURE_HEADER: sign(secret=secret, timestamp=int(time.time()), body=raw)}
    # Connect to the address we checked (a second lookup could answer differently), while TLS still
    # checks the certificate against the hook's host name.
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    with httpx.Client(timeout=settings.webhook_timeout_seconds, follow_redirects=False, trust_env=False) as client, \
            client.stream("POST", target.copy_with(host=address), content=raw, headers=headers,
                          extensions=extensions) as response:
        read = 0
        for chunk in response.iter_raw():
            read += len(chunk)
            if read >= RESPONSE_READ_BYTES:
                break
        return response.status_code


def finish(*, claimed: Claimed, status_code: int | None, error: str | None,
           settings: Settings) -> DeliveryStatus | None:
    """Record one attempt under our lease; returns the delivery's new status, or None when the lease
    was lost meanwhile (it expired and another sender took the delivery): then nothing changes."""
    attempts = claimed.attempts + 1
    now = utcnow()
    values: dict[str, object] = {"attempts": attempts, "last_status_code": status_code,
                                 "last_error": error[:ERROR_CHARS] if error else None,
                                 "lease_until": None, "leased_by": None}
    next_at: datetime | None = None
    status: DeliveryStatus
    if status_code is not None and 200 <= status_code < 300:
        status = "delivered"
        values["delivered_at"] = now
    elif attempts >= settings.webhook_max_attempts:
        status = "failed"
    else:
        status = "pending"
        next_at = now + timedelta(seconds=backoff_seconds(attempts=attempts, settings=settings))
    with session_scope() as session:
        recorded = changed(session, update(WebhookDelivery).where(
            WebhookDelivery.id == claimed.id, WebhookDelivery.leased_by == claimed.lease
        ).values(status=status, next_attempt_at=next_at, **values)) == 1
    return status if recorded else None


def deliver_one(*, settings: Settings) -> str | None:
    """Claim, send and record one due delivery; None when nothing is due."""
    claimed = claim(settings=settings)
    if claimed is None:
        return None
    status_code, error = None, None
    try:
        status_code = post(url=claimed.url, secret=claimed.secret, event_id=claimed.event_id, body=claimed.body,
                           settings=settings)
        if not 200 <= status_code < 300:
            error = f"the receiver answered HTTP {status_code}"
    except Refused as exc:
        error = str(exc)
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    status = finish(claimed=claimed, status_code=status_code, error=error, settings=settings) or "lease_lost"
    if status != "delivered":
        log.info("webhook delivery %s of event %s: %s (%s)", claimed.id, claimed.event_id, status, error)
    return status


def deliver_due(*, settings: Settings, stop: threading.Event | None = None) -> int:
    """Send until nothing is due (or ``stop`` is set); returns how many attempts were made."""
    made = 0
    while stop is None or not stop.is_set():
        if deliver_one(settings=settings) is None:
            return made
        made += 1
    return made


def prune(*, settings: Settings) -> int:
    """Remove events older than WEBHOOK_RETENTION_DAYS with no delivery still pending (their delivery
    rows go with them); returns how many events went."""
    cutoff = utcnow() - timedelta(days=settings.webhook_retention_days)
    pending = select(WebhookDelivery.id).where(WebhookDelivery.event_id == WebhookEvent.id,
                                               WebhookDelivery.status == "pending")
    with session_scope() as session:
        return changed(session, delete(WebhookEvent).where(WebhookEvent.created_at < cutoff, ~pending.exists()))


def start_sender(settings: Settings | None = None, *, shutdown: threading.Event | None = None) -> threading.Event:
    """``SENDERS`` daemon threads that deliver what is due every ``webhook_poll_seconds``; set the returned
    event (or ``shutdown``) to stop them between deliveries."""
    settings = settings or get_settings()
    stop = threading.Event()
    leaving = shutdown or threading.Event()

    def loop(prunes: bool) -> None:
        pruned = 0.0
        while not stop.wait(settings.webhook_poll_seconds) and not leaving.is_set():
            try:
                deliver_due(settings=settings, stop=leaving)
                if prunes and time.monotonic() - pruned >= PRUNE_SECONDS:
                    pruned = time.monotonic()
                    prune(settings=settings)
            except Exception:
                log.warning("webhook delivery pass failed; retrying next interval", exc_info=True)

    for number in range(SENDERS):
        threading.Thread(target=loop, args=(number == 0,), name=f"webhooks-{number}", daemon=True).start()
    return stop
