"""Who may send: calling AE titles, each optionally bound to hosts or networks."""

import ipaddress
import re
import socket

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class CallerPolicy:
    """`allowed` maps a calling AE title to the hosts it may call from: IP
    addresses, CIDR ranges or host names (resolved when the policy is built); an
    empty list means from anywhere. An empty mapping lets every caller in."""

    def __init__(self, allowed: dict[str, list[str]]):
        self._rules = {
            title.strip(): [network for host in hosts for network in _networks(host)]
            for title, hosts in allowed.items()
        }

    def permits(self, calling_ae: str, address: str) -> bool:
        if not self._rules:
            return True
        networks = self._rules.get(calling_ae.strip())
        if networks is None:
            return False
        if not networks:
            return True
        ip = ipaddress.ip_address(address.split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in network for network in networks)


_HOST_NAME = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.?"
)


def check_callers(allowed: dict[str, list[str]]) -> None:
    """ValueError for an entry that cannot be a host: the shape only, no lookup,
    so the admin commands, which read the same config, never wait on DNS.
    `serve` resolves the names when it builds its CallerPolicy."""
    for hosts in allowed.values():
        for host in hosts:
            try:
                ipaddress.ip_network(host, strict=False)
            except ValueError:
                if not _HOST_NAME.fullmatch(host) or len(host) > 253:
                    raise ValueError(
                        f"{host!r} is neither an address, a network nor a host name"
                    ) from None


def _networks(host: str) -> list[Network]:
    try:
        return [ipaddress.ip_network(host, strict=False)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise ValueError(f"{host!r} is neither an address, a network nor a known host") from exc
    return sorted({ipaddress.ip_network(info[4][0]) for info in infos}, key=str)


def parse_caller_flag(value: str) -> tuple[str, list[str]]:
    """`AE` or `AE@host[,host...]`, as the --allowed-callers flag takes it."""
    title, _, hosts = value.partition("@")
    return title.strip(), [h.strip() for h in hosts.split(",") if h.strip()]
