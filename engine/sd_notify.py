"""The sd_notify protocol without a dependency: datagrams to the Unix socket systemd names in NOTIFY_SOCKET.

systemd (Type=notify) sets NOTIFY_SOCKET to a socket path, or to an abstract name written with a leading '@'.
Each message is one datagram of newline-separated `KEY=VALUE` lines: READY=1 once the service serves,
WATCHDOG=1 at least every WatchdogSec, STOPPING=1 on the way out, STATUS=... for `systemctl status`.

Outside systemd (NOTIFY_SOCKET unset) the notifier is a no-op, so callers never branch on it. A failed send is
logged and otherwise ignored, as libsystemd's sd_notify does: the service must not die because nobody listens.

It lives in the engine because both the bot (bot/systemd_notify.py) and a worker run as its own unit
(engine/backends/local/serving.py, flux-bot-worker@.service) use it, and the engine never imports the bot.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify messages to one socket address; with no address, every call does nothing."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        """The notifier for NOTIFY_SOCKET in `env` (os.environ by default); a no-op one when it is unset or empty."""
        env = os.environ if env is None else env
        return cls(env.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send one message made of `lines` (each `KEY=VALUE`); True when the datagram went out."""
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(lines).encode(), target)
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.address, exc)
            return False
        return True

    def ready(self) -> bool:
        return self.notify("READY=1")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        # One line: a newline would start a new KEY=VALUE field.
        return self.notify("STATUS=" + " ".join(text.splitlines()))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval_s(env: Mapping[str, str] | None = None) -> float | None:
    """Half of WATCHDOG_USEC in seconds, as systemd recommends; None when no watchdog is asked of this process."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) <= 0:
        return None
    if pid.isdigit() and int(pid) != os.getpid():
        return None  # the watchdog belongs to another process (e.g. our parent)
    return int(usec) / 2_000_000
