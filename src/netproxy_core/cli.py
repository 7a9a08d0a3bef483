"""`netproxy-core`: serve / run / check / ca init (SPEC §12).

User mistakes (bad flags, configs, hooks) end with exit status 2 and exactly one line on
stderr, ``netproxy-core: error: …`` — never a traceback or a usage dump.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from . import __version__
from .errors import NetproxyError

if TYPE_CHECKING:
    from .config.model import ProxyConfig

# Only what parsing the command line needs is imported up front: `serve` binds its HTTP
# listener from the flags before the configuration machinery (or anything else) loads.

__all__ = ["main"]

PROG = "netproxy-core"


class UsageError(Exception):
    """A command-line mistake: one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _add_config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="F",
        help="TOML config layer (repeatable; later wins)",
    )
    p.add_argument(
        "--profile", metavar="P", help="profile to select (default: default_permissions, else full)"
    )
    p.add_argument("--mode", choices=["full", "limited"], help="override the profile's mode")
    p.add_argument("--allow", action="append", default=[], metavar="PAT", help="add an allow entry")
    p.add_argument("--deny", action="append", default=[], metavar="PAT", help="add a deny entry")
    p.add_argument(
        "--allow-local-binding",
        action="store_true",
        default=None,
        help="allow loopback/private destinations without exact allow entries",
    )
    p.add_argument("--mitm", action="store_true", default=None, help="intercept every TLS tunnel")
    p.add_argument(
        "--route",
        action="append",
        default=[],
        metavar="HOST[:PORT]=IP:PORT",
        help="send a destination to another address (policy still judges HOST)",
    )
    p.add_argument(
        "--resolve",
        action="append",
        default=[],
        metavar="NAME=IP[,IP]",
        help="static name resolution (answers are still checked)",
    )
    p.add_argument(
        "--upstream-ca",
        action="append",
        default=[],
        metavar="F",
        help="extra root CA file trusted for outbound TLS",
    )


def _add_serve_options(p: argparse.ArgumentParser) -> None:
    _add_config_options(p)
    p.add_argument("--http-addr", metavar="A", help="HTTP listener address (port 0 = ephemeral)")
    socks = p.add_mutually_exclusive_group()
    socks.add_argument("--socks-addr", metavar="A", help="SOCKS5 listener address")
    socks.add_argument("--no-socks5", action="store_true", help="do not start the SOCKS5 listener")
    p.add_argument("--admin-addr", metavar="A", help="admin API address (off unless given)")
    p.add_argument(
        "--audit-log", metavar="F|-", help="append audit events as JSON lines ('-' = stdout)"
    )
    p.add_argument(
        "--otel",
        action="store_true",
        default=None,
        help="export audit events as OpenTelemetry log records (needs the otel extra)",
    )
    p.add_argument(
        "--home", metavar="DIR", help="state directory (default $NETPROXY_HOME or ~/.netproxy)"
    )
    p.add_argument("--ready-file", metavar="F", help="also write the ready JSON line to this file")
    p.add_argument(
        "--log-level",
        default="info",
        type=str.lower,
        choices=["debug", "info", "warning", "error", "critical"],
        help="log level for stderr",
    )


