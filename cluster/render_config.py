"""Fill the ``${HANDSONVLM_*}`` placeholders of a cluster file from the environment.

    python cluster/render_config.py ray_cluster.yaml > my_cluster.yaml
    python cluster/render_config.py cluster/kuberay/rayjob-train.yaml | kubectl apply -f -

``ray up`` and ``kubectl`` do not expand environment variables, so the cluster files in this
repository name their site-specific values (region, bucket, image, ...) as ``${HANDSONVLM_NAME}``
and this script substitutes them. Unlike a plain ``envsubst`` it touches nothing else (shell
variables such as ``$RAY_HEAD_IP`` in the start commands are meant for the nodes) and it fails,
listing every missing name, instead of silently writing empty strings.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

PLACEHOLDER = re.compile(r"\$\{(HANDSONVLM_[A-Z0-9_]+)\}")


class MissingVariables(KeyError):
    pass


def placeholders(text: str) -> list[str]:
    """The distinct placeholder names in ``text``, in order of first appearance."""
    return list(dict.fromkeys(PLACEHOLDER.findall(text)))


def render(text: str, values: Mapping[str, str]) -> str:
    missing = [name for name in placeholders(text) if not values.get(name)]
    if missing:
        raise MissingVariables(f"set these environment variables first: {', '.join(missing)}")
    return PLACEHOLDER.sub(lambda match: values[match.group(1)], text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("template", type=Path, help="a cluster file with ${HANDSONVLM_*} placeholders")
    parser.add_argument("--list", action="store_true", help="only print the placeholder names it needs")
    args = parser.parse_args(argv)
    text = args.template.read_text()
    if args.list:
        print("\n".join(placeholders(text)))
        return 0
    try:
        sys.stdout.write(render(text, os.environ))
    except MissingVariables as missing:
        print(f"{args.template}: {missing.args[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
