"""``agentd``: administrative commands (tokens, configuration checks, usage reports, keys)."""

from __future__ import annotations

import argparse
import ipaddress
import sys

from agentd.auth import Authenticator
from agentd.config import USER_RE, ConfigError, load
from agentd.endpoints import parse_endpoint, socket_address


def _token(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="agentd token", description="Mint a JWT signed with the configured jwt_secret."
    )
    parser.add_argument("--user", required=True, help="user id (the sub claim)")
    parser.add_argument(
        "--project",
        action="append",
        required=True,
        help='project id the token covers (repeatable; "*" for all)',
    )
    parser.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (3600)")
    parser.add_argument("--admin", action="store_true", help='add the claim role: "admin"')
    parser.add_argument("--config", help="agentd.toml (default: embedded defaults)")
    args = parser.parse_args(argv)
    if not USER_RE.fullmatch(args.user):
        parser.error("--user: letters, digits and _.@+- only, at most 128 characters")
    if args.ttl <= 0:
        parser.error("--ttl must be positive")
    config = load(args.config)
    if not config.auth.jwt_secret:
        print(
            "agentd token: no jwt_secret configured (set [auth] jwt_secret or AGENTD_JWT_SECRET)",
            file=sys.stderr,
        )
        return 2
    authenticator = Authenticator.from_config(config.auth)
    longest = authenticator.max_lifetime_seconds
    if longest and args.ttl > longest:
        print(
            f"agentd token: --ttl {args.ttl} is longer than "
            f"[auth] max_token_lifetime_seconds ({longest:g}); agentd would refuse the token",
            file=sys.stderr,
        )
        return 2
    role = "admin" if args.admin else None
    print(authenticator.mint(args.user, args.project, ttl=args.ttl, role=role))
    return 0


def _check_config(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="agentd check-config", description="Validate an agentd.toml without starting."
    )
    parser.add_argument("path")
    args = parser.parse_args(argv)
    config = load(args.path)
    if config.auth.jwt_secret or config.auth.jwt_public_key_file:
        Authenticator.from_config(config.auth)
    exposed = [e for e in config.server.listen if beyond_loopback(e)]
    if exposed and not config.server.allowed_origins:
        print(
            f"{args.path}: warning: [server] allowed_origins is empty and agentd listens on "
            f"{exposed[0]}, beyond loopback: any origin whose name resolves to this host "
            "passes the same-host check (DNS rebinding); list your web app's origins",
            file=sys.stderr,
        )
    print(
        f"{args.path}: ok ({config.vms.transport} transport, agents: "
        f"{', '.join(config.agents.names)})"
    )
    return 0


def beyond_loopback(endpoint: str) -> bool:
    """Whether a listen endpoint may accept connections from other hosts.

    Unix sockets do not; tcp, tcp6 and ssl do unless their interface is a loopback address
    (none means every address); any other kind of endpoint is assumed to.
    """
    if parse_endpoint(endpoint)[0] == "unix":
        return False
    address = socket_address(endpoint)
    if address is None:
        return True
    interface = address.interface
    if interface == "localhost":
        return False
    try:
        return not ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return True


COMMANDS = {
    "token": ("mint a JWT for a user and projects", _token),
    "check-config": ("validate a configuration file", _check_config),
    "usage": ("print a user's or project's monthly usage", None),
    "keys": ("manage stored provider keys (rotate the encryption key)", None),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = ["usage: agentd COMMAND [options]", "", "commands:"]
        lines += [f"  {name:<13} {summary}" for name, (summary, _) in COMMANDS.items()]
        print("\n".join(lines), file=sys.stderr if argv else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "usage":
            from agentd.usage.cli import usage_report_main

            return usage_report_main(rest)
        if command == "keys":
            from agentd.keys.cli import keys_main

            return keys_main(rest)
        handler = COMMANDS[command][1]
        assert handler is not None
        return handler(rest)
    except ConfigError as e:
        print(f"agentd {command}: configuration error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