_DESCRIPTION = "Put every network request a program makes under a policy."
# command -> help line in the top-level listing
_COMMANDS: dict[str, str] = {
    "serve": "run the proxy until SIGINT/SIGTERM",
    "run": "run a command behind a fresh proxy",
    "check": "evaluate the policy for a host without traffic",
    "ca": "manage a persistent MITM CA",
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=_DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for command, help_line in _COMMANDS.items():
        _add_command_options(command, sub.add_parser(command, help=help_line))
    return parser


def command_parser(command: str) -> argparse.ArgumentParser:
    """The parser of one command alone: what `build_parser` hands the arguments after it.

    `main` uses it when the command comes first, so `serve` builds one parser, not six.
    """
    parser = _Parser(prog=f"{PROG} {command}")
    parser.set_defaults(command=command)
    _add_command_options(command, parser)
    return parser


def _add_command_options(command: str, p: argparse.ArgumentParser) -> None:
    if command in ("serve", "run"):
        _add_serve_options(p)
    if command == "run":
        p.add_argument(
            "--isolate", action="store_true", help="Linux: CMD's only way out is the proxy"
        )
        p.add_argument(
            "--socks", action="store_true", help="also put a socks5h:// URL in ALL_PROXY"
        )
        p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD", help="the command to run")
    elif command == "check":
        from .policy.model import Protocol

        _add_config_options(p)
        p.add_argument("--method", help="HTTP method (default GET, CONNECT for https_connect)")
        p.add_argument(
            "--protocol",
            default="http",
            choices=[str(protocol) for protocol in Protocol],
            help="protocol to evaluate (default http)",
        )
        p.add_argument("target", metavar="HOST[:PORT]")
    elif command == "ca":
        ca_sub = p.add_subparsers(dest="ca_command", metavar="ACTION", parser_class=_Parser)
        ca_sub.required = True
        init = ca_sub.add_parser("init", help="write DIR/ca.pem and DIR/ca.key (0600)")
        init.add_argument("dir", metavar="DIR")


# --- config from flags ----------------------------------------------------------------------


def config_from_args(args: argparse.Namespace) -> ProxyConfig:
    """Files and profile, then the flag overlay (flags beat the profile, SPEC §2.1)."""
    import dataclasses

    from .config.loader import load_config
    from .config.model import Access, Mode

    config = load_config(args.config, profile=args.profile)
    changes: dict[str, Any] = {}
    if args.mode:
        changes["mode"] = Mode(args.mode)
    if args.allow or args.deny:
        domains = [(p, a) for p, a in config.domains]
        for pattern, access in [(p, Access.ALLOW) for p in args.allow] + [
            (p, Access.DENY) for p in args.deny
        ]:
            domains = [(p, a) for p, a in domains if p != pattern]
            domains.append((pattern, access))
        changes["domains"] = tuple(domains)
    if args.allow_local_binding:
        changes["allow_local_binding"] = True
    if args.mitm:
        changes["mitm"] = type(config.mitm)(
            enabled=True, hooks=config.mitm.hooks, actions=config.mitm.actions, ca=config.mitm.ca
        )
    if args.route:
        changes["routes"] = config.routes + tuple(_parse_route_flag(r) for r in args.route)
    if args.resolve:
        changes["hosts"] = config.hosts + tuple(_parse_resolve_flag(r) for r in args.resolve)
    if args.upstream_ca:
        changes["upstream_ca_files"] = config.upstream_ca_files + tuple(args.upstream_ca)
    for flag, key in (
        ("http_addr", "proxy_url"),
        ("socks_addr", "socks_url"),
        ("admin_addr", "admin_url"),
        ("audit_log", "audit_log"),
    ):
        if getattr(args, flag, None):
            changes[key] = getattr(args, flag)
    if getattr(args, "no_socks5", False):
        changes["enable_socks5"] = False
    elif getattr(args, "socks_addr", None):
        changes["enable_socks5"] = True  # the flag beats a profile that turned SOCKS off
    if getattr(args, "otel", None):
        changes["otel"] = dataclasses.replace(config.otel, enabled=True)
    return config.with_changes(**changes) if changes else config


def _parse_route_flag(text: str) -> tuple[str, str]:
    target, sep, dest = text.partition("=")
    if not sep:
        raise UsageError(f"--route {text!r}: expected HOST[:PORT]=IP:PORT")
    from .config.schema import route_entry

    try:
        return route_entry(target, dest)
    except ValueError as exc:
        raise UsageError(f"--route {text!r}: {target!r} {exc}") from None


def _parse_resolve_flag(text: str) -> tuple[str, tuple[str, ...]]:
    name, sep, ips = text.partition("=")
    if not sep or not ips:
        raise UsageError(f"--resolve {text!r}: expected NAME=IP[,IP]")
    from .config.schema import hosts_entry

    try:
        return hosts_entry(name, ips.split(","))
    except ValueError as exc:
        raise UsageError(f"--resolve {text!r}: {name!r} {exc}") from None


# --- commands -----------------------------------------------------------------------------


def _setup_logging(level: str) -> None:
    import logging

    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper()),
        format="netproxy: %(levelname)s %(message)s",
    )
    logging.getLogger("netproxy.audit").setLevel(logging.WARNING)


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import bind_flag_http, serve_forever

    # A loopback --http-addr is where the HTTP listener binds whatever the configuration says
    # (flags win): bind it now, so the port accepts while everything else loads. Any problem
    # below closes it again; connections queued meanwhile are served once the engine is up.
    early_http = bind_flag_http(args.http_addr)
    try:
        _setup_logging(args.log_level)
        config = config_from_args(args)
        if not config.enabled:
            print(
                f"{PROG}: the proxy is disabled (enabled = false in profile {config.profile}); "
                "nothing to serve",
                file=sys.stderr,
            )
            return 0
        notice = None
        if not config.allowed_patterns:
            notice = (
                f"{PROG}: profile {config.profile!r} allows no host yet: every request will be "
                "blocked until you add --allow PATTERN or allow entries in a config file"
            )
        # The notice is printed once listening, so a start-up error stays the only stderr line.
        return serve_forever(
            config,
            args,
            reload=lambda: config_from_args(args),
            notice=notice,
            early_http=early_http,
        )
    finally:
        if early_http is not None:
            early_http.close()  # a no-op once the engine has adopted and closed it


