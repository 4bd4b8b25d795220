#!/usr/bin/env python3
"""Fill in a balancer template from this folder (nginx.conf, haproxy.cfg): standard library only.

    python3 deploy/render.py deploy/nginx.conf --listen 0.0.0.0:8080 \\
        --run-dir /run/trioproxy-nginx --instances 127.0.0.1:8801 127.0.0.1:8802 > nginx.conf

A line that names `${TP_SERVER}` is written once per instance, with `${TP_SERVER}` its address
and `${TP_NAME}` `tp1`, `tp2`, ...; everywhere else `${TP_LISTEN}` (where the balancer
listens), `${TP_RUN_DIR}` (pid file, temp folders, logs, stats socket: a folder the balancer's
user can write) and `${TP_USER}` (nginx's worker user when started as root). Any other
`${TP_...}` left over is an error, so a typo cannot reach the balancer.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

_PLACEHOLDER = re.compile(r"\$\{(TP_[A-Z_]+)\}")


def render(template: str, values: dict[str, str], instances: list[str]) -> str:
    if not instances:
        raise ValueError("at least one instance (host:port) is needed")
    out: list[str] = []
    for line in template.splitlines(keepends=True):
        if "${TP_SERVER}" in line:
            for number, address in enumerate(instances, 1):
                each = {**values, "TP_SERVER": address, "TP_NAME": f"tp{number}"}
                out.append(_fill(line, each))
        else:
            out.append(_fill(line, values))
    return "".join(out)


def _fill(line: str, values: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise ValueError(f"no value for ${{{name}}} in: {line.strip()}")
        return values[name]

    return _PLACEHOLDER.sub(one, line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("template", type=Path, help="deploy/nginx.conf or deploy/haproxy.cfg")
    parser.add_argument("--listen", required=True, help="where the balancer listens, HOST:PORT")
    parser.add_argument("--run-dir", required=True, help="pid file, temp folders and logs")
    parser.add_argument(
        "--instances", nargs="+", required=True, metavar="HOST:PORT", help="trioproxy instances"
    )
    parser.add_argument(
        "--user", default="www-data", help="nginx's worker user when started as root (www-data)"
    )
    args = parser.parse_args(argv)
    values = {"TP_LISTEN": args.listen, "TP_RUN_DIR": args.run_dir, "TP_USER": args.user}
    try:
        sys.stdout.write(render(args.template.read_text(), values, args.instances))
    except ValueError as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