def cmd_check(args: argparse.Namespace) -> int:
    import json
    import logging

    from .errors import InvalidHost
    from .hosts import split_host_port
    from .policy.model import NetworkPolicyRequest, Protocol
    from .proxy import NetworkProxy

    logging.basicConfig(
        stream=sys.stderr, level=logging.WARNING, format="netproxy: %(levelname)s %(message)s"
    )
    logging.getLogger("netproxy.audit").setLevel(logging.WARNING)
    config = config_from_args(args)
    protocol = Protocol(args.protocol)
    default_port = 443 if protocol in (Protocol.HTTPS_CONNECT, Protocol.HTTPS) else 80
    try:
        host, port = split_host_port(args.target)
    except InvalidHost:
        host, port = args.target, None
    port = default_port if port is None else port
    method = args.method or (
        "CONNECT"
        if protocol is Protocol.HTTPS_CONNECT
        else None
        if protocol in (Protocol.SOCKS5_TCP, Protocol.SOCKS5_UDP)
        else "GET"
    )

    async def evaluate() -> dict[str, Any]:
        # The configuration as `serve` would build it (hooks compiled, a `mitm.ca` loaded), so
        # a bad hook or CA is a config error here too; only the event outputs are left off.
        proxy = NetworkProxy(config.with_changes(audit_log=None, otel=type(config.otel)()))
        decision = await proxy.evaluate(NetworkPolicyRequest(protocol, host, port, method))
        shown = proxy.events()[-1].host if proxy.events() else host
        return {
            "decision": str(decision.decision),
            "reason": str(decision.reason),
            "source": str(decision.source),
            "host": shown,
            "port": port,
            "protocol": str(protocol),
            "method": method,
        }

    import anyio

    result = anyio.run(evaluate)
    print(json.dumps(result))
    return 0 if result["decision"] == "allow" else 1


def cmd_ca_init(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .certs import CertificateAuthority

    ca = CertificateAuthority.generate()
    cert, key = ca.write_pair(Path(args.dir))
    print(json.dumps({"certificate_file": str(cert), "private_key_file": str(key)}))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .run import run_command

    _setup_logging(args.log_level if args.log_level != "info" else "warning")
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("run needs a command after --")
    status: int = run_command(config_from_args(args), args, cmd)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `netproxy-core` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in _COMMANDS:
            args = command_parser(argv[0]).parse_args(argv[1:])
        else:
            args = build_parser().parse_args(argv)
        command = args.command
        if command == "serve":
            return cmd_serve(args)
        if command == "check":
            return cmd_check(args)
        if command == "ca":
            return cmd_ca_init(args)
        return cmd_run(args)
    except (UsageError, NetproxyError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
